"""What a worker learns from its models' starts: how long a cold start takes, how much VRAM.

Declared VRAM is often wrong (a longer context, another quantisation, a KV cache sized at load
time): placement that trusts it overcommits a GPU and the next start dies of OOM. So for each
start the worker measures, per (model, device profile) on its own host, the time from spawn to
healthy and the VRAM the engine holds once healthy (engines such as vLLM and llama.cpp allocate
weights and KV cache while loading, so that is their peak in practice):

- NVML's per-process accounting (``nvmlDeviceGetComputeRunningProcesses``) of the engine's
  process tree, where the driver gives it;
- else the growth of the GPU's used memory between before the spawn and healthy (a start of
  another model on the same GPU at the same moment can inflate it: it errs on the safe side).

The last ``KEEP`` measurements go to ``llm:learned:{wid}:{model}`` (newest first, with a TTL) and
are read back when the worker starts. The newest VRAM per profile is published in the catalog
(``CatalogEntry.measured_vram_mb``, with ``cold_start_s``), and both the worker's placement and
the routers' use ``max(declared, measured)`` (``llm_router.vram.effective_profiles``). A
measurement above the declaration is logged in the model's log stream, naming the model.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable, Mapping, Sequence

import msgspec
import psutil
from redis.asyncio import Redis

from llm_router.backoff import REDIS_ERRORS
from llm_router.config import ModelConfig
from llm_router.protocol import CatalogEntry, DeviceSnapshot, Keys, Learned, from_json, to_json
from worker.devices import DeviceProbe
from worker.logpipe import LogPipe
from worker.placement import Placement

log = logging.getLogger("llm_router.worker")

KEEP = 10  # measurements kept per model and host
LEARNED_TTL = 30 * 24 * 3600  # s: a model not started for a month is measured afresh


def measured_vram(gpus: Sequence[int], before: Mapping[int, int], after: Mapping[int, int],
                  per_process: Mapping[int, int] | None) -> tuple[int, str]:
    """Peak MiB per GPU of an engine on ``gpus`` and how it was measured: ``process`` (NVML
    per process, when it shows the engine), else ``delta`` (used memory after - before); (0, "")
    without GPUs."""
    if not gpus:
        return 0, ""
    if per_process:
        return max(per_process.get(g, 0) for g in gpus), "process"
    if all(g in before and g in after for g in gpus):
        return max(0, max(after[g] - before[g] for g in gpus)), "delta"
    return 0, ""


def used_mb(snapshot: DeviceSnapshot | None) -> dict[int, int]:
    if snapshot is None or not snapshot.cuda.online:
        return {}
    return {g.index: g.memory_used for g in snapshot.cuda.gpus}


def process_tree(pid: int) -> set[int]:
    try:
        return {pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))}
    except psutil.Error:
        return {pid}


class Learner:
    """This worker's measurements, in memory (for placement and the catalog) and in Redis."""

    def __init__(self, redis: Redis, keys: Keys, wid: str, probe: DeviceProbe, logs: LogPipe,
                 snapshot: Callable[[], Awaitable[DeviceSnapshot | None]], on_learned: Callable[[], None]) -> None:
        self.redis = redis
        self.keys = keys
        self.wid = wid
        self.probe = probe
        self.logs = logs
        self.snapshot = snapshot
        self.on_learned = on_learned  # the catalog must be published again
        self._vram: dict[str, dict[int, int]] = {}  # model -> profile index -> MiB (newest)
        self._cold: dict[str, float] = {}  # model -> s (newest)

    def measured(self, model_id: str) -> list[int]:
        """Newest measured MiB per device profile (0 = never measured)."""
        got = self._vram.get(model_id, {})
        return [got.get(i, 0) for i in range(max(got, default=-1) + 1)]

    def annotate(self, entry: CatalogEntry) -> CatalogEntry:
        """``entry`` with what was learned about it on this host."""
        return msgspec.structs.replace(entry, measured_vram_mb=self.measured(entry.id),
                                       cold_start_s=round(self._cold.get(entry.id, 0.0), 3))

    def _remember(self, model_id: str, item: Learned, newest: bool) -> None:
        vram = self._vram.setdefault(model_id, {})
        if item.vram_mb and (newest or item.profile not in vram):
            vram[item.profile] = item.vram_mb
        if item.cold_start_s and (newest or model_id not in self._cold):
            self._cold[model_id] = item.cold_start_s

    async def load(self, model_ids: Sequence[str]) -> None:
        """Read back what earlier runs of this worker measured (newest first in each list)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for m in model_ids:
                pipe.lrange(self.keys.learned(self.wid, m), 0, KEEP - 1)
            rows = await pipe.execute()
        for m, items in zip(model_ids, rows):
            for raw in items:
                try:
                    self._remember(m, from_json(raw, Learned), newest=False)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    continue

    async def before_start(self, placement: Placement) -> dict[int, int]:
        """The used memory of the GPUs before an engine is spawned (for ``delta``)."""
        return used_mb(await self.snapshot()) if placement.gpus else {}

    async def started(self, model: ModelConfig, placement: Placement, pid: int, seconds: float,
                      before: Mapping[int, int]) -> int:
        """Record one start that became healthy after ``seconds``; returns the measured MiB
        per GPU (0 = not measured)."""
        after = await self.snapshot() if placement.gpus else None
        vram, how = 0, ""
        if placement.gpus:
            per_process = await asyncio.to_thread(self.probe.process_memory, process_tree(pid))
            vram, how = measured_vram(placement.gpus, before, used_mb(after), per_process)
        names = {g.index: g.name for g in after.cuda.gpus} if after is not None else {}
        device = names.get(placement.gpus[0], "") if placement.gpus else "cpu"
        item = Learned(profile=placement.index, gpus=",".join(map(str, placement.gpus)), device=device,
                       cold_start_s=round(seconds, 3), vram_mb=vram, how=how, at=time.time())
        self._remember(model.id, item, newest=True)
        profiles = model.device_profiles()
        declared = profiles[placement.index].vram_mb if placement.index < len(profiles) else 0
        if vram > declared and placement.gpus:
            text = (f"model '{model.id}' uses {vram} MiB of VRAM per GPU (measured: {how}), more than the "
                    f"{declared} MiB it declares for profile {placement.index + 1}; placement uses the measurement")
            log.warning("%s", text)
            self.logs.write(model.id, "event", text)
        key = self.keys.learned(self.wid, model.id)
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.lpush(key, to_json(item))
                pipe.ltrim(key, 0, KEEP - 1)
                pipe.expire(key, LEARNED_TTL)
                await pipe.execute()
        except REDIS_ERRORS as exc:
            log.warning("could not store the measured start of %s: %s", model.id, exc)
        self.on_learned()
        return vram
