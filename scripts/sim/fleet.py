"""``Fleet``: one asyncio process that plays many worker hosts on a real Redis.

Each simulated host writes exactly what ``llm-router worker`` writes, with the same code
(``worker.publish``): a lease renewed every ``heartbeat`` s with a TTL (and everything published
again when the lease had vanished, as after a Redis restart), a catalog of ``models`` models,
their instances and events, a device snapshot every ``devices_interval`` s, log lines shipped
with ``LOG_SHIP_SCRIPT``, and instance state changes at ``change_rate`` per host per minute.
Instances that are "running" point at a few real engines (``engine_urls``), so requests
routed to any simulated instance are really served.

The first model (``CHAT``) runs on every host and never changes (the hot path's target); the
others start and stop at random.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import random
import socket
import time
from dataclasses import dataclass, field

from llm_lab_router import __version__
from llm_lab_router.protocol import (
    LOG_SHIP_SCRIPT,
    CatalogEntry,
    CpuInfo,
    CudaInfo,
    DeviceSnapshot,
    GpuInfo,
    Instance,
    Keys,
    WorkerInfo,
    WorkerVersion,
    log_ship_args,
)
from llm_lab_router.worker.publish import change_ops, devices_ops, goodbye_ops, lease_ops, publish_all_ops
from redis.asyncio import Redis

log = logging.getLogger("sim.fleet")

CHAT = "sim-chat"  # on every host, always running: the model requests are sent to
GPUS_PER_HOST = 4


def model_ids(count: int) -> list[str]:
    return [CHAT, *(f"sim-m{n}" for n in range(1, count))]


@dataclass
class SimHost:
    """One simulated worker: its lease, catalog and instances, as the agent keeps them."""

    wid: str
    catalog: list[CatalogEntry]
    instances: dict[str, Instance]
    info: WorkerInfo = field(init=False)
    version: WorkerVersion = field(default_factory=WorkerVersion)
    log_offsets: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        now = time.time()
        self.info = WorkerInfo(id=self.wid, host=f"{self.wid}.sim", pid=os.getpid(), version=__version__,
                               started_at=now, heartbeat_at=now)

    def change(self, model: str, url: str) -> Instance:
        """The next state of one instance (stopped -> starting -> running -> stopping -> stopped)."""
        old = self.instances[model]
        nxt = {"stopped": "starting", "starting": "running", "running": "stopping", "stopping": "stopped",
               "failed": "stopped"}[old.state]
        inst = Instance(model=model, worker=self.wid, state=nxt, url=url if nxt in ("starting", "running") else "",
                        pid=4242 if nxt != "stopped" else 0, started_at=old.started_at or time.time(),
                        updated_at=time.time(), gpus="0" if nxt != "stopped" else "",
                        vram_mb=8000 if nxt != "stopped" else 0, seq=old.seq + 1)
        self.instances[model] = inst
        return inst

    def set_state(self, model: str, state: str, url: str) -> Instance:
        old = self.instances[model]
        inst = Instance(model=model, worker=self.wid, state=state, url=url if state == "running" else "",  # type: ignore[arg-type]
                        updated_at=time.time(), seq=old.seq + 1)
        self.instances[model] = inst
        return inst

    def devices(self) -> DeviceSnapshot:
        gpus = [GpuInfo(index=n, name="NVIDIA A100-SXM4-80GB", uuid=f"GPU-{self.wid}-{n}", memory_total=81920,
                        memory_used=(used := random.randint(0, 81920)), memory_free=81920 - used,
                        utilization=random.randint(0, 100)) for n in range(GPUS_PER_HOST)]
        return DeviceSnapshot(worker=self.wid, host=self.info.host, ts=time.time(),
                              cuda=CudaInfo(online=True, driver="550.54", gpus=gpus),
                              cpu=CpuInfo(cpu_count=64, cpu_percent=random.uniform(0, 50), memory_total=515000,
                                          memory_used=(mu := random.randint(10000, 400000)),
                                          memory_free=515000 - mu))


def make_host(wid: str, models: list[str], chat_url: str) -> SimHost:
    catalog = [CatalogEntry(id=m, aliases=[f"{m}-alias"], on_demand=m != CHAT, vram_mb=[8000],
                            devices=[["cuda"]], startup_timeout=60) for m in models]
    instances = {m: Instance(model=m, worker=wid, state="running" if m == CHAT else "stopped",
                             url=chat_url if m == CHAT else "", updated_at=time.time(), seq=1) for m in models}
    return SimHost(wid, catalog, instances)


class Fleet:
    """Plays ``hosts`` workers until ``stop`` is set; ``ready`` is set after the first publish."""

    def __init__(self, redis: Redis, keys: Keys, hosts: list[SimHost], engine_urls: list[str], *,
                 heartbeat: float = 1.0, lease_ttl: float = 5.0, devices_interval: float = 5.0,
                 change_rate: float = 1.0, log_rate: float = 6.0, log_maxlen: int = 10000) -> None:
        self.redis = redis
        self.keys = keys
        self.hosts = hosts
        self.engine_urls = engine_urls
        self.heartbeat = heartbeat
        self.lease_ttl = lease_ttl
        self.devices_interval = devices_interval
        self.change_rate = change_rate  # state changes per host per minute
        self.log_rate = log_rate  # shipped log batches (of 5 lines) per host per minute
        self.log_maxlen = log_maxlen
        self.ready = asyncio.Event()
        self.changes = 0
        self.republished = 0
        self.paused = False  # no state changes while set (heartbeats, devices and logs go on)

    async def publish_all(self, host: SimHost) -> None:
        host.info.heartbeat_at = time.time()
        async with self.redis.pipeline(transaction=True) as pipe:
            publish_all_ops(pipe, self.keys, host.info, self.lease_ttl, host.catalog, host.instances.values(),
                            host.version)
            await pipe.execute()

    async def write_instance(self, host: SimHost, inst: Instance) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            change_ops(pipe, self.keys, host.wid, inst, host.version)
            await pipe.execute()

    async def run(self, stop: asyncio.Event) -> None:
        await _batched([self.publish_all(h) for h in self.hosts])
        self.ready.set()
        loops = [self._spread(self.heartbeat, self._beat), self._spread(self.devices_interval, self._devices),
                 self._changes()]
        if self.log_rate > 0:
            loops.append(self._logs())
        tasks = [asyncio.create_task(loop) for loop in loops]
        try:
            await stop.wait()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def goodbye(self) -> None:
        async def bye(host: SimHost) -> None:
            async with self.redis.pipeline(transaction=True) as pipe:
                goodbye_ops(pipe, self.keys, host.wid, host.instances.values(), host.version)
                await pipe.execute()
        await _batched([bye(h) for h in self.hosts])

    async def _spread(self, interval: float, action) -> None:
        """Call ``action(host)`` for every host once per ``interval``, spread evenly over it
        (as independent hosts' timers would be), in ticks of 50 ms."""
        tick = 0.05
        per_tick = max(1, round(len(self.hosts) * tick / interval))
        hosts = itertools.cycle(self.hosts)
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            batch = [next(hosts) for _ in range(min(per_tick, len(self.hosts)))]
            try:
                await asyncio.gather(*(action(h) for h in batch))
            except Exception as exc:  # Redis away: the next tick tries again, like the agent's loops
                log.warning("%s failed: %s", getattr(action, "__name__", action), exc)
            next_at += tick * len(batch) / per_tick
            await asyncio.sleep(max(0.0, next_at - loop.time()))

    async def _beat(self, host: SimHost) -> None:
        host.info.heartbeat_at = time.time()
        async with self.redis.pipeline(transaction=True) as pipe:
            lease_ops(pipe, self.keys, host.info, self.lease_ttl)
            added, *_ = await pipe.execute()
        if added:  # the lease had vanished (Redis restarted empty, or flushed): publish it all again
            self.republished += 1
            await self.publish_all(host)

    async def _devices(self, host: SimHost) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            devices_ops(pipe, self.keys, host.devices(), self.devices_interval)
            await pipe.execute()

    async def _changes(self) -> None:
        """State changes at random times (a Poisson process of ``change_rate`` per host per minute)."""
        rate = self.change_rate * len(self.hosts) / 60.0
        if rate <= 0:
            return
        while True:
            await asyncio.sleep(random.expovariate(rate))
            if self.paused:
                continue
            host = random.choice(self.hosts)
            model = random.choice([m for m in host.instances if m != CHAT] or [CHAT])
            inst = host.change(model, random.choice(self.engine_urls))
            try:
                await self.write_instance(host, inst)
                self.changes += 1
            except Exception as exc:
                log.warning("state change failed: %s", exc)

    async def _logs(self) -> None:
        """Log batches at random times, shipped as the worker's ``LogPipe`` ships them."""
        rate = self.log_rate * len(self.hosts) / 60.0
        sha = await self.redis.script_load(LOG_SHIP_SCRIPT)
        while True:
            await asyncio.sleep(random.expovariate(rate))
            host = random.choice(self.hosts)
            model = random.choice(list(host.instances))
            first = host.log_offsets.get(model, 0)
            lines = [f"{time.time():.6f} simulated log line {first + n} of {model} on {host.wid}".encode()
                     for n in range(5)]
            last = first + sum(len(line) + 1 for line in lines)
            host.log_offsets[model] = last
            try:
                await self.redis.evalsha(sha, 2, self.keys.logs(model),
                                         self.keys.log_position(host.wid, model, "stdout"),
                                         *log_ship_args(self.log_maxlen, host.wid, "stdout", "sim", first, last, "",
                                                        lines))
            except Exception as exc:
                log.warning("log shipping failed: %s", exc)


async def _batched(coros: list, size: int = 50) -> None:
    for n in range(0, len(coros), size):
        await asyncio.gather(*coros[n:n + size])


def host_ids(count: int, tag: str = "") -> list[str]:
    tag = tag or f"{socket.gethostname()[:8]}-{os.getpid()}"
    return [f"sim-{tag}-{n:04d}" for n in range(count)]
