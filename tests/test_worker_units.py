"""The worker's parts that need no worker process: placement decisions, line splitting, and
the log pipe's behaviour when Redis goes away and comes back."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

import pytest
import redis.asyncio as aredis
import redis.exceptions
from llm_lab_router.config import DeviceProfile, ModelConfig, WorkerSettings
from llm_lab_router.protocol import CpuInfo, CudaInfo, DeviceSnapshot, GpuInfo, Keys, log_entry
from llm_lab_router.redis_server import RedisServer, free_port
from llm_lab_router.vram import NoRoom
from llm_lab_router.worker.logpipe import MAX_LINE, LogPipe
from llm_lab_router.worker.placement import NoFit, Placer, choose_port, choose_profile
from llm_lab_router.worker.process import exit_reason
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

# --- choose_profile: pure, over stand-in snapshots ---


def snapshot(*free_mib: int, online: bool = True, error: str = "") -> DeviceSnapshot:
    gpus = [GpuInfo(index=i, name="GPU", memory_total=24000, memory_free=f, memory_used=24000 - f)
            for i, f in enumerate(free_mib)]
    return DeviceSnapshot(worker="w", host="h", ts=0.0, cuda=CudaInfo(online=online, error=error, gpus=gpus),
                          cpu=CpuInfo(cpu_count=8, memory_total=64000, memory_free=32000))


def gpu_model(*profiles: DeviceProfile) -> ModelConfig:
    return ModelConfig(id="m", command=["x"], profiles=list(profiles))


GPU0 = DeviceProfile(devices=["cuda:0"], vram_mb=8000)
ANY_GPU = DeviceProfile(devices=["cuda"], vram_mb=8000)
TWO_GPUS = DeviceProfile(devices=["cuda:0", "cuda:1"], vram_mb=8000)
CPU = DeviceProfile(devices=["cpu"], args=["-ngl", "0"])


def test_first_fitting_profile_wins():
    model = gpu_model(GPU0, CPU)
    assert choose_profile(model, snapshot(10000)) == (GPU0, [0])
    assert choose_profile(model, snapshot(7000)) == (CPU, [])


def test_any_gpu_takes_the_one_with_most_free_memory():
    assert choose_profile(gpu_model(ANY_GPU), snapshot(9000, 20000, 12000)) == (ANY_GPU, [1])
    two_any = DeviceProfile(devices=["cuda", "cuda"], vram_mb=8000)
    assert choose_profile(gpu_model(two_any), snapshot(9000, 20000, 12000)) == (two_any, [1, 2])


def test_every_listed_gpu_needs_the_memory():
    assert choose_profile(gpu_model(TWO_GPUS), snapshot(9000, 9000)) == (TWO_GPUS, [0, 1])
    with pytest.raises(NoFit, match=r"cuda:1 has 7000 MiB free, 8000 MiB needed"):
        choose_profile(gpu_model(TWO_GPUS), snapshot(9000, 7000))
    with pytest.raises(NoFit, match=r"cuda:1 does not exist on this host"):
        choose_profile(gpu_model(TWO_GPUS), snapshot(9000))


def test_reserved_memory_is_not_free():
    model = gpu_model(GPU0, CPU)
    assert choose_profile(model, snapshot(10000), reserved={0: 4000}) == (CPU, [])
    assert choose_profile(model, snapshot(10000), reserved={1: 4000}) == (GPU0, [0])


def test_without_gpu_information_only_cpu_fits():
    model = gpu_model(GPU0, CPU)
    assert choose_profile(model, None) == (CPU, [])
    assert choose_profile(model, snapshot(online=False, error="no driver")) == (CPU, [])
    with pytest.raises(NoFit) as info:
        choose_profile(gpu_model(GPU0, ANY_GPU), snapshot(online=False, error="NVML unavailable"))
    assert str(info.value) == ("no device profile fits this host now: profile 1 [cuda:0]: no GPU (NVML unavailable); "
                               "profile 2 [cuda]: no GPU (NVML unavailable)")


def test_cpu_always_fits_and_shorthand_devices_work():
    assert choose_profile(ModelConfig(id="m", command=["x"]), None)[1] == []
    shorthand = ModelConfig(id="m", command=["x"], devices=["cuda:1"], vram_mb=100)
    profile, gpus = choose_profile(shorthand, snapshot(50, 200))
    assert profile.devices == ["cuda:1"] and gpus == [1]


def test_choose_port():
    free = {20001, 20003}.__contains__
    assert choose_port(0, [20000, 20005], set(), free) == 20001
    assert choose_port(0, [20000, 20005], {20001}, free) == 20003  # held by a model still loading
    assert choose_port(20003, [20000, 20005], set(), free) == 20003
    with pytest.raises(NoFit, match="port 20002 is already in use"):
        choose_port(20002, [20000, 20005], set(), free)
    with pytest.raises(NoFit, match=r"no free port in worker.port_range \[20004, 20005\]"):
        choose_port(0, [20004, 20005], set(), free)


def test_placer_reserves_vram_until_settled():
    async def scenario():
        async def read() -> DeviceSnapshot:
            return snapshot(10000)

        placer = Placer(WorkerSettings(port_range=[20000, 20010]), read, is_free=lambda host, port: True)
        a = await placer.place(ModelConfig(id="a", command=["x"], profiles=[GPU0, CPU]))
        b = await placer.place(ModelConfig(id="b", command=["x"], profiles=[GPU0, CPU]))
        assert (a.gpus, a.port) == ([0], 20000)
        assert (b.gpus, b.port) == ([], 20001)  # a's 8000 MiB are promised: b goes to the CPU
        placer.settle("a")  # loaded: the readings now include its memory
        placer.release("b")
        c = await placer.place(ModelConfig(id="c", command=["x"], profiles=[GPU0, CPU]))
        assert (c.gpus, c.port) == ([0], 20001)

    asyncio.run(scenario())


def test_placer_says_typed_whether_a_start_lost_on_vram():
    """``no_room`` in a start's reply comes from the exception's type, not from its wording:
    VRAM is ``NoRoom`` (another host may have room), a taken port is only ``NoFit``."""
    async def scenario():
        async def read() -> DeviceSnapshot:
            return snapshot(4000)

        placer = Placer(WorkerSettings(port_range=[20000, 20010]), read, is_free=lambda host, port: port != 20005)
        with pytest.raises(NoRoom, match="cuda:0 has 4000 MiB free, 8000 MiB needed"):
            await placer.place(ModelConfig(id="big", command=["x"], profiles=[GPU0]))
        assert placer.lost_on_vram("big")
        with pytest.raises(NoFit) as port_taken:
            await placer.place(ModelConfig(id="fixed", command=["x"], port=20005, profiles=[CPU]))
        assert not isinstance(port_taken.value, NoRoom) and not placer.lost_on_vram("fixed")
        await placer.place(ModelConfig(id="big", command=["x"], profiles=[GPU0, CPU]))
        assert not placer.lost_on_vram("big")  # its last placement succeeded

    asyncio.run(scenario())


def test_exit_reason():
    assert exit_reason(0) == "exited with code 0"
    assert exit_reason(3) == "exited with code 3"
    assert exit_reason(-9) == "killed by SIGKILL"


# --- LogPipe: spooled lines to Redis, exactly once ---


def shipped_messages(client_url: str, key: str) -> list[str]:
    import redis as redis_sync

    rds = redis_sync.Redis.from_url(client_url)
    try:
        return [log_entry(fields).message for _, fields in rds.xrange(key)]
    finally:
        rds.close()


async def until(predicate, timeout: float = 10.0) -> None:
    """Await a condition of another process (Redis) that has no event to wait on."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await predicate():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_log_pipe_splits_lines_and_keeps_bad_bytes_and_huge_lines(redis_url, tmp_path):
    async def scenario() -> list[str]:
        client = aredis.Redis.from_url(redis_url)
        pipe = LogPipe(client, Keys(), host="w1", maxlen=10000, buffer_lines=1000, spool_dir=tmp_path)
        out, err = pipe.engine_output("m")
        os.write(out, b"one\ntw")
        os.write(out, b"o\r\nthree\n\ncaf\xc3\xa9 \xff\n" + b"x" * (MAX_LINE * 2 + 10) + b"\nlast without newline")
        pipe.start()
        await until(lambda: xlen(client, "llm:logs:m", 7))
        pipe.seal("m")  # the engine exited: its unterminated line goes too
        await until(lambda: xlen(client, "llm:logs:m", 8))
        os.close(out)
        os.close(err)
        await pipe.close()
        await client.aclose()

    asyncio.run(scenario())
    got = shipped_messages(redis_url, "llm:logs:m")
    assert got[:5] == ["one", "two", "three", "", "caf\u00e9 \ufffd"]
    assert [len(m) for m in got[5:8]] == [MAX_LINE, MAX_LINE, 10] and got[8] == "last without newline"


