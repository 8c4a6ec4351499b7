"""Learned cold starts and VRAM (worker/learning.py): an engine that uses more VRAM than it
declares is measured on its first start (stand-in NVML: per process, or the growth of the
GPU's used memory), the warning naming it is in its log stream, and the next start is placed by
the measurement. An engine that grows while it runs is sampled on the device loop: its peak
updates its record, the catalog and the next placement. Pure parts: ``measured_vram``,
``effective_profiles``, ``grew``, ``tree_memory``, ``typical_cold_start``."""

from __future__ import annotations

import signal

import pytest
from conftest import wait_for
from fake_nvml import FAKE_DIR_ENV, NO_PROCESSES_ENV, fake_gpu_env, set_claim
from helpers import get_json, model_block, request, start_router, start_worker, write_config
from llm_lab_router.config import DeviceProfile
from llm_lab_router.protocol import CatalogEntry, Instance, Keys, Learned, from_json, log_entry, to_json
from llm_lab_router.router.control.explain import retry_after, starting_reason
from llm_lab_router.router.control.host_rank import profiles_of
from llm_lab_router.vram import effective_profiles
from llm_lab_router.worker.learning import grew, measured_vram, tree_memory, typical_cold_start
from test_placement import instances, uid, wait_devices


def test_measured_vram_prefers_nvml_per_process_else_the_growth_of_used_memory():
    assert measured_vram([0], {0: 100}, {0: 9000}, {0: 7000}) == (7000, "process")
    assert measured_vram([0, 1], {0: 100, 1: 0}, {0: 5100, 1: 6000}, None) == (6000, "delta")
    assert measured_vram([0], {0: 500}, {0: 100}, {}) == (0, "delta")  # never negative
    assert measured_vram([], {}, {}, None) == (0, "")


def test_tree_memory_sums_the_engines_processes_per_gpu_where_they_show():
    table = {0: {10: 3000, 11: 500, 99: 8000}, 1: {99: 100}, 2: {}}
    assert tree_memory(table, {10, 11}) == {0: 3500}
    assert tree_memory(table, {42}) == {}  # the driver lists processes, not ours: no per-process figure
    assert tree_memory(None, {10}) is None


def test_a_running_peak_is_news_above_5_percent_and_256_mib():
    assert grew(7000, 3000)
    assert not grew(3256, 3000)  # 256 MiB: not more than the floor
    assert grew(3257, 3000)
    assert not grew(41000, 40000)  # 1000 MiB but 2.5 %: the allocator's noise on a big model
    assert grew(42001, 40000)
    assert grew(300, 0)  # nothing recorded yet


def test_the_typical_cold_start_is_the_upper_quartile_of_the_kept_starts():
    assert typical_cold_start([]) == 0.0
    assert typical_cold_start([12.0]) == 12.0
    assert typical_cold_start([10.0, 30.0, 20.0]) == 30.0  # few starts: the slowest
    assert typical_cold_start([10.0, 20.0, 30.0, 40.0]) == 30.0
    # ten starts, one outlier (a cold page cache): it does not set the figure; 0 = not measured
    starts = [31.0, 30.0, 33.0, 29.0, 300.0, 32.0, 30.5, 31.5, 29.5, 30.0, 0.0]
    assert typical_cold_start(starts) == 32.0
    # a starting model's ETA and Retry-After come from it (the catalog's cold_start_s)
    entry = CatalogEntry(id="m", cold_start_s=typical_cold_start(starts))
    inst = Instance(model="m", worker="w", state="starting", updated_at=1000.0)
    reason = starting_reason("m", [inst], {"w": entry}, now=1010.0)
    assert reason.eta == 1032.0 and retry_after(reason, 1010.0) == "22"


def test_effective_profiles_raise_declarations_to_measurements_only():
    declared = [DeviceProfile(devices=["cuda"], vram_mb=4000), DeviceProfile(devices=["cuda"], vram_mb=9000),
                DeviceProfile(devices=["cpu"])]
    got = effective_profiles(declared, [6000, 5000, 7000])
    assert [p.vram_mb for p in got] == [6000, 9000, 0]
    entry = CatalogEntry(id="m", devices=[["cuda"]], vram_mb=[4000], measured_vram_mb=[6000])
    assert profiles_of(entry)[0].vram_mb == 6000


