"""The router's pure logic, without HTTP or Redis: balancing, the cluster view, placement,
request sniffing, mode checks, error shapes, options (query parameters: tests/test_params.py)."""

from __future__ import annotations

import asyncio
import time

import msgspec
import pytest
from helpers import FakeWorker
from llm_lab_router.protocol import CatalogEntry, Event, Instance, Keys, Reply, WorkerInfo
from llm_lab_router.router.control.admin import clear_message
from llm_lab_router.router.control.client import (
    ControlError,
    describe_failure,
    merged_models,
    start_order,
    start_outcome,
)
from llm_lab_router.router.core.errors import ApiError, as_api_error, encode, error_body
from llm_lab_router.router.core.options import RouterOptions
from llm_lab_router.router.control.start_backoff import StartBackoff
from llm_lab_router.router.core.view import ClusterView, Snapshot, follows, model_status
from llm_lab_router.router.forward.balancer import Balancer, least_outstanding
from llm_lab_router.router.forward.proxy import mode_error, serving_order, sniff, stream_error_event
from llm_lab_router.router.http.app import redact
from llm_lab_router.router.logs.stream import LogEvent, sse


def inst(model: str, worker: str, state: str = "running", url: str | None = None, updated_at: float = 1.0,
         **kw) -> Instance:
    if url is None:
        url = f"http://{worker}:{abs(hash(model)) % 1000 + 20000}" if state == "running" else ""
    return Instance(model=model, worker=worker, state=state, url=url,  # type: ignore[arg-type]
                    updated_at=updated_at, **kw)


def lease(wid: str) -> WorkerInfo:
    return WorkerInfo(id=wid, host=wid, pid=1, version="t", started_at=0, heartbeat_at=0)


def read(view: ClusterView, snap: Snapshot) -> None:
    """What ``resync`` does with a read of Redis: every worker the view knew or the read found
    is re-read (``apply_workers``); one without a lease in the read leaves."""
    view.apply_workers(sorted(view.workers().keys() | snap.workers.keys()), snap)


def snapshot(catalogs: dict[str, list[CatalogEntry]], instances: list[Instance] = (), began: int = 0) -> Snapshot:
    """A read of Redis; ``began``: how many instance events the view had applied when it began."""
    return Snapshot(workers={w: lease(w) for w in catalogs},
                    catalogs={w: {e.id: e for e in entries} for w, entries in catalogs.items()},
                    instances=list(instances), began=began)


CHAT = CatalogEntry(id="chat", aliases=["chat", "gpt-3.5-turbo"], mode="chat")
EMBED = CatalogEntry(id="embed", aliases=["embed", "ada"], mode="embedding")


# --------------------------------------------------------------------------- balancer


def test_least_outstanding_prefers_the_idlest_and_rotates_among_ties() -> None:
    urls = ["a", "b", "c"]
    assert least_outstanding(urls, {"a": 2, "b": 1, "c": 1}, 0) == "b"
    assert least_outstanding(urls, {"a": 2, "b": 1, "c": 1}, 1) == "c"
    assert least_outstanding(urls, {}, 5) == "c"
    assert least_outstanding([], {}, 0) is None


def test_balancer_counts_outstanding_requests_and_skips_excluded() -> None:
    b = Balancer()
    a, c = inst("m", "w1", url="http://a"), inst("m", "w2", url="http://c")
    with b.track("http://a"):
        assert b.outstanding("http://a") == 1
        assert [b.pick([a, c]).url for _ in range(3)] == ["http://c"] * 3  # a is busy
        assert b.pick([a, c], exclude={"http://c"}).url == "http://a"
    assert b.outstanding("http://a") == 0
    assert b.pick([a], exclude={"http://a"}) is None
    assert {b.pick([a, c]).url for _ in range(4)} == {"http://a", "http://c"}  # idle: round-robin


def test_balancer_forgets_urls_with_nothing_outstanding() -> None:
    b = Balancer()
    with pytest.raises(RuntimeError):
        with b.track("u"):
            raise RuntimeError("request failed")
    assert b._outstanding == {}  # an instance that went away leaves no counter behind


# --------------------------------------------------------------------------- cluster view