async def xlen(client: aredis.Redis, key: str, at_least: int = 1) -> bool:
    try:
        return await client.xlen(key) >= at_least
    except redis.exceptions.ConnectionError:  # a pooled connection from before the restart
        return False


def test_log_pipe_loses_nothing_through_an_outage_and_a_restart(tmp_path):
    """Lines written while Redis is away wait in the spool; a second pipe (the next worker)
    resumes where the first stopped, and a batch the first delivered without hearing the
    answer is not sent twice."""
    server = RedisServer(tmp_path / "redis", port=free_port(), extra=["--appendonly", "no", "--save", ""])
    keys = Keys()
    spool = tmp_path / "spool"

    async def scenario() -> None:
        client = aredis.Redis.from_url(server.url, socket_connect_timeout=1, socket_timeout=1,
                                       retry=Retry(NoBackoff(), 0))
        pipe = LogPipe(client, keys, host="w1", maxlen=100000, buffer_lines=100, spool_dir=spool)
        out, _ = pipe.engine_output("m")
        pipe.start()
        for i in range(10):
            os.write(out, f"line {i}\n".encode())
        await until(lambda: xlen(client, keys.logs("m"), 10))

        server.proc.send_signal(signal.SIGSTOP)  # frozen: calls in flight time out, maybe done later
        for i in range(10, 500):  # far more than buffer_lines: they wait on disk
            os.write(out, f"line {i}\n".encode())
        await asyncio.sleep(1.5)
        await pipe.close(timeout=0.5)  # the worker goes away during the outage
        server.proc.send_signal(signal.SIGCONT)

        again = LogPipe(client, keys, host="w1", maxlen=100000, buffer_lines=100, spool_dir=spool)
        again.spool("m")
        again.start()
        for i in range(500, 600):
            os.write(out, f"line {i}\n".encode())
        await until(lambda: xlen(client, keys.logs("m"), 600))
        await asyncio.sleep(0.2)  # nothing more may come
        await again.close()
        os.close(out)
        await client.aclose()

    server.start()
    try:
        asyncio.run(scenario())
        assert shipped_messages(server.url, keys.logs("m")) == [f"line {i}" for i in range(600)]
    finally:
        if server.proc:
            server.proc.send_signal(signal.SIGCONT)
        server.stop()


