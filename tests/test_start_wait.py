"""The router waits for a start as long as the model's own ``startup_timeout`` allows (plus a
margin), not only its own ``start_timeout``: a model that loads longer than the router's limit
comes up and is served, and a streamed request keeps getting keep-alive comments meanwhile.
Real router, worker and mock engine; the router's limit is cut to 1 s, the engine loads 3 s."""

from __future__ import annotations

import uuid

import pytest
from helpers import SseStream, chat_body, model_block, request, start_router, start_worker, wait_models, write_config
from llm_lab_router.protocol import CatalogEntry
from llm_lab_router.router.control.client import START_MARGIN, start_wait

SLOW = ["--startup-delay", "3"]


def test_start_wait_is_the_longest_model_timeout_plus_margin():
    entries = [CatalogEntry(id="m", startup_timeout=600.0), CatalogEntry(id="m", startup_timeout=120.0)]
    assert start_wait(300.0, entries) == 600.0 + START_MARGIN
    assert start_wait(300.0, [CatalogEntry(id="m", startup_timeout=60.0)]) == 300.0  # the router's, if longer
    assert start_wait(300.0, [CatalogEntry(id="m")]) == 300.0  # a worker that does not say


@pytest.fixture
def router(procs, redis_url, tmp_path):
    config = write_config(tmp_path / "models.toml", model_block("slow", engine_args=SLOW),
                          model_block("slow-streamed", engine_args=SLOW), model_block("slow-api", engine_args=SLOW))
    start_worker(procs, redis_url, config, f"w-{uuid.uuid4().hex[:8]}")
    router = start_router(procs, redis_url,
                          env={"LLM_ROUTER_START_TIMEOUT": "1", "LLM_ROUTER_LOADING_KEEPALIVE": "0.5"})
    wait_models(router, 3)
    return router


def test_a_start_longer_than_the_router_timeout_is_waited_for(router):
    resp = request("POST", router.url + "/v1/chat/completions", chat_body("slow", max_tokens=2), timeout=30)
    assert resp.status == 200, resp.body
    assert resp.seconds > 2.5 and resp.json()["object"] == "chat.completion"

    api = request("POST", router.url + "/api/models/slow-api/start", timeout=30)
    assert api.status == 200, api.body

    stream = SseStream(router.url + "/v1/chat/completions", method="POST",
                       body=chat_body("slow-streamed", stream=True, max_tokens=2), timeout=30)
    try:
        events = stream.events_until(lambda ev: ev.get("data") == "[DONE]")
    finally:
        stream.close()
    comments = [ev for ev in events if "comment" in ev]
    assert len(comments) >= 4  # one at once, then every 0.5 s of the 3 s load
    assert events[-1] == {"data": "[DONE]"} and not any("error" in str(ev.get("data")) for ev in events)