def test_view_resolves_ids_and_aliases_of_live_workers_only() -> None:
    view = ClusterView(None, None)  # type: ignore[arg-type]
    read(view, snapshot({"w1": [CHAT, EMBED]}, [inst("chat", "w1")]))
    assert view.resolve("gpt-3.5-turbo") == "chat" and view.resolve("chat") == "chat"
    assert view.resolve("ada") == "embed" and view.resolve("nope") is None
    assert [i.worker for i in view.running_instances("chat")] == ["w1"]
    view.drop_worker("w1")
    assert view.resolve("chat") is None and view.running_instances("chat") == [] and view.models() == []


def test_view_merges_one_model_served_by_two_hosts() -> None:
    view = ClusterView(None, None)  # type: ignore[arg-type]
    other = CatalogEntry(id="chat", aliases=["chat", "chatgpt"], mode="chat")
    read(view, snapshot({"w1": [CHAT], "w2": [other]}, [inst("chat", "w1"), inst("chat", "w2")]))
    assert [m.id for m in view.models()] == ["chat"]
    assert view.catalog_entry("chat").aliases == ["chat", "gpt-3.5-turbo", "chatgpt"]
    assert view.resolve("chatgpt") == "chat"
    assert {i.worker for i in view.running_instances("chat")} == {"w1", "w2"}
    assert view.catalog_workers("chat") == ["w1", "w2"]


def test_view_applies_instance_events_without_reading_redis() -> None:
    view = ClusterView(None, None)  # type: ignore[arg-type]
    read(view, snapshot({"w1": [CHAT]}, [inst("chat", "w1", "stopped")]))
    assert view.status("chat") == "stopped"
    assert view.apply_event(Event(kind="instance", worker="w1", instance=inst("chat", "w1", "running"))) is None
    assert view.status("chat") == "running"
    # unknown worker: applied, and the caller is asked to read that worker
    assert view.apply_event(Event(kind="instance", worker="w9", instance=inst("chat", "w9"))) == "w9"
    assert view.apply_event(Event(kind="catalog", worker="w1")) == "w1"
    assert view.apply_event(Event(kind="worker", worker="w1", alive=False)) is None
    assert view.resolve("chat") is None


def test_view_keeps_an_event_newer_than_a_racing_resync() -> None:
    view = ClusterView(None, None)  # type: ignore[arg-type]
    read(view, snapshot({"w1": [CHAT]}, [inst("chat", "w1", "starting", seq=1)]))
    view.apply_event(Event(kind="instance", worker="w1", instance=inst("chat", "w1", "running", seq=2)))
    read(view, snapshot({"w1": [CHAT]}, [inst("chat", "w1", "starting", seq=1)], began=0))
    assert view.status("chat") == "running"
    # an instance the read did not see yet, announced after the read began, is kept too
    view.apply_event(Event(kind="instance", worker="w1", instance=inst("embed", "w1", seq=1)))
    read(view, snapshot({"w1": [CHAT, EMBED]}, [], began=1))
    assert view.status("embed") == "running"
    read(view, snapshot({"w1": [CHAT, EMBED]}, [], began=2))
    assert view.status("embed") == "stopped"


def test_view_orders_by_the_writers_seq_never_by_its_clock() -> None:
    """``updated_at`` is the worker's clock: a record stamped in the future (a forged one, or
    a host whose clock runs ahead) neither outlives its key nor outranks a later record."""
    view = ClusterView(None, None)  # type: ignore[arg-type]
    future = time.time() + 3600
    view.apply_event(Event(kind="instance", worker="w1", instance=inst("chat", "w1", updated_at=future, seq=1)))
    read(view, snapshot({"w1": [CHAT]}, [], began=1))  # a read after the event: the key is gone
    assert view.status("chat") == "stopped" and view.running_instances("chat") == []
    # an event that raced a read but is older than what the read found loses, whatever its clock says
    view.apply_event(Event(kind="instance", worker="w1", instance=inst("chat", "w1", updated_at=future, seq=4)))
    read(view, snapshot({"w1": [CHAT]}, [inst("chat", "w1", "stopped", updated_at=1.0, seq=5)], began=1))
    assert view.status("chat") == "stopped"


def test_view_worker_read_replaces_only_that_worker() -> None:
    view = ClusterView(None, None)  # type: ignore[arg-type]
    read(view, snapshot({"w1": [CHAT], "w2": [CHAT]}, [inst("chat", "w1"), inst("chat", "w2")]))
    view.apply_worker("w2", snapshot({"w2": [CHAT]}, [inst("chat", "w2", "stopped", updated_at=2.0)]))
    assert [i.state for i in view.instances("chat")] == ["running", "stopped"]
    view.apply_worker("w2", Snapshot())  # lease gone
    assert view.workers().keys() == {"w1"}