def test_log_ship_script_skips_a_batch_already_shipped(redis_url):
    from llm_lab_router.protocol import LOG_SHIP_SCRIPT, log_fields, log_ship_args

    async def scenario() -> list:
        client = aredis.Redis.from_url(redis_url)
        script = client.register_script(LOG_SHIP_SCRIPT)
        keys = ["llm:logs:x", "llm:logpos:w:x:stdout"]
        batch = [b"a", b""]
        ts = "1700000000.250000"
        results = [await script(keys=keys, args=log_ship_args(100, "w", "stdout", "f1", 0, 3, ts, batch)),
                   await script(keys=keys, args=log_ship_args(100, "w", "stdout", "f1", 0, 3, ts, batch)),  # again
                   await script(keys=keys, args=log_ship_args(100, "w", "stdout", "f2", 0, 3, ts, batch)),  # new file
                   await script(keys=keys, args=log_ship_args(100, "w", "event", "f3", 0, 9, "", [b"17.5 up x"]))]
        results.append([log_fields(log_entry(f)) for _, f in await client.xrange("llm:logs:x")])
        results.append(await client.get("llm:logpos:w:x:stdout"))
        await client.aclose()
        return results

    row = {"ts": "1700000000.250000", "host": "w", "stream": "stdout"}
    assert asyncio.run(scenario()) == [-1, 3, -1, -1, [{**row, "msg": "a"}, {**row, "msg": ""}] * 2 + [
        {"ts": "17.500000", "host": "w", "stream": "event", "msg": "up x"}], b"f3:9"]


def test_log_pipe_keeps_its_spool_within_bounds_and_counts_drops(tmp_path):
    """Redis unreachable for good: the spool stays under log_spool_mb, drops are counted and
    said in an event line on disk."""
    async def scenario() -> LogPipe:
        client = aredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}", socket_connect_timeout=0.2,
                                       retry=Retry(NoBackoff(), 0))
        bound = 256 * 1024
        pipe = LogPipe(client, Keys(), host="w1", maxlen=1000, buffer_lines=100, spool_dir=tmp_path,
                       spool_bytes=bound)
        out, _ = pipe.engine_output("m")
        pipe.start()
        line = b"x" * 99 + b"\n"
        biggest = 0
        for _ in range(40):  # 4 MB in all, 16 times the bound
            os.write(out, line * 1000)
            await asyncio.sleep(0.01)
            biggest = max(biggest, sum(f.stat().st_blocks * 512 for f in (tmp_path / "m").glob("*.log")))
        assert biggest <= bound, biggest
        assert pipe.dropped > 30000
        os.close(out)
        await pipe.close(timeout=0.1)
        await client.aclose()
        return pipe

    pipe = asyncio.run(scenario())
    events = (tmp_path / "m" / "event.log").read_bytes()
    assert b"log lines dropped: the spool of m is over its bound" in events


# --- ModelProcess: the state machine, in process, against real engines ---


