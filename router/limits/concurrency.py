"""Per-model concurrency limits with a bounded, fair queue, in this router.

A model with ``max_concurrency = N`` (per instance) serves at most ``N × running instances``
requests at once through this router; the next ones wait in a queue of at most
``queue_limit`` requests, each for at most ``queue_timeout`` seconds. Beyond that the caller
gets ``429`` in OpenAI's error shape with ``Retry-After``, which OpenAI SDKs retry by themselves.

The queue is fair across API keys, not FIFO: each key (its name from a structured keys file,
router/http/auth.py; every request without one shares the anonymous lane ``""``) has its own lane,
and a freed slot goes to the lane of the highest ``priority``, then among equals to the one
that has had the least service for its ``weight`` (start-time fair queuing: a lane's virtual
time grows by ``1 / weight`` per request served, and a lane that starts waiting joins at the
current virtual time, so it gets no credit for the time it was idle). Two keys of equal
weight thus alternate however many requests either queues; one of weight 2 gets two slots to
the other's one. Within a lane, requests go in arrival order.

Priority is strict: a lower-priority lane is served only while no higher-priority request
waits. A busy high-priority key can therefore starve a lower one, whose requests then end
with the queue timeout's 429; give such keys the same priority and different weights for a
share instead.

The ``queue_limit`` places are shared by all lanes, but a full queue does not refuse a request
while a lower-priority lane, or at equal priority a lane holding more places for its weight
than the newcomer's would, holds places: the newest waiter of such a lane (the lowest
priority first, then the most over its share) gets the 429 instead and the newcomer takes
its place. A low-priority key that filled the queue thus cannot lock out a higher one, nor
one key its equals.

The limit is per router (each router counts its own requests, no Redis on the hot path): with
R routers an instance sees at most R × N concurrent requests. An engine's own queue is the
backstop; a cluster-wide semaphore would cost a Redis round trip per request (per-key limits
across routers are router/limits/quotas.py's).
"""

from __future__ import annotations

import asyncio
from collections import deque
from contextlib import asynccontextmanager
from typing import AsyncIterator

from llm_lab_router.router.core.errors import ApiError

RETRY_AFTER = "1"  # seconds; a queue slot frees as soon as any request of the model ends
ANONYMOUS = ""  # the lane of requests without a named key


class _Lane:
    __slots__ = ("waiters", "priority", "weight", "vtime")

    def __init__(self, priority: int, weight: float) -> None:
        self.waiters: deque[asyncio.Future[None]] = deque()
        self.priority = priority
        self.weight = weight
        self.vtime = 0.0  # service received, in requests / weight


class _Gate:
    def __init__(self) -> None:
        self.active = 0
        self.capacity = 0
        self.queued = 0  # waiters over all lanes
        self.vclock = 0.0  # the virtual time of the last request handed a slot
        self.lanes: dict[str, _Lane] = {}

    def enqueue(self, lane: str, priority: int, weight: float, turn: asyncio.Future[None]) -> _Lane:
        entry = self.lanes.get(lane)
        if entry is None:
            entry = self.lanes[lane] = _Lane(priority, weight)
        entry.priority, entry.weight = priority, weight
        if not entry.waiters:
            entry.vtime = max(entry.vtime, self.vclock)  # no credit for idle time
        entry.waiters.append(turn)
        self.queued += 1
        return entry

    def remove(self, entry: _Lane, turn: asyncio.Future[None]) -> None:
        if turn in entry.waiters:
            entry.waiters.remove(turn)
            self.queued -= 1

    def displace(self, lane: str, priority: int, weight: float) -> asyncio.Future[None] | None:
        """Take out and return the newest waiter that a request of ``lane`` (``priority``,
        ``weight``) may push out of a full queue: of a lower-priority lane, or of an
        equal-priority lane with more places for its weight than ``lane`` would have; the
        lowest priority first, then the most places for its weight. ``None``: none may be."""
        own = self.lanes.get(lane)
        own_share = ((len(own.waiters) if own else 0) + 1) / weight
        victim: _Lane | None = None
        for name, entry in self.lanes.items():
            if name == lane or not entry.waiters or entry.priority > priority:
                continue
            share = len(entry.waiters) / entry.weight
            if entry.priority == priority and share <= own_share:
                continue
            if victim is None or (entry.priority, -share) < (victim.priority, -len(victim.waiters) / victim.weight):
                victim = entry
        if victim is None:
            return None
        self.queued -= 1
        return victim.waiters.pop()

    def next_turn(self) -> asyncio.Future[None] | None:
        """Take the next waiter: highest priority, then least virtual time, then lane order."""
        best: _Lane | None = None
        for entry in self.lanes.values():
            if entry.waiters and (best is None or entry.priority > best.priority
                                  or (entry.priority == best.priority and entry.vtime < best.vtime)):
                best = entry
        if best is None:
            return None
        self.queued -= 1
        self.vclock = best.vtime
        best.vtime += 1 / best.weight
        return best.waiters.popleft()


