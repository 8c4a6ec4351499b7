"""Section ``chat``: non-streamed chat completions at each ``--concurrency``: requests/s,
latency p50/p99 and, at c=32, CPU per request (engine direct, router through it)."""

from __future__ import annotations

from ..client import Target
from ..cluster import FAST
from ..context import Bench
from ..load import ab_rounds, closed_loop


async def run(bench: Bench) -> None:
    o = bench.opts
    targets = bench.targets(FAST, compare=True)
    for c in o.concurrency:
        bench.say(f"chat completions, concurrency {c} ...")

        async def one(t: Target, prime: float = 0.0, c: int = c) -> dict:
            return (await closed_loop(t, t.chat(False, 16), c, prime or o.duration, o.warmup,
                                      cpu_pid=bench.cpu_pid(t))).summary()

        runs = await ab_rounds(targets, o.rounds, one, o.prime * (3 if c >= 128 else 1))
        bench.raw[f"chat_c{c}"] = runs
        sec = f"chat c={c}"
        bench.add(sec, "requests/s", runs, "rps", "ratio", "req/s",
                  "router >= 0.5 x direct" if c == 32 else "", (lambda v: v >= 0.5) if c == 32 else None)
        bench.add(sec, "latency p50", runs, "p50_ms", "delta", "ms",
                  "+< 0.3 ms" if c == 1 else "", (lambda v: v < 0.3) if c == 1 else None)
        bench.add(sec, "latency p99", runs, "p99_ms", "delta", "ms")
        if c == 32:
            bench.add(sec, "CPU/request: engine | router", runs, "cpu_us", "", "us")
