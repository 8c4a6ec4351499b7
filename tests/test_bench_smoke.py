"""``scripts/bench.py --smoke``: every section of the benchmark runs end to end, without errors.

A few requests per section against a real Redis, worker, two routers and mock engines. Speed
is *not* asserted here (benchmarks measure it, docs/BENCHMARKS.md reports it): only that the
harness works, prints every section and that nothing failed. The session fixture checks that
the bench left no process behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ["chat c=1", "chat c=32", "chat c=256", "stream", "50 streams", "logs", "propagation", "50 viewers",
            "quotas c=1", "governance c=1", "affinity", "affinity x2", "scaling c=64",
            "scheduling", "scheduling arrivals", "swap"]


def test_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--smoke", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"bench failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    table = proc.stdout
    for section in SECTIONS:
        assert any(line.startswith(section + " ") for line in table.splitlines()), f"no {section!r} row:\n{table}"
    for column in ("direct", "router", "target"):
        assert column in table.splitlines()[1] or column in table, table

    result = json.loads(out.read_text())
    assert result["errors"] == 0, table
    rows = {(r["section"], r["metric"]): r for r in result["rows"]}
    assert {r["section"] for r in result["rows"]} >= set(SECTIONS)
    for row in result["rows"]:
        assert all(n == 0 for n in row["errors"].values()), (row, table)
    # every router-side figure was measured (a number, not NaN), not just printed
    for key in [("chat c=1", "latency p50"), ("stream", "TTFT p50 (c=1)"), ("50 streams", "router RSS peak"),
                ("logs", "lines/s into Redis"), ("logs", "print -> SSE p50"), ("propagation", "worker write -> B p50"),
                ("quotas c=1", "latency p50, key with rpm+tpm+concurrency"),
                ("governance c=1", "latency p50, key with models+start+budget")]:
        value = rows[key]["values"]["router"]
        assert value == value and value > 0, (key, rows[key])
    for key in [("affinity x2", "TTFT p50 (least | affinity)"), ("affinity x2", "requests/s (least | affinity)")]:
        assert all(v == v and v > 0 for v in rows[key]["values"].values()), (key, rows[key])  # both sides measured
    assert rows[("affinity x2", "prompt tokens found cached, % (least | affinity)")]["values"]["router"] > 0
    assert rows[("50 streams", "max open at once")]["values"]["router"] == 50
    assert rows[("50 viewers", "viewers connected")]["values"]["router"] == 50
    for policy in ("lru", "swap"):  # both scheduling workloads served requests under both policies
        assert rows[("scheduling", "requests served")]["values"][policy] > 0
        assert rows[("scheduling arrivals", "requests served")]["values"][policy] > 0
    swap = [r for r in result["rows"] if r["section"] == "swap"]  # prefetch on and off, both measured
    assert len(swap) == 2 and all(r["values"][c] > 0 for r in swap for c in ("cold", "prefetch")), swap
    for metric in ("/health p99, 50 viewers", "start (running) p99, 50 viewers", "log line -> viewer p99"):
        value = rows[("50 viewers", metric)]["values"]["router"]
        assert value == value and value > 0, (metric, rows[("50 viewers", metric)])


def test_bench_runs_as_a_module_and_lists_its_sections() -> None:
    """``python -m scripts.bench`` is the same program as ``scripts/bench.py`` (the package's
    ``__main__``); its sections come from ``scripts/bench/sections``."""
    # wide enough that argparse does not wrap the list of sections (it wraps at the terminal's width)
    proc = subprocess.run([sys.executable, "-m", "scripts.bench", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    assert "chat,stream,streams,logs,propagation,viewers,quotas,governance,affinity,scaling,scheduling,swap" in "".join(proc.stdout.split())  # wrapped

