"""Section ``streams``: ``--streams`` (1,000) slow streams open at once: errors, connect time,
TTFT, and the router's RSS at its peak."""

from __future__ import annotations

import asyncio

from ..client import Response, Target, now
from ..cluster import SLOW, SLOW_RATE
from ..context import Bench
from ..procs import rss_mb
from ..report import Row
from ..stats import Run, pct


async def run(bench: Bench) -> None:
    o = bench.opts
    n = o.streams
    sec = f"{n} streams"
    results: dict[str, list[dict]] = {}
    rss_base = rss_peak = float("nan")
    for t in bench.targets(SLOW):
        bench.say(f"{n} concurrent streams of {o.stream_tokens} tokens at {SLOW_RATE:g} tokens/s, {t.name} ...")
        sampler = None
        peak = [0.0]
        if t.name == "router":
            rss_base = rss_mb(bench.cluster.router_pid)

            async def sample() -> None:
                while True:
                    peak[0] = max(peak[0], rss_mb(bench.cluster.router_pid))
                    await asyncio.sleep(0.05)

            sampler = asyncio.ensure_future(sample())
        res = await concurrent_streams(bench, t, n, o.ramp)
        if sampler is not None:
            sampler.cancel()
            rss_peak = max(peak[0], rss_mb(bench.cluster.router_pid))
        results[t.name] = [res]
        await asyncio.sleep(0.5)
    bench.raw["many_streams"] = results
    errors = {k: int(v[0]["errors"]) for k, v in results.items()}
    bench.rows.append(Row(sec, "errors", {k: float(v) for k, v in errors.items()}, "",
                          "", "0", sum(errors.values()) == 0, errors))
    bench.rows.append(Row(sec, "max open at once", {k: v[0]["max_open"] for k, v in results.items()}, ""))
    bench.add(sec, "client connect p99", results, "connect_p99_ms", "delta", "ms")
    bench.add(sec, "TTFT p50", results, "ttft_p50_ms", "delta", "ms")
    bench.add(sec, "TTFT p99", results, "ttft_p99_ms", "delta", "ms")
    if bench.cluster.routers:
        bench.rows.append(Row(sec, "router RSS idle", {"router": rss_base}, "MB"))
        bench.rows.append(Row(sec, "router RSS peak", {"router": rss_peak}, "MB", f"{rss_peak - rss_base:+.1f} MB",
                              "< 150 MB", rss_peak < 150))


async def concurrent_streams(bench: Bench, t: Target, n: int, ramp: float) -> dict:
    tokens = bench.opts.stream_tokens
    raw = t.chat(True, tokens)
    run = Run(t.name)
    connects: list[float] = []
    open_now = [0, 0]

    async def one(i: int) -> None:
        await asyncio.sleep(ramp * i / n)
        t_connect = now()
        try:
            conn = await t.connect()
        except OSError as exc:
            run.error(f"connect: {exc}")
            return
        connects.append(now() - t_connect)
        open_now[0] += 1
        open_now[1] = max(open_now[1], open_now[0])
        resp = Response(sse=True)
        try:
            await conn.request(raw, resp)
            if resp.status != 200 or not resp.done_seen or resp.frames < tokens + 2:
                run.error(f"HTTP {resp.status}, {resp.frames} frames, [DONE] {resp.done_seen}")
            else:
                run.n += 1
                run.ttfts.append(resp.ttft)
                run.latencies.append(resp.t_end - resp.t_sent)
        except Exception as exc:
            run.error(f"{type(exc).__name__}: {exc}")
        finally:
            open_now[0] -= 1
            conn.close()

    tasks = [asyncio.ensure_future(one(i)) for i in range(n)]
    _, pending = await asyncio.wait(tasks, timeout=ramp + tokens / SLOW_RATE + 60)
    for p in pending:
        p.cancel()
        run.error("timeout")
    out = run.summary()
    out["max_open"] = open_now[1]
    out["connect_p50_ms"] = pct(connects, 0.5) * 1e3
    out["connect_p99_ms"] = pct(connects, 0.99) * 1e3
    out["connect_max_ms"] = max(connects, default=float("nan")) * 1e3
    out["error_samples"] = run.error_samples
    return out
