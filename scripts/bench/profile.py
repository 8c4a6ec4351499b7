"""``--profile``: py-spy samples router A while it serves the concurrency-32 chat load."""

from __future__ import annotations

import asyncio
import shutil
import sys
from pathlib import Path

from .cluster import FAST
from .context import Bench
from .load import closed_loop


async def profile(bench: Bench, out: str, seconds: float) -> None:
    """py-spy samples router A while it serves the concurrency-32 chat load."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        raise RuntimeError("--profile needs py-spy: pip install py-spy")
    fmt = {".svg": "flamegraph", ".json": "speedscope"}.get(Path(out).suffix, "raw")
    bench.say(f"profiling router A (pid {bench.cluster.router_pid}) under chat c=32 for {seconds:g}s -> {out}")
    router = bench.targets(FAST)[-1]
    load = asyncio.ensure_future(closed_loop(router, router.chat(False, 16), 32, seconds + 1.0, 0.5))
    await asyncio.sleep(0.5)
    proc = await asyncio.create_subprocess_exec(
        spy, "record", "--pid", str(bench.cluster.router_pid), "--duration", str(int(seconds)), "--rate", "200",
        "--format", fmt, "--output", out, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    run = await load
    if proc.returncode != 0:
        raise RuntimeError(f"py-spy failed: {err.decode(errors='replace')[-500:]}")
    bench.raw["profile"] = {"file": out, "format": fmt, "load": run.summary()}
