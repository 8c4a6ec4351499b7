"""``GET /api/models/{alias}/logs/stream``: history, live entries, resume, keep-alive, cleanup.

Log entries are written straight into the model's Redis stream (as a worker's log pipe does,
with ``protocol.log_fields``), so any router serves them whichever host produced them.
"""

from __future__ import annotations

import signal
import threading
import time

import psutil
import pytest
from conftest import wait_for
from helpers import (
    FakeWorker,
    SseStream,
    model_block,
    request,
    start_router,
    start_worker,
    wait_models,
    write_config,
)
from llm_lab_router.protocol import CatalogEntry, Keys, LogEntry, log_fields

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
    # Every 0.3 s here (15 s by default, which the 5 s read timeout would not wait for).
    stream = SseStream(f"{router.url}/api/models/chat/logs/stream", timeout=5)
    assert stream.event()["data"] == {"type": "historical_complete"}
    assert stream.event() == {"comment": "keep-alive"}
    assert stream.event() == {"comment": "keep-alive"}
    stream.close()


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


def blocked_reads(rds) -> int:
    """Router connections blocked in ``XREAD`` now (a log reader waiting for entries)."""
    return sum(1 for c in rds.client_list() if c.get("cmd") == "xread" and "b" in c.get("flags", ""))


def test_one_reader_per_model_which_stops_when_its_last_client_leaves(procs, redis_url, rds) -> None:
    """Keep-alives are far apart here, so only the cancel on close can end the reads this soon."""
    FakeWorker(rds, "w1").publish(CHAT)
    router = start_router(procs, redis_url)
    streams = [SseStream(f"{router.url}/api/models/chat/logs/stream") for _ in range(4)]
    for s in streams:
        s.event()
    wait_for(lambda: blocked_reads(rds) == 1, timeout=3, message="one reader for 4 viewers")
    ids = add_logs(rds, "chat", "to all")
    assert [s.event()["id"] for s in streams] == ids * 4
    assert blocked_reads(rds) <= 1
    for s in streams:
        s.close()
    wait_for(lambda: blocked_reads(rds) == 0, timeout=1.5, message="the reader gone with its last viewer")


def test_router_shutdown_ends_streams_with_stream_end(router, procs) -> None:
    stream = SseStream(f"{router.url}/api/models/chat/logs/stream")
    assert stream.event()["data"] == {"type": "historical_complete"}
    router.proc.send_signal(signal.SIGTERM)
    events = stream.events_until(lambda ev: False)  # must end, not hang
    stream.close()
    assert is_type("stream_end")(events[-1])
    assert router.proc.wait(10) == 0


# --------------------------------------------------------------------------- many viewers, big tails


def test_many_viewers_leave_the_control_plane_alone(procs, redis_url, rds, tmp_path) -> None:
    """150 open log streams (the old code held a pooled Redis connection per viewer, and the
    pool has 100): /health, log stats and a real start through a worker still answer."""
    config = write_config(tmp_path / "models.toml", model_block("demo"))
    start_worker(procs, redis_url, config, "w1")
    router = start_router(procs, redis_url)
    wait_models(router, 1)
    viewers = [SseStream(f"{router.url}/api/models/demo/logs/stream?tail=0") for _ in range(VIEWERS)]
    for v in viewers:
        assert v.event()["data"] == {"type": "historical_complete"}
    wait_for(lambda: blocked_reads(rds) == 1, timeout=5, message="one log reader for every viewer")

    health = request("GET", f"{router.url}/health")
    assert health.status == 200 and health.json()["redis"] == "ok", health.body
    assert request("GET", f"{router.url}/api/logs/stats").status == 200
    started = request("POST", f"{router.url}/api/models/demo/start", timeout=30)
    assert started.status == 200, started.body
    # every viewer sees the start's log lines, in the same order
    firsts = [v.events_until(lambda ev: "data" in ev)[-1] for v in viewers]
    assert all(ev["data"]["type"] == "realtime" for ev in firsts)
    assert len({ev["id"] for ev in firsts}) == 1
    router_conns = [c for c in rds.client_list() if c.get("user") == "router"]
    assert len(router_conns) < 40, f"{len(router_conns)} Redis connections for {VIEWERS} viewers"
    for v in viewers:
        v.close()


VIEWERS = 150


