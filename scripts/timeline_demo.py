#!/usr/bin/env python3
"""A timeline to look at: hours of simulated traffic written by the real writers, then the
dashboard in headless Chromium (the README's screenshot, and the render time of big ranges).

Starts a private redis-server and fills it as a lab would have: ``--models`` models under a
load that rises and falls (``router.observe.History`` with a simulated clock: the same counts,
buckets and flushes as a router), ``--hosts`` hosts of 4 GPUs (``worker.timeline.GaugeRecorder``:
their records and roll-ups), and events (starts, cold starts, an eviction, a crash). Then runs
``llm-router serve`` on it and, with ``--shot PATH``, Chromium's ``--screenshot`` of
``/ui/#timeline``. Everything it starts is stopped before it exits.

    python scripts/timeline_demo.py --hours 2 --shot docs/timeline.png
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llm_lab_router.protocol import CpuInfo, CudaInfo, DeviceSnapshot, GpuInfo, Keys  # noqa: E402
from llm_lab_router.redis_server import RedisServer, free_port  # noqa: E402
from llm_lab_router.redis_url import async_client  # noqa: E402
from llm_lab_router.router.observe.history import History  # noqa: E402
from llm_lab_router.timeline import EngineUse, TimelineEvent, event_ops, parse_resolutions  # noqa: E402
from llm_lab_router.worker.timeline import GaugeRecorder  # noqa: E402

RESOLUTIONS = parse_resolutions("10s:24h,5m:30d")


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


async def fill(url: str, hours: float, models: int, hosts: int, seed: int = 7) -> None:
    rng = random.Random(seed)
    redis = async_client(url)
    keys = Keys()
    now = time.time()
    clock = Clock(now - hours * 3600)
    history = History(redis, keys, "demo", RESOLUTIONS, clock=clock)
    names = [f"model-{chr(97 + i)}" for i in range(models)]
    recorders = [GaugeRecorder(keys, f"gpu{h + 1}", RESOLUTIONS) for h in range(hosts)]
    for rec in recorders:
        await rec.load(redis)
    events: list[TimelineEvent] = []
    for i, m in enumerate(names):
        start = clock.t + 60 * i
        events += [TimelineEvent(ts=start, kind="start_requested", model=m, key="alice", by="router:demo"),
                   TimelineEvent(ts=start + 25 + 10 * i, kind="ready", model=m, host=f"gpu{i % hosts + 1}",
                                 seconds=25 + 10 * i, by=f"worker:gpu{i % hosts + 1}")]
    mid = clock.t + hours * 3600 * 0.6
    events += [TimelineEvent(ts=mid, kind="evicted", model=names[-1], models=[names[0]], host="gpu1", key="bob",
                             by="router:demo"),
               TimelineEvent(ts=mid + 900, kind="crashed", model=names[1], host="gpu2",
                             detail="exited with code 1", by="worker:gpu2")]
    step = 2.0
    while clock.t < now:
        phase = (clock.t - (now - hours * 3600)) / 3600
        loads = {}
        for i, m in enumerate(names):
            load = loads[m] = max(0.0, 1.5 + math.sin(phase * 2 + i) * 1.2) * (1 + i * 0.5)
            for _ in range(int(rng.expovariate(1 / max(load * step, 0.01)))):
                ttft = rng.lognormvariate(math.log(0.08 + 0.05 * load), 0.5)
                out = rng.randint(20, 400)
                history.request(m, 200 if rng.random() > 0.01 else 502, ttft + out / (40 + 10 * i), ttft,
                                rng.randint(50, 2000), out)
            if load > 2.5:
                history.waited(m, rng.expovariate(1 / (load / 4)))
        if int(clock.t) % 10 < step:
            async with redis.pipeline(transaction=False) as pipe:
                for h, rec in enumerate(recorders):
                    engines = running(names, h, hosts, clock.t, mid, phase)
                    rec.ops(pipe, DeviceSnapshot(
                        worker=rec.wid, host=rec.wid, ts=clock.t,
                        cuda=CudaInfo(online=True, gpus=[GpuInfo(
                            index=g, name="NVIDIA H100", memory_total=81920,
                            memory_used=sum(e.mib for e in engines if g in e.gpus) + 600 + 400 * (g == 3),
                            utilization=(util := int(50 + 45 * math.sin(phase * 3 + g))),
                            power=120 + 5 * util, temperature=35 + util // 2) for g in range(4)]),
                        cpu=CpuInfo(cpu_count=64, cpu_percent=30 + 20 * math.sin(phase), memory_total=515000,
                                    memory_used=200000)), engines)
                await pipe.execute()
            await history.summary.run_once(clock.t)  # the lab's GPUs summed, as one router does
            history.inflight = lambda: {m: round(2 * load) for m, load in loads.items()}
            history.queued = lambda: {m: max(0, round(load - 2.5)) for m, load in loads.items()}
            await history.flush()
            if int(clock.t) % 300 < step:
                await history.roll_up()
                for rec in recorders:
                    await rec.roll_up(redis, clock.t)
        clock.t += step
    async with redis.pipeline(transaction=False) as pipe:
        event_ops(pipe, keys, events)
        await pipe.execute()
    await redis.aclose()


def running(names: list[str], host: int, hosts: int, t: float, mid: float, phase: float) -> list[EngineUse]:
    """The engines on ``host`` at ``t``: model i on host i % hosts, GPU i % 4 (the first model
    evicted for the last at ``mid``; the second crashed from mid + 15 min for 10 min), their KV
    caches growing and shrinking with the load."""
    out = []
    for i, m in enumerate(names):
        if i % hosts != host or (i == 0 and t >= mid) or (i == 1 and mid + 900 <= t < mid + 1500):
            continue
        gpu = (0 if i == len(names) - 1 and t >= mid else i % 4)
        out.append(EngineUse(model=m, gpus=(gpu,), mib=int(14000 + 5000 * i + 3000 * math.sin(phase * 2 + i))))
    return out


@contextmanager
def router_on(redis_url: str) -> Iterator[str]:
    """``llm-router serve`` on ``redis_url`` (no access log) for the block; yields its URL once it answers."""
    port = free_port()
    router = subprocess.Popen([sys.executable, "-m", "llm_lab_router.cli", "serve", "--redis", redis_url,
                               "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "LLM_ROUTER_ACCESS_LOG": "0"})
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"{url}/health", timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        yield url
    finally:
        router.terminate()
        router.wait(10)


def shot(url: str, path: Path, width: int = 1440, height: int = 1900) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("no chromium on PATH")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--user-data-dir={profile}", f"--window-size={width},{height}",
                        "--virtual-time-budget=15000", f"--screenshot={path.resolve()}", f"{url}/ui/#timeline"],
                       check=True, timeout=120, capture_output=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hours", type=float, default=2)
    ap.add_argument("--models", type=int, default=3)
    ap.add_argument("--hosts", type=int, default=2)
    ap.add_argument("--shot", type=Path, default=None, help="write a screenshot of /ui/#timeline here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp), extra=["--appendonly", "no", "--save", ""])
        server.start()
        try:
            started = time.monotonic()
            asyncio.run(fill(server.url, args.hours, args.models, args.hosts))
            print(f"filled {args.hours:g} h of {args.models} models and {args.hosts} hosts in "
                  f"{time.monotonic() - started:.1f} s")
            with router_on(server.url) as url:
                if args.shot:
                    shot(url, args.shot)
                    print(f"screenshot: {args.shot}")
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
