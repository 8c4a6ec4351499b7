"""A router's share of the lab's timeline (``llm_router.timeline``): request series, its
events, and the roll-ups to the coarser resolutions.

Why in memory first: the hot path (``request``, ``waited``) only adds to a few integers of the
current fine slot of its model (no Redis, no allocation once the model is known: well under
5 µs, ``scripts/bench_history.py``). ``run`` writes every closed slot once, one pipeline per
slot (``HINCRBY`` of the non-zero fields of each model's hash, its TTL, the series index and
one ``flushes`` mark in the ``routers`` coverage slot), so Redis sees at most one write per
model per fine step from each router, however many requests it serves.

A flush that fails (Redis away) is dropped, not retried: a pipeline may have been applied
before its reply was lost, and counting it twice would be a wrong number; a missing slot reads
as a gap (no ``flushes`` in its coverage slot). Events wait in a bounded queue instead (an
event written twice is still true) and go out at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Callable, Sequence

from llm_lab_router.protocol import Keys
from llm_lab_router.router.observe.claims import claim
from llm_lab_router.router.observe.gpu_summary import GpuSummary
from llm_lab_router.timeline import (
    COUNTERS,
    COVERAGE,
    FLUSHES,
    GPUS_SERIES,
    HISTOGRAMS,
    NBUCKETS,
    ROLLUP_SCRIPT,
    Resolution,
    TimelineEvent,
    bucket_fields,
    bucket_of,
    event_ops,
    model_series,
)
from redis.asyncio import Redis
from redis.exceptions import RedisError

log = logging.getLogger("router.history")

# Layout of a model's accumulator (one flat list: the hot path only indexes it).
FIELDS: tuple[str, ...] = (*COUNTERS, *(f for name in HISTOGRAMS for f in bucket_fields(name)))
REQUESTS, ERR4, ERR5, TOKENS_IN, TOKENS_OUT = range(len(COUNTERS))
TTFT = len(COUNTERS)
LATENCY = TTFT + NBUCKETS
WAIT = LATENCY + NBUCKETS
ROLLUP_GRACE = 0.5  # fine steps after a slot's own flush before its coarse slot is rolled up
ROLLUP_LOOKBACK = 12  # coarse slots looked at each time (routers that were all down catch up)
EVENT_QUEUE = 1000  # events kept while Redis is away


class History:
    """Accumulates this router's requests per model and fine slot; ``run`` flushes and rolls up."""

    def __init__(self, redis: Redis, keys: Keys, router_id: str, resolutions: Sequence[Resolution],
                 clock: Callable[[], float] = time.time, reader: Redis | None = None) -> None:
        """``reader``: the client that may read the workers' keys (their gauge records, summed
        into the ``gpus`` series by ``GpuSummary``); ``redis`` where it may."""
        # What this router holds now, sampled once per slot flushed: model -> requests in flight
        # (queued or served) and model -> requests waiting for a start or a swap (set by the wiring).
        self.inflight: Callable[[], dict[str, int]] = dict
        self.queued: Callable[[], dict[str, int]] = dict
        self.redis = redis
        self.keys = keys
        self.router_id = router_id
        self.resolutions = tuple(resolutions)
        self.fine = resolutions[0]
        self.coarse = tuple(resolutions[1:])
        self.clock = clock
        self.slot = int(clock() // self.fine.step)
        self.current: dict[str, list[int]] = {}  # model -> counts of ``slot``
        self.closed: dict[int, dict[str, list[int]]] = {}  # earlier slots not yet written
        self.events: deque[TimelineEvent] = deque(maxlen=EVENT_QUEUE)
        self.wake = asyncio.Event()
        self.written = self.slot - 1  # the last slot flushed (or given up)
        self.dropped_slots = 0  # flushes lost to Redis errors (gaps)
        self.lost: tuple[float, str] | None = None  # since when, and why, Redis has been unreachable
        self._rollup = None
        self.summary = GpuSummary(redis, reader or redis, keys, self.fine)

    # --- hot path ---

    def _counts(self, model: str) -> list[int]:
        slot = int(self.clock() // self.fine.step)
        if slot != self.slot:
            if self.current:
                self.closed[self.slot] = self.current
            self.slot, self.current = slot, {}
        counts = self.current.get(model)
        if counts is None:
            counts = self.current[model] = [0] * len(FIELDS)
        return counts

    def request(self, model: str, status: int, latency: float, ttft: float | None,
                tokens_in: int | None, tokens_out: int | None) -> None:
        """One request of ``model`` ended (``ttft``: streamed requests only)."""
        c = self._counts(model)
        c[REQUESTS] += 1
        if status >= 500:
            c[ERR5] += 1
        elif status >= 400:
            c[ERR4] += 1
        c[LATENCY + bucket_of(latency)] += 1
        if ttft is not None:
            c[TTFT + bucket_of(ttft)] += 1
        if tokens_in:
            c[TOKENS_IN] += tokens_in
        if tokens_out:
            c[TOKENS_OUT] += tokens_out

    def waited(self, model: str, seconds: float) -> None:
        """A request of ``model`` waited ``seconds`` (queue, swap or cold start) before being served."""
        self._counts(model)[WAIT + bucket_of(seconds)] += 1

    def event(self, kind: str, **fields) -> None:
        """Record a timeline event (written at once by ``run``)."""
        self.events.append(TimelineEvent(ts=self.clock(), kind=kind, by=f"router:{self.router_id}", **fields))
        self.wake.set()

    # --- writing ---

    async def flush(self, final: bool = False) -> None:
        """Write every slot closed since the last flush (at shutdown, ``final``, the current one
        too) and the queued events. Each slot is marked covered, with or without requests."""
        self._counts("")  # rotate if the current slot has ended
        self.current.pop("", None)
        closed, self.closed = self.closed, {}
        end = self.slot + 1 if final else self.slot
        if final:
            closed[self.slot], self.current = self.current, {}
        slots = range(max(self.written + 1, end - 1 - ROLLUP_LOOKBACK), end)
        self.written = max(self.written, end - 1)
        if not slots and not self.events:
            return
        events = list(self.events)
        load = {"inflight": self.inflight(), "queued": self.queued()}
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for slot in slots:
                    self._slot_ops(pipe, slot, closed.get(slot, {}), load if slot == slots[-1] else {})
                event_ops(pipe, self.keys, events)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            self.dropped_slots += len(slots)
            log.warning("history: %d slot(s) not written (redis: %s): they show as a gap", len(slots), exc)
            if self.lost is None:
                self.lost = (self.clock(), str(exc))
            return
        for _ in events:
            self.events.popleft()
        if self.lost is not None:
            self._back()

    def _back(self) -> None:
        """Redis answers again: the outage as this router saw it, as two events (written next)."""
        since, why = self.lost  # type: ignore[misc]
        self.lost = None
        now = self.clock()
        by = f"router:{self.router_id}"
        self.events.append(TimelineEvent(ts=since, kind="redis_lost", detail=why, by=by))
        self.events.append(TimelineEvent(ts=now, kind="redis_back", seconds=now - since, by=by,
                                         detail=f"unreachable for {now - since:.0f}s: those slots are gaps"))
        self.wake.set()

    def _slot_ops(self, pipe, slot: int, models: dict[str, list[int]], load: dict[str, dict[str, int]]) -> None:
        """One slot's counts, and ``load`` (gauge -> model -> this router's sample), all added to."""
        step, keep = self.fine.step, self.fine.keep
        samples: dict[str, list[tuple[str, int]]] = {}
        for gauge, per_model in load.items():
            for model, n in per_model.items():
                samples.setdefault(model, []).append((gauge, n))
        for model in {*models, *samples}:
            key = self.keys.history(step, model_series(model), slot)
            for name, value in [*zip(FIELDS, models.get(model, ())), *samples.get(model, ())]:
                if value:
                    pipe.hincrby(key, name, value)
            pipe.expire(key, keep)
            pipe.hset(self.keys.history_series(), model_series(model), slot * step)
        cover = self.keys.history(step, COVERAGE, slot)
        pipe.hincrby(cover, FLUSHES, 1)
        pipe.expire(cover, keep)

    async def run(self) -> None:
        """Flush each fine slot once it closes (plus a little, so late requests land in it) and
        events as they come; roll up coarse slots (whoever wins each slot's lock)."""
        step = self.fine.step
        while True:
            now = self.clock()
            next_flush = (int(now // step) + 1) * step + min(1.0, step / 10)
            try:
                await asyncio.wait_for(self.wake.wait(), max(0.0, next_flush - now))
            except asyncio.TimeoutError:
                pass
            self.wake.clear()
            await self.flush()
            try:  # before the roll-up that may read it; apart: a reader without GETRANGE stops only this
                await self.summary.run_once(self.clock())
            except (RedisError, OSError) as exc:
                log.warning("history: the lab's GPU summary: redis: %s", exc)
            if self.coarse:
                try:
                    await self.roll_up()
                except (RedisError, OSError) as exc:
                    log.warning("history roll-up: redis: %s", exc)

    async def roll_up(self) -> int:
        """Roll every finished coarse slot of the last ``ROLLUP_LOOKBACK`` that no router rolled
        up yet (the first ``HINCRBY`` of its claim decides who does); return how many this router did."""
        done = 0
        now = self.clock()
        for res in self.coarse:
            # the last coarse slot surely complete: every router has flushed its last fine slot
            last = int((now - self.fine.step * (1 + ROLLUP_GRACE)) // res.step) - 1
            slots = [s for s in range(last - ROLLUP_LOOKBACK + 1, last + 1) if (s + 1) * res.step > now - self.fine.keep]
            won = await claim(self.redis, self.keys.history_rolled(res.step), slots, res.keep, min(slots, default=0))
            for s in won:
                await self._roll_slot(res, s)
                done += 1
            if won:
                await self._prune(res)
        return done

    async def _roll_slot(self, res: Resolution, slot: int) -> None:
        """Sum the request series' and the ``gpus`` summary's fine slots into ``slot`` (each
        host's own gauges are its worker's to roll up)."""
        if self._rollup is None:
            self._rollup = self.redis.register_script(ROLLUP_SCRIPT)
        index = await self.redis.hgetall(self.keys.history_series())
        series = [name for s in index if (name := s.decode() if isinstance(s, bytes) else s).startswith("model:") or name == GPUS_SERIES]
        per = res.step // self.fine.step
        first = slot * per
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in [COVERAGE, *series]:
                fine = [self.keys.history(self.fine.step, name, first + i) for i in range(per)]
                await self._rollup(keys=[self.keys.history(res.step, name, slot), *fine], args=[res.keep],
                                   client=pipe)
            await pipe.execute()

    async def _prune(self, res: Resolution) -> None:
        """With the longest retention, drop series unwritten for longer than it, and events older
        than it."""
        keep = max(r.keep for r in (self.fine, *self.coarse))
        if res.keep != keep:
            return
        cutoff = self.clock() - keep
        index = await self.redis.hgetall(self.keys.history_series())
        stale = [k for k, v in index.items() if float(v) < cutoff]
        if stale:
            await self.redis.hdel(self.keys.history_series(), *stale)
        await self.redis.xtrim(self.keys.timeline(), minid=f"{int(cutoff * 1000)}-0", approximate=True)
