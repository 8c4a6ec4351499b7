"""Placement, eviction, idle and limit decisions as pure functions (no Redis, no processes)."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
from llm_lab_router.protocol import (
    USED_LAST,
    CatalogEntry,
    CpuInfo,
    CudaInfo,
    DeviceSnapshot,
    GpuInfo,
    Instance,
    ModelUsage,
    RouterUsage,
    to_json,
    usage_of,
)
from llm_lab_router.router.control.client import start_order
from llm_lab_router.router.control.host_rank import (
    Eviction,
    host_free,
    no_room_message,
    plan_eviction,
    profiles_of,
    rank_hosts,
)
from llm_lab_router.router.core.errors import ApiError
from llm_lab_router.router.limits.concurrency import Limits
from llm_lab_router.vram import Held, free_vram
from llm_lab_router.worker.idle import idle_models


def snap(wid: str, *free_mib: int, total: int = 24000) -> DeviceSnapshot:
    gpus = [GpuInfo(index=i, name="GPU", memory_total=total, memory_free=f, memory_used=total - f)
            for i, f in enumerate(free_mib)]
    return DeviceSnapshot(worker=wid, host=wid, ts=0.0, cuda=CudaInfo(online=True, gpus=gpus), cpu=CpuInfo())


def entry(model: str, *profiles: tuple[list[str], int]) -> CatalogEntry:
    return CatalogEntry(id=model, devices=[d for d, _ in profiles], vram_mb=[v for _, v in profiles])


def inst(model: str, wid: str, state: str = "running", gpus: str = "0", vram: int = 8000,
         started_at: float = 0.0) -> Instance:
    return Instance(model=model, worker=wid, state=state, url="http://x", gpus=gpus, vram_mb=vram,  # type: ignore[arg-type]
                    started_at=started_at)


# --- free VRAM: NVML minus promises -------------------------------------------------------


def test_free_vram_counts_loading_models_against_nvml_and_all_models_against_the_total():
    s = snap("a", 20000)
    assert free_vram(s, [Held((0,), 8000, loading=True)])[0] == {0: 12000}  # not visible in NVML yet
    # loaded and visible in NVML (free 12000 already excludes it): not subtracted twice
    assert free_vram(snap("a", 12000), [Held((0,), 8000, loading=False)])[0] == {0: 12000}
    # loaded but invisible (stand-in GPUs, MIG): its declared VRAM still counts
    assert free_vram(snap("a", 24000), [Held((0,), 8000, loading=False)])[0] == {0: 16000}


def test_host_free_reads_reservations_from_instances():
    instances = [inst("m1", "a", "starting"), inst("m2", "a", "stopped"), inst("m3", "a", "running", gpus="1")]
    assert host_free(snap("a", 24000, 24000), instances)[0] == {0: 16000, 1: 16000}


def test_a_model_stopped_since_the_snapshot_gives_its_vram_back_to_it():
    """The snapshot (taken at 100, the worker's clock) still shows a model that stopped at 150:
    its VRAM is free again, else a start right after a stop is refused for the room it made."""
    s = msgspec.structs.replace(snap("a", 4000, 24000), ts=100.0)
    stopped = Instance(model="m", worker="a", state="stopped", gpus="0", vram_mb=16000, started_at=50.0,
                       updated_at=150.0)
    assert host_free(s, [stopped])[0] == {0: 20000, 1: 24000}
    assert host_free(s, [msgspec.structs.replace(stopped, state="failed")])[0] == {0: 20000, 1: 24000}
    assert host_free(s, [msgspec.structs.replace(stopped, vram_mb=30000)])[0] == {0: 24000, 1: 24000}  # the total
    for not_in_it in (msgspec.structs.replace(stopped, updated_at=90.0),  # stopped before: NVML no longer had it
                      msgspec.structs.replace(stopped, started_at=120.0),  # started after: NVML never had it
                      msgspec.structs.replace(stopped, started_at=0.0)):  # never ran (failed while loading)
        assert host_free(s, [not_in_it])[0] == {0: 4000, 1: 24000}
    running = msgspec.structs.replace(stopped, state="stopping")  # still holds it
    assert host_free(s, [running])[0] == {0: 4000, 1: 24000}


# --- choosing a host ----------------------------------------------------------------------


def test_model_goes_to_the_host_where_it_fits_and_others_say_why():
    entries = {"a": entry("m", (["cuda"], 16000)), "b": entry("m", (["cuda"], 16000))}
    order, reasons = rank_hosts("m", entries, {"a": snap("a", 10000), "b": snap("b", 20000)}, [])
    assert order == ["b"]
    assert "no GPU has 16000 MiB free (the most is 10000 MiB)" in reasons["a"]


def test_earlier_profile_beats_a_less_busy_host():
    e = entry("m", (["cuda", "cuda"], 8000), (["cuda"], 8000), (["cpu"], 0))
    entries = {"a": e, "b": e}
    busy = [inst("x", "b", gpus="", vram=0)]
    order, _ = rank_hosts("m", entries, {"a": snap("a", 9000), "b": snap("b", 9000, 9000)}, busy)
    assert order == ["b", "a"]  # b fits two GPUs; a only one
    assert profiles_of(e)[2].devices == ["cpu"]


def test_where_it_already_starts_wins():
    entries = {"a": entry("m", (["cuda"], 8000)), "b": entry("m", (["cuda"], 8000))}
    order, _ = start_order("m", entries, {"a": snap("a", 0), "b": snap("b", 20000)}, [inst("m", "a", "starting")])
    assert order == ["a"]


def test_promises_published_by_other_routers_starts_are_not_free():
    entries = {"a": entry("m", (["cuda"], 8000)), "b": entry("m", (["cuda"], 8000))}
    snaps = {"a": snap("a", 10000), "b": snap("b", 10000)}
    order, _ = rank_hosts("m", entries, snaps, [inst("other", "a", "starting")])
    assert order == ["b"]


# --- eviction -----------------------------------------------------------------------------


def test_eviction_picks_the_least_recently_used_idle_model():
    entries = {"a": entry("big", (["cuda:0"], 16000))}
    instances = [inst("old", "a", started_at=1), inst("new", "a", started_at=2), inst("cpu", "a", gpus="", vram=0)]
    usage = {"old": ModelUsage(last_used=10), "new": ModelUsage(last_used=20)}
    assert plan_eviction("big", entries, {"a": snap("a", 24000)}, instances, usage) == Eviction("a", ["old"])
    usage["old"].inflight = 1  # never stopped with a request in flight: the next one goes
    assert plan_eviction("big", entries, {"a": snap("a", 24000)}, instances, usage) == Eviction("a", ["new"])
    usage["new"].inflight = 1
    assert plan_eviction("big", entries, {"a": snap("a", 24000)}, instances, usage) is None


def test_eviction_prefers_the_host_with_fewest_victims_and_frees_nvml_memory_of_loaded_models():
    e = entry("big", (["cuda:0"], 16000))
    instances = [inst("x", "a"), inst("y", "a"), inst("z", "b", vram=16000)]
    # NVML shows what the loaded models use (and 4000 MiB of something else on a): stopping
    # them gives it back
    snaps = {"a": snap("a", 4000), "b": snap("b", 8000)}
    assert plan_eviction("big", {"a": e, "b": e}, snaps, instances, {}) == Eviction("b", ["z"])
    assert plan_eviction("big", {"a": e}, snaps, instances, {}) == Eviction("a", ["x", "y"])


def test_no_room_message_names_each_host():
    assert no_room_message("m", {"b": "why b", "a": "why a"}).endswith("(a: why a; b: why b)")


# --- idle unload --------------------------------------------------------------------------


def test_idle_models():
    running = [(inst("unused", "w", started_at=0), 10.0), (inst("busy", "w", started_at=0), 10.0),
               (inst("recent", "w", started_at=0), 10.0), (inst("fresh", "w", started_at=95), 10.0),
               (inst("forever", "w", started_at=0), 0.0), (inst("unknown", "w", started_at=0), 10.0)]
    usage = {"unused": ModelUsage(last_used=50), "busy": ModelUsage(last_used=0, inflight=1),
             "recent": ModelUsage(last_used=95), "fresh": ModelUsage(), "forever": ModelUsage()}
    assert idle_models(100.0, running, usage) == ["unused"]


def test_usage_of_drops_stale_routers_in_flight_counts():
    fields = {USED_LAST: "5.0",
              "router:live": to_json(RouterUsage(inflight=2, last_used=90, at=99)),
              "router:dead": to_json(RouterUsage(inflight=7, last_used=20, at=50))}
    assert usage_of(fields, now=100) == ModelUsage(last_used=90, inflight=2)


# --- limits -------------------------------------------------------------------------------


def test_limits_queue_then_429():
    async def scenario():
        limits = Limits(queue_limit=1, queue_timeout=5)
        release = asyncio.Event()
        order: list[str] = []

        async def call(name: str) -> None:
            async with limits.admit("m", 1):
                order.append(name)
                await release.wait()

        first = asyncio.create_task(call("first"))
        await asyncio.sleep(0)
        second = asyncio.create_task(call("second"))
        await asyncio.sleep(0)
        assert limits.queued("m") == 1
        with pytest.raises(ApiError) as info:
            await call("third")
        assert info.value.status == 429 and info.value.headers == {"Retry-After": "1"}
        release.set()
        await asyncio.gather(first, second)
        assert order == ["first", "second"]
        assert limits.queued("m") == 0

        short = Limits(queue_limit=5, queue_timeout=0.05)
        held = asyncio.Event()
        async with short.admit("m", 1):
            with pytest.raises(ApiError, match="queue timeout"):
                async with short.admit("m", 1):
                    held.set()
        assert not held.is_set()
        async with short.admit("m", 1):  # the slot was given back
            pass

    asyncio.run(scenario())


def test_limits_cancelled_waiter_passes_its_slot_on():
    async def scenario():
        limits = Limits(queue_limit=5, queue_timeout=5)
        async with limits.admit("m", 1):
            gone = asyncio.create_task(limits.admit("m", 1).__aenter__())
            await asyncio.sleep(0)
            gone.cancel()
            await asyncio.gather(gone, return_exceptions=True)
        async with asyncio.timeout(1):
            async with limits.admit("m", 1):
                pass

    asyncio.run(scenario())