def start_two_gpu_host(procs, redis_url, tmp_path, how: str, wid: str, model: str, other: str,
                       engine_args: list[str], other_args: tuple[str, ...] = (), **worker):
    """A worker with GPUs of 8000 and 16000 MiB (stand-in NVML, ``how``: per process or only
    the used memory) and a router. ``model`` declares 4000 MiB on GPU 0, else on GPU 1, and runs
    the mock engine with ``engine_args``; ``other`` declares 2000 MiB on GPU 0 (``other_args``:
    its engine's flags). Returns the router, the folder of the engines' memory claims, and
    ``restart``, which starts the worker again (after a SIGTERM it adopts the engines left running)."""
    claims = tmp_path / "nvml"
    claims.mkdir()
    block = model_block(model, engine_args=[*engine_args, "--fake-nvml-dir", str(claims)])
    block += '[[models.profiles]]\ndevices = ["cuda:0"]\nvram_mb = 4000\n'
    block += '[[models.profiles]]\ndevices = ["cuda:1"]\nvram_mb = 4000\n'
    other_engine = [*other_args, "--fake-nvml-dir", str(claims)] if other_args else []
    blocks = [block, model_block(other, devices=["cuda:0"], vram_mb=2000, engine_args=other_engine)]
    env = {**fake_gpu_env(8000, 16000), FAKE_DIR_ENV: str(claims)}
    if how == "delta":
        env[NO_PROCESSES_ENV] = "1"
    config = write_config(tmp_path / "w.toml", *blocks, **worker)

    def restart():
        return start_worker(procs, redis_url, config, wid, env=env)
    restart()
    router = start_router(procs, redis_url)
    wait_devices(router, wid)
    return router, claims, restart


def wait_samples(rds, wid: str, n: int) -> None:
    """Until the worker's device loop (which samples the running peaks) went round ``n`` times."""
    for _ in range(n):
        seen = rds.get(Keys().devices(wid))
        wait_for(lambda: rds.get(Keys().devices(wid)) != seen, timeout=10, message="the next device sample")


def assert_placed_by_the_measurement(router, wid: str, model: str, other: str) -> None:
    """``model`` (measured at 7000 MiB) is stopped, ``other`` takes 2000 MiB of GPU 0 at once
    (the router's device snapshot may still show ``model`` there: the room its stop made counts,
    ``test_a_start_right_after_a_stop_has_the_room_the_stop_made``): the 6000 MiB left there are
    enough for the 4000 MiB declared, not for the measurement, so ``model`` starts on GPU 1."""
    assert request("POST", f"{router.url}/api/models/{model}/stop", timeout=30).status == 200
    assert request("POST", f"{router.url}/api/models/{other}/start", timeout=30).status == 200
    assert request("POST", f"{router.url}/api/models/{model}/start", timeout=30).status == 200
    assert instances(router, model)[wid]["gpus"] == "1"
    assert instances(router, other)[wid]["gpus"] == "0"


@pytest.mark.parametrize("how", ["process", "delta"])
def test_a_model_using_more_vram_than_declared_is_placed_by_the_measurement(procs, redis_url, rds, tmp_path, how):
    wid, model, other = uid("w"), uid("m"), uid("o")
    # The engine really takes 7000 MiB once loaded.
    router, _, _ = start_two_gpu_host(procs, redis_url, tmp_path, how, wid, model, other,
                                   ["--startup-delay", "0.5", "--vram-mb", "7000"])

    assert request("POST", f"{router.url}/api/models/{model}/start", timeout=30).status == 200
    first = instances(router, model)[wid]
    assert first["gpus"] == "0"  # placed by the declaration
    learned = [from_json(raw, Learned) for raw in rds.lrange(Keys().learned(wid, model), 0, -1)]
    assert [(x.profile, x.vram_mb, x.how) for x in learned] == [(0, 7000, how)]
    assert learned[0].cold_start_s >= 0.5 and learned[0].device == "NVIDIA H100"
    warnings = [e.message for _, f in rds.xrange(Keys().logs(model)) if "more than the" in (e := log_entry(f)).message]
    assert warnings and f"model '{model}' uses 7000 MiB" in warnings[0]
    wait_for(lambda: from_json(rds.hget(Keys().catalog(wid), model), CatalogEntry).measured_vram_mb == [7000],
             timeout=10, message="the measurement in the catalog")

    assert_placed_by_the_measurement(router, wid, model, other)
    assert get_json(f"{router.url}/api/models/{model}/info")["success"]