def test_view_keeps_its_state_a_while_when_every_lease_vanishes_at_once(rds, redis_url) -> None:
    """``resync`` against a real Redis: one host gone leaves at once; every lease gone at once
    (Redis restarted empty) keeps the view for ``empty_grace``."""
    from redis.asyncio import Redis

    now = [100.0]
    w1, w2 = FakeWorker(rds, "w1"), FakeWorker(rds, "w2")

    async def scenario() -> None:
        client = Redis.from_url(redis_url)
        view = ClusterView(client, Keys(), empty_grace=5, clock=lambda: now[0])
        try:
            w1.publish(CHAT, instances=[inst("chat", "w1")])
            w2.publish(EMBED)
            await view.resync()
            assert view.resolve("embed") == "embed"
            w2.leave()
            await view.resync()  # one host gone: it leaves at once
            assert view.resolve("embed") is None
            rds.flushall()  # Redis restarted empty: kept...
            await view.resync()
            now[0] += 4
            await view.resync()
            assert view.running_instances("chat")
            w1.publish(CHAT, instances=[inst("chat", "w1")])  # ...and the worker is back
            await view.resync()
            rds.flushall()
            await view.resync()
            now[0] += 5.1
            assert view.resolve("chat") == "chat"
            await view.resync()  # still nothing after the grace: the cluster is really gone
            assert view.resolve("chat") is None
        finally:
            await client.aclose()

    asyncio.run(scenario())


def test_model_status_prefers_running_then_starting() -> None:
    assert model_status([]) == "stopped"
    assert model_status([inst("m", "a", "failed"), inst("m", "b", "starting")]) == "starting"
    assert model_status([inst("m", "a", "failed"), inst("m", "b", "running")]) == "running"
    assert model_status([inst("m", "a", "failed"), inst("m", "b", "stopped")]) == "failed"


def test_wait_until_wakes_on_an_update_not_by_polling() -> None:
    async def scenario() -> tuple[bool, bool, list]:
        view = ClusterView(None, None)  # type: ignore[arg-type]
        read(view, snapshot({"w1": [CHAT]}))
        waiter = asyncio.create_task(view.wait_until(lambda: view.running_instances("chat"), timeout=60))
        await asyncio.sleep(0)  # it looks, finds nothing, and waits
        assert not waiter.done()
        view.apply_event(Event(kind="instance", worker="w1", instance=inst("chat", "w1")))
        for _ in range(5):  # a few loop turns, no time: only the update itself can wake it
            if waiter.done():
                break
            await asyncio.sleep(0)
        woken = waiter.done()
        found = await waiter
        missing = await view.wait_until(lambda: view.running_instances("nope"), timeout=0.05)
        return bool(found), woken, missing

    found, woken, missing = asyncio.run(scenario())
    assert found and woken and missing == []


# --------------------------------------------------------------------------- placement and control


def test_start_order_prefers_where_it_runs_then_healthy_then_least_loaded() -> None:
    """``start_order`` for models without GPU needs (no device snapshots): the first host to try."""
    def first(candidates: list[str], instances: list[Instance]) -> str | None:
        order, _ = start_order("m", {w: CatalogEntry(id="m") for w in candidates}, {}, instances)
        return order[0] if order else None

    assert first([], []) is None
    assert first(["a", "b"], [inst("m", "b", "starting")]) == "b"
    assert first(["a", "b"], [inst("m", "a", "failed")]) == "b"
    assert first(["a", "b"], [inst("x", "a"), inst("y", "a"), inst("z", "b")]) == "b"
    assert first(["b", "a"], []) == "a"  # ties: by id, deterministic


def test_start_outcome() -> None:
    assert start_outcome([inst("m", "b")], "a", ["a", "b"], 0) == "running"
    assert start_outcome([inst("m", "a", "starting")], "a", ["a"], 0) == ""
    assert start_outcome([inst("m", "a", "failed", updated_at=5)], "a", ["a"], 5) == ""  # the old failure
    assert start_outcome([inst("m", "a", "failed", updated_at=6)], "a", ["a"], 5) == "failed"
    assert start_outcome([], "a", ["b"], 0) == "gone"


