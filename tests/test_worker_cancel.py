"""A worker loop ends when it is cancelled, even when redis-py loses the ``CancelledError``.

Python 3.11's ``asyncio.wait_for`` (inside every redis-py command) drops a cancel that lands
as the command completes (CPython gh-86296); a loop that only waited for the exception then
ran on until the shutdown timeout: 3 s instead of 0.4 s in about one worker shutdown in three
(``scripts/bench_shutdown.py``). The publisher is cancelled here while it is busy publishing,
at many different moments, against the session's real Redis."""

from __future__ import annotations

import asyncio
import uuid

from conftest import role_url
from llm_lab_router.config import parse_config
from llm_lab_router.worker.agent import WorkerAgent


def test_the_publisher_ends_on_every_cancel(redis_url):
    async def main() -> None:
        cfg = parse_config(f'[worker]\nid = "w-{uuid.uuid4().hex[:8]}"\n[[models]]\nid = "m"\ncommand = ["x"]\n')
        agent = WorkerAgent(cfg, role_url(redis_url, "worker", cfg.worker_id))
        instance = agent.models["m"].instance

        async def busy() -> None:  # a change to publish at every turn: the publisher is always in Redis
            while True:
                agent._instance_changed(instance)
                await asyncio.sleep(0)

        feeder = asyncio.create_task(busy())
        try:
            for attempt in range(60):
                publisher = asyncio.create_task(agent._publisher())
                await asyncio.sleep(0.0005 * (attempt % 9))
                publisher.cancel()
                done, _ = await asyncio.wait([publisher], timeout=2.0)
                assert done, f"attempt {attempt}: the publisher ignored cancel() (still running 2 s later)"
        finally:
            feeder.cancel()
            for task in asyncio.all_tasks() - {asyncio.current_task()}:
                task.cancel()
            await agent.redis.aclose()
            agent.probe.close()

    asyncio.run(main())
