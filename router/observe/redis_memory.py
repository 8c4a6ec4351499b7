"""Watching the shared Redis's memory: what the timeline, logs and state hold against its
``maxmemory``, and the keys it evicted.

Why a router watches it: the timeline's history is most of what a lab keeps in Redis
(docs/BENCHMARKS.md: about 2.3 MiB per host and 8.4 MiB per busy model at full retention), and
every history key has a TTL. Under a ``volatile-*`` policy a Redis at ``maxmemory`` evicts such
keys, oldest read first: a slot of a model's series may go while its coverage stays, and then
reads as fewer requests than were served. Nothing else would tell the operator. So every
``redis_memory_check`` seconds each router reads ``INFO memory`` and ``INFO stats`` (its user
has ``INFO``), exports the figures in ``/metrics``, and one router per check (a claim, as for
roll-ups) writes a timeline event when Redis evicted keys since the last check, or when used
memory crosses ``redis_memory_warn`` of ``maxmemory``: the night's graphs then show where the
history may undercount, and why.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

import msgspec
from llm_lab_router.protocol import Keys
from llm_lab_router.router.observe.claims import claim
from llm_lab_router.router.observe.history import History
from redis.asyncio import Redis
from redis.exceptions import RedisError

log = logging.getLogger("router.redis_memory")

CLAIMS_KEEP = 3600  # s: the claims hash outlives the checks it decides


class RedisMemoryReading(msgspec.Struct, frozen=True):
    """One reading of ``INFO``: bytes used and allowed (0: no limit), the eviction policy, and
    Redis's count of keys evicted since it started."""

    used: int
    maxmemory: int
    policy: str
    evicted: int

    @property
    def share(self) -> float:
        """Used memory as a share of ``maxmemory`` (0 without a limit)."""
        return self.used / self.maxmemory if self.maxmemory else 0.0


class RedisMemory:
    """Reads Redis's memory every ``interval`` s; tells ``/metrics`` (``report``) and the timeline."""

    def __init__(self, redis: Redis, keys: Keys, history: History, interval: float, warn: float,
                 report: Callable[[RedisMemoryReading], None]) -> None:
        self.redis = redis
        self.keys = keys
        self.history = history
        self.interval = interval
        self.warn = warn
        self.report = report
        self.last: RedisMemoryReading | None = None
        self.high = False  # above ``warn`` at the last check (an event only when it crosses)

    async def read(self) -> RedisMemoryReading:
        memory = await self.redis.info("memory")
        stats = await self.redis.info("stats")
        return RedisMemoryReading(used=int(memory.get("used_memory", 0)), maxmemory=int(memory.get("maxmemory", 0)),
                                  policy=str(memory.get("maxmemory_policy", "")),
                                  evicted=int(stats.get("evicted_keys", 0)))

    async def check(self) -> RedisMemoryReading:
        """One check: the figures to ``/metrics``; events for evictions and for crossing ``warn``."""
        now = await self.read()
        self.report(now)
        before, self.last = self.last, now
        events: list[tuple[str, str]] = []
        if before is not None and now.evicted > before.evicted:
            events.append(("redis_evicted", f"Redis evicted {now.evicted - before.evicted} keys "
                                            f"(used {_mib(now.used)} of maxmemory {_mib(now.maxmemory)}, "
                                            f"policy {now.policy}): history of this time may undercount"))
        high = now.maxmemory > 0 and now.share >= self.warn
        if high and not self.high:
            events.append(("redis_memory_high", f"Redis uses {now.share:.0%} of its maxmemory "
                                                f"({_mib(now.used)} of {_mib(now.maxmemory)}, policy {now.policy}): "
                                                "raise maxmemory or shorten LLM_ROUTER_HISTORY_RESOLUTIONS"))
        self.high = high
        for kind, detail in events:
            log.warning("%s", detail)
        if events and await self._claim():
            for kind, detail in events:
                self.history.event(kind, detail=detail)
        return now

    async def _claim(self) -> bool:
        """Whether this router writes this check's events (the first ``HINCRBY`` of its period)."""
        period = int(self.history.clock() // self.interval)
        return bool(await claim(self.redis, self.keys.history_claims("redis-memory"), [period], CLAIMS_KEEP,
                                period - 1))

    async def run(self) -> None:
        while True:
            try:
                await self.check()
            except (RedisError, OSError) as exc:  # the history says when Redis was away
                log.debug("redis memory: %s", exc)
            await asyncio.sleep(self.interval)


def _mib(n: int) -> str:
    return f"{n / 1048576:.0f} MiB"
