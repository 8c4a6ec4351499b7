"""Section ``swap``: what prefetch saves on a swap, by scripts/bench_swap.py (its docstring says
how) run as a child process: it brings its own Redis, two workers (prefetch on and off) and a
router, and weight files of ``--swap-mib`` MiB on the disk of ``--swap-dir`` (a real disk: the
page cache is what is measured). ``--llama-server PATH`` makes the engines a real llama-server
serving GGUFs of that size (the `real` extra writes them); otherwise the mock engine reads its
file whole. Rows: the swapped-in model's request to first token and its cold start (the worker's
``starting`` to ``running on``), cold page cache vs prefetched; the target is the issue's, at
least half of the cold start gone."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import tempfile
from pathlib import Path

from ..context import Bench
from ..report import Row
from ..stats import median

SCRIPT = Path(__file__).resolve().parents[2] / "bench_swap.py"


async def run(bench: Bench) -> None:
    o = bench.opts
    with tempfile.TemporaryDirectory(prefix="llm-router-swap-json-") as tmp:
        out = Path(tmp) / "swap.json"
        argv = [sys.executable, str(SCRIPT), "--mib", str(o.swap_mib), "--residency", f"{o.swap_residency:g}",
                "--rounds", str(o.swap_rounds), "--dir", o.swap_dir, "--json", str(out)]
        if o.llama_server:
            argv += ["--engine", "llama-server", "--llama-server", o.llama_server]
        bench.say(f"swap: {' '.join(argv[1:])}")
        proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.DEVNULL,
                                                    stderr=asyncio.subprocess.PIPE)
        try:
            _, err = await proc.communicate()
        except asyncio.CancelledError:  # SIGINT: the script stops its processes in its finally
            proc.send_signal(signal.SIGINT)
            await proc.wait()
            raise
        if proc.returncode != 0:
            raise RuntimeError(f"bench_swap.py exited with {proc.returncode}: {err.decode()[-2000:]}")
        result = json.loads(out.read_text())
    rounds = result["rounds"]
    first = {name: 1000 * median([r["first_token"] for r in rs]) for name, rs in rounds.items()}
    start = {name: 1000 * median([r["cold_start"] for r in rs]) for name, rs in rounds.items()}
    saved = 1 - start["prefetch"] / start["cold"] if start["cold"] else 0.0
    what = f"{result['engine']}, {result['mib']} MiB"
    bench.rows += [
        Row("swap", f"first token of the swapped-in model ({what})", first, "ms",
            f"{first['prefetch'] - first['cold']:+.0f} ms"),
        Row("swap", f"its cold start, starting to running ({what})", start, "ms", f"{-100 * saved:+.0f}%",
            ">= 50% less with prefetch", saved >= 0.5),
    ]
    bench.raw["swap"] = result