def supervise(redis_url: str, tmp_path, scenario, **fields) -> None:
    """Run ``scenario(mp, states)`` with a ModelProcess for a mock engine; ``states`` records
    every published state."""
    from conftest import MOCK_ENGINE
    from llm_lab_router.worker.process import HostContext, ModelProcess

    async def main() -> None:
        client = aredis.Redis.from_url(redis_url)
        settings = WorkerSettings(port_range=[41000, 41100])
        logs = LogPipe(client, Keys(), host="w", maxlen=1000, buffer_lines=1000, spool_dir=tmp_path / "spool")
        host = HostContext(worker_id=f"unit-{tmp_path.name}", settings=settings, config_dir=str(tmp_path),
                           logs=logs, placer=Placer(settings, lambda: asyncio.sleep(0)))
        cfg = ModelConfig(id="m", command=["{python}", str(MOCK_ENGINE), "--port", "{port}", "--quiet"],
                          stop_grace=1.0, startup_timeout=10.0, **fields)
        states: list[str] = []
        mp = ModelProcess(cfg, host, lambda inst: states.append(inst.state))
        try:
            await scenario(mp, states)
        finally:
            await mp.ensure_stopped()
            await client.aclose()

    asyncio.run(main())


def test_process_states_of_a_start_and_a_stop(redis_url, tmp_path):
    async def scenario(mp, states):
        inst = await mp.ensure_running()
        assert inst.state == "running" and inst.pid and inst.url
        assert [s for i, s in enumerate(states) if i == 0 or s != states[i - 1]] == ["starting", "running"]
        assert (await mp.ensure_running()).pid == inst.pid  # no second start
        assert (await mp.ensure_stopped()).state == "stopped"
        assert states[-2:] == ["stopping", "stopped"]

    supervise(redis_url, tmp_path, scenario)


def test_process_start_while_stopping_waits_then_starts(redis_url, tmp_path):
    async def scenario(mp, states):
        first = await mp.ensure_running()
        stop = asyncio.create_task(mp.ensure_stopped())
        while mp.state != "stopping":
            await asyncio.sleep(0)
        second = await mp.ensure_running()
        assert (await stop).state in ("stopped", "running")
        assert second.state == "running" and second.pid != first.pid

    supervise(redis_url, tmp_path, scenario)


def test_process_stop_cancels_a_pending_restart(redis_url, tmp_path):
    async def scenario(mp, states):
        pid = (await mp.ensure_running()).pid
        os.kill(pid, signal.SIGKILL)
        while mp.state != "failed":
            await asyncio.sleep(0.01)
        assert mp.log_tail(1) == ["restarting in 1s (restart = 'always')"]
        assert (await mp.ensure_stopped()).state == "stopped"
        await asyncio.sleep(1.3)  # past the restart's back-off: nothing may happen
        assert mp.state == "stopped" and mp.instance.restarts == 0

    supervise(redis_url, tmp_path, scenario, restart="always")


def test_process_gives_up_after_max_restarts(redis_url, tmp_path):
    async def scenario(mp, states):
        pid = (await mp.ensure_running()).pid
        os.kill(pid, signal.SIGTERM)  # a clean exit (code 0) counts for restart = "always"
        while mp.state != "failed":
            await asyncio.sleep(0.01)
        assert mp.instance.last_error == "exited with code 0"
        assert mp.log_tail(1) == ["not restarting: 0 restarts within 300s (max_restarts = 0)"]

    supervise(redis_url, tmp_path, scenario, restart="always", max_restarts=0)


def test_every_command_of_the_protocol_has_an_operation() -> None:
    """``Operations.ops`` is the dispatch table: one entry per ``CommandOp``, each a method."""
    from typing import get_args

    from llm_lab_router.protocol import CommandOp
    from llm_lab_router.worker.commands import Operations

    ops = Operations("w", {}, None, Keys()).ops  # type: ignore[arg-type]
    assert set(ops) == set(get_args(CommandOp)) and all(callable(op) for op in ops.values())


def test_a_linger_that_missed_the_next_worker_still_sees_it_came(tmp_path) -> None:
    """A linger slow to start may first look after the next worker came and went (stopped at
    once): the lock file then names that worker, not the one that left, and the linger ends
    instead of waiting out its timeout (and stopping models that were not its to stop)."""
    import os

    from llm_lab_router.worker.handover import WorkerLock, linger

    state = tmp_path / "state"
    came = WorkerLock(state)
    assert came.try_acquire("worker")  # the next worker (this process) took the lock ...
    came.release()  # ... and is gone again
    left = os.getpid() + 1  # the worker that left, whose linger this is
    assert linger(state, "w1", timeout=30, grace=1, previous=left) == []
    assert WorkerLock(state).holder() == (os.getpid(), "worker")  # the linger did not take the lock
    # no worker came since the one that left: the linger waits its timeout, then takes over
    assert linger(state, "w1", timeout=0.3, grace=1, previous=os.getpid()) == []
    assert WorkerLock(state).holder() == (os.getpid(), "linger")