def test_a_model_measured_above_its_declaration_starts_again_on_the_same_profile(procs, redis_url, rds, tmp_path):
    """Placed by the measurement (7000 MiB, declared 4000) on the profile it ran with: its spawn
    names that profile by index (the placed profile carries the measured VRAM, so it is no longer
    equal to the declared one; a lookup by value failed and the start died)."""
    wid, model, other = uid("w"), uid("m"), uid("o")
    router, _, _ = start_two_gpu_host(procs, redis_url, tmp_path, "process", wid, model, other, ["--vram-mb", "7000"])
    assert request("POST", f"{router.url}/api/models/{model}/start", timeout=30).status == 200
    wait_for(lambda: from_json(rds.hget(Keys().catalog(wid), model), CatalogEntry).measured_vram_mb == [7000],
             timeout=10, message="the measurement in the catalog")
    assert request("POST", f"{router.url}/api/models/{model}/stop", timeout=30).status == 200
    assert request("POST", f"{router.url}/api/models/{model}/start", timeout=30).status == 200
    again = instances(router, model)[wid]
    assert (again["state"], again["gpus"]) == ("running", "0")
    assert rds.hget(Keys().instance(model, wid), "vram_mb") == "7000"


@pytest.mark.parametrize("how", ["process", "delta"])
def test_an_engine_that_grows_while_running_is_placed_by_its_peak(procs, redis_url, rds, tmp_path, how):
    wid, model, other = uid("w"), uid("m"), uid("o")
    # earlier starts on this host, newest first: the catalog's cold start is their upper quartile
    key = Keys().learned(wid, model)
    rds.rpush(key, *[to_json(Learned(profile=0, cold_start_s=s)) for s in (20.0, 90.0, 30.0, 40.0, 10.0)])
    rds.rpush(key, to_json(Learned(profile=1, cold_start_s=500.0)))  # another profile: not counted
    # 3000 MiB once loaded, then it grows to 7000 while it runs
    router, claims, _ = start_two_gpu_host(procs, redis_url, tmp_path, how, wid, model, other, ["--vram-mb", "3000"],
                                        devices_interval=0.2)

    def catalog() -> CatalogEntry:
        return from_json(rds.hget(Keys().catalog(wid), model), CatalogEntry)

    wait_for(lambda: rds.hexists(Keys().catalog(wid), model), timeout=10, message="the catalog")
    assert catalog().cold_start_s == 40.0
    assert request("POST", f"{router.url}/api/models/{model}/start", timeout=30).status == 200
    first = instances(router, model)[wid]
    assert first["gpus"] == "0"
    wait_for(lambda: catalog().measured_vram_mb == [3000], timeout=10, message="the measurement at start")
    assert catalog().cold_start_s == 40.0  # 6 profile-0 starts now: the 5th fastest

    set_claim(str(claims), first["pid"], 7000)  # the engine grows (its KV cache, CUDA graphs)
    wait_for(lambda: catalog().measured_vram_mb == [7000], timeout=10, message="the peak in the catalog")
    wait_for(lambda: rds.hget(Keys().instance(model, wid), "vram_mb") == "7000", timeout=10,
             message="the instance held at its peak (what routers subtract)")
    learned = [from_json(raw, Learned) for raw in rds.lrange(key, 0, -1)]
    assert len(learned) == 7 and (learned[0].profile, learned[0].vram_mb, learned[0].how) == (0, 7000, how)
    assert learned[0].cold_start_s > 0  # the start's own record, raised (not a new one)

    def warnings() -> list[str]:
        return [m for _, f in rds.xrange(Keys().logs(model)) if "more than the" in (m := log_entry(f).message)]
    wait_for(lambda: any(f"model '{model}' uses 7000 MiB" in w for w in warnings()), timeout=10,
             message="the warning in the model's log stream")
    wait_samples(rds, wid, 3)  # three more device samples at the same peak
    assert len(warnings()) == 1  # once per new peak, not once per sample

    # GPU 0 will have 6000 MiB left: enough for the 4000 declared and the 3000 seen at start, not for the peak
    assert_placed_by_the_measurement(router, wid, model, other)


def test_the_used_memory_delta_counts_only_while_the_engine_is_alone_on_its_gpus(procs, redis_url, rds, tmp_path):
    """Without per-process figures, another model of the worker starting on the same GPU would
    look like growth: the running peak ignores the delta then, and counts it again once alone."""
    wid, model, other = uid("w"), uid("m"), uid("o")
    router, claims, _ = start_two_gpu_host(procs, redis_url, tmp_path, "delta", wid, model, other, ["--vram-mb", "3000"],
                                        other_args=("--vram-mb", "2000"), devices_interval=0.2)

    def measured() -> list[int]:
        return from_json(rds.hget(Keys().catalog(wid), model), CatalogEntry).measured_vram_mb

    assert request("POST", f"{router.url}/api/models/{model}/start", timeout=30).status == 200
    wait_for(lambda: measured() == [3000], timeout=10, message="the measurement at start")
    assert request("POST", f"{router.url}/api/models/{other}/start", timeout=30).status == 200
    assert instances(router, other)[wid]["gpus"] == "0"  # next to it: GPU 0 now shows 5000 MiB used
    wait_samples(rds, wid, 4)
    assert measured() == [3000]
    assert request("POST", f"{router.url}/api/models/{other}/stop", timeout=30).status == 200
    set_claim(str(claims), instances(router, model)[wid]["pid"], 7000)  # alone again, and it grows
    wait_for(lambda: measured() == [7000], timeout=10, message="the peak in the catalog")


