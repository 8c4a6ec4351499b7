"""``GET /api/models/{alias}/logs/stream``: history, live entries, resume, keep-alive, cleanup.

Log entries are written straight into the model's Redis stream (as a worker's log pipe does,
with ``protocol.log_fields``), so any router serves them whichever host produced them.
"""

from __future__ import annotations

import signal
import time

import pytest

from conftest import wait_for
from helpers import FakeWorker, SseStream, request, start_router
from llm_router.protocol import CatalogEntry, Keys, LogEntry, log_fields

KEYS = Keys()
CHAT = CatalogEntry(id="chat", aliases=["chat", "gpt-3.5-turbo"])


def add_logs(rds, model: str, *messages: str, host: str = "w1") -> list[str]:
    return [rds.xadd(KEYS.logs(model), log_fields(LogEntry(timestamp=time.time(), message=m, host=host)))
            for m in messages]


@pytest.fixture
def router(procs, redis_url, rds):
    FakeWorker(rds, "w1").publish(CHAT)
    return start_router(procs, redis_url, env={"LLM_ROUTER_KEEPALIVE_INTERVAL": "0.3"})


def is_type(kind: str):
    return lambda ev: isinstance(ev.get("data"), dict) and ev["data"].get("type") == kind


def test_history_then_complete_then_realtime(router, rds) -> None:
    ids = add_logs(rds, "chat", *[f"line {i}" for i in range(5)])
    stream = SseStream(f"{router.url}/api/models/gpt-3.5-turbo/logs/stream?tail=3")
    assert stream.status == 200
    assert stream.headers["Content-Type"] == "text/event-stream"
    assert stream.headers["Cache-Control"] == "no-cache" and stream.headers["X-Accel-Buffering"] == "no"
    history = stream.events_until(is_type("historical_complete"))
    assert [ev["data"]["log"]["message"] for ev in history[:-1]] == ["line 2", "line 3", "line 4"]
    assert [ev["id"] for ev in history[:-1]] == ids[2:]
    assert all(ev["data"]["type"] == "historical" and ev["data"]["log"]["host"] == "w1" for ev in history[:-1])
    assert history[-1]["data"] == {"type": "historical_complete"}

    live_ids = add_logs(rds, "chat", "live 1", "live 2", host="w2")
    live = [stream.event(), stream.event()]
    stream.close()
    assert [(ev["id"], ev["data"]["type"], ev["data"]["log"]["message"], ev["data"]["log"]["host"]) for ev in live] == [
        (live_ids[0], "realtime", "live 1", "w2"), (live_ids[1], "realtime", "live 2", "w2")]
    assert isinstance(live[0]["data"]["log"]["timestamp"], float)


def test_tail_zero_sends_no_history_but_misses_nothing_after(router, rds) -> None:
    add_logs(rds, "chat", "old")
    stream = SseStream(f"{router.url}/api/models/chat/logs/stream?tail=0")
    assert stream.event()["data"] == {"type": "historical_complete"}
    add_logs(rds, "chat", "new")
    ev = stream.event()
    stream.close()
    assert ev["data"]["log"]["message"] == "new"


def test_reconnect_with_last_event_id_resumes_without_loss_or_duplicates(router, rds) -> None:
    add_logs(rds, "chat", "a", "b")
    first = SseStream(f"{router.url}/api/models/chat/logs/stream")
    seen = first.events_until(is_type("historical_complete"))
    add_logs(rds, "chat", "c")
    seen.append(first.event())
    first.close()
    last_id = seen[-1]["id"]
    add_logs(rds, "chat", "d", "e")  # written while the client was away

    second = SseStream(f"{router.url}/api/models/chat/logs/stream", headers={"Last-Event-ID": last_id})
    resumed = [second.event(), second.event()]
    second.close()
    assert [ev["data"]["type"] for ev in resumed] == ["realtime", "realtime"]  # no history again
    messages = [ev["data"]["log"]["message"] for ev in seen if "log" in ev["data"]] + \
               [ev["data"]["log"]["message"] for ev in resumed]
    assert messages == ["a", "b", "c", "d", "e"]

    third = SseStream(f"{router.url}/api/models/chat/logs/stream?last_event_id={resumed[0]['id']}")
    assert third.event()["data"]["log"]["message"] == "e"
    third.close()


def test_keep_alive_comments_on_a_quiet_stream(router) -> None:
    stream = SseStream(f"{router.url}/api/models/chat/logs/stream")
    assert stream.event()["data"] == {"type": "historical_complete"}
    started = time.monotonic()
    assert stream.event() == {"comment": "keep-alive"}
    stream.close()
    assert time.monotonic() - started < 2


def test_parameters_are_validated_and_unknown_models_are_404(router) -> None:
    base = f"{router.url}/api/models"
    for query in ("tail=abc", "tail=-1", "tail=10001", "last_event_id=yesterday"):
        resp = request("GET", f"{base}/chat/logs/stream?{query}")
        assert resp.status == 400 and resp.json()["success"] is False, query
    assert "tail" in request("GET", f"{base}/chat/logs/stream?tail=x").json()["message"]
    resp = request("GET", f"{base}/nope/logs/stream")
    assert resp.status == 404 and resp.json() == {"success": False, "message": resp.json()["message"]}


def test_logs_of_a_model_whose_worker_is_gone_stay_readable(router, rds) -> None:
    add_logs(rds, "retired", "last words")
    stream = SseStream(f"{router.url}/api/models/retired/logs/stream")
    history = stream.events_until(is_type("historical_complete"))
    stream.close()
    assert history[0]["data"]["log"]["message"] == "last words"


def test_a_client_that_leaves_releases_its_redis_connection(procs, redis_url, rds) -> None:
    """Keep-alives are far apart here, so only the cancel on close can end the reads this soon."""
    FakeWorker(rds, "w1").publish(CHAT)
    router = start_router(procs, redis_url)

    def blocked_reads() -> int:
        return sum(1 for c in rds.client_list() if c.get("cmd") == "xread" and "b" in c.get("flags", ""))

    streams = [SseStream(f"{router.url}/api/models/chat/logs/stream") for _ in range(4)]
    for s in streams:
        s.event()
    wait_for(lambda: blocked_reads() == 4, timeout=3, message="4 followers reading")
    for s in streams:
        s.close()
    wait_for(lambda: blocked_reads() == 0, timeout=1.5, message="their reads gone")


def test_router_shutdown_ends_streams_with_stream_end(router, procs) -> None:
    stream = SseStream(f"{router.url}/api/models/chat/logs/stream")
    assert stream.event()["data"] == {"type": "historical_complete"}
    router.proc.send_signal(signal.SIGTERM)
    events = stream.events_until(lambda ev: False)  # must end, not hang
    stream.close()
    assert is_type("stream_end")(events[-1])
    assert router.proc.wait(10) == 0
