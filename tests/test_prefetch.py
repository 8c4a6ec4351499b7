"""Prefetch (worker/prefetch.py, issue 29 item 3): a model waiting for its turn on a host has its
weight files read into the page cache, within a budget, rate-limited, cancelled when the line
changes. Page-cache residency is read with ``mincore`` on a mapping of the file (ctypes on libc)
and emptied with ``posix_fadvise(DONTNEED)``, as ``vmtouch`` does; the files are real, on disk."""

from __future__ import annotations

import asyncio
import ctypes
import mmap
import os
import time
from pathlib import Path

import pytest
from conftest import wait_for
from fake_nvml import fake_gpu_env
from helpers import request, start_router, start_worker, write_config
from llm_lab_router.worker.prefetch import (
    CHUNK,
    allowance,
    read_into_cache,
    weight_files,
)
from test_placement import gpu_model, instances, running_on, uid, wait_devices
from test_scheduling import ask, pending

MIB = 1 << 20
PAGE = os.sysconf("SC_PAGE_SIZE")
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def resident(path: Path) -> int:
    """Bytes of ``path`` in the page cache now (``mincore`` of a read-only shared mapping)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, f.fileno(), 0)
    assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
    try:
        pages = -(-size // PAGE)
        vec = ctypes.create_string_buffer(pages)
        assert libc.mincore(addr, size, vec) == 0, os.strerror(ctypes.get_errno())
        return sum(b & 1 for b in vec.raw) * PAGE
    finally:
        libc.munmap(addr, size)


def evict(path: Path) -> None:
    """Drop ``path`` from the page cache (its pages are written back first: dirty pages stay)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def weights(path: Path, mib: int) -> Path:
    """A weight file of ``mib`` MiB on disk, out of the page cache."""
    with open(path, "wb") as f:
        f.writelines(os.urandom(MIB) for _ in range(mib))
    evict(path)
    assert resident(path) < path.stat().st_size // 4, "the file system keeps the file cached"
    return path


def test_the_allowance_is_the_budget_and_what_leaves_the_reserve():
    assert allowance(100, 0, 1000, 200) == 100  # no budget, plenty of memory: all of it
    assert allowance(100, 40, 1000, 200) == 40  # the budget
    assert allowance(100, 0, 250, 200) == 50  # MemAvailable - reserve
    assert allowance(100, 0, 150, 200) == 0  # below the reserve already: nothing


def test_a_prefetch_reads_into_the_page_cache_within_its_limit_and_rate(tmp_path):
    file = weights(tmp_path / "model.gguf", 24)
    assert weight_files(str(file)) == [file] and weight_files(str(tmp_path)) == [file]
    seen: list[int] = []
    began = time.monotonic()
    done = asyncio.run(read_into_cache([file], 8 * MIB, rate=16 * MIB, reserve=0, progress=seen.append))
    took = time.monotonic() - began
    assert done == 8 * MIB and seen[-1] == 8 * MIB and seen == sorted(seen)
    assert took >= 0.45  # 8 MiB at 16 MiB/s
    cached = resident(file)
    assert 8 * MIB <= cached <= 8 * MIB + MIB  # what was read, not the rest (no readahead)
    assert asyncio.run(read_into_cache([file], 24 * MIB, rate=0, reserve=0)) == 24 * MIB
    assert resident(file) == 24 * MIB


def test_a_prefetch_stops_at_the_memory_reserve(tmp_path):
    file = weights(tmp_path / "model.gguf", 16)
    free = [10 * MIB]  # the page cache it fills counts against MemAvailable here

    def available() -> int:
        return free[0]
    done = asyncio.run(read_into_cache([file], 16 * MIB, 0, reserve=2 * MIB,
                                       progress=lambda n: free.__setitem__(0, 10 * MIB - n), available=available))
    assert done == 2 * CHUNK  # a third chunk would leave less than the reserve
    assert resident(file) < 12 * MIB


