"""The router's usage reporter against a real Redis: a request that begins or ends while a
report is on the wire is not lost (issue 13, item 11).

The interleaving is made deterministic with Redis itself: ``CLIENT PAUSE … WRITE`` holds the
reporter's write in the server, the test waits until Redis shows that client blocked, changes
the request count, then lets the write through. A private Redis: pausing the session's would
stall everything else using it.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager

import pytest
import redis.asyncio as aredis
from llm_lab_router.protocol import Keys, read_usage
from llm_lab_router.redis_server import RedisServer
from llm_lab_router.router.control.in_use import UsageReporter

KEYS = Keys("usage-test:")


@pytest.fixture
def redis_url(tmp_path):
    with RedisServer(tmp_path / "redis", extra=["--appendonly", "no", "--save", ""]) as server:
        yield server.url


@asynccontextmanager
async def held_write(admin: aredis.Redis, reporter: UsageReporter):
    """A ``flush`` started inside the block, whose write Redis holds until the block ends."""
    await admin.execute_command("CLIENT", "PAUSE", 30000, "WRITE")
    flush = asyncio.create_task(reporter.flush())
    try:
        async with asyncio.timeout(10):
            while (await admin.info("clients"))["blocked_clients"] < 1:  # the write is in Redis, held
                await asyncio.sleep(0.01)
        yield
    finally:
        await admin.execute_command("CLIENT", "UNPAUSE")
        await flush


async def inflight(admin: aredis.Redis) -> int:
    return (await read_usage(admin, KEYS, ["m"], time.time()))["m"].inflight


def run(redis_url: str, scenario) -> None:
    async def main() -> None:
        admin = aredis.Redis.from_url(redis_url)
        client = aredis.Redis.from_url(redis_url)
        try:
            await scenario(admin, UsageReporter(client, KEYS, "r1"))
        finally:
            await client.aclose()
            await admin.aclose()

    asyncio.run(main())


def test_a_request_ending_during_a_write_is_reported_by_the_next_one(redis_url):
    async def scenario(admin: aredis.Redis, reporter: UsageReporter) -> None:
        request = reporter.track("m")
        request.__enter__()
        await reporter.flush()
        assert await inflight(admin) == 1
        async with held_write(admin, reporter):  # writes inflight=1 ...
            request.__exit__(None, None, None)  # ... while the request ends
        await reporter.flush()
        assert await inflight(admin) == 0  # was 1 until the entry went stale (10 s)

    run(redis_url, scenario)


def test_a_request_beginning_during_a_write_keeps_its_count(redis_url):
    async def scenario(admin: aredis.Redis, reporter: UsageReporter) -> None:
        with reporter.track("m"):
            pass
        async with held_write(admin, reporter):  # writes inflight=0 ...
            request = reporter.track("m")
            request.__enter__()  # ... while a new request begins
        assert reporter.inflight("m") == 1  # the count was dropped with the idle model
        await reporter.flush()
        assert await inflight(admin) == 1
        request.__exit__(None, None, None)  # raised KeyError when the count was dropped
        await reporter.flush()
        assert await inflight(admin) == 0

    run(redis_url, scenario)


def test_each_report_says_which_workers_serve_the_requests(redis_url):
    """``serving`` (the balancer's outstanding requests per instance) is read at each write:
    readers tell a copy that serves from one that does not (drain per instance)."""
    async def main() -> None:
        client = aredis.Redis.from_url(redis_url)
        served: dict[str, int] = {}
        reporter = UsageReporter(client, KEYS, "r1", serving=lambda model: served)
        try:
            with reporter.track("m"), reporter.track("m"):
                await reporter.flush()  # both queued: they hold every copy
                got = (await read_usage(client, KEYS, ["m"], time.time()))["m"]
                assert (got.serving, got.requests_on("h"), got.requests_on("z")) == ({}, 2, 2)
                served["z"] = 1  # one sent to z's copy
                await reporter.flush()
                got = (await read_usage(client, KEYS, ["m"], time.time()))["m"]
                assert (got.serving, got.requests_on("h"), got.requests_on("z")) == ({"z": 1}, 1, 2)
        finally:
            await client.aclose()

    asyncio.run(main())
