"""Prefix-affinity routing and model fallbacks through real routers and real mock engines.

The workers' keys are written by ``FakeWorker`` (one per replica), so each test says which
engine runs where; which instance served is read from ``X-Router-Worker`` and from the engines'
own counters (``/debug/stats``).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import Counter

import pytest
from conftest import wait_for
from helpers import (
    FakeWorker,
    SseStream,
    chat_body,
    engine_stats,
    get_json,
    model_block,
    request,
    start_router,
    start_worker,
    wait_engine,
    wait_models,
    wait_routable,
    write_config,
)
from llm_lab_router.protocol import CatalogEntry
from llm_lab_router.redis_server import free_port
from test_metrics import metric

SYSTEM = {"role": "system", "content": "You are a patient assistant. " * 50}


def conversation(turns: int, topic: str) -> list[dict]:
    """The messages of turn ``turns`` of a conversation about ``topic``."""
    msgs = [SYSTEM]
    for t in range(turns):
        msgs.append({"role": "user", "content": f"{topic}: question {t}"})
        if t < turns - 1:
            msgs.append({"role": "assistant", "content": f"answer {t}"})
    return msgs


def replicas(procs, rds, mock_engine, model: str, n: int, *engine_args: str, **entry) -> dict[str, str]:
    """``n`` fake workers, each with a running mock engine of ``model``: worker id -> engine URL."""
    out = {}
    for i in range(n):
        fake = FakeWorker(rds, f"w{os.getpid()}-{i}")
        fake.publish(CatalogEntry(id=model, aliases=[model], on_demand=False, **entry))
        _, url = mock_engine("--quiet", *engine_args, model=model)
        wait_engine(url)
        fake.instance(model, "running", url)
        out[fake.wid] = url
    return out


def wait_instances(router, model: str, count: int) -> None:
    def running() -> int:
        card = next((m for m in get_json(f"{router.url}/v1/models")["data"] if m["id"] == model), {})
        return sum(i["state"] == "running" for i in card.get("instances", []))
    wait_for(lambda: running() == count, message=f"{count} running instances of {model}")


def ask(router, model: str, messages: list[dict], **extra) -> tuple[str, dict]:
    resp = request("POST", f"{router.url}/v1/chat/completions",
                   {"model": model, "messages": messages, "max_tokens": 2, **extra})
    assert resp.status == 200, resp.body
    return resp.headers["X-Router-Worker"], resp.headers


def test_two_routers_send_every_turn_of_a_conversation_to_the_same_instance(procs, redis_url, rds,
                                                                            mock_engine) -> None:
    engines = replicas(procs, rds, mock_engine, "chat", 3)
    a, b = start_router(procs, redis_url), start_router(procs, redis_url)
    for r in (a, b):
        wait_instances(r, "chat", 3)
    homes = {}
    for c in range(12):
        topic = f"conversation {c}"
        served = {ask(r, "chat", conversation(turn, topic))[0] for turn in (1, 2, 3) for r in (a, b)}
        assert len(served) == 1, (topic, served)  # both routers, every turn: one instance
        homes[topic] = served.pop()
    assert len(set(homes.values())) >= 2, homes  # different conversations spread
    # the engines' own counters agree with the routers' headers
    per_worker = Counter(homes.values())
    for wid, url in engines.items():
        assert engine_stats(url)["requests"] == 6 * per_worker.get(wid, 0)
    _, headers = ask(a, "chat", conversation(1, "x"), user="alice")
    assert headers["X-Router-Model"] == "chat"
    # the session header wins over the messages: two conversations, one session, one instance
    with_session = {request("POST", f"{r.url}/v1/chat/completions",
                            {"model": "chat", "messages": conversation(1, f"topic {i}"), "max_tokens": 1},
                            headers={"X-Session-Id": "the-session"}).headers["X-Router-Worker"]
                    for i in range(8) for r in (a, b)}
    assert len(with_session) == 1
    text = request("GET", f"{a.url}/metrics").body.decode()
    assert metric(text, "llm_router_routing_decisions_total", model="chat", decision="affinity") >= 18


def test_least_outstanding_routing_spreads_a_conversation(procs, redis_url, rds, mock_engine) -> None:
    replicas(procs, rds, mock_engine, "chat", 2, routing="least-outstanding")
    router = start_router(procs, redis_url)
    wait_instances(router, "chat", 2)
    served = [ask(router, "chat", conversation(turn, "same"))[0] for turn in range(1, 5)]
    assert len(set(served)) == 2, served  # idle instances take turns: no affinity


def test_a_full_preferred_instance_spills_over_and_the_load_bound_holds(procs, redis_url, rds, mock_engine) -> None:
    # slow streams hold their instance; every request is the same conversation (one key)
    engines = replicas(procs, rds, mock_engine, "chat", 2, "--tokens-per-second", "2")
    router = start_router(procs, redis_url)
    wait_instances(router, "chat", 2)
    streams, served = [], []
    try:
        for _ in range(6):
            s = SseStream(f"{router.url}/v1/chat/completions", method="POST",
                          body={"model": "chat", "messages": conversation(2, "hot"), "stream": True,
                                "max_tokens": 50})
            assert s.status == 200
            s.event()  # its first chunk: the request is outstanding on its instance
            streams.append(s)
            served.append(s.headers["X-Router-Worker"])
        load = Counter(served)
        active = {wid: engine_stats(url)["active_streams"] for wid, url in engines.items()}
        assert active == dict(load) | {w: 0 for w in engines if w not in load}
        mean = 6 / 2
        assert len(load) == 2 and max(load.values()) <= math.ceil(1.25 * mean), load  # 4/2: spilled, bounded
        assert served[0] == served[1] and max(load.values()) == load[served[0]]  # the preferred one first
    finally:
        for s in streams:
            s.close()
    text = request("GET", f"{router.url}/metrics").body.decode()
    assert metric(text, "llm_router_routing_decisions_total", model="chat", decision="spill") == 2


# --------------------------------------------------------------------------- fallbacks


def entry(model: str, *fallbacks: str, **fields) -> CatalogEntry:
    return CatalogEntry(id=model, aliases=[model, f"{model}-alias"], on_demand=False, fallbacks=list(fallbacks),
                        **fields)


def publish(rds, mock_engine, running: dict[str, tuple[str, ...]], *entries: CatalogEntry) -> dict[str, str]:
    """One fake worker with the ``entries``; those in ``running`` run on a mock engine (its
    flags); returns model -> engine URL."""
    fake = FakeWorker(rds, f"w{os.getpid()}")
    fake.publish(*entries)
    urls = {}
    for model, args in running.items():
        if args == ("dead",):
            urls[model] = f"http://127.0.0.1:{free_port()}"  # nothing listens there
        else:
            _, urls[model] = mock_engine("--quiet", *args, model=model)
            wait_engine(urls[model])
        fake.instance(model, "running", urls[model])
    return urls


def access_lines(procs, router) -> list[dict]:
    return [json.loads(line.split(" ", 1)[1]) for line in procs.log(router.proc).splitlines()
            if line.startswith("router.access ")]


def test_a_model_that_cannot_serve_falls_back_and_says_who_served(procs, redis_url, rds, mock_engine) -> None:
    # a: its only instance refuses connections; b: not running, no on-demand start; c serves.
    urls = publish(rds, mock_engine, {"a": ("dead",), "c": ()}, entry("a", "b-alias"), entry("b", "c"), entry("c"))
    router = start_router(procs, redis_url)
    wait_routable(router, "a")
    wait_routable(router, "c")
    resp = request("POST", f"{router.url}/v1/chat/completions", chat_body("a-alias", max_tokens=2))
    assert resp.status == 200, resp.body
    assert resp.headers["X-Router-Model"] == "c"
    assert resp.json()["model"] == "c"  # the body's model was rewritten for the fallback's engine
    assert engine_stats(urls["c"])["requests"] == 1
    text = request("GET", f"{router.url}/metrics").body.decode()
    assert metric(text, "llm_router_fallbacks_total", model="a", served="c") == 1
    line = wait_for(lambda: next((ln for ln in access_lines(procs, router) if ln.get("served")), None),
                    message="the access log line")
    assert line["model"] == "a" and line["served"] == "c" and line["status"] == 200
    # the model itself, when it serves: its own name, no fallback
    direct = request("POST", f"{router.url}/v1/chat/completions", chat_body("c", max_tokens=1))
    assert direct.headers["X-Router-Model"] == "c" and direct.json()["model"] == "c"


def test_without_a_fallback_that_can_serve_the_model_s_own_error_is_answered(procs, redis_url, rds,
                                                                            mock_engine) -> None:
    publish(rds, mock_engine, {"a": ("dead",)}, entry("a", "b", "ghost"), entry("b", "a"))
    router = start_router(procs, redis_url)
    wait_routable(router, "a")
    resp = request("POST", f"{router.url}/v1/chat/completions", chat_body("a", max_tokens=2))
    assert resp.status == 502 and resp.json()["error"]["code"] == "upstream_unreachable", resp.body


def test_a_full_queue_falls_back(procs, redis_url, rds, mock_engine) -> None:
    urls = publish(rds, mock_engine, {"a": ("--tokens-per-second", "2"), "b": ()},
                   entry("a", "b", max_concurrency=1), entry("b"))
    router = start_router(procs, redis_url, env={"LLM_ROUTER_QUEUE_LIMIT": "0"})
    wait_routable(router, "a")
    wait_routable(router, "b")
    busy = SseStream(f"{router.url}/v1/chat/completions", method="POST",
                     body=chat_body("a", stream=True, max_tokens=40))
    try:
        busy.event()
        resp = request("POST", f"{router.url}/v1/chat/completions", chat_body("a", max_tokens=1))
        assert resp.status == 200 and resp.headers["X-Router-Model"] == "b", resp.body
        assert engine_stats(urls["a"])["requests"] == 1 and engine_stats(urls["b"])["requests"] == 1
    finally:
        busy.close()


def test_no_fallback_once_the_answer_has_begun(procs, redis_url, rds, mock_engine) -> None:
    urls = publish(rds, mock_engine, {"a": ("--crash-mid-stream",), "b": ()}, entry("a", "b"), entry("b"))
    router = start_router(procs, redis_url)
    wait_routable(router, "a")
    stream = SseStream(f"{router.url}/v1/chat/completions", method="POST",
                       body=chat_body("a", stream=True, max_tokens=10))
    assert stream.headers["X-Router-Model"] == "a"
    events = stream.events_until(lambda ev: isinstance(ev.get("data"), dict) and "error" in ev["data"])
    stream.close()
    assert "error" in events[-1]["data"], events  # the stream ends with an error event...
    assert engine_stats(urls["b"])["requests"] == 0  # ...and the fallback was not asked
    text = request("GET", f"{router.url}/metrics").body.decode()
    assert metric(text, "llm_router_fallbacks_total", model="a", served="b") is None


def test_a_failed_start_is_the_request_s_one_start_then_its_model_backs_off_to_the_fallback(
        procs, redis_url, tmp_path) -> None:
    """A real worker: ``broken`` exits at start, ``late`` fails after loading for longer than
    the loading keep-alive (the SSE head is out by then); both fall back to ``good``. A request
    starts at most one model of its chain: the one whose model failed gets that failure, and
    ``good`` is not cold-started for it too. ``broken`` then backs off (visible in /v1/models and
    /info): the next requests skip it at once and ``good`` serves, streamed too; once ``good``
    runs, ``late`` is not started again: a running member of the chain serves first."""
    fail = [sys.executable, "-c", "import sys; sys.exit('no GPU here')"]
    fail_late = [sys.executable, "-c", "import sys, time; time.sleep(9); sys.exit('out of memory')"]
    config = write_config(tmp_path / "models.toml",
                          model_block("broken", restart="no", command=fail, fallbacks=["good"]),
                          model_block("late", restart="no", command=fail_late, fallbacks=["good"]),
                          model_block("good"))
    start_worker(procs, redis_url, config, f"w{os.getpid()}-fb")
    router = start_router(procs, redis_url, env={"LLM_ROUTER_LOADING_KEEPALIVE": "3"})  # room for a slow python start
    wait_models(router, 3)

    def instances(model: str) -> list[dict]:
        return get_json(f"{router.url}/api/models/{model}/info")["model"]["instances"]

    # the head goes out after the keep-alive interval: from then on no fallback
    late = SseStream(f"{router.url}/v1/chat/completions", method="POST", timeout=30,
                     body=chat_body("late", stream=True, max_tokens=2))
    events = late.events_until(lambda ev: isinstance(ev.get("data"), dict) and "error" in ev["data"])
    late.close()
    assert late.headers["X-Router-Model"] == "late" and events[0] == {"comment": "loading model 'late'"}
    assert events[-1]["data"]["error"]["code"] == "model_start_failed", events
    resp = request("POST", f"{router.url}/v1/chat/completions", chat_body("broken", max_tokens=2), timeout=30)
    assert resp.status == 503 and resp.json()["error"]["code"] == "model_start_failed", resp.body
    assert "no GPU here" in resp.json()["error"]["message"]
    assert [(i["state"], i["started_at"]) for i in instances("good")] in ([], [("stopped", 0)])  # one start: broken's
    pending = get_json(f"{router.url}/v1/models/broken")["pending"]
    assert pending["kind"] == "backoff" and pending["eta"] > time.time() and "exited with code 1" in pending["message"]
    assert get_json(f"{router.url}/api/models/broken/info")["model"]["pending"]["kind"] == "backoff"
    failed_at = instances("broken")[0]["updated_at"]
    resp = request("POST", f"{router.url}/v1/chat/completions", chat_body("broken", max_tokens=2), timeout=30)
    assert resp.status == 200 and resp.headers["X-Router-Model"] == "good", resp.body
    stream = SseStream(f"{router.url}/v1/chat/completions", method="POST", timeout=30,
                       body=chat_body("broken", stream=True, max_tokens=2))
    events = stream.events_until(lambda ev: ev.get("data") == "[DONE]")
    stream.close()
    assert stream.headers["X-Router-Model"] == "good" and events[-1]["data"] == "[DONE]", events
    assert instances("broken")[0]["updated_at"] == failed_at  # skipped at once: not started again
    # good runs now: late's requests go to it before any start of late
    late_at = instances("late")[0]["updated_at"]
    started = time.monotonic()
    resp = request("POST", f"{router.url}/v1/chat/completions", chat_body("late", max_tokens=2), timeout=30)
    assert resp.status == 200 and resp.headers["X-Router-Model"] == "good", resp.body
    assert time.monotonic() - started < 2 and instances("late")[0]["updated_at"] == late_at
    text = request("GET", f"{router.url}/metrics").body.decode()
    assert metric(text, "llm_router_fallbacks_total", model="broken", served="good") == 2
    assert metric(text, "llm_router_fallbacks_total", model="late", served="good") == 1