"""Learned cold starts and VRAM (worker/learning.py): an engine that uses more VRAM than it
declares is measured on its first start (stand-in NVML: per process, or the growth of the
GPU's used memory), the warning naming it is in its log stream, and the next start is placed by
the measurement. Pure parts: ``measured_vram``, ``effective_profiles``."""

from __future__ import annotations

import pytest

from conftest import wait_for
from fake_nvml import FAKE_DIR_ENV, NO_PROCESSES_ENV, fake_gpu_env
from helpers import get_json, model_block, request, start_router, start_worker, write_config
from llm_router.config import DeviceProfile
from llm_router.protocol import CatalogEntry, Keys, Learned, from_json, log_entry
from llm_router.vram import effective_profiles
from router.placement import profiles_of
from test_placement import instances, uid, wait_devices
from worker.learning import measured_vram


def test_measured_vram_prefers_nvml_per_process_else_the_growth_of_used_memory():
    assert measured_vram([0], {0: 100}, {0: 9000}, {0: 7000}) == (7000, "process")
    assert measured_vram([0, 1], {0: 100, 1: 0}, {0: 5100, 1: 6000}, None) == (6000, "delta")
    assert measured_vram([0], {0: 500}, {0: 100}, {}) == (0, "delta")  # never negative
    assert measured_vram([], {}, {}, None) == (0, "")


def test_effective_profiles_raise_declarations_to_measurements_only():
    declared = [DeviceProfile(devices=["cuda"], vram_mb=4000), DeviceProfile(devices=["cuda"], vram_mb=9000),
                DeviceProfile(devices=["cpu"])]
    got = effective_profiles(declared, [6000, 5000, 7000])
    assert [p.vram_mb for p in got] == [6000, 9000, 0]
    entry = CatalogEntry(id="m", devices=[["cuda"]], vram_mb=[4000], measured_vram_mb=[6000])
    assert profiles_of(entry)[0].vram_mb == 6000


@pytest.mark.parametrize("how", ["process", "delta"])
def test_a_model_using_more_vram_than_declared_is_placed_by_the_measurement(procs, redis_url, rds, tmp_path, how):
    wid, model, other = uid("w"), uid("m"), uid("o")
    claims = tmp_path / "nvml"
    claims.mkdir()
    # Two profiles declaring 4000 MiB: GPU 0 (8000 MiB) first, then GPU 1 (16000 MiB). The
    # engine really takes 7000 MiB once loaded. ``other`` declares 2000 MiB on GPU 0.
    block = model_block(model, engine_args=["--startup-delay", "0.5", "--vram-mb", "7000",
                                            "--fake-nvml-dir", str(claims)])
    block += '[[models.profiles]]\ndevices = ["cuda:0"]\nvram_mb = 4000\n'
    block += '[[models.profiles]]\ndevices = ["cuda:1"]\nvram_mb = 4000\n'
    blocks = [block, model_block(other, devices=["cuda:0"], vram_mb=2000)]
    env = {**fake_gpu_env(8000, 16000), FAKE_DIR_ENV: str(claims)}
    if how == "delta":
        env[NO_PROCESSES_ENV] = "1"
    start_worker(procs, redis_url, write_config(tmp_path / "w.toml", *blocks), wid, env=env)
    router = start_router(procs, redis_url)
    wait_devices(router, wid)

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

    assert request("POST", f"{router.url}/api/models/{model}/stop", timeout=30).status == 200
    wait_for(lambda: get_json(f"{router.url}/api/devices/info")["hosts"][wid]["cuda"]["gpus"][0]["memory_used"] == 0,
             timeout=10, message="the router sees GPU 0 free again")
    assert request("POST", f"{router.url}/api/models/{other}/start", timeout=30).status == 200
    # GPU 0 has 6000 MiB left: enough for the 4000 declared, not for the 7000 measured
    assert request("POST", f"{router.url}/api/models/{model}/start", timeout=30).status == 200
    assert instances(router, model)[wid]["gpus"] == "1"
    assert instances(router, other)[wid]["gpus"] == "0"
    assert get_json(f"{router.url}/api/models/{model}/info")["success"]
