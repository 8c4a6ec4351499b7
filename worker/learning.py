"""What a worker learns from its models' starts: how long a cold start takes, how much VRAM.

Declared VRAM is often wrong (a longer context, another quantisation, a KV cache sized at load
time): placement that trusts it overcommits a GPU and the next start dies of OOM. So for each
start the worker measures, per (model, device profile) on its own host, the time from spawn to
healthy and the VRAM the engine holds once healthy:

- NVML's per-process accounting (``nvmlDeviceGetComputeRunningProcesses``) of the engine's
  process tree, where the driver gives it;
- else the growth of the GPU's used memory between before the spawn and healthy (a start of
  another model on the same GPU at the same moment can inflate it: it errs on the safe side).

Engines also grow after they are healthy (vLLM's CUDA graphs, llama.cpp's KV cache under
``--parallel``, PyTorch's caching allocator), so the worker keeps a running peak per running
instance (``Learner.sample``), sampled on its device loop (``devices_interval``): no NVML call while
no engine runs on a GPU, else one per-process call per GPU in use. The per-process figure is
used where the driver shows the engine; the delta of used memory only while the instance is the
only one of this worker on its GPUs now *and* was at its spawn (its ``before`` reading then holds
no other model of ours; a model started or stopped next to it would be counted or subtracted).
A peak that exceeds what its record says by more than ``GROWTH_RATIO`` *and* ``GROWTH_MIN_MB``
(``grew``: noise of the caching allocator and NVML's rounding are below that; a real KV cache or
CUDA graph is far above) updates the instance's record in Redis and the catalog, raises what the
worker and the routers hold for the instance (``Instance.vram_mb``), and, when it exceeds the
declaration, writes one warning naming the model into its log stream (once per recorded peak,
never per sample).

The last ``KEEP`` measurements go to ``llm:w:{wid}:learned:{model}`` (newest first, with a TTL) and
are read back when the worker starts. The catalog (``CatalogEntry``) publishes, per device
profile, the newest VRAM (``measured_vram_mb``: the last instance's peak, so a config change that
shrinks a model counts from its next start), and the typical cold start of the newest start's
profile (``cold_start_s``, ``typical_cold_start``: the upper quartile of the kept starts). Both
the worker's placement and the routers' use ``max(declared, measured)``
(``llm_router.vram.effective_profiles``); routers give a starting model an ETA from the cold
start (``router.control.explain``). A measurement above the declaration is logged in the model's log
stream, naming the model.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass
from typing import Awaitable, Callable, Iterable, Mapping, Sequence

import msgspec
import psutil
from llm_lab_router.backoff import REDIS_ERRORS
from llm_lab_router.clock import CLOCK
from llm_lab_router.config import ModelConfig
from llm_lab_router.protocol import CatalogEntry, DeviceSnapshot, Keys, Learned, from_json, to_json
from llm_lab_router.worker.devices import DeviceProbe
from llm_lab_router.worker.logpipe import LogPipe
from llm_lab_router.worker.placement import Placement
from redis.asyncio import Redis
from redis.exceptions import ResponseError

log = logging.getLogger("llm_router.worker")

KEEP = 10  # measurements kept per model and host
LEARNED_TTL = 30 * 24 * 3600  # s: a model not started for a month is measured afresh
GROWTH_RATIO = 0.05  # a running peak is recorded when it exceeds the record by more than 5 % ...
GROWTH_MIN_MB = 256  # ... and by more than 256 MiB
COLD_START_QUANTILE = 0.75  # see typical_cold_start


def measured_vram(gpus: Sequence[int], before: Mapping[int, int], after: Mapping[int, int],
                  per_process: Mapping[int, int] | None) -> tuple[int, str]:
    """Peak MiB per GPU of an engine on ``gpus`` and how it was measured: ``process`` (NVML
    per process, when it shows the engine), else ``delta`` (used memory after - before); (0, "")
    without GPUs or without a reading to trust."""
    if not gpus:
        return 0, ""
    if per_process:
        return max(per_process.get(g, 0) for g in gpus), "process"
    if all(g in before and g in after for g in gpus):
        return max(0, max(after[g] - before[g] for g in gpus)), "delta"
    return 0, ""


def tree_memory(table: Mapping[int, Mapping[int, int]] | None, pids: set[int]) -> dict[int, int] | None:
    """MiB that the processes ``pids`` use on each GPU of ``table`` (``compute_processes``),
    only GPUs where one of them shows; None where the driver gave no table."""
    if table is None:
        return None
    return {g: sum(mb for pid, mb in procs.items() if pid in pids)
            for g, procs in table.items() if pids.intersection(procs)}


def grew(peak: int, recorded: int) -> bool:
    """Whether a running peak is news: more than ``GROWTH_RATIO`` and ``GROWTH_MIN_MB`` above
    what is recorded (below that: the caching allocator's noise, NVML's rounding)."""
    return peak - recorded > max(GROWTH_MIN_MB, recorded * GROWTH_RATIO)


def typical_cold_start(seconds: Iterable[float]) -> float:
    """The cold start to expect: the upper quartile (nearest rank) of past starts; 0 without any.

    Upper quartile, not the last start nor the median: the figure becomes ``Retry-After``, and a
    client retries only a few times (the OpenAI SDK twice), so it errs long (three starts in four
    were at least that fast); not the maximum or a p90 either, which over ten starts is the
    single slowest one, so a lone outlier (the first load from a cold page cache, a start that
    raced another for the disk) would set every ETA until it ages out. With fewer than four
    starts it is the slowest of them."""
    ordered = sorted(s for s in seconds if s > 0)
    if not ordered:
        return 0.0
    return ordered[max(0, math.ceil(COLD_START_QUANTILE * len(ordered)) - 1)]


def used_mb(snapshot: DeviceSnapshot | None) -> dict[int, int]:
    if snapshot is None or not snapshot.cuda.online:
        return {}
    return {g.index: g.memory_used for g in snapshot.cuda.gpus}


def process_tree(pid: int) -> set[int]:
    try:
        return {pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))}
    except psutil.Error:
        return {pid}


@dataclass(frozen=True)
class RunningEngine:
    """A model's engine that is running now (``ModelProcess.engine``)."""

    model: ModelConfig
    pid: int
    placement: Placement