def test_replies_are_merged_and_failures_quote_the_log() -> None:
    replies = [Reply(id="1", worker="a", ok=True, models=["x", "y"]),
               Reply(id="2", worker="b", ok=True, models=["y", "z"])]
    assert merged_models(replies) == ["x", "y", "z"]
    text = describe_failure(ControlError("health check timed out", ["line 1", "Traceback: boom"]))
    assert text.startswith("health check timed out") and text.endswith("line 1\nTraceback: boom")
    assert describe_failure(ControlError("plain")) == "plain"


# --------------------------------------------------------------------------- requests


def test_sniff_reads_model_and_stream_only() -> None:
    got = sniff(b'{"messages": [{"role": "user", "content": "x"}], "model": "m", "stream": true, "n": 1}')
    assert (got.model, got.stream) == ("m", True)
    assert sniff(b"").model is None
    assert sniff(b'{"model": "m"}', "application/x-www-form-urlencoded").model == "m"  # curl -d
    bad_bodies = [(b'{"model": ', "invalid_json"), (b'{"model": 3}', "invalid_request"), (b"[1]", "invalid_request")]
    for bad, code in bad_bodies:
        with pytest.raises(ApiError) as err:
            sniff(bad)
        assert err.value.status == 400 and err.value.code == code


def test_sniff_finds_the_model_part_of_a_multipart_upload() -> None:
    body = (b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
            b"Content-Type: audio/wav\r\n\r\nRIFF....\r\n"
            b"--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n--XyZ--\r\n")
    assert sniff(body, "multipart/form-data; boundary=XyZ").model == "whisper-1"


def test_mode_mismatch() -> None:
    assert mode_error("/v1/chat/completions", "embedding", "e") is not None
    assert mode_error("/v1/completions/", "embedding", "e") is not None
    assert mode_error("/v1/embeddings", "chat", "c") is not None
    assert mode_error("/v1/embeddings", "base", "b") is not None
    assert mode_error("/v1/embeddings", "embedding", "e") is None
    assert mode_error("/v1/chat/completions", "base", "b") is None
    assert mode_error("/v1/audio/transcriptions", "chat", "c") is None


def test_clear_message_follows_the_manual() -> None:
    assert clear_message("gpt", 60, 100) == "模型 'gpt' 已清理 60 分钟前的日志，删除 100 条"
    assert clear_message("gpt", 0, 7) == "模型 'gpt' 已清空全部日志，删除 7 条"


# --------------------------------------------------------------------------- responses


def test_error_shapes() -> None:
    err = ApiError(404, "The model 'x' does not exist", "model_not_found")
    assert msgspec.json.decode(encode(error_body(err, True))) == {
        "error": {"message": "The model 'x' does not exist", "type": "not_found_error", "code": "model_not_found"}}
    assert msgspec.json.decode(encode(error_body(err, False))) == {"success": False,
                                                                   "message": "The model 'x' does not exist"}
    from redis.exceptions import ConnectionError as RedisConnectionError
    assert as_api_error(500, RedisConnectionError("refused")).status == 503
    assert as_api_error(500, ValueError("secret detail")).message == "Internal Server Error"


def test_sse_frames() -> None:
    assert sse(LogEvent("historical_complete")) == b'data: {"type":"historical_complete"}\n\n'
    assert sse(LogEvent("stream_end", message="bye"), "1-0").startswith(b"id: 1-0\ndata: ")
    frame = stream_error_event("engine died")
    assert frame.startswith(b"data: ") and frame.endswith(b"\n\n")
    assert msgspec.json.decode(frame[6:]) == {"error": {"message": "engine died", "type": "upstream_error",
                                                        "code": "stream_interrupted"}}


def test_options_from_env() -> None:
    opts = RouterOptions.from_env({"LLM_ROUTER_IDLE_TIMEOUT": "1.5", "LLM_ROUTER_LOG_TAIL_MAX": "50",
                                   "UNRELATED": "x"})
    assert opts.idle_timeout == 1.5 and opts.log_tail_max == 50 and opts.connect_timeout == 5.0
    with pytest.raises(ValueError, match="idle_timeout"):
        RouterOptions.from_env({"LLM_ROUTER_IDLE_TIMEOUT": "-1"})


