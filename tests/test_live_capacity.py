"""Capacity that changes under queued requests, and background loops that outlive their bugs.

- A model at its concurrency limit queues requests; when a second instance starts, the queued
  requests take its slots at once (router/limits/concurrency.py ``Limits.resize``, driven by
  ``Proxy.follow_capacity`` on every view change), not at the queue timeout.
- A router background loop that raises something other than a Redis error is logged with its
  traceback, counted in ``/metrics`` and restarted (llm_router/loops.py).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest
from conftest import wait_for
from helpers import SseStream, chat_body, model_block, request, start_router, start_worker, wait_status, write_config
from llm_lab_router.loops import forever
from llm_lab_router.protocol import Keys, usage_of
from llm_lab_router.router.limits.concurrency import Limits

SLOW = ["--tokens-per-second", "4", "--max-tokens", "400"]  # a stream that lasts as long as the test


async def settle() -> None:
    """Let every ready task run (a resolved future wakes its waiter a few loop turns later)."""
    for _ in range(10):
        await asyncio.sleep(0)


def test_a_larger_capacity_admits_queued_requests_at_once():
    async def scenario() -> list[str]:
        limits = Limits(queue_limit=10, queue_timeout=30)
        served: list[str] = []

        async def call(name: str) -> None:
            async with limits.admit("m", 1):
                served.append(name)
                await asyncio.sleep(60)  # holds its slot: only a resize can admit the others

        async with limits.admit("m", 1):
            tasks = [asyncio.create_task(call(n)) for n in ("a", "b", "c")]
            await settle()
            assert (served, limits.waiting_models()) == ([], ["m"])
            limits.resize("m", 2)
            await settle()
            assert served == ["a"]
            limits.resize("m", 0)  # no instance (or unlimited) for a moment: waiters keep their place
            limits.resize("m", 4)
            await settle()
            assert served == ["a", "b", "c"] and limits.waiting_models() == []
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return served

    asyncio.run(scenario())


def test_queued_requests_take_a_second_instances_slots_when_it_starts(procs, redis_url, rds, tmp_path):
    block = model_block("cap", engine_args=SLOW, auto_start=True, restart="no", max_concurrency=1)
    start_worker(procs, redis_url, write_config(tmp_path / "a.toml", block), "cap-a")
    router = start_router(procs, redis_url, env={"LLM_ROUTER_QUEUE_TIMEOUT": "40"})
    wait_status(router, "cap", "running")
    busy = SseStream(f"{router.url}/v1/chat/completions", method="POST", body=chat_body("cap", stream=True))
    assert busy.status == 200 and busy.event()  # the only slot is taken for ~100 s
    got: list = []
    waiter = threading.Thread(target=lambda: got.append(request(
        "POST", f"{router.url}/v1/chat/completions", chat_body("cap", max_tokens=2), timeout=60)))
    try:
        waiter.start()
        wait_for(lambda: usage_of(rds.hgetall(Keys().used("cap")), time.time()).inflight == 2, timeout=10,
                 message="the second request queued (the router reports 2 in flight)")
        assert not got, "admitted while the only slot was busy"
        started = time.monotonic()
        start_worker(procs, redis_url, write_config(tmp_path / "b.toml", block), "cap-b")  # a second instance
        waiter.join(45)
        assert got and got[0].status == 200, got and got[0].body
        assert time.monotonic() - started < 20, "admitted only at the queue timeout"
    finally:
        busy.close()


def test_a_loop_that_raises_is_logged_counted_and_restarted(caplog):
    runs: list[int] = []
    restarts: list[str] = []

    async def flaky() -> None:
        runs.append(1)
        if len(runs) < 3:
            raise ValueError("a bug")

    async def scenario() -> None:
        await asyncio.wait_for(forever("usage", flaky, logging.getLogger("t"), restarts.append,
                                       first_delay=0.01), 5)

    with caplog.at_level(logging.ERROR, logger="t"):
        asyncio.run(scenario())
    assert len(runs) == 3 and restarts == ["usage", "usage"]
    failures = [r for r in caplog.records if "usage loop failed" in r.getMessage()]
    assert len(failures) == 2 and failures[0].exc_info and "a bug" in str(failures[0].exc_info[1])


def test_cancelling_a_supervised_loop_is_not_a_failure():
    restarts: list[str] = []

    async def scenario() -> None:
        task = asyncio.create_task(forever("quotas", lambda: asyncio.sleep(60), logging.getLogger("t"),
                                           restarts.append))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert restarts == []
