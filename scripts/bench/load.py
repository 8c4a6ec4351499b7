"""The load: closed loops of requests on pre-opened connections, and ABAB rounds that
alternate the targets so that every router figure has a direct twin from the same moments."""

from __future__ import annotations

import asyncio
from typing import Any, Callable

from .client import HttpConn, Response, Target, now
from .procs import cpu_seconds
from .stats import Run


async def closed_loop(target: Target, raw: bytes, concurrency: int, duration: float, warmup: float,
                      sse: bool = False, cpu_pid: int = 0) -> Run:
    """``concurrency`` connections, each sending the next request as soon as the last is
    answered; only requests that start after the warm-up and end within the window count.

    With ``cpu_pid``, also the CPU time that process spent per answered request (warm-up
    included): a figure that, unlike wall-clock throughput, hardly moves on a busy machine."""
    run = Run(target.name)
    conns = await asyncio.gather(*(target.connect() for _ in range(concurrency)))
    answered = [0]
    cpu0 = cpu_seconds(cpu_pid)
    t0 = now()
    measure_from, end = t0 + warmup, t0 + warmup + duration

    async def client(conn: HttpConn) -> None:
        while True:
            start = now()
            if start >= end:
                break
            resp = Response(sse=sse)
            try:
                await conn.request(raw, resp)
            except Exception as exc:
                run.error(f"{type(exc).__name__}: {exc}")
                conn.close()
                if not (conn := await reconnect()):
                    return
                continue
            answered[0] += 1
            if sse:
                run.frames += sum(1 for t in resp.times if measure_from <= t <= end)
            if resp.status != 200 or (sse and not resp.done_seen):
                run.error(f"HTTP {resp.status}" + (" (stream without [DONE])" if resp.status == 200 else ""))
            elif start >= measure_from and resp.t_end <= end:
                run.n += 1
                run.latencies.append(resp.t_end - start)
                if sse:
                    run.ttfts.append(resp.ttft)
                    tt = resp.token_times
                    run.gaps.extend(b - a for a, b in zip(tt, tt[1:]))
            if conn.closed and not (conn := await reconnect()):
                return
        conn.close()

    async def reconnect() -> HttpConn | None:
        try:
            return await target.connect()
        except OSError as exc:
            run.error(f"connect: {exc}")
            await asyncio.sleep(0.1)
            return None

    tasks = [asyncio.ensure_future(client(c)) for c in conns]
    done, pending = await asyncio.wait(tasks, timeout=warmup + duration + 60)
    for t in pending:  # a hung request: an error, not a hung benchmark
        t.cancel()
        run.error("timeout (no answer within 60 s)")
    run.seconds = duration
    if cpu_pid and answered[0]:
        run.cpu_us = (cpu_seconds(cpu_pid) - cpu0) / answered[0] * 1e6
    return run


async def ab_rounds(targets: list[Target], rounds: int, make: Callable[..., Any],
                    prime: float = 0.0) -> dict[str, list[dict]]:
    """Run ``make(target)`` for every target in each round; the order flips every round.

    First, unless ``prime`` is 0, one unmeasured ``make(target, prime)`` per target: the
    router's upstream pool fills and both sides settle (without it, the first c=256 round
    through the router ran at a quarter of the rate of the later ones)."""
    out: dict[str, list[dict]] = {t.name: [] for t in targets}
    primed: dict[str, int] = {}
    if prime:
        for t in targets:
            primed[t.name] = int((await make(t, prime))["errors"])
    for r in range(rounds):
        order = targets[r % len(targets):] + targets[:r % len(targets)] if r % 2 == 0 else list(reversed(targets))
        for t in order:
            out[t.name].append(await make(t))
    for name, errors in primed.items():  # errors while priming are errors too
        out[name][0]["errors"] += errors
        out[name][0]["priming_errors"] = errors
    return out
