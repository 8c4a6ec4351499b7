"""Engines outlive their worker: adoption after a crash or an upgrade, logs that survive both,
and desired state that survives start-up failures (issue 11).

Real worker processes (``llm-router worker``), real engines (the mock engine, or a tiny counting
engine written by the test), a real router where routing matters, and a private redis-server
where the test freezes Redis (SIGSTOP) to make an outage.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis as redis_sync
from conftest import MOCK_ENGINE, ROOT, wait_for
from helpers import SseStream, chat_body, get_json, request, start_router, wait_routable
from llm_lab_router.redis_server import RedisServer, free_port
from worker_helpers import KEYS, Worker, alive, model, processes_of, worker  # noqa: F401 (fixture)

COUNTING_ENGINE = '''
import http.server, sys, threading, time
port, count, rate = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])

class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.send_header("Content-Length", "2"); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *args):
        pass

def talk():
    start = time.monotonic()
    for i in range(count):
        print(f"line {i}", flush=True)
        time.sleep(max(0.0, start + (i + 1) / rate - time.monotonic()))
    print("done", flush=True)

server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Health)
threading.Thread(target=talk, daemon=True).start()
server.serve_forever()
'''


@pytest.fixture
def own_redis(procs, tmp_path):
    """A private redis-server the test may freeze (SIGSTOP); the test's processes are stopped
    before it goes, so that workers still reach it while they stop."""
    server = RedisServer(tmp_path / "own-redis", port=free_port(), extra=["--appendonly", "no", "--save", ""])
    server.start()
    rds = redis_sync.Redis.from_url(server.url, decode_responses=True)
    yield server, rds
    server.proc.send_signal(signal.SIGCONT)
    procs.stop_all()
    rds.close()
    server.stop()


def spool_bytes(state: Path, model_id: str) -> int:
    return sum(f.stat().st_blocks * 512 for f in state.glob(f"*/spool/{model_id}/*.log"))


# --- adoption ---


def test_kill_9_of_the_worker_keeps_the_engine_its_stream_and_its_routing(worker, procs, redis_url, rds):
    router = start_router(procs, redis_url)
    worker.start([model("m1", "--tokens-per-second", "20")], lease_ttl=5.0)
    assert worker.command("start", "m1").ok
    pid = worker.instance("m1").pid
    wait_routable(router, "m1")
    stream = SseStream(f"{router.url}/v1/chat/completions", method="POST",
                       body=chat_body("m1", stream=True, max_tokens=60))
    assert stream.status == 200 and "choices" in stream.event()["data"]

    killed_at, killed_wall = time.monotonic(), time.time()
    procs.stop(worker.proc, signal.SIGKILL)
    worker.start(wait=False)
    while True:  # until the new worker has taken the engine over, the router keeps routing to it
        listed = get_json(f"{router.url}/v1/models")["data"]
        assert any(m["id"] == "m1" and m["status"] == "running" for m in listed), listed
        assert request("POST", f"{router.url}/v1/chat/completions", chat_body("m1", max_tokens=1)).status == 200
        inst = worker.instance("m1")
        if rds.hget(KEYS.worker(worker.wid), "pid") == str(worker.proc.pid) and inst.updated_at > killed_wall:
            break
        assert time.monotonic() - killed_at < 5, f"not adopted within 5 s\n{worker.log()}"
        time.sleep(0.05)
    assert inst.state == "running" and inst.pid == pid, inst

    events = stream.events_until(lambda e: e.get("data") == "[DONE]")
    assert events[-1]["data"] == "[DONE]" and not any("error" in str(e.get("data")) for e in events)
    assert len([e for e in events if isinstance(e.get("data"), dict)]) >= 59  # every token came
    stream.close()
    assert processes_of(worker.wid) == [pid]  # no new engine
    assert sum(m.startswith("starting: ") for m in worker.messages("m1", "event")) == 1


def test_changed_config_or_a_hung_engine_is_not_adopted(worker, procs):
    worker.start([model("m1"), model("m2")])
    old1 = worker.command("start", "m1").ok and worker.instance("m1").pid
    old2 = worker.command("start", "m2").ok and worker.instance("m2").pid
    procs.stop(worker.proc, signal.SIGKILL)
    os.kill(old2, signal.SIGSTOP)  # m2 hangs: its health check is never answered
    worker.write_config([model("m1", "--max-tokens", "3"), model("m2")])  # m1's command changed

    worker.start()
    new1 = wait_for(lambda: (i := worker.instance("m1")).state == "running" and i.pid != old1 and i, timeout=15,
                    message="m1 started again (its desired state, from Redis)")
    new2 = wait_for(lambda: (i := worker.instance("m2")).state == "running" and i.pid != old2 and i, timeout=15,
                    message="m2 started again")
    assert not alive(old1) and not alive(old2)
    assert sorted(processes_of(worker.wid)) == sorted([new1.pid, new2.pid])
    wait_for(lambda: any(f"process {old1} " in m and "differ from the config" in m
                         for m in worker.messages("m1", "event")), message="why m1's engine was not adopted")
    wait_for(lambda: any(f"process {old2} " in m and "did not answer its health check" in m
                         for m in worker.messages("m2", "event")), message="why m2's engine was not adopted")


def test_a_model_whose_engine_died_with_the_worker_is_started_again(worker, procs):
    worker.start([model("m1"), model("m2")])
    old = worker.command("start", "m1").ok and worker.instance("m1").pid
    procs.stop(worker.proc, signal.SIGKILL)
    os.kill(old, signal.SIGKILL)
    worker.start()
    inst = wait_for(lambda: (i := worker.instance("m1")).state == "running" and i.pid != old and i, timeout=15,
                    message="m1 started again")
    assert alive(inst.pid)
    assert worker.instance("m2").state == "stopped"  # it was not running: it stays stopped


# --- the two ways to stop ---


def test_sigterm_leaves_the_models_running_for_the_next_worker(worker, procs, rds):
    worker.start([model("m1", auto_start=True)], adopt_timeout=60.0)
    pid = worker.wait_state("m1", "running").pid
    assert procs.stop(worker.proc, signal.SIGTERM) == 0
    assert alive(pid) and worker.instance("m1").state == "running"
    assert rds.exists(KEYS.worker(worker.wid))  # left to expire: routers keep routing meanwhile
    assert "models keep running" in worker.log() and "Traceback" not in worker.log()

    worker.start()
    worker.wait_state("m1", "running", pid=pid)
    wait_for(lambda: rds.hget(KEYS.worker(worker.wid), "pid") == str(worker.proc.pid), message="the new lease")
    time.sleep(0.5)  # past a few looks of the linger (every 0.2 s): it must have left the engine alone
    assert alive(pid) and processes_of(worker.wid) == [pid]


def test_models_nobody_adopts_are_stopped_after_adopt_timeout_and_stay_stopped(worker, procs, rds):
    worker.start([model("m1", auto_start=True)], adopt_timeout=1.0)
    pid = worker.wait_state("m1", "running").pid
    assert procs.stop(worker.proc, signal.SIGTERM) == 0
    assert alive(pid)
    wait_for(lambda: not alive(pid), timeout=10, message="the linger to stop the model")

    rds.delete(KEYS.worker(worker.wid))
    worker.start([model("m1")])  # not auto_start: only the desired state could start it
    inst = wait_for(lambda: (i := worker.instance("m1")) and i.state == "stopped" and i, message="m1 stopped")
    assert inst.pid == 0 and processes_of(worker.wid) == []


def test_stop_models_command_stops_what_a_worker_left_running(worker, procs):
    worker.start([model("m1", auto_start=True)])
    pid = worker.wait_state("m1", "running").pid
    cli = [sys.executable, "-m", "llm_lab_router.cli", "worker", "--config", str(worker.config), "--worker-id",
           worker.wid, "--stop-models"]
    busy = subprocess.run(cli, capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert busy.returncode == 2 and "is running" in busy.stderr and alive(pid)  # its worker is there

    procs.stop(worker.proc, signal.SIGKILL)
    done = subprocess.run(cli, capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert done.returncode == 0, done.stderr
    assert f"{pid} m1" in done.stdout and not alive(pid)


# --- logs: nothing lost, nothing twice ---


def test_every_line_arrives_once_across_kill_9_and_a_30s_redis_outage(procs, tmp_path, own_redis):
    count, rate = 8000, 200.0
    engine = tmp_path / "counting_engine.py"
    engine.write_text(COUNTING_ENGINE)
    server, rds = own_redis
    worker = Worker(procs, rds, server.url, tmp_path)
    worker.start([{"id": "counter", "command": ["{python}", str(engine), "{port}", str(count), str(rate)],
                   "auto_start": True, "startup_timeout": 10.0, "stop_grace": 1.0, "restart": "no"}])
    pid = worker.wait_state("counter", "running").pid
    wait_for(lambda: rds.xlen(KEYS.logs("counter")) > 200, message="lines flowing")

    server.proc.send_signal(signal.SIGSTOP)  # Redis frozen: batches in flight hang, maybe land later
    frozen = time.monotonic()
    time.sleep(2)
    procs.stop(worker.proc, signal.SIGKILL)  # the worker dies during the outage
    worker.start(wait=False)  # ... and its successor starts while Redis is still frozen
    time.sleep(max(0.0, 30 - (time.monotonic() - frozen)))
    server.proc.send_signal(signal.SIGCONT)

    def lines() -> list[str]:
        return [e.message for e in worker.logs("counter") if e.stream == "stdout"]

    wait_for(lambda: "done" in lines(), timeout=count / rate + 30, interval=0.5, message="the last line")
    assert worker.instance("counter").pid == pid  # adopted, not restarted
    got = lines()
    assert got == [f"line {i}" for i in range(count)] + ["done"], \
        f"{len(got)} lines; first wrong at {next(i for i, m in enumerate(got) if m != f'line {i}')}"


def test_the_spool_bound_holds_and_drops_are_published(procs, tmp_path, own_redis):
    state = tmp_path / "state"
    server, rds = own_redis
    router = start_router(procs, server.url)
    worker = Worker(procs, rds, server.url, tmp_path)
    worker.start([model("chatty", "--chatty", "20000", auto_start=True)], log_spool_mb=1,
                 state_dir=str(state))
    worker.wait_state("chatty", "running")
    server.proc.send_signal(signal.SIGSTOP)
    biggest = 0
    for _ in range(40):  # 4 s of a chatty engine against a frozen Redis: several MiB printed
        biggest = max(biggest, spool_bytes(state, "chatty"))
        time.sleep(0.1)
    server.proc.send_signal(signal.SIGCONT)
    assert 0 < biggest <= 1 << 20, biggest

    dropped = wait_for(lambda: int(rds.hget(KEYS.worker(worker.wid), "log_lines_dropped") or 0),
                       timeout=15, message="the drops in the worker's lease")
    assert dropped > 0

    def exported() -> float:  # the router reads leases at its next resync
        metrics = request("GET", f"{router.url}/metrics").body.decode()
        return sum(float(m.rsplit(" ", 1)[1]) for m in metrics.splitlines()
                   if m.startswith("llm_router_worker_log_lines_dropped{") and f'worker="{worker.wid}"' in m)

    wait_for(lambda: exported() > 0, message="the drops in the router's /metrics")
    assert "log lines dropped: the spool of chatty is over its bound (log_spool_mb = 1)" in worker.log()


# --- desired state through start-up failures ---


def test_two_workers_with_one_port_range_both_run_their_auto_start_model(procs, rds, redis_url, tmp_path):
    a, b = Worker(procs, rds, redis_url, tmp_path), Worker(procs, rds, redis_url, tmp_path)
    entry = model("m1", "--startup-delay", "4", auto_start=True, startup_timeout=30.0)
    a.write_config([entry])
    b.write_config([entry])  # the same port_range: both pick its first free port at once
    a.start(wait=False)
    b.start(wait=False)
    ia, ib = a.wait_state("m1", "running", timeout=40), b.wait_state("m1", "running", timeout=40)
    assert ia.url != ib.url
    assert any("was taken meanwhile; trying another port" in m for m in a.messages("m1", "event")
               + b.messages("m1", "event"))  # the race did happen


def test_an_auto_start_model_whose_start_fails_is_retried(worker, tmp_path):
    flag = tmp_path / "failed-once"
    command = ["sh", "-c", f'test -e {flag} || {{ touch {flag}; exit 1; }}; exec "$0" "$@"', "{python}",
               str(MOCK_ENGINE), "--port", "{port}", "--host", "{host}", "--quiet"]
    worker.start([{"id": "m1", "command": command, "auto_start": True, "restart": "on-failure",
                   "startup_timeout": 10.0, "stop_grace": 1.0}])
    inst = worker.wait_state("m1", "running", timeout=15)
    assert inst.restarts == 1 and flag.exists()
    assert any(m.startswith("restarting in 1s") for m in worker.messages("m1", "event"))


def test_up_ctrl_c_still_stops_the_models_it_started(procs, tmp_path):
    wid = f"up-{uuid.uuid4().hex[:8]}"
    low = free_port()
    config = tmp_path / "models.toml"
    config.write_text(f'[worker]\nid = "{wid}"\nport_range = [{low}, {low + 20}]\n\n[[models]]\nid = "m1"\n'
                      f'command = {json.dumps(model("m1")["command"])}\nauto_start = true\nstop_grace = 1.0\n')
    port = free_port()
    up = procs.start([sys.executable, "-m", "llm_lab_router.cli", "up", "--config", str(config), "--port", str(port),
                      "--data-dir", str(tmp_path / "data")], name="up", stop_signal=signal.SIGINT)

    def running() -> bool:
        assert up.poll() is None, procs.log(up)
        try:
            listed = get_json(f"http://127.0.0.1:{port}/v1/models")["data"]
        except (OSError, AssertionError):
            return False
        return any(m["id"] == "m1" and m["status"] == "running" for m in listed)

    wait_for(running, timeout=60, interval=0.2, message="up serving m1")
    engines = processes_of(wid)
    assert len(engines) == 1
    assert procs.stop(up, signal.SIGINT) == 0
    assert not any(alive(pid) for pid in engines)
