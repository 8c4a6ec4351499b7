"""Per-model concurrency limits with a bounded queue, in this router.

A model with ``max_concurrency = N`` (per instance) serves at most ``N × running instances``
requests at once through this router; the next ones wait in a FIFO queue of at most
``queue_limit`` requests, each for at most ``queue_timeout`` seconds. Beyond that the caller
gets ``429`` in OpenAI's error shape with ``Retry-After``, which OpenAI SDKs retry by themselves.

The limit is per router (each router counts its own requests, no Redis on the hot path): with
R routers an instance sees at most R × N concurrent requests. An engine's own queue is the
backstop; a cluster-wide semaphore would cost a Redis round trip per request.
"""

from __future__ import annotations

import asyncio
from collections import deque
from contextlib import asynccontextmanager
from typing import AsyncIterator

from router.responses import ApiError

RETRY_AFTER = "1"  # seconds; a queue slot frees as soon as any request of the model ends


class _Gate:
    def __init__(self) -> None:
        self.active = 0
        self.capacity = 0
        self.waiters: deque[asyncio.Future[None]] = deque()


def too_many(model: str, why: str) -> ApiError:
    return ApiError(429, f"model '{model}' is at its concurrency limit: {why}; retry later",
                    "rate_limit_exceeded", {"Retry-After": RETRY_AFTER})


class Limits:
    def __init__(self, queue_limit: int, queue_timeout: float) -> None:
        self.queue_limit = queue_limit
        self.queue_timeout = queue_timeout
        self._gates: dict[str, _Gate] = {}

    def queued(self, model: str) -> int:
        gate = self._gates.get(model)
        return len(gate.waiters) if gate else 0

    @asynccontextmanager
    async def admit(self, model: str, capacity: int) -> AsyncIterator[None]:
        """Hold one of ``capacity`` slots of ``model`` for the block (0 = unlimited); wait in
        the queue for one, or raise the 429 ``ApiError``."""
        if capacity <= 0:
            yield
            return
        gate = self._gates.setdefault(model, _Gate())
        gate.capacity = capacity
        if gate.active >= capacity or gate.waiters:
            await self._wait(model, gate)
        else:
            gate.active += 1
        try:
            yield
        finally:
            self._release(model, gate)

    async def _wait(self, model: str, gate: _Gate) -> None:
        """Queue for a slot; ``_release`` hands it over by resolving our future."""
        if len(gate.waiters) >= self.queue_limit:
            raise too_many(model, f"{len(gate.waiters)} requests already queued (queue limit {self.queue_limit})")
        turn = asyncio.get_running_loop().create_future()
        gate.waiters.append(turn)
        try:
            done, _ = await asyncio.wait([turn], timeout=self.queue_timeout)
        except asyncio.CancelledError:  # the client went away
            if turn.done() and not turn.cancelled():
                self._release(model, gate)  # a slot was handed to us: pass it on
            raise
        finally:
            if not turn.done():
                turn.cancel()
            if turn in gate.waiters:
                gate.waiters.remove(turn)
        if not done:
            raise too_many(model, f"no slot within the queue timeout of {self.queue_timeout:g}s")

    def _release(self, model: str, gate: _Gate) -> None:
        gate.active -= 1
        while gate.waiters and gate.active < gate.capacity:
            turn = gate.waiters.popleft()
            if not turn.done():
                turn.set_result(None)
                gate.active += 1
        if not gate.active and not gate.waiters:
            del self._gates[model]  # models come and go: keep no idle gates
