"""Every host's GPUs summed per fine slot: the series ``gpus`` of the lab's timeline
(``llm_router.timeline``).

Why a summary written once instead of a sum at read time: a host's gauges are its worker's
binary records (``timeline.RECORD``), and a chart of the whole lab over 30 days would read and
decode every host's records (500 hosts × 720 hourly records) on each refresh. Instead, once a
fine slot is closed, one router (whoever wins ``HINCRBY llm:hist:rolled:{fine} {slot}``) reads
that slot's record of every host (one ``GETRANGE`` each, as the read-only user that reads the
workers' keys) and writes one hash, ``llm:hist:{fine}:gpus:{slot}``. It is then rolled up to the
coarser resolutions and read back like a request series: a 30-day view reads 720 small hashes.

Fields (sums over the hosts that had a record in the slot): ``hosts``, ``gpus``,
``memory_used`` and ``memory_total`` (MiB), ``utilization`` (sum of % over ``gpus``: the mean is
``utilization / gpus``), ``power`` (W), and ``vram:{model}`` (MiB its engines hold, all hosts).
A slot no host recorded is not written: it reads as a gap.
"""

from __future__ import annotations

from typing import Mapping

from llm_lab_router.protocol import Keys
from llm_lab_router.router.observe.claims import claim
from llm_lab_router.timeline import (
    GPU_SLOTS,
    GPUS_SERIES,
    HostMeta,
    RECORD,
    Resolution,
    engines_of,
    gauge_chunk,
    gpu_at,
    vram_by_model,
)
from redis.asyncio import Redis

LOOKBACK = 12  # fine slots looked at each time (routers that were all down catch up)
META_EVERY = 30  # fine slots between reads of every host's meta (totals, GPU count)
GRACE = 0.25  # fine steps after a slot ends before it is summed (every host wrote during it)


def sum_records(records: Mapping[str, bytes], metas: Mapping[str, HostMeta]) -> dict[str, int]:
    """One slot's summary from each host's record of it (host -> raw ``RECORD`` bytes, or short or
    empty where none) and what its meta says."""
    out: dict[str, int] = {}

    def add(name: str, value: int) -> None:
        if value:
            out[name] = out.get(name, 0) + value

    for host, raw in records.items():
        if len(raw) < RECORD.size or not raw[0]:
            continue
        row = RECORD.unpack(raw[:RECORD.size])
        meta = metas.get(host, HostMeta())
        n = min(meta.gpus, GPU_SLOTS)
        add("hosts", 1)
        add("gpus", n)
        for i in range(n):
            add("memory_used", row[gpu_at(i, 0)])
            add("utilization", row[gpu_at(i, 1)])
            add("power", row[gpu_at(i, 2)])
            add("memory_total", meta.totals.get(i, 0))
        for number, mib in vram_by_model(engines_of(row)).items():
            if number in meta.models:  # a number without a name (its meta lost) counts as other
                add(f"vram:{meta.models[number]}", mib)
    return out


class GpuSummary:
    """Writes the ``gpus`` series: each closed fine slot summed once over every host."""

    def __init__(self, redis: Redis, reader: Redis, keys: Keys, fine: Resolution) -> None:
        """``reader``: a client that may read the workers' own keys (their gauge records)."""
        self.redis = redis
        self.reader = reader
        self.keys = keys
        self.fine = fine
        self.meta: dict[str, HostMeta] = {}

    async def run_once(self, now: float) -> int:
        """Sum every closed fine slot of the last ``LOOKBACK`` that no router summed yet; return
        how many this router wrote."""
        step = self.fine.step
        last = int((now - step * GRACE) // step) - 1
        slots = list(range(last - LOOKBACK + 1, last + 1))
        won = await claim(self.redis, self.keys.history_rolled(step), slots, self.fine.keep, slots[0])
        if not won:
            return 0
        index = await self.redis.hgetall(self.keys.history_series())
        hosts = sorted(n[5:] for s in index if (n := s.decode() if isinstance(s, bytes) else s).startswith("host:"))
        written = 0
        for slot in won:
            written += await self._sum_slot(slot, hosts)
        return written

    async def _sum_slot(self, slot: int, hosts: list[str]) -> int:
        if slot % META_EVERY == 0:
            self.meta.clear()  # a host's GPUs or totals changed now and then: read afresh
        async with self.reader.pipeline(transaction=False) as pipe:
            for host in hosts:
                key, offset = gauge_chunk(self.keys, self.fine.step, host, slot)
                pipe.getrange(key, offset, offset + RECORD.size - 1)
            raw = dict(zip(hosts, [b or b"" for b in await pipe.execute()]))
        await self._read_meta([h for h, r in raw.items() if len(r) == RECORD.size and r[0]], raw)
        summed = sum_records(raw, self.meta)
        if not summed:
            return 0
        key = self.keys.history(self.fine.step, GPUS_SERIES, slot)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(key, mapping=summed)
            pipe.expire(key, self.fine.keep)
            pipe.hset(self.keys.history_series(), GPUS_SERIES, slot * self.fine.step)
            await pipe.execute()
        return 1

    async def _read_meta(self, hosts: list[str], raw: Mapping[str, bytes]) -> None:
        """A host's model numbers, GPU count and totals, read again where a record names a model
        number not known yet (a model new on that host) or the host is new to this router."""
        stale = [h for h in hosts if h not in self.meta or not set(vram_by_model(engines_of(
            RECORD.unpack(raw[h][:RECORD.size])))) <= set(self.meta[h].models)]
        if not stale:
            return
        async with self.reader.pipeline(transaction=False) as pipe:
            for host in stale:
                pipe.hgetall(self.keys.history_gauges(host))
            metas = await pipe.execute()
        self.meta.update((host, HostMeta.of(meta)) for host, meta in zip(stale, metas))
