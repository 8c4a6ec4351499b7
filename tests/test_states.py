"""The model process state machine is enforced (worker/states.py): the table refuses what it
does not list, and a real ``ModelProcess`` running the mock engine walks every edge of it."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import uuid
from itertools import product

import pytest
import redis.asyncio as aredis
from conftest import MOCK_ENGINE
from llm_lab_router.config import ModelConfig, WorkerSettings
from llm_lab_router.protocol import Instance, Keys
from llm_lab_router.worker.logpipe import LogPipe
from llm_lab_router.worker.placement import Placer
from llm_lab_router.worker.process import HostContext, ModelProcess
from llm_lab_router.worker.states import TRANSITIONS, IllegalTransition, check_transition

STATES = list(TRANSITIONS)
EDGES = {(old, new) for old, targets in TRANSITIONS.items() for new in targets}
ENGINE = [sys.executable, str(MOCK_ENGINE), "--port", "{port}", "--host", "{host}", "--quiet"]


def test_the_table_refuses_every_transition_it_does_not_list():
    for old, new in product(STATES, STATES):
        if (old, new) in EDGES or old == new:
            check_transition(old, new)
        else:
            with pytest.raises(IllegalTransition, match=f"{old} -> {new}"):
                check_transition(old, new)
    check_transition("running", None)  # a change of other fields only


def test_a_model_process_refuses_a_transition_the_table_does_not_allow(tmp_path):
    """No public call can ask for an illegal transition (that is the point), so the test asks
    the supervisor's one state setter directly, as a bug in it would."""
    settings = WorkerSettings()
    logs = LogPipe(aredis.Redis(), Keys(), host="w", maxlen=1000, buffer_lines=1000, spool_dir=tmp_path / "spool")
    host = HostContext(worker_id="w", settings=settings, config_dir=str(tmp_path), logs=logs,
                       placer=Placer(settings, lambda: asyncio.sleep(0, None)))
    published: list[Instance] = []
    mp = ModelProcess(ModelConfig(id="m", command=["x"]), host, published.append)
    with pytest.raises(IllegalTransition, match="stopped -> failed"):
        mp._set(state="failed", last_error="boom")
    assert mp.state == "stopped" and published == []  # nothing changed, nothing published


def test_a_model_process_walks_every_edge_of_the_table_and_no_other(redis_url, tmp_path):
    seen: list[tuple[str, str]] = []

    async def scenario() -> None:
        redis = aredis.Redis.from_url(redis_url)
        settings = WorkerSettings(port_range=[41000, 41200])
        logs = LogPipe(redis, Keys(f"states-{uuid.uuid4().hex[:6]}:"), host="w", maxlen=1000, buffer_lines=1000,
                       spool_dir=tmp_path / "spool")
        host = HostContext(worker_id=f"w-{uuid.uuid4().hex[:8]}", settings=settings, config_dir=str(tmp_path),
                           logs=logs, placer=Placer(settings, lambda: asyncio.sleep(0, None)))
        last: dict[str, str] = {}

        def changed(inst: Instance) -> None:
            if inst.state != last.setdefault(inst.model, "stopped"):
                seen.append((last[inst.model], inst.state))
                last[inst.model] = inst.state

        def process(model_id: str, *args: str, command: list[str] | None = None) -> ModelProcess:
            model = ModelConfig(id=model_id, command=command or [*ENGINE, *args], startup_timeout=20.0,
                                stop_grace=1.0, restart="no")
            return ModelProcess(model, host, changed)

        good, slow = process("good"), process("slow", "--startup-delay", "60")
        broken = process("broken", command=[sys.executable, "-c", "raise SystemExit(3)"])
        try:
            assert (await good.ensure_running()).state == "running"  # stopped → starting → running
            await good.ensure_stopped()  # running → stopping → stopped
            inst = await good.ensure_running()
            os.killpg(inst.pid, signal.SIGKILL)  # running → failed
            async with asyncio.timeout(20):
                while good.state != "failed":
                    await asyncio.sleep(0.02)
            assert (await good.ensure_running()).state == "running"  # failed → starting
            assert (await broken.ensure_running()).state == "failed"  # starting → failed
            await broken.ensure_stopped()  # failed → stopped
            start = asyncio.create_task(slow.ensure_running())
            async with asyncio.timeout(20):
                while slow.state != "starting" or slow.instance.pid == 0:
                    await asyncio.sleep(0.02)
            await slow.ensure_stopped()  # starting → stopping → stopped
            await start
        finally:
            for mp in (good, slow, broken):
                await mp.close()
            await redis.aclose()

    asyncio.run(scenario())
    # stopped -> running is adoption's edge (an engine a previous worker left running):
    # walked by tests/test_adoption.py and test_worker.py's adoption tests.
    assert set(seen) == EDGES - {("stopped", "running")}
