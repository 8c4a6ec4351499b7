"""``GET /metrics`` (Prometheus) and the access log of forwarded requests, through a real router
process in front of a real mock engine; the cluster gauges come from keys ``FakeWorker`` wrote."""

from __future__ import annotations

import json
import re
import uuid

import pytest
from conftest import wait_for
from helpers import FakeWorker, SseStream, chat_body, request, start_router, wait_engine, wait_routable
from llm_lab_router.protocol import CatalogEntry, CpuInfo, CudaInfo, DeviceSnapshot, GpuInfo, to_json
from llm_lab_router.router.observe.accesslog import RequestRecord, usage_from_tail
from llm_lab_router.router.observe.metrics import route_label

CHAT = CatalogEntry(id="chat", aliases=["chat", "gpt-3.5-turbo"], mode="chat", on_demand=False)
SECRET_PROMPT = "purple-elephant-prompt-text"
SECRET_KEY = "sk-secret-key-9f8e7d"


def metric(text: str, name: str, /, **labels: str) -> float | None:
    """The value of the sample ``name{labels...}`` (label order free), None if absent."""
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            return float(m.group(3))
    return None


@pytest.fixture
def routed(procs, redis_url, rds, mock_engine):
    wid = f"w-{uuid.uuid4().hex[:8]}"
    fake = FakeWorker(rds, wid)
    rds.set(fake.keys.devices(wid), to_json(DeviceSnapshot(
        worker=wid, host="gpuhost", ts=1.0, cpu=CpuInfo(memory_total=1000, memory_used=400),
        cuda=CudaInfo(online=True, gpus=[GpuInfo(index=0, name="H100", memory_total=80000, memory_used=1234,
                                                 utilization=50)]))))
    fake.publish(CHAT)
    router = start_router(procs, redis_url)
    _, url = mock_engine("--quiet", model="chat")
    wait_engine(url)
    fake.instance("chat", "running", url, restarts=2)
    wait_routable(router, "chat")
    return router, wid


def test_metrics_count_requests_per_model_with_latency_histograms(routed) -> None:
    router, wid = routed
    for _ in range(3):
        assert request("POST", f"{router.url}/v1/chat/completions", chat_body("gpt-3.5-turbo", max_tokens=4)).status == 200
    assert request("POST", f"{router.url}/v1/chat/completions", chat_body("nope")).status == 404
    stream = SseStream(f"{router.url}/v1/chat/completions", method="POST",
                       body=chat_body("chat", stream=True, max_tokens=3, stream_options={"include_usage": True}))
    stream.events_until(lambda ev: ev.get("data") == "[DONE]")
    stream.close()

    def counted() -> str | None:
        resp = request("GET", f"{router.url}/metrics")
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
        text = resp.body.decode()
        ok = metric(text, "llm_router_requests_total", model="chat", route="/v1/chat/completions", status="200")
        return text if ok == 4 else None

    # the stream's request is counted when its handler finishes, just after [DONE] went out
    text = wait_for(counted, timeout=5, message="4 requests counted")
    assert metric(text, "llm_router_requests_total", model="", route="/v1/chat/completions", status="404") == 1
    assert metric(text, "llm_router_request_duration_seconds_count", model="chat") == 4
    assert metric(text, "llm_router_request_duration_seconds_bucket", model="chat", le="+Inf") == 4
    assert metric(text, "llm_router_time_to_first_token_seconds_count", model="chat") == 1  # the stream only
    assert metric(text, "llm_router_requests_in_flight", model="chat") == 0
    # usage: 3 x 4 completion tokens (JSON bodies) + 3 (the stream's usage chunk)
    assert metric(text, "llm_router_tokens_total", model="chat", kind="completion") == 15
    # the cluster as the router's view holds it
    assert metric(text, "llm_router_instances", model="chat", worker=wid, state="running") == 1
    assert metric(text, "llm_router_instance_restarts", model="chat", worker=wid) == 2
    assert metric(text, "llm_router_worker_up", worker=wid, host="testhost") == 1
    assert metric(text, "llm_router_gpu_memory_used_bytes", worker=wid, host="gpuhost", gpu="0",
                  name="H100") == 1234 * 1024 * 1024


def test_access_log_line_has_the_fields_and_no_prompt_or_key(procs, routed) -> None:
    router, wid = routed
    resp = request("POST", f"{router.url}/v1/chat/completions",
                   chat_body("chat", max_tokens=5, messages=[{"role": "user", "content": SECRET_PROMPT}]),
                   headers={"Authorization": f"Bearer {SECRET_KEY}"})
    assert resp.status == 200

    def line() -> dict | None:
        for raw in procs.log(router.proc).splitlines():
            if raw.startswith("router.access ") and '"/v1/chat/completions"' in raw:
                return json.loads(raw.split(" ", 1)[1])
        return None

    entry = wait_for(line, timeout=5, message="the access log line")
    assert entry["model"] == "chat" and entry["worker"] == wid and entry["status"] == 200
    assert entry["method"] == "POST" and entry["ms"] > 0 and entry["ttfb_ms"] > 0
    assert (entry["prompt_tokens"], entry["completion_tokens"]) == (1, 5)  # mock: prompt tokens are words
    log = procs.log(router.proc)
    assert SECRET_PROMPT not in log and SECRET_KEY not in log


def test_usage_is_read_from_the_end_of_json_and_streams() -> None:
    body = b'{"choices":[{"message":{"content":"say \\"prompt_tokens\\": 99"}}],"usage":{"prompt_tokens":3,' \
           b'"completion_tokens":7,"total_tokens":10,"prompt_tokens_details":{"cached_tokens":1}}}'
    usage = usage_from_tail(body)
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (3, 7, 10)
    stream_end = b'data: {"choices":[],"usage":{"prompt_tokens":2,"completion_tokens":1,"total_tokens":3}}\n\n' \
                 b'data: [DONE]\n\n'
    assert usage_from_tail(stream_end).completion_tokens == 1  # type: ignore[union-attr]
    assert usage_from_tail(b'data: {"choices":[],"usage":null}\n\ndata: [DONE]\n\n') is None
    rec = RequestRecord("POST", "/v1/chat/completions", 0.0)
    rec.chunk(b'x' * 10 + b'"usage":{"prompt_tokens":')
    rec.chunk(b'1,"completion_tokens":2}}')
    assert usage_from_tail(rec.recent()).completion_tokens == 2  # type: ignore[union-attr]
    assert route_label("/v1/chat/completions/") == "/v1/chat/completions" and route_label("/v1/x/y") == "other"
