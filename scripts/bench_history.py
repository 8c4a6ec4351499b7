#!/usr/bin/env python3
"""What recording one request in the timeline costs the router, in-process (issue 27: < 5 µs).

Times ``History.request`` (the hot-path call ``RouterMetrics.observe`` makes once per request:
counters, a latency bucket, a TTFT bucket, tokens) and ``History.waited``, over 10 models, in
CPU time (``time.process_time``, so the machine's other load does not count): best of
``--rounds`` runs of ``--per-round`` calls, divided by the calls. No Redis is involved: the
hot path never touches it (the flush, once per slot, is timed separately as a pipeline build).

    python scripts/bench_history.py [--rounds 7] [--per-round 200000]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llm_lab_router.protocol import Keys  # noqa: E402
from llm_lab_router.router.observe.history import History  # noqa: E402
from llm_lab_router.timeline import parse_resolutions  # noqa: E402

MODELS = [f"model-{i}" for i in range(10)]


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
    return 0


if __name__ == "__main__":
    sys.exit(main())
