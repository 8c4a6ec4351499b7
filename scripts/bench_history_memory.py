#!/usr/bin/env python3
"""Redis memory of the timeline at full retention (issue 27), measured in a private redis-server.

Writes, with the writers' own functions, everything the timeline keeps at the default
resolutions (10 s for 24 h, 5 min and 1 h for 30 days) for ``--hosts`` hosts of ``--gpus`` GPUs
(each host's gauge records and totals, ``worker.timeline``'s layout) and ``--models`` models
busy in every slot (counters, tokens and 8 TTFT, 10 latency and 4 wait buckets set, as under
steady mixed load; ``routers`` coverage marks), plus ``--events`` timeline events; then reads
``INFO memory``. Memory is linear in hosts and in models, so the figure for 500 hosts is the
measured per-host cost × 500 (``--hosts 500`` measures it directly, in ~10 minutes).

    python scripts/bench_history_memory.py [--hosts 20] [--gpus 4] [--models 10] [--scale-to 500]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402
from llm_lab_router.protocol import Keys  # noqa: E402
from llm_lab_router.redis_server import RedisServer  # noqa: E402
from llm_lab_router.timeline import (  # noqa: E402
    COVERAGE,
    DEFAULT_RESOLUTIONS,
    FLUSHES,
    Gauges,
    TimelineEvent,
    event_ops,
    gauge_meta_ops,
    gauge_ops,
    model_series,
    parse_resolutions,
)

BUSY = ["requests", "errors_4xx", "errors_5xx", "tokens_in", "tokens_out", *(f"ttft:{i}" for i in range(3, 11)),
        *(f"latency:{i}" for i in range(4, 14)), *(f"wait:{i}" for i in range(0, 4))]


def used(r: redis.Redis) -> int:
    return int(r.info("memory")["used_memory"])


def dashboard_reads(url: str, hosts: int, gpus: int) -> list[tuple[str, float]]:
    """What the dashboard's 30 d view asks a router for (its series list, each model's series,
    the first 32 GPUs', the events), six at a time as a browser does; the series of ``hosts``
    hosts are listed (only the measured ones have records)."""
    import json
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    from scripts.timeline_demo import router_on

    r = redis.Redis.from_url(url)
    with r.pipeline(transaction=False) as pipe:
        for h in range(hosts):
            gauge_meta_ops(pipe, Keys(), f"host-{h:04d}", 86400, 515000, [81920] * gpus, time.time())
        pipe.execute()
    with router_on(url) as base:
        get = lambda path: json.load(urllib.request.urlopen(base + path, timeout=60))  # noqa: E731
        out = []
        t0 = time.monotonic()
        names = get("/api/history")["available"]
        out.append((f"series list ({len(names)} series)", time.monotonic() - t0))
        window = "from=-30d&step=7200"
        paths = [f"/api/history?series=model&model={n[6:]}&{window}" for n in names if n.startswith("model:")]
        paths += [f"/api/history?series=gpu&host={n[4:].rpartition(':')[0]}&gpu={n.rpartition(':')[2]}&{window}"
                  for n in sorted(n for n in names if n.startswith("gpu:"))[:32]]
        paths.append("/api/events?from=-30d&limit=2000")
        for path in (paths[0], paths[-2]):
            t = time.monotonic()
            get(path)
            out.append((f"one: {path.split('&')[0]}", time.monotonic() - t))
        t1 = time.monotonic()
        with ThreadPoolExecutor(6) as pool:
            list(pool.map(get, paths))
        out.append((f"{len(paths)} series and events, 6 at a time", time.monotonic() - t1))
        out.append(("total", time.monotonic() - t0))
        return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hosts", type=int, default=20)
    ap.add_argument("--gpus", type=int, default=4)
    ap.add_argument("--models", type=int, default=10)
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--scale-to", type=int, default=500, help="hosts to extrapolate the host part to")
    ap.add_argument("--read", action="store_true", help="then time what the dashboard reads for 30 days, through a "
                                                         "router, with --scale-to hosts listed")
    args = ap.parse_args()
    resolutions = parse_resolutions(DEFAULT_RESOLUTIONS)
    keys = Keys()
    rng = random.Random(1)
    now = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp), extra=["--appendonly", "no", "--save", ""])
        server.start()
        try:
            r = redis.Redis.from_url(server.url)
            base = used(r)
            for h in range(args.hosts):  # hosts: every slot of every resolution has a record
                wid = f"host-{h:04d}"
                with r.pipeline(transaction=False) as pipe:
                    gauge_meta_ops(pipe, keys, wid, resolutions[-1].keep, 515000, [81920] * args.gpus, now)
                    for res in resolutions:
                        last = int(now // res.step)
                        for slot in range(last - res.keep // res.step + 1, last + 1):
                            gauge_ops(pipe, keys, res, wid, slot, Gauges(
                                samples=min(255, res.step // resolutions[0].step), cpu_percent=rng.randrange(100),
                                memory_used=rng.randrange(515000),
                                gpus=[(rng.randrange(81920), rng.randrange(100), rng.randrange(700), rng.randrange(30, 90))
                                      for _ in range(args.gpus)]))
                    pipe.execute()
            hosts = used(r) - base
            for m in range(args.models + 1):  # models busy in every slot, and the coverage series
                series = model_series(f"model-{m:02d}") if m < args.models else COVERAGE
                for res in resolutions:
                    last = int(now // res.step)
                    with r.pipeline(transaction=False) as pipe:
                        for slot in range(last - res.keep // res.step + 1, last + 1):
                            key = keys.history(res.step, series, slot)
                            fields = {f: rng.randrange(1, 10_000) for f in BUSY} if m < args.models else {FLUSHES: 2}
                            if res is not resolutions[0]:
                                fields["slots"] = res.step // resolutions[0].step
                            pipe.hset(key, mapping=fields)
                            pipe.expire(key, res.keep)
                        pipe.hset(keys.history_series(), series, int(now))
                        pipe.execute()
            models = used(r) - base - hosts
            with r.pipeline(transaction=False) as pipe:
                event_ops(pipe, keys, [TimelineEvent(ts=now - i, kind="ready", model=f"model-{i % 10:02d}",
                                                     host=f"host-{i % 500:04d}", seconds=12.5, detail="serving on "
                                                     "http://10.0.0.1:20000", by="worker:host-0001")
                                       for i in range(args.events)])
                pipe.execute()
            events = used(r) - base - hosts - models
            if args.read:
                read_times = dashboard_reads(server.url, args.scale_to, args.gpus)
        finally:
            server.stop()
    mib = 1 << 20
    per_host = hosts / args.hosts
    total = per_host * args.scale_to + models + events
    print(f"hosts ({args.gpus} GPUs): {hosts / mib:.1f} MiB for {args.hosts} = {per_host / mib:.2f} MiB per host")
    print(f"models: {models / mib:.1f} MiB for {args.models} busy models (+ coverage)")
    print(f"events: {events / mib:.1f} MiB for {args.events}")
    print(f"full retention, {args.scale_to} hosts x {args.gpus} GPUs x {args.models} models: {total / mib:.0f} MiB")
    if args.read:
        for what, seconds in read_times:
            print(f"dashboard, 30 d: {what}: {seconds:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
