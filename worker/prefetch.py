"""Read a model's weight files into the page cache while it waits for its turn on this host.

A swap is mostly reading weights: a 1 GiB file reads in about 1 s from disk and 0.15 s from the
page cache here, and over a network file system the gap is larger. A model that waits in line
for this host (routers write ``llm:waiting`` entries naming the host a swap will start it on,
``WaitEntry.worker``, and copy them to that host's ``llm:hint:{wid}``, which its prefetcher reads: behind another model's residency or drain, or an operator's start waiting
the same way) loads nothing until its victims are gone; the worker reads its files meanwhile,
so that the engine's own read hits memory.

Bounds: one model at a time (so one per disk), the one waiting longest; at most
``prefetch_budget_mb`` (0 = no cap), never leaving less than ``prefetch_reserve_mb`` of
``MemAvailable`` (checked before each chunk: the page cache is reclaimable, but a prefetch
must not push the engines' own memory into reclaim); ``prefetch_rate_mb`` MiB/s (0 = as fast as
the disk gives). The read is cancelled as soon as the line changes (the model is served, gives
up, or is to start elsewhere), and its progress is published on the model's instance
(``prefetch_done`` of ``prefetch_total`` bytes), which ``/api/models/{alias}/info`` shows.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import msgspec
import psutil
from llm_lab_router.backoff import REDIS_ERRORS
from llm_lab_router.clock import CLOCK
from llm_lab_router.config import ModelConfig, WorkerSettings
from llm_lab_router.estimate import model_weights
from llm_lab_router.protocol import USAGE_STALE, Keys, WaitEntry, from_json
from redis.asyncio import Redis

log = logging.getLogger("llm_router.worker")

MIB = 1 << 20
CHUNK = 4 * MIB  # bytes per read: a cancellation or a memory check waits at most one chunk
POLL = 1.0  # s between reads of llm:hint:{wid}
PROGRESS_EVERY = 0.5  # s between progress publications (each is an instance change)
WEIGHT_SUFFIXES = (".gguf", ".safetensors", ".bin", ".pt", ".pth", ".ggml")


def weight_files(path: str) -> list[Path]:
    """The files a model reads at load: ``path`` itself, or a folder's weight files."""
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        return sorted(f for f in p.iterdir() if f.is_file() and f.suffix in WEIGHT_SUFFIXES)
    return []


def allowance(total: int, budget: int, available: int, reserve: int) -> int:
    """Bytes a prefetch may read: all of ``total``, capped by the ``budget`` (0 = none) and by
    what leaves ``reserve`` of ``available`` memory."""
    cap = max(0, available - reserve)
    return min(total, cap, budget) if budget else min(total, cap)


def mem_available() -> int:
    """``MemAvailable`` in bytes (psutil reads /proc/meminfo)."""
    return int(psutil.virtual_memory().available)


def _read_chunk(path: Path, offset: int, buffer: memoryview) -> int:
    """Read one chunk. No kernel readahead (``POSIX_FADV_RANDOM``): sequential reads would
    pull as much again into the page cache, beyond the budget and after a cancellation."""
    with open(path, "rb", buffering=0) as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_RANDOM)
        f.seek(offset)
        return f.readinto(buffer) or 0


