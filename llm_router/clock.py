"""The deployment's one clock: Redis ``TIME``, read through this process's offset to it.

Why: routers and workers run on different hosts, and a stamp one host writes into Redis is
compared by another (a router's last use of a model by the worker's idle reaper, a worker's
``started_at`` by every router's residency check, several routers' ``since`` in the waiting
line). Two hosts' wall clocks a few seconds apart then decide wrongly (a router 30 s behind its
worker got a model unloaded under a running stream). So every stamp that crosses hosts, and the
"now" it is compared with, is on Redis's clock, the one both sides already share.

How: a Redis call per stamp would put a round trip on the hot path, so each process measures
the offset between Redis ``TIME`` and its own monotonic clock (``sync``: a few samples, the one
with the shortest round trip wins, error at most half of it) and ``now()`` is the monotonic
clock plus that offset: no I/O, and immune to this host's wall clock being wrong or stepped.
``first`` measures it, ``keep`` again every ``RESYNC`` s (the monotonic clock drifts by parts per
million). Until the first measurement succeeds (Redis away at start) ``now()`` is this host's
wall clock, and a line in the log says so.

Where time is only a duration measured on one host (timeouts, back-offs, the loop's timers) the
host's own monotonic clock is used, as before: no clock is shared there.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from llm_lab_router.backoff import REDIS_ERRORS
from redis.exceptions import ResponseError

log = logging.getLogger("llm_router.clock")

RESYNC = 60.0  # s between measurements of the offset
SAMPLES = 3  # TIME round trips per measurement (the shortest is kept)


class RedisClock:
    """Unix time as Redis tells it, without a round trip per reading."""

    def __init__(self, local: Callable[[], float] = time.monotonic) -> None:
        self._local = local
        self._offset: float | None = None  # Redis time minus local monotonic time
        self.error = float("inf")  # s: half the round trip of the sample the offset came from
        self._warned = False  # an outage was logged (once per outage)

    @property
    def synced(self) -> bool:
        return self._offset is not None

    def now(self) -> float:
        """Redis's unix time now (this host's wall clock until the first ``sync``)."""
        if self._offset is None:
            return time.time()
        return self._local() + self._offset

    def adopt(self, redis_time: float, sent: float, received: float) -> None:
        """Take the sample ``redis_time`` (Redis ``TIME`` in s), asked at local ``sent`` and
        answered at ``received``: Redis read its clock somewhere in between, so the midpoint is
        the best guess and half the round trip bounds the error."""
        self._offset = redis_time - (sent + received) / 2
        self.error = (received - sent) / 2

    async def sync(self, redis, samples: int = SAMPLES) -> None:
        """Measure the offset to Redis ``TIME`` (``samples`` round trips, the shortest kept).
        Raises what the Redis client raises."""
        best: tuple[float, float, float] | None = None
        for _ in range(samples):
            sent = self._local()
            secs, micros = await redis.time()
            received = self._local()
            if best is None or received - sent < best[2] - best[1]:
                best = (secs + micros / 1e6, sent, received)
        assert best is not None
        self.adopt(*best)

    async def first(self, redis) -> None:
        """Measure the offset before the process's first stamp (a failure is logged; ``keep``
        tries again)."""
        await self._measure(redis)

    async def keep(self, redis, interval: float = RESYNC) -> None:
        """Measure the offset again every ``interval`` s, forever (a background loop: run it
        under ``llm_lab_router.loops.supervised``)."""
        while True:
            await asyncio.sleep(interval)
            await self._measure(redis)

    async def _measure(self, redis) -> None:
        """One ``sync``; an outage is logged once (the last offset, or the wall clock, stays)."""
        try:
            await self.sync(redis)
        except (*REDIS_ERRORS, ResponseError) as exc:  # ResponseError: an ACL without +time
            if not self._warned:
                what = ("keeping the last offset" if self.synced else
                        "using this host's wall clock meanwhile: skew between hosts counts (docs/deploy.md, Clocks)")
                log.warning("clock: cannot read Redis TIME (%s): %s", exc, what)
            self._warned = True
            return
        if self._warned:
            log.info("clock: measured against Redis TIME again (error %.1f ms)", self.error * 1000)
        self._warned = False


CLOCK = RedisClock()
"""This process's clock for every stamp another host reads, and every comparison with one."""
