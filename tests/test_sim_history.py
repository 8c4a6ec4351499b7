"""``python -m scripts.sim history``: the timeline's Redis memory at full retention, filled by the
project's own writers under a simulated clock (issue 27, docs/BENCHMARKS.md).

Run as an operator would, a real process with its own private redis-server, at a tiny scale
with short resolutions (1 s for 60 s, 5 s for 300 s) so the whole retention fills in seconds."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESOLUTIONS = "1s:60s,5s:300s"


def sim_history(tmp_path: Path, hosts: int, end: float) -> dict:
    out = tmp_path / f"history-{hosts}.json"
    proc = subprocess.run([sys.executable, "-m", "scripts.sim", "history", "--hosts", str(hosts), "--gpus", "2",
                           "--models", "2", "--resolutions", RESOLUTIONS, "--check-hosts", str(hosts),
                           "--end", str(end), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=90, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| **used_memory** |" in proc.stdout  # the Markdown table
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict[int, dict]:
    tmp = tmp_path_factory.mktemp("sim-history")
    end = time.time()  # both runs end at the same time: their chunk strings have the same lengths
    return {n: sim_history(tmp, n, end) for n in (3, 6)}


def part(report: dict, name: str) -> dict:
    return next(p for p in report["parts"] if p["part"] == name)


@pytest.mark.parametrize("hosts", [3, 6])
def test_every_slot_of_every_resolution_is_held_and_nothing_older(reports, hosts):
    report = reports[hosts]
    check = report["check"]
    for res in ("1s", "5s"):
        present, expected = check[res]["host_records"]
        assert expected >= hosts * 55 and present == expected, (res, check[res])  # every host, every slot
        assert check[res]["model_hashes"][0] == check[res]["model_hashes"][1] >= 2 * 55
        assert check[res]["gpus_hashes"][0] == check[res]["gpus_hashes"][1] >= 55  # the lab's GPUs summed
    # Redis's own clock expired nothing during the fill; the simulated TTLs dropped what a real
    # run's would have (older fine slots, older chunks), and left nothing past its retention
    assert check["expired_in_redis_time"] == 0 and check["evicted"] == 0
    assert check["keys_swept"] > 0 and check["keys_with_ttl_past_retention"] == 0
    assert 2 * 60 <= part(report, "request series, 1 s")["keys"] <= 2 * 62  # 2 models × 60 slots of 1 s
    assert 2 * 60 <= part(report, "request series, 5 s")["keys"] <= 2 * 62
    assert part(report, "gpus summary, all resolutions")["bytes"] > 0
    assert report["counts"]["events"] > 0 and part(report, "events (llm:timeline)")["bytes"] > 0


@pytest.mark.parametrize("hosts", [3, 6])
def test_the_parts_add_up_to_used_memory(reports, hosts):
    report = reports[hosts]
    named = sum(p["bytes"] for p in report["parts"] if not p["part"].startswith("other"))
    assert report["used_memory"] > 0
    assert abs(report["used_memory"] - named) <= 0.08 * report["used_memory"], report["parts"]
    b = report["bound"]
    assert b["A_per_host"] * hosts + b["B_per_model"] * 2 + b["C"] == pytest.approx(report["used_memory"], abs=3)


def test_the_hosts_cost_is_linear(reports):
    small, large = reports[3], reports[6]
    for res in (1, 5):
        name = f"hosts' gauge records, {res} s"
        assert part(large, name)["keys"] == 2 * part(small, name)["keys"]  # one chunk string per host and chunk
        assert part(large, name)["bytes"] == pytest.approx(2 * part(small, name)["bytes"], rel=0.05)
    assert large["bound"]["A_per_host"] == pytest.approx(small["bound"]["A_per_host"], rel=0.05)
    assert large["bound"]["B_per_model"] == pytest.approx(small["bound"]["B_per_model"], rel=0.05)
