"""Section ``logs``: the log pipeline: delay from an engine's print to a router's SSE client,
and the lines/s a worker ships into Redis from an engine printing ``--log-rate`` lines/s."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from llm_lab_router.redis_url import async_client

from ..client import Response, Target, now
from ..cluster import CHATTY, LOGS
from ..context import Bench
from ..report import Row
from ..stats import pct


async def run(bench: Bench) -> None:
    if not bench.cluster.routers:
        return
    o = bench.opts
    bench.say("log pipeline: delay from print to SSE client ...")
    delays, errors = await log_delay(bench, o.log_probes)
    bench.raw["log_delay_ms"] = delays
    bench.rows.append(Row("logs", "print -> SSE p50", {"router": pct(delays, 0.5)}, "ms", errors={"router": errors}))
    bench.rows.append(Row("logs", "print -> SSE p99", {"router": pct(delays, 0.99)}, "ms"))

    rds = async_client(bench.cluster.redis.url)  # type: ignore[union-attr]
    key = f"llm:logs:{CHATTY}"
    try:
        bench.say(f"log pipeline: throughput (an engine printing {o.log_rate:,} lines/s) ...")
        await bench.cluster.start_model(CHATTY)
        await asyncio.sleep(o.warmup + 0.5)
        len0, t0 = await rds.xlen(key), now()
        await asyncio.sleep(o.log_window)
        len1, t1 = await rds.xlen(key), now()
        # how far behind the printing the shipping is: the worker stamps a line when it reads it
        newest = await rds.xrevrange(key, count=1)
        lag = (time.time() - float(newest[0][1][b"ts"])) * 1e3 if newest else float("nan")
        await bench.cluster.stop_model(CHATTY)
        drained = await drain(rds, key)
    finally:
        await rds.aclose()
    pushed = (len1 - len0) / (t1 - t0)
    bench.raw["log_throughput"] = {"pushed_per_s": pushed, "window_s": t1 - t0, "xlen": [len0, len1],
                                   "ship_lag_ms": lag, "drained_after_stop": drained}
    bench.rows.append(Row("logs", "lines/s into Redis", {"router": pushed}, "line/s", "", ">= 50000",
                          pushed >= 50_000))
    # lines read but not yet shipped when the window closed: ~0 means the worker kept up with
    # the engine (so it can do more); a full buffer means this rate is the worker's ceiling
    bench.rows.append(Row("logs", "backlog at window end", {"router": float(drained)}, "lines",
                          "saturated: ceiling" if drained > pushed * 0.1 else "kept up"))


async def log_delay(bench: Bench, probes: int) -> tuple[list[float], int]:
    """The engine prints an access-log line right after it writes a response; the delay is
    from the response reaching us to that line arriving on the router's log SSE."""
    token = uuid.uuid4().hex[:8]
    seen: dict[int, float] = {}
    marker = f"/bench-probe-{token}-"

    def on_frame(frame: str, t: float) -> None:
        i = frame.find(marker)
        if i >= 0:
            j = i + len(marker)
            k = j
            while k < len(frame) and frame[k].isdigit():
                k += 1
            seen.setdefault(int(frame[j:k]), t)

    router = bench.cluster.routers[-1]  # router B: the log path never touches router A
    sse = await router.connect()
    sse_resp = Response(sse=True, on_frame=on_frame)
    sse_fut = sse.request(router.raw("GET", f"/api/models/{LOGS}/logs/stream?tail=0"), sse_resp)
    sse_fut.add_done_callback(lambda f: f.exception() if not f.cancelled() else None)
    await asyncio.sleep(0.3)  # subscribed
    engine = Target("engine", bench.cluster.urls[LOGS], LOGS)
    conn = await engine.connect()
    sent: dict[int, float] = {}
    errors = 0
    for i in range(probes):
        resp = await conn.request(engine.raw("GET", f"/bench-probe-{token}-{i}"), Response())
        sent[i] = resp.t_end
        await asyncio.sleep(0.02)
    deadline = now() + 3
    while len(seen) < probes and now() < deadline:
        await asyncio.sleep(0.02)
    conn.close()
    sse.close()
    if sse_resp.status != 200:
        errors += probes
    errors += sum(1 for i in sent if i not in seen)
    return [(seen[i] - sent[i]) * 1e3 for i in sent if i in seen], errors


async def drain(rds: Any, key: str, timeout: float = 15.0) -> int:
    """Wait until the worker has shipped what it had queued (the stream stops growing)."""
    start = last = await rds.xlen(key)
    deadline = now() + timeout
    while now() < deadline:
        await asyncio.sleep(0.3)
        n = await rds.xlen(key)
        if n == last:
            break
        last = n
    return last - start
