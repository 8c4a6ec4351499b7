"""What this router tells the cluster about model use: requests in flight and last use.

Each router writes, per model, one field ``router:{rid}`` of the hash ``llm:used:{model}`` (a
JSON ``RouterUsage``: in-flight count, of which served per worker, last use, when written) and
the field ``last_used``.
Throttled: at most one write per model per ``interval`` — except that a model going from idle
to busy is reported at once, so an eviction or idle unload elsewhere sees the request within a
Redis round trip. While requests are in flight the entry is rewritten every ``interval``;
readers ignore entries older than ``USAGE_STALE``, so a router that died cannot pin a model.
Every stamp (``last_used``, ``at``) is on Redis's clock (``llm_lab_router.clock``): the worker
that reads them to unload an idle model runs on another host, with its own wall clock.

Readers: the worker's idle reaper (``worker.idle``) and this router's eviction planning
(``protocol.read_usage``). The hot path only touches in-memory counters.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import contextmanager
from typing import Callable, Iterator, Mapping

from redis.asyncio import Redis
from redis.exceptions import RedisError

from llm_lab_router.backoff import RedisLink
from llm_lab_router.clock import CLOCK
from llm_lab_router.protocol import USED_LAST, USED_ROUTER, Keys, RouterUsage, to_json

log = logging.getLogger("router.usage")

USED_TTL = 7 * 24 * 3600  # llm:used:{model} outlives any sensible idle_ttl, but is bounded


class UsageReporter:
    def __init__(self, redis: Redis, keys: Keys, router_id: str, interval: float = 1.0,
                 clock: Callable[[], float] = CLOCK.now,
                 serving: Callable[[str], Mapping[str, int]] | None = None) -> None:
        self.redis = redis
        self.keys = keys
        self.router_id = router_id
        self.interval = interval
        self.clock = clock
        # Of a model's requests in flight, those sent to an instance, per worker: read at each
        # write (the balancer counts them anyway: nothing more on the hot path), so they lag by
        # up to ``interval``, meanwhile counting as queued, which holds every copy of the model.
        self.serving = serving
        self._inflight: dict[str, int] = {}
        self._last_used: dict[str, float] = {}
        # per (model, key priority): requests in flight, and the last use (start or end)
        self._prio_inflight: dict[tuple[str, int], int] = {}
        self._prio_used: dict[tuple[str, int], float] = {}
        self._reported: dict[str, int] = {}  # in-flight count last written, per model
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()
        self._link = RedisLink("usage reporting", log=log)  # one log line per outage; retried every interval

    def inflight(self, model: str) -> int:
        return self._inflight.get(model, 0)

    def all_inflight(self) -> dict[str, int]:
        """Every model with requests of this router in flight now (queued or served)."""
        return {m: n for m, n in self._inflight.items() if n}

    @contextmanager
    def track(self, model: str, priority: int = 0) -> Iterator[None]:
        """Count one request of ``model`` (queued or served), by a key of ``priority``, for the
        duration of the block."""
        key = (model, priority)
        self._inflight[model] = self._inflight.get(model, 0) + 1
        self._prio_inflight[key] = self._prio_inflight.get(key, 0) + 1
        self._touch(model, key)
        if not self._reported.get(model):
            self._wake.set()  # idle -> busy: say so now, not within a second
        try:
            yield
        finally:
            self._inflight[model] -= 1
            self._prio_inflight[key] -= 1
            self._touch(model, key)

    def serving_on(self, model: str) -> dict[str, int]:
        """This router's requests of ``model`` being served now, per worker (``serving``)."""
        return dict(self.serving(model)) if self.serving is not None else {}

    def _touch(self, model: str, key: tuple[str, int]) -> None:
        self._last_used[model] = self._prio_used[key] = self.clock()
        self._dirty.add(model)

    def priorities(self, models: set[str], now: float) -> dict[str, dict[int, float]]:
        """Per model of ``models``: each key priority it was used at, and when last (``now``
        while a request of that priority is in flight)."""
        found: dict[str, dict[int, float]] = {}
        for (model, prio), at in self._prio_used.items():
            if model in models:
                found.setdefault(model, {})[prio] = now if self._prio_inflight.get((model, prio)) else at
        return found

    async def run(self) -> None:
        """Write what changed every ``interval`` (or at once when a model became busy)."""
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval)
            except TimeoutError:
                pass
            self._wake.clear()
            await self.flush()

    async def flush(self) -> None:
        """Write the models that changed (and those busy: their entry must stay fresh).

        What is written is taken, and ``_dirty`` emptied, before the await: a request that
        starts or ends while the write is on the wire marks its model dirty again and the
        next flush writes it. (Emptying after the await lost that change: Redis kept saying
        ``inflight=1`` until the entry went stale, holding off idle unload and eviction.)"""
        models = self._dirty | {m for m, n in self._inflight.items() if n}
        if not models:
            return
        self._dirty = set()
        now = self.clock()
        counts = {m: self._inflight.get(m, 0) for m in models}
        priorities = self.priorities(models, now)
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for m in models:
                    entry = RouterUsage(inflight=counts[m], last_used=self._last_used.get(m, 0.0), at=now,
                                        serving=self.serving_on(m), priorities=priorities.get(m, {}))
                    pipe.hset(self.keys.used(m), mapping={USED_LAST: f"{entry.last_used:.3f}",
                                                          USED_ROUTER + self.router_id: to_json(entry)})
                    pipe.expire(self.keys.used(m), USED_TTL)
                await pipe.execute()
        except RedisError as exc:
            self._dirty |= models  # not written: try again next time
            self._link.failed(exc)
            return
        self._link.ok()
        self._reported.update(counts)
        for m in counts:
            if not self._inflight.get(m):  # idle now (a request may have begun during the write)
                self._inflight.pop(m, None)