def too_many(model: str, why: str) -> ApiError:
    return ApiError(429, f"model '{model}' is at its concurrency limit: {why}; retry later",
                    "rate_limit_exceeded", {"Retry-After": RETRY_AFTER})


class Limits:
    def __init__(self, queue_limit: int, queue_timeout: float) -> None:
        self.queue_limit = queue_limit
        self.queue_timeout = queue_timeout
        self._gates: dict[str, _Gate] = {}

    def queued(self, model: str) -> int:
        """Requests waiting for a slot of ``model``, all lanes."""
        gate = self._gates.get(model)
        return gate.queued if gate else 0

    def waiting_models(self) -> list[str]:
        """Models with requests waiting for a slot (their capacity may have grown since)."""
        return [model for model, gate in self._gates.items() if gate.queued]

    def resize(self, model: str, capacity: int) -> None:
        """``model`` can now take ``capacity`` requests at once (an instance started or
        stopped): a larger capacity hands its new slots to waiters at once, instead of at the
        next release (which, with every slot busy on long streams, may be long after the
        waiters' queue timeout). 0 (unlimited, or no instance running) changes nothing: waiters
        keep their place."""
        gate = self._gates.get(model)
        if gate is None or capacity <= 0:
            return
        gate.capacity = capacity
        self._hand_out(gate)

    @asynccontextmanager
    async def admit(self, model: str, capacity: int, lane: str = ANONYMOUS, priority: int = 0,
                    weight: float = 1.0) -> AsyncIterator[None]:
        """Hold one of ``capacity`` slots of ``model`` for the block (0 = unlimited); wait in
        ``lane`` of the queue for one, or raise the 429 ``ApiError``."""
        if capacity <= 0:
            yield
            return
        gate = self._gates.setdefault(model, _Gate())
        if capacity > gate.capacity and gate.queued:
            self.resize(model, capacity)
        gate.capacity = capacity
        if gate.active >= capacity or gate.queued:
            await self._wait(model, gate, lane, priority, weight)
        else:
            gate.active += 1
        try:
            yield
        finally:
            self._release(model, gate)

    async def _wait(self, model: str, gate: _Gate, lane: str, priority: int, weight: float) -> None:
        """Queue for a slot; ``_release`` hands it over by resolving our future."""
        if gate.queued >= self.queue_limit:
            full = f"{gate.queued} requests already queued (queue limit {self.queue_limit})"
            pushed = gate.displace(lane, priority, weight) if self.queue_limit else None
            if pushed is None:
                raise too_many(model, full)
            pushed.set_exception(too_many(model, f"{full}: its place was taken by a request of higher "
                                                 "priority or a smaller share"))
        turn = asyncio.get_running_loop().create_future()
        entry = gate.enqueue(lane, priority, weight, turn)
        try:
            done, _ = await asyncio.wait([turn], timeout=self.queue_timeout)
        except asyncio.CancelledError:  # the client went away
            if turn.done() and not turn.cancelled() and turn.exception() is None:
                self._release(model, gate)  # a slot was handed to us: pass it on
            raise
        finally:
            if not turn.done():
                turn.cancel()
            gate.remove(entry, turn)
        if not done:
            raise too_many(model, f"no slot within the queue timeout of {self.queue_timeout:g}s")
        turn.result()  # raises the 429 of a waiter whose place was taken (``displace``)

    def _release(self, model: str, gate: _Gate) -> None:
        gate.active -= 1
        self._hand_out(gate)
        if not gate.active and not gate.queued:
            del self._gates[model]  # models come and go: keep no idle gates

    @staticmethod
    def _hand_out(gate: _Gate) -> None:
        """Free slots to the next waiters, in queue order (``_Gate.next_turn``)."""
        while gate.queued and gate.active < gate.capacity:
            turn = gate.next_turn()
            if turn is None:
                break
            if not turn.done():
                turn.set_result(None)
                gate.active += 1


def process_share(capacity: int, index: int, count: int) -> int:
    """Child ``index`` of ``count``'s part of ``capacity`` concurrent requests.

    The parts add up to ``capacity`` exactly (the first ``capacity % count`` children take one
    more), so N children admit no more than one process would. Where ``capacity < count`` a
    child would get 0 (and refuse everything that reaches it): each gets at least 1, so the
    total is then ``count``. ``capacity <= 0`` (unlimited) stays unlimited."""
    if capacity <= 0 or count <= 1:
        return capacity
    return max(1, capacity // count + (index < capacity % count))
