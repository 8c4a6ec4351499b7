"""Swap-aware scheduling end to end: two real routers, one worker on a stand-in GPU that holds
one model of three at a time. The routers share the line of waiting models (``llm:waiting``)
and decide alike: the model that waited longest swaps first, a fresh model stays its
``min_residency`` unless a waiter has waited its ``max_wait``, and both routers' requests for a
model are served by one start."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
from typing import Iterator

import msgspec
from conftest import wait_for
from helpers import SseStream, chat_body, get_json, request, start_router
from llm_lab_router.protocol import Command, Keys, Reply, WaitEntry, command_fields, from_json, log_entry
from test_placement import SLOW, gpu_model, gpu_worker, instances, open_stream, running_on, uid, wait_devices


def ask(results: dict, key: str, router, model: str) -> threading.Thread:
    """A non-streamed chat in a thread; its response lands in ``results[key]``."""
    def run() -> None:
        results[key] = request("POST", f"{router.url}/v1/chat/completions", chat_body(model, max_tokens=1),
                               timeout=90)
    t = threading.Thread(target=run)
    t.start()
    return t


def pending(router, model: str) -> dict | None:
    return get_json(f"{router.url}/api/models/{model}/info")["model"].get("pending")


def waiting(rds) -> dict[str, WaitEntry]:
    return {e.model: e for e in (from_json(v, WaitEntry) for v in rds.hgetall(Keys().waiting()).values())}


def running_since(rds, model: str) -> list[float]:
    """When the worker logged each start of ``model`` as running (its own clock)."""
    return [e.timestamp for _, f in rds.xrange(Keys().logs(model)) if (e := log_entry(f)).message.startswith("running on")]


def test_two_routers_share_the_line_residency_and_starvation(procs, redis_url, rds, tmp_path):
    wid = uid("w")
    a, b, c = uid("a"), uid("b"), uid("c")
    gpu_worker(procs, redis_url, tmp_path, wid, [20000],  # one of them at a time
               gpu_model(a, 12000, min_residency=600), gpu_model(b, 12000, min_residency=600, max_wait=4),
               gpu_model(c, 12000, max_wait=8))
    r1, r2 = start_router(procs, redis_url), start_router(procs, redis_url)
    for r in (r1, r2):
        wait_devices(r, wid)
    assert request("POST", f"{r1.url}/api/models/{a}/start", timeout=30).status == 200

    results: dict = {}
    threads = [ask(results, "b1", r1, b)]
    wait_for(lambda: b in waiting(rds), timeout=10, message="b in the shared line")
    threads.append(ask(results, "c2", r2, c))
    threads.append(ask(results, "b2", r2, b))  # batched with r1's request for b: one start
    wait_for(lambda: c in waiting(rds) and (pending(r2, b) or {}).get("waiting") == 2, timeout=10,
             message="c in line, both routers' requests for b counted")

    # Both routers see the same line: b first (a's residency holds it), c behind b.
    for r in (r1, r2):
        got = pending(r, b)
        assert (got["kind"], got["position"]) == ("queued", 1), got
        assert got["blocked"][0]["kind"] == "residency" and got["blocked"][0]["model"] == a
    got = pending(r2, c)
    assert (got["position"], got["blocked"]) == (2, [{"kind": "turn", "model": b}]), got
    assert running_on(r1, a) == [wid]

    for t in threads:
        t.join(100)
    assert {k: v.status for k, v in results.items()} == {"b1": 200, "b2": 200, "c2": 200}, \
        {k: v.body[:600] for k, v in results.items() if v.status != 200}
    # b waited its max_wait (4 s) and evicted a despite a's residency; c waited behind b, then
    # its own max_wait (8 s) overrode b's residency. One start of each.
    (b_at,), (c_at,) = running_since(rds, b), running_since(rds, c)
    assert b_at < c_at
    assert running_on(r1, c) == [wid] and instances(r1, a)[wid]["state"] == "stopped"
    assert not waiting(rds).keys() & {b, c}  # the line is empty again
    for r in (r1, r2):
        metrics = request("GET", f"{r.url}/metrics").body.decode()
        assert f'llm_router_queue_wait_seconds_count{{cause="swap",model="{b}"}}' in metrics or \
               f'llm_router_queue_wait_seconds_count{{cause="swap",model="{c}"}}' in metrics


def test_lru_scheduler_swaps_at_once(procs, redis_url, rds, tmp_path):
    """``LLM_ROUTER_SCHEDULER=lru``: residency is ignored (the comparison the benchmark makes)."""
    wid = uid("w")
    a, b = uid("a"), uid("b")
    gpu_worker(procs, redis_url, tmp_path, wid, [20000], gpu_model(a, 12000, min_residency=600), gpu_model(b, 12000))
    router = start_router(procs, redis_url, env={"LLM_ROUTER_SCHEDULER": "lru"})
    wait_devices(router, wid)
    assert request("POST", f"{router.url}/api/models/{a}/start", timeout=30).status == 200
    began = time.monotonic()
    resp = request("POST", f"{router.url}/v1/chat/completions", chat_body(b, max_tokens=1), timeout=30)
    assert resp.status == 200, resp.body
    assert time.monotonic() - began < 20 and running_on(router, b) == [wid]


def test_idle_release_ends_the_residency_of_an_unused_model(procs, redis_url, rds, tmp_path):
    """``idle_release``: a model that nobody has used for that long gives way to a waiting one
    although its ``min_residency`` (600 s here) is far from over; not before."""
    wid = uid("w")
    a, b = uid("a"), uid("b")
    gpu_worker(procs, redis_url, tmp_path, wid, [20000], gpu_model(a, 12000, min_residency=600, idle_release=2),
               gpu_model(b, 12000))
    router = start_router(procs, redis_url)
    wait_devices(router, wid)
    assert request("POST", f"{router.url}/v1/chat/completions", chat_body(a, max_tokens=1), timeout=30).status == 200
    a_done = time.time()
    resp = request("POST", f"{router.url}/v1/chat/completions", chat_body(b, max_tokens=1), timeout=60)
    assert resp.status == 200, resp.body
    (b_at,) = running_since(rds, b)
    assert b_at - a_done >= 1.9  # a stayed while it had been used within idle_release
    assert running_on(router, b) == [wid] and instances(router, a)[wid]["state"] == "stopped"


def test_every_wait_explained_no_room_queue_keepalive_info_and_status(procs, redis_url, tmp_path):
    wid = uid("w")
    a, b, huge = uid("a"), uid("b"), uid("huge")
    gpu_worker(procs, redis_url, tmp_path, wid, [20000], gpu_model(a, 12000, min_residency=600),
               gpu_model(b, 12000), gpu_model(huge, 30000))
    router = start_router(procs, redis_url, env={"LLM_ROUTER_LOADING_KEEPALIVE": "0.3"})
    wait_devices(router, wid)

    # no_room: each host's free and needed MiB, at once
    resp = request("POST", f"{router.url}/v1/chat/completions", chat_body(huge, max_tokens=1), timeout=30)
    assert resp.status == 503, resp.body
    error = resp.json()["error"]
    assert error["code"] == "model_start_failed" and error["reason"]["kind"] == "no_room"
    assert error["reason"]["hosts"][wid] == {"free_mb": {"0": 20000}, "needed_mb": 30000,
                                             "why": error["reason"]["hosts"][wid]["why"]}
    assert resp.headers["Retry-After"] == "5"

    # queued behind a's residency: the streamed request's keep-alives say so, as do info and status
    assert request("POST", f"{router.url}/api/models/{a}/start", timeout=30).status == 200
    stream = SseStream(f"{router.url}/v1/chat/completions", method="POST", body=chat_body(b, stream=True),
                       timeout=30)
    try:
        prefix = f"loading model '{b}' "
        comments = (stream.event().get("comment", "") for _ in range(20))  # bounded: no data comes
        comment = next((c for c in comments if c.startswith(prefix)), "")
        assert comment, "no keep-alive comment with a reason"
        reason = json.loads(comment[len(prefix):])
        assert (reason["kind"], reason["position"], reason["blocked"][0]["kind"]) == ("queued", 1, "residency")
        assert reason["eta"] > time.time() + 500  # a's residency (600 s) ends then
        info = get_json(f"{router.url}/api/models/{b}/info")["model"]["pending"]
        assert info["kind"] == "queued" and info["waiting"] == 1
        card = next(m for m in get_json(f"{router.url}/v1/models")["data"] if m["id"] == b)
        assert card["pending"]["kind"] == "queued"
        assert all("pending" not in m for m in get_json(f"{router.url}/v1/models")["data"] if m["id"] != b)
        out = subprocess.run([sys.executable, "-m", "llm_lab_router.cli", "status", "--url", router.url],
                             capture_output=True, text=True, timeout=30)
        line = next(ln for ln in out.stdout.splitlines() if ln.startswith("waiting"))
        assert b in line and "min_residency" in line and "ETA" in line, out.stdout
    finally:
        stream.close()


def test_free_room_goes_to_the_model_ahead_in_the_line(procs, redis_url, rds, tmp_path):
    """A model that fits now does not take free room that an older waiter waits for: a new
    request must not slip in between a starving model's eviction and its start. The older
    waiter here is another router's entry in ``llm:waiting`` (written by the test, kept fresh),
    so the room stays free for as long as the test needs."""
    wid = uid("w")
    b, c = uid("b"), uid("c")
    gpu_worker(procs, redis_url, tmp_path, wid, [20000], gpu_model(b, 12000), gpu_model(c, 12000))
    router = start_router(procs, redis_url)
    wait_devices(router, wid)
    field = f"{b}@elsewhere"

    def older_waiter() -> None:
        entry = WaitEntry(model=b, router="elsewhere", since=time.time() - 30, count=1, at=time.time())
        rds.hset(Keys().waiting(), field, json.dumps(msgspec.to_builtins(entry)))

    older_waiter()
    results: dict = {}
    thread = ask(results, "c", router, c)
    try:
        def c_behind_b() -> bool:
            older_waiter()
            got = pending(router, c) or {}
            return got.get("position") == 2 and got.get("blocked") == [{"kind": "turn", "model": b}]
        wait_for(c_behind_b, timeout=15, message="c waits behind b although the GPU is free")
        assert {i["state"] for i in instances(router, c).values()} == {"stopped"}, "c took the room b waits for"
    finally:
        rds.hdel(Keys().waiting(), field)  # b's router is gone: its turn passes
    thread.join(60)
    assert results["c"].status == 200, results["c"].body[:600]
    assert running_on(router, c) == [wid]


@contextlib.contextmanager
def b_waits_for_a(procs, redis_url, tmp_path, routers: int = 1, extra: tuple[str, ...] = ()
                  ) -> Iterator[tuple[str, str, list]]:
    """One worker whose stand-in GPU holds ``a`` (loaded, ``min_residency`` 600 s) or ``b`` (or
    one of the ``extra`` model blocks), and ``routers`` routers: a chat for ``b`` through the
    first waits for a swap behind ``a``'s residency while the body runs (given ``a``, ``b`` and
    the routers). Then ``a`` is stopped, so ``b`` starts and the chat is answered."""
    wid = uid("w")
    a, b = uid("a"), uid("b")
    gpu_worker(procs, redis_url, tmp_path, wid, [20000], gpu_model(a, 12000, min_residency=600), gpu_model(b, 12000),
               *extra)
    started = [start_router(procs, redis_url) for _ in range(routers)]
    for r in started:
        wait_devices(r, wid)
    assert request("POST", f"{started[0].url}/api/models/{a}/start", timeout=30).status == 200
    results: dict = {}
    thread = ask(results, "b", started[0], b)
    try:
        wait_for(lambda: (pending(started[0], b) or {}).get("blocked"), timeout=15, message="b waiting for a swap")
        yield a, b, started
    finally:
        request("POST", f"{started[-1].url}/api/models/{a}/stop", timeout=30)  # b's turn: it starts
        thread.join(60)
    assert results["b"].status == 200, results["b"].body[:600]


def test_every_router_shows_the_same_pending_line(procs, redis_url, tmp_path):
    """Behind a load balancer any router may answer ``/info``: a request waits through router 1,
    and router 2, with no request of its own for the model, shows the same pending reason
    (count, since, position, blocked, ETA) in ``/api/models/{alias}/info``, ``/v1/models`` and
    ``llm-router status``: the line is read from ``llm:waiting``, where router 1 publishes its
    decision."""
    with b_waits_for_a(procs, redis_url, tmp_path, routers=2) as (a, b, (r1, r2)):
        seen = ("kind", "position", "waiting", "since", "blocked")

        def same() -> bool:
            here, there = pending(r1, b), pending(r2, b)
            return bool(there) and {k: here.get(k) for k in seen} == {k: there.get(k) for k in seen}
        wait_for(same, timeout=10, message="router 2 shows router 1's pending line")
        got = pending(r2, b)
        assert (got["kind"], got["position"], got["waiting"]) == ("queued", 1, 1), got
        assert [(x["kind"], x["model"]) for x in got["blocked"]] == [("residency", a)], got
        assert got["eta"] > time.time() + 500 and abs(got["eta"] - pending(r1, b)["eta"]) < 1, got
        assert got["since"] <= time.time() and "min_residency" in got["message"], got
        card = next(m for m in get_json(f"{r2.url}/v1/models")["data"] if m["id"] == b)
        assert card["pending"]["position"] == 1 and card["pending"]["blocked"] == got["blocked"]
        out = subprocess.run([sys.executable, "-m", "llm_lab_router.cli", "status", "--url", r2.url],
                             capture_output=True, text=True, timeout=30)
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("waiting")), "")
        assert b in line and "position 1" in line and "1 request(s) waiting for " in line and "ETA" in line, out.stdout
    wait_for(lambda: pending(r2, b) is None, timeout=10, message="the line empty on router 2 too")


def start_on(rds, wid: str, model: str) -> Reply:
    """Start ``model`` on worker ``wid`` itself (a command as a router sends it): a router's
    start of a model that runs elsewhere already is a no-op."""
    cmd = Command(op="start", model=model, timeout=30)
    rds.xadd(Keys().commands(wid), command_fields(cmd))
    got = rds.blpop([Keys().reply(wid, cmd.id)], 30)
    assert got is not None, f"no reply from {wid}"
    return from_json(got[1], Reply)


def a_on_two_hosts(procs, redis_url, tmp_path, **a_settings):
    """Workers h and z (named so that h sorts first), each a stand-in GPU that holds one model
    of 12000 MiB; a (with ``a_settings``) on both, b on h only; one router. Returns (h, z, router)."""
    h, z = uid("h"), uid("z")
    gpu_worker(procs, redis_url, tmp_path, z, [20000], gpu_model("a", 12000, **a_settings))
    gpu_worker(procs, redis_url, tmp_path, h, [20000], gpu_model("a", 12000, **a_settings), gpu_model("b", 12000))
    router = start_router(procs, redis_url)
    wait_devices(router, h, z)
    return h, z, router


def test_residency_is_per_instance_across_two_workers(procs, redis_url, rds, tmp_path):
    """a runs on two hosts with the same 3 s residency: on z since long enough that its copy's is
    over, on h since a moment ago. b fits only on h, by evicting h's copy: it waits for that
    copy's residency, whatever z's copy says (workers sort h before z: a guard per model id took
    z's copy's verdict, and h's copy was evicted at once)."""
    residency = 3.0
    h, z, router = a_on_two_hosts(procs, redis_url, tmp_path, min_residency=residency)
    assert start_on(rds, z, "a").ok
    z_started = time.monotonic()
    wait_for(lambda: time.monotonic() - z_started > residency, timeout=residency + 1, message="z's copy past residency")
    assert start_on(rds, h, "a").ok
    h_started = time.monotonic()
    wait_for(lambda: sorted(running_on(router, "a")) == sorted([h, z]), timeout=10, message="a running on h and z")
    results: dict = {}
    thread = ask(results, "b", router, "b")
    wait_for(lambda: rds.hget(Keys().instance("a", h), "state") != "running", timeout=residency + 6,
             message="h's copy evicted")
    held = time.monotonic() - h_started
    thread.join(60)
    assert results["b"].status == 200, results["b"].body[:600]
    assert held >= residency - 1, held  # not at once
    assert running_on(router, "b") == [h] and running_on(router, "a") == [z]


def test_drain_is_per_instance_across_two_workers(procs, redis_url, rds, tmp_path):
    """a runs on z, serving a long stream, and on h, serving nothing. b fits only on h: it
    evicts h's idle copy at once, and the stream on z's copy goes on (a drain per model id held
    b back until the stream ended)."""
    h, z, router = a_on_two_hosts(procs, redis_url, tmp_path, engine_args=SLOW)
    assert start_on(rds, z, "a").ok
    wait_for(lambda: running_on(router, "a") == [z], timeout=10, message="a running on z")
    stream = open_stream(router, "a")  # served by z's copy, the only one
    try:
        assert start_on(rds, h, "a").ok
        wait_for(lambda: sorted(running_on(router, "a")) == sorted([h, z]), timeout=10, message="a on h and z")
        results: dict = {}
        thread = ask(results, "b", router, "b")
        thread.join(20)
        assert "b" in results, "b waited for a stream that h's copy does not serve"
        assert results["b"].status == 200, results["b"].body[:600]
        assert running_on(router, "b") == [h] and running_on(router, "a") == [z]
        assert stream.event()  # still being served
    finally:
        stream.close()
