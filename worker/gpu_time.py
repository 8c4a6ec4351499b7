"""GPU time for the usage ledger: each running model's resident GPU-seconds (time running × its
GPUs), per hour, added to ``llm:ledger:{hour}`` as ``gpu|{model}|{worker}`` (llm_router/ledger.py).

Measured by this worker alone (its own instances; Redis's clock, as the instances'
``started_at``), so hosts never count a second twice; a write Redis refused is kept and added to the next one. Each tick charges the
time since the previous one (or since the instance became running, if later), split at hour
boundaries; an instance that stops between two ticks loses the part of the interval it ran
(at most one tick, a few seconds).
"""

from __future__ import annotations

from typing import Callable, Iterable

from redis.exceptions import RedisError

from llm_lab_router.backoff import RedisLink
from llm_lab_router.clock import CLOCK
from llm_lab_router.ledger import HOUR, expire_at, gpu_field, hour_of
from llm_lab_router.protocol import Instance, Keys


def gpu_count(instance: Instance) -> int:
    return len([g for g in instance.gpus.split(",") if g.strip()]) if instance.gpus else 0


def split_by_hour(start: float, end: float) -> list[tuple[int, float]]:
    """``[start, end)`` as (hour, seconds in it) pieces."""
    pieces = []
    while start < end:
        hour = hour_of(start)
        upto = min(end, hour + HOUR)
        pieces.append((hour, upto - start))
        start = upto
    return pieces


class GpuClock:
    def __init__(self, redis, keys: Keys, worker: str, retention_days: int, log,
                 clock: Callable[[], float] = CLOCK.now) -> None:
        self.redis = redis
        self.keys = keys
        self.worker = worker
        self.retention_days = retention_days
        self.clock = clock
        self._since: float | None = None
        self._pending: dict[tuple[int, str], float] = {}  # (hour, field) -> GPU-seconds not yet written
        self._link = RedisLink("GPU time ledger", log=log)

    def tick(self, instances: Iterable[Instance]) -> None:
        """Charge the time since the last tick to the instances running now."""
        now = self.clock()
        since, self._since = self._since, now
        if since is None:
            return
        for inst in instances:
            gpus = gpu_count(inst)
            if inst.state != "running" or not gpus:
                continue
            for hour, seconds in split_by_hour(max(since, inst.started_at), now):
                item = (hour, gpu_field(inst.model, self.worker))
                self._pending[item] = self._pending.get(item, 0.0) + seconds * gpus

    async def flush(self) -> None:
        if not self._pending:
            return
        taken, self._pending = self._pending, {}
        now = self.clock()
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for (hour, field), seconds in taken.items():
                    pipe.hincrbyfloat(self.keys.ledger(hour), field, round(seconds, 3))
                for hour in {h for h, _ in taken}:
                    pipe.expire(self.keys.ledger(hour), max(1, int(expire_at(hour, self.retention_days) - now)))
                await pipe.execute()
        except RedisError as exc:
            for item, seconds in taken.items():
                self._pending[item] = self._pending.get(item, 0.0) + seconds
            self._link.failed(exc)
            return
        self._link.ok()
