#!/usr/bin/env python3
"""What recording one request in the timeline costs the router, in-process (issue 27: < 5 µs).

Times ``History.request`` (the hot-path call ``RouterMetrics.observe`` makes once per request:
counters, a latency bucket, a TTFT bucket, tokens) and ``History.waited``, over 10 models, in
CPU time (``time.process_time``, so the machine's other load does not count): best of
``--rounds`` runs of ``--per-round`` calls, divided by the calls. No Redis is involved: the
hot path never touches it (the flush, once per slot, is timed separately as a pipeline build).

``--summary-hosts N`` also times the lab's GPU summary (``router.observe.gpu_summary``): the
work one router does once per 10 s slot for the whole lab (one ``GETRANGE`` per host from a
private redis-server, the sums, one ``HSET``), with N hosts of 4 GPUs and 3 engines each.

    python scripts/bench_history.py [--rounds 7] [--per-round 200000] [--summary-hosts 500]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llm_lab_router.protocol import Keys  # noqa: E402
from llm_lab_router.router.observe.history import History  # noqa: E402
from llm_lab_router.timeline import parse_resolutions  # noqa: E402

MODELS = [f"model-{i}" for i in range(10)]


async def summary_cost(hosts: int, slots: int = 20) -> tuple[float, float]:
    """Median CPU ms and wall ms of one slot's summary over ``hosts`` hosts (a private Redis)."""
    from llm_lab_router.protocol import CpuInfo, CudaInfo, DeviceSnapshot, GpuInfo
    from llm_lab_router.redis_server import RedisServer
    from llm_lab_router.redis_url import async_client
    from llm_lab_router.router.observe.gpu_summary import GpuSummary
    from llm_lab_router.timeline import EngineUse
    from llm_lab_router.worker.timeline import GaugeRecorder

    res = parse_resolutions("10s:24h,5m:30d")
    keys = Keys()
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp), extra=["--appendonly", "no", "--save", ""]).start()
        redis = async_client(server.url)
        try:
            first = int(time.time() // 10) - slots
            recorders = [GaugeRecorder(keys, f"host-{h:04d}", res) for h in range(hosts)]
            for rec in recorders:
                await rec.load(redis)
            for slot in range(first, first + slots):  # every host's record of each slot, as workers write them
                async with redis.pipeline(transaction=False) as pipe:
                    for h, rec in enumerate(recorders):
                        rec.ops(pipe, DeviceSnapshot(
                            worker=rec.wid, host=rec.wid, ts=slot * 10.0,
                            cuda=CudaInfo(online=True, gpus=[GpuInfo(index=g, name="H100", memory_total=81920,
                                                                     memory_used=30000 + g, utilization=50,
                                                                     power=400) for g in range(4)]),
                            cpu=CpuInfo(memory_total=515000, memory_used=100000)),
                            [EngineUse(model=MODELS[(h + e) % 10], gpus=(e,), mib=20000) for e in range(3)])
                    await pipe.execute()
            summary = GpuSummary(redis, redis, keys, res[0])
            index = await redis.hgetall(keys.history_series())
            names = sorted(k.decode()[5:] for k in index if k.startswith(b"host:"))
            cpu, wall = [], []
            for slot in range(first, first + slots):
                c0, w0 = time.process_time(), time.perf_counter()
                assert await summary._sum_slot(slot, names) == 1
                cpu.append((time.process_time() - c0) * 1000)
                wall.append((time.perf_counter() - w0) * 1000)
            return statistics.median(cpu[1:]), statistics.median(wall[1:])  # the first reads every host's meta
        finally:
            await redis.aclose()
            server.stop()


def best(fn, rounds: int, per_round: int) -> float:
    """CPU µs per call, the best of ``rounds``."""
    times = []
    for _ in range(rounds):
        t0 = time.process_time()
        fn(per_round)
        times.append(time.process_time() - t0)
    return min(times) / per_round * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--per-round", type=int, default=200_000)
    ap.add_argument("--summary-hosts", type=int, default=0, help="also time the lab's GPU summary over N hosts")
    args = ap.parse_args()
    history = History(None, Keys(), "bench", parse_resolutions("10s:24h,5m:30d"))  # type: ignore[arg-type]
    rng = random.Random(1)
    calls = [(rng.choice(MODELS), rng.choice((200, 200, 200, 429, 502)), rng.uniform(0.01, 30),
              rng.choice((None, rng.uniform(0.005, 5))), rng.randint(1, 4000), rng.randint(1, 1000))
             for _ in range(1024)]

    def requests(n: int) -> None:
        record = history.request
        for i in range(n):
            record(*calls[i & 1023])

    def waits(n: int) -> None:
        waited = history.waited
        for i in range(n):
            waited(MODELS[i % 10], 0.25)

    def loop(n: int) -> None:  # the loop and argument unpacking alone, subtracted
        for i in range(n):
            calls[i & 1023]

    base = best(loop, args.rounds, args.per_round)
    req = best(requests, args.rounds, args.per_round) - base
    wait = best(waits, args.rounds, args.per_round) - base
    print(f"History.request: {req:.2f} µs per request (CPU, best of {args.rounds} x {args.per_round})")
    print(f"History.waited:  {wait:.2f} µs per wait")
    print(f"limit 5 µs: {'met' if req + wait < 5 else 'NOT met'}")
    if args.summary_hosts:
        cpu, wall = asyncio.run(summary_cost(args.summary_hosts))
        print(f"GPU summary of {args.summary_hosts} hosts: {cpu:.1f} ms CPU, {wall:.1f} ms wall per 10 s slot "
              f"(median of 19; one router per slot)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
