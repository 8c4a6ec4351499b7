"""The plan an operator reads (router/control/plan.py: ``GET /api/plan``, ``llm-router plan``),
against a real worker on stand-in NVML GPUs, real engines and a real router (issue 29 item 2)."""

from __future__ import annotations

from click.testing import CliRunner
from conftest import wait_for
from fake_nvml import FAKE_DIR_ENV, fake_gpu_env
from helpers import (
    get_json,
    model_block,
    request,
    start_router,
    start_worker,
    write_config,
)
from llm_lab_router.cli import main as cli_group
from llm_lab_router.protocol import CatalogEntry, Keys, from_json
from test_estimate import big_llama
from test_placement import instances, uid, wait_devices


def test_the_plan_says_what_fits_together_what_a_start_evicts_and_what_fits_nowhere(procs, redis_url, rds, tmp_path):
    """Two GPUs of 8000 MiB. ``est`` has no ``vram_mb`` (its file says ~4.7 GiB) and holds 6500
    once running; ``a`` declares 5000 and runs; ``b`` (5000) is stopped, ``huge`` (20000) fits
    no GPU, ``small`` runs on the CPU."""
    estimated = big_llama(tmp_path / "big.gguf")
    claims = tmp_path / "nvml"
    claims.mkdir()
    wid = uid("w")
    est, a, b, huge, small = (uid(p) for p in ("est", "a", "b", "huge", "small"))
    config = write_config(tmp_path / "w.toml",
                          model_block(est, model_path="big.gguf", devices=["cuda"],
                                      engine_args=["--vram-mb", "6500", "--fake-nvml-dir", str(claims)]),
                          model_block(a, devices=["cuda"], vram_mb=5000), model_block(b, devices=["cuda"], vram_mb=5000),
                          model_block(huge, devices=["cuda"], vram_mb=20000), model_block(small))
    start_worker(procs, redis_url, config, wid, env={**fake_gpu_env(8000, 8000), FAKE_DIR_ENV: str(claims)})
    router = start_router(procs, redis_url)
    wait_devices(router, wid)
    assert request("POST", f"{router.url}/api/models/{est}/start", timeout=30).status == 200
    wait_for(lambda: from_json(rds.hget(Keys().catalog(wid), est), CatalogEntry).measured_vram_mb == [6500],
             timeout=10, message="est measured")
    assert request("POST", f"{router.url}/api/models/{a}/start", timeout=30).status == 200
    assert instances(router, est)[wid]["gpus"] == "0" and instances(router, a)[wid]["gpus"] == "1"

    def plan() -> dict:
        return get_json(f"{router.url}/api/plan")
    wait_for(lambda: plan()["disagree"], timeout=10, message="the measurement in the router's view")
    body = plan()
    assert body["success"] is True and [h["worker"] for h in body["hosts"]] == [wid]
    host = body["hosts"][0]
    assert [(g["index"], g["total_mb"], g["free_mb"], g["resident"]) for g in host["gpus"]] == [
        (0, 8000, 1500, [est]), (1, 8000, 3000, [a])]
    by = {m["model"]: m for m in host["models"]}
    assert by[est]["now"] == "running" and by[est]["profiles"] == [
        {"devices": ["cuda"], "vram_mb": 6500, "source": "measured"}]
    assert by[a]["now"] == "running" and by[a]["profiles"][0]["source"] == "declared"
    assert by[b]["now"] == "evicts" and by[b]["evicts"] == [est]  # least recently used first
    assert by[huge]["now"] == "no_room" and not by[huge]["fits_alone"] and "20000 MiB" in by[huge]["why"]
    assert by[small]["now"] == "fits" and by[small]["profiles"] == [{"devices": ["cpu"], "vram_mb": 0, "source": "cpu"}]
    # one model per GPU: every pair of the GPU models that fit a GPU alone
    assert host["together_complete"] and sorted(map(sorted, host["together"])) == sorted(
        sorted(pair) for pair in [[est, a], [est, b], [a, b]])
    assert [n["model"] for n in body["nowhere"]] == [huge] and wid in body["nowhere"][0]["reasons"]
    assert body["disagree"] == [{"model": est, "figures": {
        "worker": wid, "profile": 0, "devices": ["cuda"], "declared_mb": 0, "estimated_mb": estimated,
        "measured_mb": 6500, "estimate_error": round((estimated - 6500) / 6500, 4)}}]

    # --host: one host; an unknown one is a 404 in the API's shape
    assert get_json(f"{router.url}/api/plan?worker={wid}")["hosts"][0]["worker"] == wid
    missing = request("GET", f"{router.url}/api/plan?worker=nope")
    assert missing.status == 404 and missing.json()["success"] is False and "not live" in missing.json()["message"]

    text = CliRunner().invoke(cli_group, ["plan", "--url", router.url], catch_exceptions=False).output
    assert f"cuda:0 NVIDIA H100  free 1500/8000 MiB  resident: {est}" in text
    assert f"evicts {est}" in text and "no room even alone" in text and f"fits nowhere: {huge}" in text
    assert f"estimate off: {est} on {wid} profile 1: estimated {estimated} MiB, measured 6500 MiB" in text
    as_json = CliRunner().invoke(cli_group, ["plan", "--host", wid, "--json", "--url", router.url])
    assert as_json.exit_code == 0 and f'"worker": "{wid}"' in as_json.output
