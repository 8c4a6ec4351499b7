"""The shared clock (llm_router/clock.py) and a command's expiry by its stream id
(worker/commands.py), against the session's real Redis."""

from __future__ import annotations

import asyncio
import time

import redis.asyncio as aredis
from llm_lab_router.clock import RedisClock
from llm_lab_router.protocol import Command
from llm_lab_router.worker.commands import expired
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff


class Stepped:
    """A monotonic clock the test moves by hand."""

    def __init__(self, at: float = 100.0) -> None:
        self.at = at

    def __call__(self) -> float:
        return self.at


def test_a_sample_is_taken_at_its_round_trips_midpoint_and_the_clock_runs_on_locally():
    local = Stepped()
    clock = RedisClock(local)
    assert not clock.synced and abs(clock.now() - time.time()) < 1  # the wall clock until measured
    clock.adopt(5000.0, sent=100.0, received=100.2)  # Redis read 5000 somewhere in the round trip
    assert clock.synced and abs(clock.error - 0.1) < 1e-9
    assert abs(clock.now() - 4999.9) < 1e-9  # now is 0.1 s after the midpoint
    local.at = 160.1
    assert abs(clock.now() - 5060.0) < 1e-9  # a minute later by the local clock, no round trip


def test_sync_reads_redis_time(redis_url):
    async def main() -> tuple[float, float, float]:
        client = aredis.Redis.from_url(redis_url)
        try:
            clock = RedisClock()
            await clock.sync(client)
            secs, micros = await client.time()
            return clock.now(), secs + micros / 1e6, clock.error
        finally:
            await client.aclose()

    mine, redis_now, error = asyncio.run(main())
    assert error < 0.05
    assert abs(mine - redis_now) < 0.05


def test_sync_failure_keeps_the_wall_clock_and_the_process_running():
    async def main() -> RedisClock:
        client = aredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2,  # nothing listens
                              retry=Retry(NoBackoff(), 0))
        clock = RedisClock()
        await clock.first(client)
        await client.aclose()
        return clock

    clock = asyncio.run(main())
    assert not clock.synced and abs(clock.now() - time.time()) < 1


def test_a_command_expires_by_its_entry_id_plus_its_timeout():
    cmd = Command(op="start", model="m", timeout=30)
    added = "1700000000000-0"  # Redis added it at 1700000000.000
    assert not expired(cmd, added, 1700000029.9)
    assert expired(cmd, added, 1700000030.1)
    assert not expired(Command(op="start", model="m"), added, 1800000000.0)  # no timeout: no bound
    assert not expired(cmd, "not-an-id", 1800000000.0)