def test_redis_password_is_not_logged() -> None:
    assert redact("redis://:s3cret@db:6379/0") == "redis://:***@db:6379/0"
    assert redact("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


def test_view_reads_a_worker_again_only_when_its_version_skips() -> None:
    """An instance event carries the worker's version (``llm:versions``): the next one in line
    is applied as carried; one that skips a version means an event was missed, so the view
    asks for that worker to be re-read; events of older workers (no version) change nothing."""
    view = ClusterView(None, Keys())  # type: ignore[arg-type]
    snap = snapshot({"w1": [CHAT]}, [inst("chat", "w1", "stopped", seq=1)])
    snap.versions = {"w1": "e1:4"}
    view.apply_worker("w1", snap)
    assert view.apply_event(Event(kind="instance", worker="w1", instance=inst("chat", "w1", seq=2),
                                  version="e1:5")) is None
    assert view.apply_event(Event(kind="instance", worker="w1", instance=inst("chat", "w1", "stopped", seq=3),
                                  version="e1:7")) == "w1"  # e1:6 was missed
    assert view.apply_event(Event(kind="instance", worker="w1", instance=inst("chat", "w1", seq=1),
                                  version="e2:1")) == "w1"  # a new worker process
    assert view.apply_event(Event(kind="instance", worker="w1", instance=inst("chat", "w1", seq=4))) is None
    assert follows("e1:5", "e1:4") and follows("e1:4", "e1:4")
    assert not follows("e1:6", "e1:4") and not follows("e2:5", "e1:4") and not follows("e1:x", "e1:4")


def test_cluster_metrics_follow_changes_after_being_cached() -> None:
    """Each worker's lines are cached until its records change (by identity): a new state, a
    worker that leaves, must show at the next scrape."""
    from llm_lab_router.router.observe.cluster_metrics import ClusterMetrics

    view = ClusterView(None, Keys())  # type: ignore[arg-type]
    read(view, snapshot({"w1": [CHAT], "w2": [CHAT]}, [inst("chat", "w1", "stopped"), inst("chat", "w2")]))
    metrics = ClusterMetrics(view)
    first = metrics.render().decode()
    assert 'llm_router_instances{model="chat",worker="w1",state="stopped"} 1.0' in first
    view.apply_event(Event(kind="instance", worker="w1", instance=inst("chat", "w1", "running", seq=1)))
    view.drop_worker("w2")
    second = metrics.render().decode()
    assert 'llm_router_instances{model="chat",worker="w1",state="running"} 1.0' in second
    assert 'state="stopped"' not in second and 'worker="w2"' not in second


def test_a_fallback_chain_tries_running_members_first_and_a_failed_start_backs_off() -> None:
    assert serving_order(["a", "b", "c", "d"], lambda m: m in {"c", "b"}) == ["b", "c", "a", "d"]
    assert serving_order(["a", "b"], lambda m: False) == ["a", "b"]
    backoff = StartBackoff(30)
    backoff.failed("a", "exited with code 1\nlast log lines: ...", now=1000)
    why = backoff.reason("a", now=1010)
    assert why is not None and (why.kind, why.eta) == ("backoff", 1030)
    assert why.message == "model 'a' failed to start 10s ago (exited with code 1); not started again for 20s"
    assert backoff.reason("a", now=1030) is None and backoff.reason("b", now=1010) is None
    backoff.failed("a", "again", now=2000)
    backoff.succeeded("a")
    assert backoff.reason("a", now=2001) is None
    off = StartBackoff(0)
    off.failed("a", "x", now=1000)
    assert off.reason("a", now=1000) is None


def test_a_background_start_that_fails_unexpectedly_leaves_a_log_line(caplog):
    """``?wait=false`` starts run with nobody waiting: a failure other than ``ControlError``
    (a Redis error, a bug) was dropped without a word."""
    import asyncio
    import logging

    from llm_lab_router.protocol import Keys
    from llm_lab_router.router.control.client import ControlClient, ControlError

    async def scenario() -> None:
        client = ControlClient(None, None, Keys(), None)  # type: ignore[arg-type]  (nothing reaches Redis)

        async def broken(model: str, *args):
            raise RuntimeError("boom")

        async def refused(model: str, *args):
            raise ControlError("no room")

        client._start = broken  # type: ignore[method-assign]
        await asyncio.gather(client.start_in_background("m", 1.0), return_exceptions=True)
        client._start = refused  # type: ignore[method-assign]
        await asyncio.gather(client.start_in_background("n", 1.0), return_exceptions=True)
        await asyncio.sleep(0)

    with caplog.at_level(logging.WARNING, logger="router.control"):
        asyncio.run(scenario())
    lines = {r.getMessage(): r for r in caplog.records if r.name == "router.control"}
    assert "start of m failed" in lines and "boom" in str(lines["start of m failed"].exc_info[1])
    assert "start of n failed: no room" in lines
