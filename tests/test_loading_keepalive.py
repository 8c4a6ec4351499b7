"""A streamed request for a model that must start first: the SSE head and keep-alive comments
at once and during the load (router/forward/loading_stream.py), then the engine's stream; failures become an
error event. Real router, worker and mock engine (``--startup-delay 2``, keep-alive 0.5 s)."""

from __future__ import annotations

import json
import re
import sys
import uuid
from dataclasses import dataclass

import openai
import pytest
from conftest import wait_for
from helpers import (
    Router,
    SseStream,
    chat_body,
    model_block,
    request,
    start_router,
    start_worker,
    wait_models,
    wait_status,
    write_config,
)

LAZY = model_block("lazy", engine_args=["--startup-delay", "2"])
SLOW = model_block("slow", engine_args=["--startup-delay", "120"])  # loads for as long as a test needs
BROKEN = model_block("broken", restart="no", command=[sys.executable, "-c", "import sys; sys.exit('no GPU here')"])


@dataclass
class Cluster:
    router: Router

    def url(self, path: str) -> str:
        return self.router.url + path


@pytest.fixture
def cluster(procs, redis_url, tmp_path) -> Cluster:
    config = write_config(tmp_path / "models.toml", LAZY, BROKEN, SLOW)
    start_worker(procs, redis_url, config, f"w-{uuid.uuid4().hex[:8]}")
    router = start_router(procs, redis_url, env={"LLM_ROUTER_LOADING_KEEPALIVE": "0.5"})
    wait_models(router, 3)
    return Cluster(router)


def test_streamed_request_gets_the_head_and_comments_while_the_model_loads(cluster: Cluster) -> None:
    stream = SseStream(cluster.url("/v1/chat/completions"), method="POST",
                       body=chat_body("lazy", stream=True, max_tokens=3), timeout=30)
    try:
        assert stream.status == 200
        assert stream.headers["Content-Type"] == "text/event-stream"
        assert stream.headers["Cache-Control"] == "no-cache" and stream.headers["X-Accel-Buffering"] == "no"
        events = stream.events_until(lambda ev: ev.get("data") == "[DONE]")
    finally:
        stream.close()
    comments = [ev for ev in events if "comment" in ev]
    first_data = next(i for i, ev in enumerate(events) if "data" in ev)
    assert len(comments) >= 2 and comments[0] == {"comment": "loading model 'lazy'"}
    # later ones say why it waits: the model is starting (router/control/explain.py)
    prefix = "loading model 'lazy' "
    assert all(c["comment"].startswith(prefix) for c in comments[1:])
    assert all(json.loads(c["comment"][len(prefix):])["kind"] == "starting" for c in comments[1:])
    assert events[:first_data] == comments  # every comment came before the first chunk
    chunks = [ev["data"] for ev in events[first_data:]]
    assert chunks[-1] == "[DONE]" and all(c["object"] == "chat.completion.chunk" for c in chunks[:-1])
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1] if c["choices"])


def test_engine_error_during_a_load_is_an_error_event(cluster: Cluster) -> None:
    """The engine answers 400 (after the head went out): one OpenAI-shaped error event, then the end."""
    body = {"model": "lazy", "stream": True, "messages": "not a list"}
    stream = SseStream(cluster.url("/v1/chat/completions"), method="POST", body=body, timeout=30)
    try:
        assert stream.status == 200
        events = [ev for ev in stream.events_until(lambda ev: False) if "data" in ev]
    finally:
        stream.close()
    assert len(events) == 1
    error = events[0]["data"]["error"]
    assert error["type"] == "invalid_request_error" and error["message"]


def test_openai_sdk_streams_through_the_load_and_raises_on_a_failed_start(cluster: Cluster) -> None:
    with openai.OpenAI(base_url=cluster.url("/v1"), api_key="sk-test", max_retries=0, timeout=30) as client:
        chunks = list(client.chat.completions.create(model="lazy", max_tokens=4, stream=True,
                                                     messages=[{"role": "user", "content": "hi"}]))
        assert chunks and "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        with pytest.raises(openai.APIError, match="could not be started") as failed:
            list(client.chat.completions.create(model="broken", stream=True,
                                                messages=[{"role": "user", "content": "hi"}]))
        assert not isinstance(failed.value, openai.APIStatusError)  # raised by the stream's error event


def test_non_streamed_request_waits_silently_for_plain_json(cluster: Cluster) -> None:
    resp = request("POST", cluster.url("/v1/chat/completions"), chat_body("lazy", max_tokens=2), timeout=30)
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("application/json")
    assert resp.json()["object"] == "chat.completion"
    failed = request("POST", cluster.url("/v1/chat/completions"), chat_body("broken"), timeout=30)
    assert failed.status == 503 and failed.json()["error"]["code"] == "model_start_failed"


def test_failed_start_ends_the_stream_with_an_error_event(cluster: Cluster) -> None:
    stream = SseStream(cluster.url("/v1/chat/completions"), method="POST", body=chat_body("broken", stream=True),
                       timeout=20)
    try:
        assert stream.status == 200 and stream.event() == {"comment": "loading model 'broken'"}
        events = [ev for ev in stream.events_until(lambda ev: False) if "data" in ev]  # to the end: no hang
    finally:
        stream.close()
    assert len(events) == 1
    error = events[0]["data"]["error"]
    assert error["code"] == "model_start_failed" and "no GPU here" in error["message"]


def test_client_that_leaves_during_the_load_does_not_stop_the_start(cluster: Cluster) -> None:
    stream = SseStream(cluster.url("/v1/chat/completions"), method="POST", body=chat_body("lazy", stream=True))
    assert stream.event() == {"comment": "loading model 'lazy'"}
    stream.close()
    wait_status(cluster.router, "lazy", "running", timeout=20)
    resp = request("POST", cluster.url("/v1/chat/completions"), chat_body("lazy", stream=True, max_tokens=1))
    assert resp.status == 200 and b": loading" not in resp.body and resp.body.endswith(b"data: [DONE]\n\n")


def in_flight(cluster: Cluster, model: str) -> float:
    text = request("GET", cluster.url("/metrics")).body.decode()
    found = re.search(rf'^llm_router_requests_in_flight{{model="{model}"}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def test_a_request_waiting_for_its_model_to_start_is_in_flight(cluster: Cluster) -> None:
    """The in-flight gauge counts the on-demand start wait (docs/metrics.md says why)."""
    stream = SseStream(cluster.url("/v1/chat/completions"), method="POST", body=chat_body("slow", stream=True),
                       timeout=30)
    try:
        assert stream.event() == {"comment": "loading model 'slow'"}  # waiting for the start
        wait_for(lambda: in_flight(cluster, "slow") == 1, message="the waiting request in the gauge")
    finally:
        stream.close()
    wait_for(lambda: in_flight(cluster, "slow") == 0, message="the gauge once the client left")
    assert request("POST", cluster.url("/api/models/slow/stop"), timeout=30).status == 200
