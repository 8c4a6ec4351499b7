"""Idle unload: a model unused for longer than its ``idle_ttl`` is stopped by its own worker.

Why the worker and not a router: the worker is the single writer of its host and owns the
model's config (``idle_ttl``); one reaper per host decides once, while N routers would race to
stop the same model. Routers report use in ``llm:used:{model}`` (``router.control.in_use``); the
worker reads it for its running models every ``poll_interval`` and stops those ``idle_models``
names, by each model's ``idle_ttl`` as it is now (a config reload may add, change or remove
it). A model with a request in flight (on any live router) is never stopped; when Redis
cannot be read, nothing is stopped (unknown use is not idleness).

Every time compared here is on Redis's clock (``llm_lab_router.clock``): the routers' last use
and the freshness of their entries, this worker's ``started_at``, and now. A router whose clock
is off by minutes neither gets a model unloaded under its requests nor keeps an idle one loaded.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable, Iterable, Mapping

import redis.asyncio as aredis
from llm_lab_router.backoff import REDIS_ERRORS, RedisLink, stop_if_cancelled
from llm_lab_router.clock import CLOCK
from llm_lab_router.protocol import Instance, Keys, ModelUsage, read_usage
from llm_lab_router.worker.process import ModelProcess

log = logging.getLogger("llm_router.worker")


def idle_models(now: float, running: Iterable[tuple[Instance, float]],
                usage: Mapping[str, ModelUsage]) -> list[str]:
    """The models to stop now: ``running`` pairs (instance, idle_ttl) whose ttl is set, with
    no request in flight, last used (or started, if later) at least ``idle_ttl`` seconds ago.
    A model missing from ``usage`` is kept (its use is unknown)."""
    out = []
    for inst, ttl in running:
        use = usage.get(inst.model)
        if ttl <= 0 or use is None or use.inflight > 0:
            continue
        if now - max(use.last_used, inst.started_at) >= ttl:
            out.append(inst.model)
    return out


def poll_interval(ttls: Iterable[float], cap: float = 1.0) -> float:
    """How long the reaper sleeps between rounds: half the shortest ``idle_ttl`` set, so a
    model is stopped at most half its ttl late, and at most ``cap``."""
    return min([cap, *(t / 2 for t in ttls if t > 0)])


class IdleReaper:
    """Stops this host's idle models. It runs whatever the config said at start, and reads
    the ``idle_ttl`` of every model again each round: a reload may set one on a host that had
    none, or change it (``models`` is the agent's own dict, which a reload updates in place).
    A round without any ``idle_ttl`` set costs nothing (no Redis call)."""

    def __init__(self, redis: aredis.Redis, keys: Keys, models: Mapping[str, ModelProcess],
                 interval: float = 1.0, on_idle: Callable[[str, str], None] | None = None) -> None:
        self.redis = redis
        self.on_idle = on_idle  # told (model, why) before an idle model is stopped: the timeline's cause
        self.keys = keys
        self.models = models
        self.max_interval = interval

    def interval(self) -> float:
        return poll_interval((mp.model.idle_ttl for mp in self.models.values()), self.max_interval)

    async def run(self) -> None:
        link = RedisLink("idle")
        while True:
            stop_if_cancelled()
            await asyncio.sleep(self.interval())
            try:
                await self.reap()
                link.ok()
            except REDIS_ERRORS as exc:
                link.failed(exc)

    async def reap(self) -> list[str]:
        """Stop the idle models once; return their ids."""
        running = [(mp.instance, mp.model.idle_ttl) for mp in self.models.values()
                   if mp.state == "running" and mp.model.idle_ttl > 0]
        if not running:
            return []
        now = CLOCK.now()  # the routers' stamps are on Redis's clock, as is started_at
        usage = await read_usage(self.redis, self.keys, [inst.model for inst, _ in running], now)
        idle = idle_models(now, running, usage)
        for model in idle:
            why = f"unused for {self.models[model].model.idle_ttl:g}s (idle_ttl): stopping"
            log.info("%s: %s", model, why)
            self.models[model].host.logs.write(model, "event", why)
            if self.on_idle is not None:
                self.on_idle(model, f"idle: unused for {self.models[model].model.idle_ttl:g}s")
        await asyncio.gather(*(self.models[m].ensure_stopped() for m in idle))
        return idle