def test_resume_by_last_event_id_across_the_fan_out(router, rds) -> None:
    """A viewer resuming from an id older than the feed's position gets the gap from Redis,
    then joins the live fan-out, while entries keep arriving: no loss, no duplicate."""
    live = SseStream(f"{router.url}/api/models/chat/logs/stream?tail=0")
    assert live.event()["data"] == {"type": "historical_complete"}
    early = add_logs(rds, "chat", *[f"early {i}" for i in range(50)])
    assert [live.event()["id"] for _ in early] == early  # the feed is past early[9] now

    writer = threading.Thread(target=lambda: [add_logs(rds, "chat", f"late {i}") for i in range(300)])
    writer.start()
    resumed = SseStream(f"{router.url}/api/models/chat/logs/stream", headers={"Last-Event-ID": early[9]})
    writer.join()
    everything = [entry_id for entry_id, _ in rds.xrange(KEYS.logs("chat"))]
    want = everything[everything.index(early[9]) + 1:]
    got = resumed.events_until(lambda ev: ev.get("id") == want[-1])
    seen_live = live.events_until(lambda ev: ev.get("id") == want[-1])
    resumed.close()
    live.close()
    assert [ev["id"] for ev in got if "id" in ev] == want
    assert all(ev["data"]["type"] == "realtime" for ev in got if "id" in ev)
    assert [ev["id"] for ev in seen_live if "id" in ev] == everything[50:]


def test_a_slow_viewer_holds_back_no_one_and_loses_nothing(procs, redis_url, rds) -> None:
    """A viewer that stops reading overflows its small queue, leaves the fan-out and later
    resumes from Redis; meanwhile another viewer of the same feed gets everything at once."""
    FakeWorker(rds, "w1").publish(CHAT)
    router = start_router(procs, redis_url, env={"LLM_ROUTER_LOG_VIEWER_BUFFER": "16384"})
    slow = SseStream(f"{router.url}/api/models/chat/logs/stream?tail=0", recv_buffer=4096)
    fast = SseStream(f"{router.url}/api/models/chat/logs/stream?tail=0")
    assert slow.event()["data"] == fast.event()["data"] == {"type": "historical_complete"}
    ids = []
    for burst in range(20):  # 16 MB: far more than the socket buffers and the queue hold
        ids += add_logs(rds, "chat", *[f"{burst}/{i} " + "x" * 8192 for i in range(100)])
    got = fast.events_until(lambda ev: ev.get("id") == ids[-1], limit=len(ids) + 100)
    assert [ev["id"] for ev in got if "id" in ev] == ids  # while the slow one read nothing
    assert blocked_reads(rds) <= 1
    late = slow.events_until(lambda ev: ev.get("id") == ids[-1], limit=len(ids) + 100)
    assert [ev["id"] for ev in late if "id" in ev] == ids
    slow.close()
    fast.close()


def test_tail_is_the_last_entries_in_order_whatever_the_page(procs, redis_url, rds) -> None:
    """Pages of 3: a tail kept while walking back (small) and one read again forwards (over
    the viewer's buffer) are both exactly the last N entries, oldest first."""
    FakeWorker(rds, "w1").publish(CHAT)
    router = start_router(procs, redis_url, env={"LLM_ROUTER_LOG_PAGE_SIZE": "3",
                                                 "LLM_ROUTER_LOG_VIEWER_BUFFER": "1024"})
    ids = add_logs(rds, "chat", *[f"{i:03d} " + "y" * 100 for i in range(40)])
    for tail in (5, 20, 40, 100):
        stream = SseStream(f"{router.url}/api/models/chat/logs/stream?tail={tail}")
        history = stream.events_until(is_type("historical_complete"))
        stream.close()
        assert [ev["id"] for ev in history[:-1]] == ids[-tail:], tail


def test_big_tails_keep_router_memory_bounded(procs, redis_url, rds) -> None:
    """Three viewers of ``tail=1000`` over 64 KiB lines (64 MB of log): the old router read
    each whole tail into memory at once (hundreds of MB); pages with back-pressure keep it
    to a page or so per viewer."""
    FakeWorker(rds, "w1").publish(CHAT)
    router = start_router(procs, redis_url)
    line = "z" * (64 * 1024 - 16)
    with rds.pipeline(transaction=False) as pipe:
        for i in range(1000):
            pipe.xadd(KEYS.logs("chat"), log_fields(LogEntry(timestamp=time.time(), message=f"{i:05d} {line}")))
        ids = pipe.execute()
    router_proc = psutil.Process(router.proc.pid)
    base = router_proc.memory_info().rss
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], router_proc.memory_info().rss)
            done.wait(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    viewers = [SseStream(f"{router.url}/api/models/chat/logs/stream?tail=1000") for _ in range(3)]
    try:
        histories = [[] for _ in viewers]
        while not all(h and h[-1].get("data") == {"type": "historical_complete"} for h in histories):
            for v, h in zip(viewers, histories):  # round robin: all three in flight at once
                if not (h and "id" not in h[-1]):
                    h.append(v.event())
    finally:
        done.set()
        sampler.join()
        for v in viewers:
            v.close()
    for h in histories:
        assert [ev["id"] for ev in h[:-1]] == ids
    grew_mb = (peak[0] - base) / 2**20
    assert grew_mb < 150, f"router RSS grew {grew_mb:.0f} MB serving 3 x 64 MB tails"