async def read_into_cache(files: Iterable[Path], limit: int, rate: float, reserve: int,
                          progress: Callable[[int], None] = lambda done: None,
                          available: Callable[[], int] = mem_available) -> int:
    """Read ``files`` in order, at most ``limit`` bytes, ``rate`` bytes/s (0 = unlimited),
    stopping when ``available()`` memory would fall below ``reserve``; returns the bytes read.
    ``progress(done)`` is called after each chunk. Cancellable between chunks."""
    buffer = bytearray(CHUNK)
    done, began = 0, time.monotonic()
    for path in files:
        offset = 0
        while done < limit:
            if available() - CHUNK < reserve:
                log.info("prefetch stopped at %d MiB: MemAvailable is near the reserve", done // MIB)
                return done
            view = memoryview(buffer)[:min(CHUNK, limit - done)]
            got = await asyncio.to_thread(_read_chunk, path, offset, view)
            if got <= 0:
                break
            offset += got
            done += got
            progress(done)
            if rate > 0 and (ahead := done / rate - (time.monotonic() - began)) > 0:
                await asyncio.sleep(ahead)
    return done


def next_target(entries: Iterable[WaitEntry], wid: str, models: Mapping[str, ModelConfig],
                idle: Callable[[str], bool], now: float) -> str | None:
    """The model to prefetch: among fresh waiting entries that name this host, for a model of
    this host that is not loaded (``idle``), the one waiting longest."""
    fresh = [e for e in entries if e.worker == wid and now - e.at <= USAGE_STALE and e.model in models
             and idle(e.model)]
    return min(fresh, key=lambda e: (e.since, e.model)).model if fresh else None


@dataclass(eq=False)
class Prefetcher:
    """Follows this host's copy of the waiting line (``llm:hint:{wid}``) and prefetches the model next in line for this host.

    ``settings``: the ``[worker]`` table (a reload applies it at the next worker start);
    ``models()``: this worker's model configs now (a reload changes them); ``idle(model)``:
    whether it is stopped (or failed) here; ``report(model, done, total)``: publish progress."""

    redis: Redis
    keys: Keys
    wid: str
    config_dir: str
    settings: WorkerSettings
    models: Callable[[], Mapping[str, ModelConfig]]
    idle: Callable[[str], bool]
    report: Callable[[str, int, int], None]
    target: str | None = None  # the model being prefetched (or done, while it still waits)
    _task: asyncio.Task | None = None

    async def run(self) -> None:
        try:
            while True:
                await self.step()
                await asyncio.sleep(POLL)
        finally:
            await self.cancel()

    async def step(self) -> None:
        """One look at the line: start, keep or cancel the prefetch."""
        if not self.settings.prefetch:
            return await self.cancel()
        try:
            rows = await self.redis.hgetall(self.keys.hint(self.wid))  # the line's entries naming this host
        except REDIS_ERRORS as exc:
            log.debug("prefetch: cannot read the waiting line: %s", exc)
            return  # keep what runs: the line is unknown, not changed
        entries = []
        for value in rows.values():
            try:
                entries.append(from_json(value, WaitEntry))
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue
        target = next_target(entries, self.wid, self.models(), self.idle, CLOCK.now())  # `at` is on Redis's clock
        if target == self.target and (target is None or self._task is not None):
            return
        await self.cancel()
        if target is not None:
            self.target = target
            self._task = asyncio.create_task(self._prefetch(target), name=f"prefetch {target}")

    async def cancel(self) -> None:
        """Stop the prefetch in progress (the plan changed) and clear its progress (also of
        one that finished: the model now starts, or no longer waits here)."""
        task, model = self._task, self.target
        self._task, self.target = None, None
        if task is None:
            return
        if not task.done():
            task.cancel()
            log.info("prefetch of %s cancelled: it no longer waits for this host", model)
        await asyncio.gather(task, return_exceptions=True)
        if model is not None and model in self.models():
            self.report(model, 0, 0)

    async def _prefetch(self, model_id: str) -> None:
        model = self.models()[model_id]
        path, _ = model_weights(model, model.device_profiles()[0], self.config_dir)
        files = weight_files(path) if path else []
        total = sum(f.stat().st_size for f in files)
        s = self.settings
        limit = allowance(total, s.prefetch_budget_mb * MIB, mem_available(), s.prefetch_reserve_mb * MIB)
        if not limit:
            return
        log.info("prefetching %s: %d of %d MiB of %s", model_id, limit // MIB, total // MIB, path)
        last = [0.0]

        def progress(done: int) -> None:
            now = time.monotonic()
            if now - last[0] >= PROGRESS_EVERY or done >= limit:
                last[0] = now
                self.report(model_id, done, limit)
        self.report(model_id, 0, limit)
        try:
            done = await read_into_cache(files, limit, s.prefetch_rate_mb * MIB, s.prefetch_reserve_mb * MIB, progress)
        except OSError as exc:
            log.warning("prefetch of %s failed: %s", model_id, exc)
            return
        self.report(model_id, done, limit)
        log.info("prefetched %s: %d MiB", model_id, done // MIB)
