"""The worker agent as operators and routers see it: a real process, a real Redis, real engines.

Each test writes a host config, runs ``llm-router worker`` and talks to it only through Redis
(commands in, replies / hashes / streams / events out), polling Redis state where there is no
event to wait for. Short grace periods and timeouts keep the suite fast.
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request

from conftest import wait_for
from llm_lab_router.protocol import CatalogEntry, DeviceSnapshot, from_json
from llm_lab_router.redis_server import RedisServer, free_port
from worker_helpers import (  # noqa: F401  (worker: the fixture)
    KEYS,
    Worker,
    alive,
    events,
    http_status,
    model,
    processes_of,
    worker,
)

# --- publishing ---


def test_publishes_lease_catalog_instances_and_devices(worker, rds):
    pubsub = rds.pubsub()
    pubsub.subscribe(KEYS.events(worker.wid))
    worker.start([model("m-chat", aliases=["chatty-alias"], created=1700000000),
                  model("m-embed", mode="embedding")])

    lease = rds.hgetall(KEYS.worker(worker.wid))
    assert lease["id"] == worker.wid and int(lease["pid"]) == worker.proc.pid
    assert 0 < rds.pttl(KEYS.worker(worker.wid)) <= 2000
    first_beat = float(lease["heartbeat_at"])
    wait_for(lambda: float(rds.hget(KEYS.worker(worker.wid), "heartbeat_at")) > first_beat, message="a heartbeat")

    catalog = {k: from_json(v, CatalogEntry) for k, v in rds.hgetall(KEYS.catalog(worker.wid)).items()}
    assert set(catalog) == {"m-chat", "m-embed"}
    assert catalog["m-chat"].aliases == ["m-chat", "chatty-alias"] and catalog["m-chat"].created == 1700000000
    assert catalog["m-embed"].mode == "embedding"
    for model_id in catalog:
        inst = worker.instance(model_id)
        assert inst.state == "stopped" and inst.worker == worker.wid

    seen = events(pubsub, lambda e: e.kind == "catalog")
    assert any(e.kind == "worker" and e.alive for e in seen)

    raw = wait_for(lambda: rds.get(KEYS.devices(worker.wid)), message="a device snapshot")
    snap = from_json(raw, DeviceSnapshot)
    assert snap.worker == worker.wid and snap.cpu.online and snap.cpu.memory_total > 0
    assert snap.cuda.online or snap.cuda.error  # offline on GPU-less hosts, with the reason
    assert 0 < rds.pttl(KEYS.devices(worker.wid)) <= 1500
    pubsub.close()


# --- start, stop, logs ---


def test_start_and_stop_by_command(worker, rds):
    worker.start([model("m1", aliases=["m1-alias"])])
    reply = worker.command("start", "m1-alias")
    assert reply.ok and reply.state == "running", reply
    inst = worker.instance("m1")
    assert inst.state == "running" and inst.pid > 0 and inst.url.startswith("http://127.0.0.1:")
    assert http_status(inst.url + "/health") == 200
    assert alive(inst.pid)

    again = worker.command("start", "m1")  # idempotent: already running
    assert again.ok and worker.instance("m1").pid == inst.pid

    # Log lines are shipped in batches (every ~20 ms), independently of replies and states.
    wait_for(lambda: any(m.startswith("running on ") for m in worker.messages("m1", "event")),
             message="the 'running on' event line")
    entries = worker.logs("m1")
    assert all(e.host == worker.wid and e.timestamp > 0 for e in entries)
    assert any(e.stream == "event" and e.message.startswith("starting: ") for e in entries)
    assert any(e.stream == "stdout" and "ready; listening" in e.message for e in entries)

    reply = worker.command("stop", "m1")
    assert reply.ok and reply.state == "stopped"
    assert worker.instance("m1").state == "stopped"
    assert not alive(inst.pid)
    wait_for(lambda: "stopped" in worker.messages("m1", "event"), message="the 'stopped' event line")
    assert worker.command("stop", "m1").ok  # idempotent


def test_unknown_model_and_expired_command(worker):
    worker.start([model("m1")])
    # A command added (the stream id is Redis's time) 60 s ago whose sender waited 30 s: not
    # run. The first entry of the stream may carry any id, so it goes first.
    secs, _ = worker.rds.time()
    expired = worker.reply(worker.send("start", "m1", entry_id=f"{(secs - 60) * 1000}-1", timeout=30))
    assert not expired.ok and expired.message == "expired"
    reply = worker.command("start", "nope")
    assert not reply.ok and "unknown model" in reply.message
    assert worker.instance("m1").state == "stopped"


def test_concurrent_starts_share_one_process(worker):
    worker.start([model("m1", "--startup-delay", "0.5")])
    cmds = [worker.send("start", "m1") for _ in range(3)]
    replies = [worker.reply(c) for c in cmds]
    assert all(r.ok for r in replies)
    assert len(processes_of(worker.wid)) == 1
    assert sum(m.startswith("starting: ") for m in worker.messages("m1", "event")) == 1


def test_stop_during_start_cancels_it(worker):
    worker.start([model("m1", "--startup-delay", "5")])
    start = worker.send("start", "m1")
    worker.wait_state("m1", "starting")
    stop = worker.command("stop", "m1")
    assert stop.ok and stop.state == "stopped"
    reply = worker.reply(start)
    assert not reply.ok and "cancelled" in reply.message
    assert processes_of(worker.wid) == []


def test_auto_start_and_clear_logs(worker, rds):
    worker.start([model("auto", auto_start=True), model("manual")])
    inst = worker.wait_state("auto", "running")
    assert http_status(inst.url + "/health") == 200
    assert worker.instance("manual").state == "stopped"
    assert worker.command("stop", "auto").ok
    wait_for(lambda: "stopped" in worker.messages("auto", "event"), message="the 'stopped' event line")

    count = rds.xlen(KEYS.logs("auto"))
    reply = worker.command("clear_logs", "auto", keep_minutes=5)  # everything is newer: nothing goes
    assert reply.ok and reply.deleted == 0
    reply = worker.command("clear_logs", "auto", keep_minutes=0)
    assert reply.ok and reply.deleted == count
    assert rds.xlen(KEYS.logs("auto")) == 0


def test_stop_all_and_restart_autostart(worker):
    worker.start([model("auto", auto_start=True), model("manual")])
    worker.wait_state("auto", "running")
    assert worker.command("start", "manual").ok

    reply = worker.command("stop_all")
    assert reply.ok and sorted(reply.models) == ["auto", "manual"]
    assert worker.instance("auto").state == worker.instance("manual").state == "stopped"
    assert processes_of(worker.wid) == []

    assert worker.command("start", "manual").ok
    reply = worker.command("restart_autostart")
    assert reply.ok and reply.models == ["auto"], reply
    assert worker.instance("auto").state == "running"
    assert worker.instance("manual").state == "stopped"


# --- failures ---


def test_crash_is_seen_within_a_second(worker):
    worker.start([model("m1")])
    pid = worker.command("start", "m1").ok and worker.instance("m1").pid
    killed_at = time.time()
    os.kill(pid, signal.SIGKILL)
    inst = worker.wait_state("m1", "failed")
    # Measured with the worker's own stamp of the change (not when this test got to read it):
    # the worker awaits the exit itself, no polling, so this is one loop turn and the pipes'
    # drain (DRAIN_TIMEOUT, 0.25 s at most); 1 s leaves a loaded host's scheduling 0.75 s.
    delay = inst.updated_at - killed_at
    assert delay < 1.0, f"crash noticed after {delay:.3f}s"
    assert inst.last_error == "killed by SIGKILL" and inst.pid == 0
    time.sleep(1.5)  # restart = "no": it must stay failed (nothing to wait for but time)
    assert worker.instance("m1").state == "failed"
    wait_for(lambda: "killed by SIGKILL" in worker.messages("m1", "event"), message="the exit event line")


def test_restart_on_failure_counts_restarts(worker):
    worker.start([model("m1", restart="on-failure", max_restarts=2)])
    first = worker.command("start", "m1").ok and worker.instance("m1").pid
    os.kill(first, signal.SIGKILL)
    worker.wait_state("m1", "failed")
    inst = worker.wait_state("m1", "running", timeout=10, restarts=1)
    assert inst.pid != first and alive(inst.pid)
    assert any(m.startswith("restarting in 1s") for m in worker.messages("m1", "event"))  # logged 1 s ago


def test_last_lines_before_a_crash_are_kept(worker):
    worker.start([model("m1", "--crash-after", "1")])
    url = worker.command("start", "m1").ok and worker.instance("m1").url
    req = urllib.request.Request(url + "/v1/chat/completions", method="POST",
                                 data=json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        urllib.request.urlopen(req, timeout=5).read()
    except OSError:
        pass  # the engine may die before the response is complete
    inst = worker.wait_state("m1", "failed")
    assert inst.last_error == "exited with code 1"
    wait_for(lambda: "exited with code 1" in worker.messages("m1", "event"), message="the exit event line")
    entries = worker.logs("m1")
    fatal = [i for i, e in enumerate(entries) if e.stream == "stderr" and e.message.startswith("fatal: simulated crash")]
    exited = [i for i, e in enumerate(entries) if e.stream == "event" and e.message == "exited with code 1"]
    assert fatal and exited and fatal[0] < exited[0]


def test_failed_start_replies_with_reason_and_log_tail(worker):
    worker.start([
        # prints at once, then never answers: no heavy imports to race the 1 s on a loaded host
        model("unhealthy", startup_timeout=1.0, command=["{python}", "-S", "-c", "print('ready; listening', "
                                                         "flush=True); import time; time.sleep(60)"]),
        {"id": "dies", "command": ["{python}", "-c", "import sys; print('loading weights'); "
                                   "sys.exit('cannot open model file')"], "restart": "on-failure"},
        model("missing", cwd="no/such/dir"),
    ])
    reply = worker.command("start", "unhealthy")
    assert not reply.ok and reply.state == "failed"
    assert reply.message == "did not become healthy within 1s"
    assert any(line.startswith("starting: ") for line in reply.log_tail)
    assert any("ready; listening" in line for line in reply.log_tail)
    assert processes_of(worker.wid) == []

    reply = worker.command("start", "dies")
    assert not reply.ok and reply.message == "exited with code 1 during start-up"
    assert "loading weights" in reply.log_tail and "cannot open model file" in reply.log_tail
    assert worker.instance("dies").last_error == reply.message
    assert worker.instance("dies").restarts == 0  # an operator's failed start is not retried

    reply = worker.command("start", "missing")
    assert not reply.ok and "No such file or directory" in reply.message


def test_engine_ignoring_sigterm_is_killed_after_grace(worker):
    worker.start([model("stubborn", "--ignore-sigterm", stop_grace=0.5)])
    pid = worker.command("start", "stubborn").ok and worker.instance("stubborn").pid
    reply = worker.command("stop", "stubborn")  # no reply within 15 s: SIGKILL never came
    assert reply.ok
    assert not alive(pid)
    kill = "still running 0.5s after SIGTERM: sending SIGKILL"
    wait_for(lambda: kill in worker.messages("stubborn", "event"), message="the SIGKILL event line")
    stamps = {e.message: e.timestamp for e in worker.logs("stubborn") if e.stream == "event"}
    # The grace, by the worker's clock. Lines are stamped when the shipper reads them from the
    # spool, so a loaded machine can stamp "stopping" a little late: allow 0.1 s of that.
    assert stamps[kill] - stamps["stopping"] >= 0.4


# --- the worker's own life cycle ---


def test_sigint_stops_models_and_withdraws_the_lease(worker, rds, procs):
    worker.start([model("m1", auto_start=True), model("m2")])
    worker.wait_state("m1", "running")
    assert worker.command("start", "m2").ok
    pids = processes_of(worker.wid)
    assert len(pids) == 2
    pubsub = rds.pubsub()
    pubsub.subscribe(KEYS.events(worker.wid))
    assert procs.stop(worker.proc, signal.SIGINT) == 0
    assert not rds.exists(KEYS.worker(worker.wid))
    assert worker.instance("m1").state == worker.instance("m2").state == "stopped"
    assert not any(alive(pid) for pid in pids)
    seen = events(pubsub, lambda e: e.kind == "worker" and not e.alive)
    assert {e.instance.model for e in seen if e.kind == "instance" and e.instance.state == "stopped"} == {"m1", "m2"}
    pubsub.close()
    assert "Traceback" not in worker.log()


def test_engines_of_a_killed_worker_are_adopted(worker, procs):
    """Formerly: the orphans of a killed worker were reaped. Now the next worker adopts them:
    same pid, same URL, the restarts count and start time kept."""
    worker.start([model("m1", restart="on-failure"), model("m2")])
    first = worker.command("start", "m1").ok and worker.instance("m1").pid
    os.kill(first, signal.SIGKILL)  # one crash, so that there is a restarts count to keep
    before = worker.wait_state("m1", "running", restarts=1)
    assert worker.command("start", "m2").ok
    procs.stop(worker.proc, signal.SIGKILL)
    assert alive(before.pid)  # the model outlives its worker ...

    worker.start()  # ... and the worker that comes back with the same id takes it over
    after = worker.wait_state("m1", "running", pid=before.pid)
    assert (after.url, after.restarts, after.started_at) == (before.url, 1, before.started_at)
    assert sorted(processes_of(worker.wid)) == sorted([before.pid, worker.instance("m2").pid])
    wait_for(lambda: any(m.startswith(f"adopted pid {before.pid} ") for m in worker.messages("m1", "event")),
             message="the adoption event line")
    os.kill(before.pid, signal.SIGKILL)  # not its child, and still its crash is seen at once
    inst = worker.wait_state("m1", "failed", timeout=2)
    assert inst.last_error == "exited (adopted: exit status unknown)"
    worker.wait_state("m1", "running", restarts=2)


def test_commands_sent_while_the_worker_is_down_are_run_when_it_returns(worker, rds):
    worker.write_config([model("m1"), model("m2")])
    stream = KEYS.commands(worker.wid)
    # One command delivered to this worker before it "crashed" (pending, never acknowledged) ...
    rds.xgroup_create(stream, "workers", id="0", mkstream=True)
    delivered = worker.send("start", "m1")
    assert rds.xreadgroup("workers", worker.wid, {stream: ">"}, count=1)
    # ... and one sent while it was down.
    queued = worker.send("start", "m2")

    worker.start()
    assert worker.reply(delivered).ok and worker.reply(queued).ok
    assert worker.instance("m1").state == worker.instance("m2").state == "running"
    assert rds.xpending(stream, "workers")["pending"] == 0


def test_worker_republishes_everything_after_a_redis_restart(procs, tmp_path):
    import redis as redis_sync

    server = RedisServer(tmp_path / "own-redis", port=free_port(), extra=["--appendonly", "no", "--save", ""])
    server.start()
    try:
        rds = redis_sync.Redis.from_url(server.url, decode_responses=True)
        worker = Worker(procs, rds, server.url, tmp_path)
        worker.start([model("m1", auto_start=True)])
        pid = worker.wait_state("m1", "running").pid

        server.kill()  # Redis vanishes and comes back empty
        server.start()
        inst = worker.wait_state("m1", "running", timeout=15)
        assert inst.pid == pid and alive(pid)  # the model kept running meanwhile
        assert rds.exists(KEYS.worker(worker.wid)) and rds.hexists(KEYS.catalog(worker.wid), "m1")
        assert worker.command("stop", "m1").ok  # the command group was re-created
        assert "Traceback" not in worker.log()
        procs.stop(worker.proc)
        rds.close()
    finally:
        server.stop()


def test_a_second_worker_with_the_same_id_refuses_to_start(worker, procs):
    worker.start([model("m1", auto_start=True)])
    pid = worker.wait_state("m1", "running").pid
    first = worker.proc
    second = worker.start(wait=False)
    assert second.wait(15) == 2
    log = worker.log().strip().splitlines()
    assert "is in use by a running worker on this host" in log[-1] and "Traceback" not in worker.log()
    assert alive(pid) and first.poll() is None


def test_worker_waits_for_a_redis_that_is_not_there_yet(procs, tmp_path):
    import redis as redis_sync

    server = RedisServer(tmp_path / "late-redis", port=free_port(), extra=["--appendonly", "no", "--save", ""])
    rds = redis_sync.Redis.from_url(server.url, decode_responses=True)
    worker = Worker(procs, rds, server.url, tmp_path)
    worker.start([model("m1", auto_start=True)], wait=False)
    wait_for(lambda: "redis unreachable (publish)" in worker.log(), message="the worker to notice")
    server.start()
    try:
        inst = worker.wait_state("m1", "running", timeout=15)  # started meanwhile, published now
        assert alive(inst.pid)
        assert worker.command("stop", "m1").ok
        assert procs.stop(worker.proc) == 0
        log = worker.log()
        assert "Traceback" not in log
        assert log.count("redis unreachable (publish)") == 1  # one line per outage, not per retry
    finally:
        rds.close()
        server.stop()
