"""Hosts whose clocks disagree by 30 s, in both directions, decide as if they agreed.

A router or a worker runs under libfaketime (``LD_PRELOAD`` + ``FAKETIME``), so its wall clock
is 30 s behind or ahead of Redis's and of the other processes'. Every stamp another host reads
is on Redis's clock (``llm_lab_router.clock``) and a command's age is measured from its stream
id, so: a request in flight is never unloaded and an idle model is unloaded on time (the
worker's idle reaper reads the routers' stamps), commands neither expire early nor outlive
their sender (the router sets the timeout, the worker checks it), residency lasts its length
(the worker stamps ``started_at``, the router compares it) and the waiting line keeps arrival
order (two routers' ``since``). Skipped where libfaketime is not installed (Debian package
``faketime``; ``.ci/run`` installs it).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import wait_for
from fake_nvml import fake_gpu_env
from helpers import (
    SseStream,
    chat_body,
    model_block,
    request,
    start_router,
    start_worker,
    wait_models,
    write_config,
)
from llm_lab_router.protocol import Command, Keys, Reply, from_json
from test_placement import gpu_model, idle_stop_at, uid, wait_devices
from test_scheduling import ask, waiting

FAKETIME_LIB = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
SKEWS = ("-30s", "+30s")
pytestmark = pytest.mark.skipif(not FAKETIME_LIB.exists(),
                                reason=f"libfaketime is not installed ({FAKETIME_LIB}: apt-get install faketime)")


def skewed(offset: str) -> dict[str, str]:
    """The environment that runs a process with its clocks shifted by ``offset`` ("-30s")."""
    return {"LD_PRELOAD": str(FAKETIME_LIB), "FAKETIME": offset}


def test_the_bed_really_shifts_a_python_childs_clock():
    """Without this, every test below would pass on agreeing clocks."""
    for offset, sign in (("-30s", -1), ("+30s", 1)):
        env = {"PATH": "/usr/bin:/bin", **skewed(offset)}
        out = subprocess.run([sys.executable, "-c", "import time; print(time.time())"], env=env,
                             capture_output=True, text=True, timeout=30, check=True)
        assert abs(float(out.stdout) - time.time() - sign * 30) < 5, (offset, out.stdout)


@pytest.mark.parametrize("side", ["router", "worker"])
@pytest.mark.parametrize("offset", SKEWS)
def test_a_stream_is_never_unloaded_and_an_idle_model_is_on_time(procs, redis_url, rds, tmp_path, side, offset):
    """idle_ttl 2 s, a stream of about 4 s: the worker's reaper must count it in flight (the
    router's entry is fresh whatever either clock says), then stop the model about 2 s after
    it ended (the router's last use is not 30 s in the past, nor in the future)."""
    ttl = 2.0
    wid = uid("w")
    cfg = write_config(tmp_path / "idle.toml", model_block("m", idle_ttl=ttl, engine_args=["--tokens-per-second", "5"]))
    start_worker(procs, redis_url, cfg, wid, env=skewed(offset) if side == "worker" else None)
    router = start_router(procs, redis_url, env=skewed(offset) if side == "router" else None)
    wait_models(router, 1)
    assert request("POST", f"{router.url}/api/models/m/start", timeout=30).status == 200

    began = time.monotonic()
    stream = SseStream(f"{router.url}/v1/chat/completions", method="POST",
                       body=chat_body("m", stream=True, max_tokens=20), timeout=30)
    try:
        assert stream.status == 200
        events = stream.events_until(lambda e: e.get("data") == "[DONE]")
    finally:
        stream.close()
    ended = time.monotonic()
    assert events and events[-1].get("data") == "[DONE]", events[-3:]  # not cut
    assert ended - began > ttl + 1, "the stream must outlast idle_ttl"
    assert idle_stop_at(rds, "m") is None, "unloaded while a request was in flight"

    wait_for(lambda: idle_stop_at(rds, "m"), timeout=ttl + 4, message="m stopped as idle")
    idle_for = time.monotonic() - ended
    assert ttl - 0.5 <= idle_for <= ttl + 4, idle_for


def command_entries(rds, wid: str) -> list[Command]:
    return [from_json(f["data"], Command) for _, f in rds.xrange(Keys().commands(wid))]


@pytest.mark.parametrize("offset", SKEWS)
def test_commands_neither_expire_early_nor_outlive_their_sender(procs, redis_url, rds, tmp_path, offset):
    """The router waits 2 s for a stop. Its clock 30 s behind: the worker still runs the stop
    (a deadline on the router's clock had passed already). Ahead: a stop that waited in the
    stream longer than the router did (the worker was paused) is not run when the worker comes
    back (that deadline lay 30 s later)."""
    wid = uid("w")
    cfg = write_config(tmp_path / "cmd.toml", model_block("m"), lease_ttl=15.0)  # a pause keeps the lease
    worker = start_worker(procs, redis_url, cfg, wid)
    router = start_router(procs, redis_url, env={**skewed(offset), "LLM_ROUTER_STOP_TIMEOUT": "2"})
    wait_models(router, 1)
    info = f"{router.url}/api/models/m/info"

    def state() -> str:
        return request("GET", info).json()["model"]["status"]

    assert request("POST", f"{router.url}/api/models/m/start", timeout=30).status == 200
    resp = request("POST", f"{router.url}/api/models/m/stop", timeout=30)
    assert resp.status == 200, resp.body  # not expired on arrival
    wait_for(lambda: state() == "stopped", timeout=10, message="m stopped")

    assert request("POST", f"{router.url}/api/models/m/start", timeout=30).status == 200
    worker.send_signal(signal.SIGSTOP)
    try:
        resp = request("POST", f"{router.url}/api/models/m/stop", timeout=30)
        assert resp.status == 503, resp.body  # the router gave up after 2 s
    finally:
        worker.send_signal(signal.SIGCONT)
    stop = next(c for c in reversed(command_entries(rds, wid)) if c.op == "stop")
    got = rds.blpop([Keys().reply(wid, stop.id)], 15)
    assert got is not None, "the worker never answered the late stop"
    reply = from_json(got[1], Reply)
    assert (reply.ok, reply.message) == (False, "expired"), reply
    assert state() == "running"


@pytest.mark.parametrize("offset", SKEWS)
def test_residency_lasts_its_length(procs, redis_url, rds, tmp_path, offset):
    """The worker stamps ``started_at`` on a clock 30 s off; the router decides a's residency
    (3 s) by it: b evicts a about 3 s after a became running, not at once, not 30 s late."""
    wid = uid("w")
    residency = 3.0
    cfg = write_config(tmp_path / f"{wid}.toml", gpu_model("a", 12000, min_residency=residency),
                       gpu_model("b", 12000))
    start_worker(procs, redis_url, cfg, wid, env={**fake_gpu_env(20000), **skewed(offset)})
    router = start_router(procs, redis_url)
    wait_devices(router, wid)
    key = Keys().instance("a", wid)
    assert request("POST", f"{router.url}/api/models/a/start", timeout=30).status == 200
    running_at = time.monotonic()  # a became running a moment before
    results: dict = {}
    thread = ask(results, "b", router, "b")
    wait_for(lambda: rds.hget(key, "state") != "running", timeout=residency + 6, message="a evicted")
    held = time.monotonic() - running_at
    thread.join(60)
    assert results["b"].status == 200, results["b"].body[:600]
    assert residency - 1 <= held <= residency + 3, held


@pytest.mark.parametrize("first,second", [("+30s", "-30s"), ("-30s", "+30s")])
def test_the_waiting_line_keeps_arrival_order_across_routers(procs, redis_url, rds, tmp_path, first, second):
    """b waits through a router whose clock is ``first``, then c through one at ``second``
    (60 s apart), both behind a's residency (600 s: no clock can end it here); once a is
    stopped, b (there first) starts first, then c."""
    wid = uid("w")
    cfg = write_config(tmp_path / f"{wid}.toml", gpu_model("a", 12000, min_residency=600), gpu_model("b", 12000),
                       gpu_model("c", 12000))
    start_worker(procs, redis_url, cfg, wid, env=fake_gpu_env(20000))
    r1 = start_router(procs, redis_url, env=skewed(first))
    r2 = start_router(procs, redis_url, env=skewed(second))
    for r in (r1, r2):
        wait_devices(r, wid)
    assert request("POST", f"{r1.url}/api/models/a/start", timeout=30).status == 200
    order: list[str] = []
    watch = threading.Thread(target=record_starts, args=(rds, wid, ["b", "c"], order), daemon=True)
    watch.start()
    results: dict = {}
    threads = [ask(results, "b", r1, "b")]
    wait_for(lambda: "b" in waiting(rds), timeout=10, message="b in the shared line")
    threads.append(ask(results, "c", r2, "c"))
    wait_for(lambda: "c" in waiting(rds), timeout=10, message="c in the shared line")
    assert request("POST", f"{r1.url}/api/models/a/stop", timeout=30).status == 200
    for t in threads:
        t.join(60)
    watch.join(30)
    assert {k: v.status for k, v in results.items()} == {"b": 200, "c": 200}, \
        {k: json.loads(v.body) for k, v in results.items() if v.status != 200}
    assert order == ["b", "c"]


def record_starts(rds, wid: str, models: list[str], order: list[str], timeout: float = 60) -> None:
    """Append each of ``models`` to ``order`` when its instance first shows ``starting`` or
    ``running`` (polled: another process's state has no event to await here)."""
    deadline = time.monotonic() + timeout
    while len(order) < len(models) and time.monotonic() < deadline:
        for m in models:
            if m not in order and rds.hget(Keys().instance(m, wid), "state") in ("starting", "running"):
                order.append(m)
        time.sleep(0.02)
