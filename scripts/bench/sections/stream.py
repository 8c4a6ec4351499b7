"""Section ``stream``: streamed chat: time to the first token (c=1), the gap between chunks of
paced streams, chunks/s of unpaced ones."""

from __future__ import annotations

from ..client import Target
from ..cluster import FAST, PACED, PACED_RATE
from ..context import Bench
from ..load import ab_rounds, closed_loop


async def run(bench: Bench) -> None:
    o = bench.opts
    bench.say("streamed chat: time to first token (concurrency 1) ...")
    fast = bench.targets(FAST, compare=True)

    async def ttft(t: Target, prime: float = 0.0) -> dict:
        return (await closed_loop(t, t.chat(True, 16), 1, prime or o.duration, o.warmup, sse=True)).summary()

    runs = await ab_rounds(fast, o.rounds, ttft, o.prime)
    bench.raw["stream_ttft"] = runs
    bench.add("stream", "TTFT p50 (c=1)", runs, "ttft_p50_ms", "delta", "ms", "+< 1 ms", lambda v: v < 1.0)
    bench.add("stream", "TTFT p99 (c=1)", runs, "ttft_p99_ms", "delta", "ms")

    bench.say(f"streamed chat: inter-chunk gap ({PACED_RATE:.0f} tokens/s, 16 streams of {o.gap_tokens} tokens) ...")

    async def gaps(t: Target, prime: float = 0.0) -> dict:
        return (await closed_loop(t, t.chat(True, o.gap_tokens), 16, prime or o.gap_duration, o.warmup,
                                  sse=True)).summary()

    runs = await ab_rounds(bench.targets(PACED), o.rounds, gaps)
    bench.raw["stream_gap"] = runs
    bench.add("stream", f"chunk gap p50 @{PACED_RATE:.0f}/s", runs, "gap_p50_ms", "delta", "ms")
    bench.add("stream", f"chunk gap p99 @{PACED_RATE:.0f}/s", runs, "gap_p99_ms", "delta", "ms")

    bench.say("streamed chat: chunks/s (unpaced, 32 streams of 256 tokens) ...")

    async def chunks(t: Target, prime: float = 0.0) -> dict:
        return (await closed_loop(t, t.chat(True, 256), 32, prime or o.duration, o.warmup, sse=True)).summary()

    runs = await ab_rounds(fast, o.rounds, chunks, o.prime)
    bench.raw["stream_chunks"] = runs
    bench.add("stream", "chunks/s (c=32)", runs, "chunks_per_s", "ratio", "chunk/s")