def test_an_adopted_engine_keeps_its_record_and_grows_it(procs, redis_url, rds, tmp_path):
    """After an upgrade (SIGTERM, the engine keeps running) the next worker knows the engine's
    record: nothing is news until it grows, and growth updates that record."""
    wid, model, other = uid("w"), uid("m"), uid("o")
    router, claims, restart = start_two_gpu_host(procs, redis_url, tmp_path, "process", wid, model, other,
                                                 ["--vram-mb", "3000"], devices_interval=0.2, adopt_timeout=60.0)
    key = Keys().learned(wid, model)
    assert request("POST", f"{router.url}/api/models/{model}/start", timeout=30).status == 200
    pid = instances(router, model)[wid]["pid"]
    wait_for(lambda: rds.llen(key) == 1, timeout=10, message="the start's record")
    worker = next(p for p in procs.procs if p.args[-1] == wid and p.poll() is None)
    assert procs.stop(worker, signal.SIGTERM) == 0

    new = restart()
    wait_for(lambda: rds.hget(Keys().worker(wid), "pid") == str(new.pid), timeout=20, message="the new lease")
    wait_for(lambda: "adopted" in " ".join(log_entry(f).message for _, f in rds.xrange(Keys().logs(model))),
             timeout=10, message="the engine adopted")
    wait_samples(rds, wid, 3)  # device samples of the adopted engine
    assert [from_json(raw, Learned).vram_mb for raw in rds.lrange(key, 0, -1)] == [3000]

    set_claim(str(claims), pid, 7000)
    wait_for(lambda: from_json(rds.hget(Keys().catalog(wid), model), CatalogEntry).measured_vram_mb == [7000],
             timeout=10, message="the peak in the catalog")
    learned = [from_json(raw, Learned) for raw in rds.lrange(key, 0, -1)]
    assert [(x.vram_mb, x.cold_start_s > 0) for x in learned] == [(7000, True)]  # its record, raised


def test_a_start_right_after_a_stop_has_the_room_the_stop_made(procs, redis_url, rds, tmp_path):
    """A router places from its hosts' device snapshots, up to ``devices_interval`` old: one
    taken while a model ran still shows that model's memory after it stopped. A start right
    after the stop is placed in the room the stop made (router/control/host_rank.py
    ``freed_since``), not refused with a 503 until the next snapshot. Deterministic: the only
    snapshot is the one a restarted worker takes at once, of the engine it adopts."""
    wid, model, other = uid("w"), uid("m"), uid("o")
    router, _, restart = start_two_gpu_host(procs, redis_url, tmp_path, "process", wid, model, other,
                                            ["--vram-mb", "7000"], devices_interval=60.0, adopt_timeout=60.0)
    assert request("POST", f"{router.url}/api/models/{model}/start", timeout=30).status == 200
    assert instances(router, model)[wid]["gpus"] == "0"
    worker = next(p for p in procs.procs if p.args[-1] == wid and p.poll() is None)
    assert procs.stop(worker, signal.SIGTERM) == 0  # the engine keeps running
    new = restart()
    wait_for(lambda: rds.hget(Keys().worker(wid), "pid") == str(new.pid), timeout=20, message="the new lease")
    wait_for(lambda: instances(router, model)[wid]["state"] == "running", timeout=20, message="the engine adopted")

    def gpu0() -> dict:
        return get_json(f"{router.url}/api/devices/info")["hosts"][wid]["cuda"]["gpus"][0]
    wait_for(lambda: gpu0()["memory_used"] == 7000, timeout=10, message="the router's snapshot with the engine")
    taken = rds.get(Keys().devices(wid))

    assert request("POST", f"{router.url}/api/models/{model}/stop", timeout=30).status == 200
    # 8000 MiB on GPU 0, 7000 of them used in the snapshot: 2000 fit only in the room the stop made
    started = request("POST", f"{router.url}/api/models/{other}/start", timeout=30)
    assert started.status == 200, started.body
    assert instances(router, other)[wid]["gpus"] == "0"
    assert rds.get(Keys().devices(wid)) == taken and gpu0()["memory_used"] == 7000  # no newer snapshot since
