"""The one back-off (``llm_router.backoff``) every Redis loop uses: worker loops, the router's
cluster view and its usage reporter."""

from __future__ import annotations

import asyncio
import logging

import redis.exceptions
from llm_lab_router.backoff import Backoff, RedisLink


def test_delays_double_up_to_the_cap_and_reset_after_a_success():
    b = Backoff(cap=1.0, first=0.1)
    seen = []
    for _ in range(6):
        seen.append(b.delay)
        b.grow()
    assert seen == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    b.reset()
    assert b.delay == 0.1


def test_sleep_waits_the_delay_then_grows_it():
    b = Backoff(cap=0.05, first=0.01)

    async def twice() -> None:
        await b.sleep()
        await b.sleep()

    asyncio.run(twice())
    assert b.delay == 0.04


def test_link_logs_each_outage_once_and_says_when_it_ends(caplog):
    log = logging.getLogger("test.backoff")
    link = RedisLink("thing", first_delay=0.1, max_delay=0.4, log=log)
    with caplog.at_level(logging.INFO, logger="test.backoff"):
        for _ in range(5):
            link.failed(redis.exceptions.ConnectionError("refused"))
            link.backoff.grow()
        assert link.backoff.delay == 0.4
        assert link.ok() is True  # the outage ended: the caller re-publishes
        assert link.ok() is False
        assert link.backoff.delay == 0.1
    assert [r.getMessage() for r in caplog.records] == ["redis unreachable (thing): refused; retrying",
                                                        "redis reachable again (thing)"]