def test_a_cancelled_prefetch_reads_no_further(tmp_path):
    file = weights(tmp_path / "model.gguf", 32)

    async def main() -> int:
        got: list[int] = []
        task = asyncio.create_task(read_into_cache([file], 32 * MIB, rate=8 * MIB, reserve=0, progress=got.append))
        while not got or got[-1] < 8 * MIB:
            await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return got[-1]
    done = asyncio.run(main())
    time.sleep(0.3)  # nothing is reading any more: residency must not grow (a wait for an absence)
    assert done < 32 * MIB and resident(file) <= done + MIB


def prefetch_stack(procs, redis_url, tmp_path, mib: int, **worker) -> tuple:
    """One stand-in GPU of 20000 MiB: ``a`` loaded (min_residency 600 s); ``b`` (weights of
    ``mib`` MiB on disk, out of the page cache) waits behind it for a chat in a thread."""
    wid, a, b = uid("w"), uid("a"), uid("b")
    file = weights(tmp_path / "b.gguf", mib)
    config = write_config(tmp_path / "w.toml", gpu_model(a, 12000, min_residency=600),
                          gpu_model(b, 12000, model_path=str(file)), **worker)
    start_worker(procs, redis_url, config, wid, env=fake_gpu_env(20000))
    router = start_router(procs, redis_url)
    wait_devices(router, wid)
    assert request("POST", f"{router.url}/api/models/{a}/start", timeout=30).status == 200
    results: dict = {}
    thread = ask(results, "b", router, b)
    wait_for(lambda: (pending(router, b) or {}).get("blocked"), timeout=15, message="b waiting for a swap")
    return wid, a, b, file, router, thread, results


def prefetching(router, model: str, wid: str) -> dict | None:
    return instances(router, model)[wid].get("prefetching")


def test_a_model_waiting_in_line_is_prefetched_then_shown_done(procs, redis_url, tmp_path):
    wid, a, b, file, router, thread, results = prefetch_stack(procs, redis_url, tmp_path, 24, prefetch_reserve_mb=0)
    wait_for(lambda: (prefetching(router, b, wid) or {}).get("done") == 24 * MIB, timeout=15,
             message="b prefetched")
    assert prefetching(router, b, wid) == {"done": 24 * MIB, "total": 24 * MIB}
    assert resident(file) == 24 * MIB
    reason = pending(router, b)  # the wait reason says it too
    assert reason["prefetching"] == {wid: {"done": 24 * MIB, "total": 24 * MIB}}
    assert reason["message"].endswith(f"; prefetched its weights on '{wid}' (24 of 24 MiB)")
    assert request("POST", f"{router.url}/api/models/{a}/stop", timeout=30).status == 200  # b's turn
    thread.join(60)
    assert results["b"].status == 200 and running_on(router, b) == [wid]
    wait_for(lambda: prefetching(router, b, wid) is None, timeout=10, message="the progress cleared once b runs")


def test_a_prefetch_is_cancelled_when_the_line_changes_and_keeps_its_budget(procs, redis_url, tmp_path):
    wid, a, b, file, router, thread, results = prefetch_stack(procs, redis_url, tmp_path, 32, prefetch_reserve_mb=0,
                                                              prefetch_rate_mb=4.0, prefetch_budget_mb=20)
    wait_for(lambda: (prefetching(router, b, wid) or {}).get("done", 0) > 0, timeout=15, message="b prefetching")
    assert prefetching(router, b, wid)["total"] == 20 * MIB  # the budget, not the whole file
    assert request("POST", f"{router.url}/api/models/{a}/stop", timeout=30).status == 200  # b starts: cancelled
    thread.join(60)
    assert results["b"].status == 200
    wait_for(lambda: prefetching(router, b, wid) is None, timeout=10, message="the prefetch cancelled")
    cached = resident(file)
    time.sleep(1.0)  # at 4 MiB/s a prefetch still going would add 4 MiB (waiting for an absence)
    assert resident(file) <= cached + 1 * MIB and cached < 20 * MIB