@dataclass
class _Peak:
    """The running peak of one engine: ``record`` is its item in the history (None: none yet,
    e.g. adopted after its record expired), ``recorded`` the MiB it says."""

    pid: int
    before: dict[int, int]  # used MiB per GPU before its spawn; {} = the delta is never trusted
    record: Learned | None
    recorded: int
    peak: int = 0


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
        self._starts: dict[str, list[tuple[int, float]]] = {}  # model -> (profile, s) of kept starts, newest first
        self._newest: dict[str, Learned] = {}  # model -> the head of its history
        self._peaks: dict[str, _Peak] = {}  # model -> the running peak of its engine
        self._now: dict[str, tuple[int, int]] = {}  # model -> (pid, MiB per GPU) at the last sample
        self._loaded = False  # the history is read back: an adopted engine's record is known

    def measured(self, model_id: str) -> list[int]:
        """Newest measured MiB per device profile (0 = never measured)."""
        got = self._vram.get(model_id, {})
        return [got.get(i, 0) for i in range(max(got, default=-1) + 1)]

    def cold_start(self, model_id: str) -> float:
        """The typical cold start (s) of the profile ``model_id`` last started with; 0 = unknown."""
        starts = self._starts.get(model_id, [])
        if not starts:
            return 0.0
        return typical_cold_start(s for p, s in starts if p == starts[0][0])

    def annotate(self, entry: CatalogEntry) -> CatalogEntry:
        """``entry`` with what was learned about it on this host."""
        return msgspec.structs.replace(entry, measured_vram_mb=self.measured(entry.id),
                                       cold_start_s=round(self.cold_start(entry.id), 3))

    def _remember(self, model_id: str, item: Learned, newest: bool) -> None:
        vram = self._vram.setdefault(model_id, {})
        if item.vram_mb and (newest or item.profile not in vram):
            vram[item.profile] = item.vram_mb
        if newest or model_id not in self._newest:
            self._newest[model_id] = item
        if item.cold_start_s:
            starts = self._starts.setdefault(model_id, [])
            starts.insert(0 if newest else len(starts), (item.profile, item.cold_start_s))
            del starts[KEEP:]

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
        self._loaded = True

    async def before_start(self, placement: Placement) -> dict[int, int]:
        """The used memory of the GPUs before an engine is spawned (for ``delta``)."""
        return used_mb(await self.snapshot()) if placement.gpus else {}

    async def started(self, model: ModelConfig, placement: Placement, pid: int, seconds: float,
                      before: Mapping[int, int], alone: bool = False) -> int:
        """Record one start that became healthy after ``seconds``; returns the measured MiB
        per GPU (0 = not measured). ``alone``: no other model of this worker was placed on its
        GPUs when it was spawned, so ``before`` is a baseline for its running peak."""
        after = await self.snapshot() if placement.gpus else None
        vram, how = 0, ""
        if placement.gpus:
            table = await asyncio.to_thread(self.probe.compute_processes, placement.gpus)
            vram, how = measured_vram(placement.gpus, before, used_mb(after), tree_memory(table, process_tree(pid)))
        names = {g.index: g.name for g in after.cuda.gpus} if after is not None else {}
        device = names.get(placement.gpus[0], "") if placement.gpus else "cpu"
        item = Learned(profile=placement.index, gpus=",".join(map(str, placement.gpus)), device=device,
                       cold_start_s=round(seconds, 3), vram_mb=vram, how=how, at=CLOCK.now())
        self._remember(model.id, item, newest=True)
        self._warn_if_over(model, placement, vram, how)
        await self._store(model.id, item, replace_newest=False)
        self.on_learned()
        if placement.gpus:  # after the last await: the next sample finds it running under this pid
            self._peaks[model.id] = _Peak(pid=pid, before=dict(before) if alone else {}, record=item,
                                          recorded=vram, peak=vram)
        return vram

    async def sample(self, snapshot: DeviceSnapshot | None, running: Sequence[RunningEngine],
                     shares_gpus: Callable[[str], bool]) -> dict[str, int]:
        """One sample of the running peak of each engine in ``running`` (called on the device
        loop with its ``snapshot``); ``shares_gpus(model)``: another model of this worker is
        placed on one of its GPUs now. Returns the models whose peak was recorded, with it.
        Nothing is sampled before the history is read back (``load``): an engine adopted from
        the previous worker would be taken for one without a record, and its peak for news."""
        running = [r for r in running if r.placement.gpus and self._loaded]
        live = {r.model.id: r.pid for r in running}
        for m in [m for m, p in self._peaks.items() if live.get(m) != p.pid]:
            del self._peaks[m]  # stopped, or another engine now
        self._now = {m: now for m, now in self._now.items() if live.get(m) == now[0]}
        if not running:
            return {}  # nothing on a GPU: no NVML call
        gpus = sorted({g for r in running for g in r.placement.gpus})
        table = await asyncio.to_thread(self.probe.compute_processes, gpus)
        used = used_mb(snapshot)
        names = {g.index: g.name for g in snapshot.cuda.gpus} if snapshot is not None else {}
        recorded: dict[str, int] = {}
        for r in running:
            peak = self._peaks.get(r.model.id) or self._adopted(r)
            before = {} if shares_gpus(r.model.id) else peak.before
            vram, how = measured_vram(r.placement.gpus, before, used, tree_memory(table, process_tree(r.pid)))
            if how:
                self._now[r.model.id] = (r.pid, vram)
            peak.peak = max(peak.peak, vram)
            if how and grew(peak.peak, peak.recorded):
                await self._record_peak(r, peak, how, names.get(r.placement.gpus[0], ""))
                recorded[r.model.id] = peak.peak
        return recorded

    def using(self, model_id: str, pid: int) -> int:
        """MiB per GPU that ``model_id``'s engine ``pid`` used at the last sample (0: not measured)."""
        pid_now, mib = self._now.get(model_id, (0, 0))
        return mib if pid_now == pid else 0

    def _adopted(self, r: RunningEngine) -> _Peak:
        """The peak of an engine this worker did not start (adopted): no baseline; its record
        is the newest one if that is for the same profile and GPUs."""
        newest = self._newest.get(r.model.id)
        gpus = ",".join(map(str, r.placement.gpus))
        record = newest if newest is not None and (newest.profile, newest.gpus) == (r.placement.index, gpus) else None
        got = record.vram_mb if record is not None else 0
        peak = self._peaks[r.model.id] = _Peak(pid=r.pid, before={}, record=record, recorded=got, peak=got)
        return peak

    async def _record_peak(self, r: RunningEngine, peak: _Peak, how: str, device: str) -> None:
        """The engine of ``r`` grew: update its record (or add one), the catalog, and say so."""
        model = r.model
        head = peak.record is not None and self._newest.get(model.id) is peak.record
        if peak.record is not None:
            item = msgspec.structs.replace(peak.record, vram_mb=peak.peak, how=how)
        else:
            item = Learned(profile=r.placement.index, gpus=",".join(map(str, r.placement.gpus)), device=device,
                           vram_mb=peak.peak, how=how, at=CLOCK.now())
        peak.record, peak.recorded = item, peak.peak
        self._vram.setdefault(model.id, {})[item.profile] = peak.peak
        self._newest[model.id] = item
        self.logs.write(model.id, "event", f"model '{model.id}' grew to {peak.peak} MiB of VRAM per GPU while "
                        f"running (measured: {how})")
        self._warn_if_over(model, r.placement, peak.peak, how)
        await self._store(model.id, item, replace_newest=head)
        self.on_learned()

    def _warn_if_over(self, model: ModelConfig, placement: Placement, vram: int, how: str) -> None:
        profiles = model.device_profiles()
        declared = profiles[placement.index].vram_mb if placement.index < len(profiles) else 0
        if vram > declared and placement.gpus:
            text = (f"model '{model.id}' uses {vram} MiB of VRAM per GPU (measured: {how}), more than the "
                    f"{declared} MiB it declares for profile {placement.index + 1}; placement uses the measurement")
            log.warning("%s", text)
            self.logs.write(model.id, "event", text)

    async def _store(self, model_id: str, item: Learned, replace_newest: bool) -> None:
        """Push ``item`` onto the model's history, or overwrite its head (a running peak of the
        start recorded there; pushed after all if the list is gone: expired, Redis flushed)."""
        key = self.keys.learned(self.wid, model_id)
        try:
            if replace_newest:
                try:
                    async with self.redis.pipeline(transaction=True) as pipe:
                        pipe.lset(key, 0, to_json(item))
                        pipe.expire(key, LEARNED_TTL)
                        await pipe.execute()
                    return
                except ResponseError as exc:
                    if "no such key" not in str(exc).lower():
                        raise
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.lpush(key, to_json(item))
                pipe.ltrim(key, 0, KEEP - 1)
                pipe.expire(key, LEARNED_TTL)
                await pipe.execute()
        except (*REDIS_ERRORS, ResponseError) as exc:
            log.warning("could not store what was measured of %s: %s", model_id, exc)
