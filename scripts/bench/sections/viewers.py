"""Bench section ``viewers``: thousands of log viewers on one router, and its control plane.

    ./dev.sh bench --only viewers                 # 5,000 viewers (--viewers N to change)

Router A gets ``--viewers`` concurrent ``GET /api/models/bench-logs/logs/stream`` (default
tail), opened in waves of ``WAVE``; each counts as connected once its ``historical_complete``
arrives. Measured before they connect (idle) and while they are all connected, on the same
router: ``/health`` and ``POST /api/models/{fast}/start`` (a running model: the HTTP and event
loop path) p50/p99 over sequential requests on one keep-alive connection, a real start of a
stopped model through the worker (``bench-prop``: XADD, the worker's spawn, the reply's BLPOP),
the router's RSS and its Redis connections (psutil). Then ``PROBES`` log lines are written
into the stream at ``PROBE_HZ``: the delay from ``XADD`` to each viewer's receipt is the
fan-out latency (every viewer must receive every line: a missing one is an error), and the
router's CPU time over those deliveries, per delivery, what the fan-out costs.

Descriptors: each viewer is one socket in this process and one in the router. The bench
lifts this process's soft ``RLIMIT_NOFILE`` to the hard limit and the routers inherit it (the
router also lifts its own, ``router/http/app.py``); with a hard limit below ``viewers`` + 200 the
section runs fewer viewers and says so in the table.
"""

from __future__ import annotations

import asyncio
import resource
import time
from typing import Any

import psutil
from llm_lab_router.protocol import Keys, LogEntry, log_fields
from llm_lab_router.redis_url import async_client

from ..client import Response, Target, now
from ..cluster import FAST, LOGS, PROP
from ..context import Bench
from ..procs import cpu_seconds, rss_mb
from ..report import Row
from ..stats import pct

WAVE = 250  # viewers connecting at once
LOG_PAGE_CONNECTIONS = 8  # the router's log_connections default (router/core/options.py)
PROBE_HZ = 1.0  # log lines/s written to the viewers' stream, after the control plane is measured
PROBES = 5
WINDOW = 15.0  # s: the most one control-plane figure is sampled for
MARK = "bench-viewer-probe-"


class Viewers:
    """Open log streams and what they received: connect times, probe arrivals, errors."""

    def __init__(self, router: Target, path: str) -> None:
        self.router = router
        self.raw = router.raw("GET", path)
        self.conns: list[Any] = []
        self.connect_s: list[float] = []
        self.sent: dict[int, float] = {}  # probe number -> when it was written
        self.delays: list[float] = []
        self.received = 0
        self.errors = 0
        self.error_samples: list[str] = []

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(what)

    async def open_one(self) -> None:
        ready = asyncio.get_running_loop().create_future()

        def on_frame(frame: str, t: float) -> None:
            if not ready.done():
                if "historical_complete" in frame:
                    ready.set_result(t)
                return
            i = frame.find(MARK)
            if i >= 0:
                probe = int(frame[i + len(MARK):i + len(MARK) + 6])
                self.delays.append(t - self.sent[probe])
                self.received += 1

        started = now()
        try:
            conn = await self.router.connect()
        except OSError as exc:
            self.error(f"connect: {exc}")
            return
        self.conns.append(conn)
        resp = Response(sse=True, on_frame=on_frame)
        done = conn.request(self.raw, resp)

        def ended(f: asyncio.Future) -> None:
            exc = None if f.cancelled() else f.exception()  # always retrieved: closing fails them all
            if not ready.done():
                ready.set_exception(exc or ConnectionError(f"stream ended, HTTP {resp.status}"))

        done.add_done_callback(ended)
        try:
            self.connect_s.append(await asyncio.wait_for(ready, 60) - started)
        except Exception as exc:
            self.error(f"{type(exc).__name__}: {exc} (HTTP {resp.status})")

    async def open(self, n: int) -> float:
        t0 = now()
        for start in range(0, n, WAVE):
            await asyncio.gather(*(self.open_one() for _ in range(min(WAVE, n - start))))
        return now() - t0

    def close(self) -> None:
        for conn in self.conns:
            conn.close()


async def latencies(router: Target, method: str, path: str, samples: int) -> list[float]:
    """Up to ``samples`` sequential requests on one keep-alive connection, for at most
    ``WINDOW`` s; seconds each (non-200: NaN)."""
    conn = await router.connect()
    raw = router.raw(method, path)
    out: list[float] = []
    end = now() + WINDOW
    try:
        while len(out) < samples and now() < end:
            t = now()
            resp = await asyncio.wait_for(conn.request(raw, Response()), 60)
            out.append(now() - t if resp.status == 200 else float("nan"))
            if conn.closed:
                conn = await router.connect()
    finally:
        conn.close()
    return out


async def real_starts(bench: Bench, model: str, cycles: int) -> list[float]:
    """Start (through the worker, waited for) and stop ``model`` ``cycles`` times; seconds per start."""
    out = []
    router = bench.cluster.routers[0]
    for _ in range(cycles):
        t = now()
        resp = await router.call("POST", f"/api/models/{model}/start", timeout=60)
        out.append(now() - t if resp.status == 200 else float("nan"))
        await router.call("POST", f"/api/models/{model}/stop", timeout=60)
    return out


def redis_connections(pid: int, redis_port: int) -> int:
    try:
        return sum(1 for c in psutil.Process(pid).net_connections("tcp") if c.raddr and c.raddr.port == redis_port)
    except psutil.Error:
        return -1


async def control_plane(bench: Bench) -> dict[str, list[float]]:
    o, router = bench.opts, bench.cluster.routers[0]
    return {
        "health": await latencies(router, "GET", "/health", o.viewer_samples),
        "start": await latencies(router, "POST", f"/api/models/{FAST}/start", o.viewer_samples),
        "real_start": await real_starts(bench, PROP, o.viewer_starts),
    }


async def write_probes(redis: Any, key: str, viewers: Viewers, count: int) -> None:
    """``count`` log lines into the viewers' stream, ``PROBE_HZ`` a second (as a worker would)."""
    for k in range(count):
        viewers.sent[k] = now()
        entry = LogEntry(timestamp=time.time(), message=f"{MARK}{k:06d}", host="bench")
        await redis.xadd(key, log_fields(entry))
        await asyncio.sleep(1 / PROBE_HZ)


def fd_room(wanted: int) -> int:
    """How many viewers this process's descriptor limit allows (the bench has lifted it)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return max(0, min(wanted, soft - 200))


async def run(bench: Bench) -> None:
    """The section: adds its rows to ``bench.rows`` and its raw figures to ``bench.raw``."""
    cluster = bench.cluster
    if not cluster.routers:
        return

    wanted = bench.opts.viewers
    n = fd_room(wanted)
    sec = f"{wanted:,} viewers"
    pid, redis_port = cluster.router_pid, cluster.redis.port
    model = LOGS
    bench.say(f"{n:,} log viewers on router A: control plane idle ...")
    idle = await control_plane(bench)
    rss_idle, conns_idle = rss_mb(pid), redis_connections(pid, redis_port)

    bench.say(f"{n:,} log viewers on router A: connecting ...")
    viewers = Viewers(cluster.routers[0], f"/api/models/{model}/logs/stream")
    redis = async_client(cluster.redis.url)
    try:
        ramp_s = await viewers.open(n)
        connected = len(viewers.connect_s)
        bench.say(f"{connected:,} viewers connected in {ramp_s:.1f}s: control plane and fan-out ...")
        rss_busy, conns_busy = rss_mb(pid), redis_connections(pid, redis_port)
        busy = await control_plane(bench)
        bench.say(f"fan-out: {PROBES} log lines, {PROBE_HZ:g}/s, to {connected:,} viewers ...")
        cpu0 = cpu_seconds(pid)
        await write_probes(redis, Keys().logs(model), viewers, PROBES)
        deadline = now() + 30
        while viewers.received < connected * len(viewers.sent) and now() < deadline:
            await asyncio.sleep(0.05)
        cpu_us = (cpu_seconds(pid) - cpu0) / max(viewers.received, 1) * 1e6
        rss_peak = max(rss_busy, rss_mb(pid))
    finally:
        viewers.close()
        await redis.aclose()
    missing = connected * len(viewers.sent) - viewers.received
    errors = viewers.errors + max(0, missing) + sum(1 for runs in (idle, busy) for v in runs.values()
                                                    for x in v if x != x)
    bench.raw["viewers"] = {
        "wanted": wanted, "connected": connected, "ramp_s": ramp_s, "probes": len(viewers.sent),
        "deliveries": viewers.received, "missing": missing, "error_samples": viewers.error_samples,
        "idle": idle, "busy": busy, "rss_mb": {"idle": rss_idle, "connected": rss_busy, "peak": rss_peak},
        "redis_connections": {"idle": conns_idle, "connected": conns_busy}, "router_cpu_us_per_delivery": cpu_us,
    }
    def ms(values: list[float], q: float) -> float:
        return pct([v for v in values if v == v], q) * 1e3

    def pair(metric: str, key: str, q: float, target: str = "", limit: float = 0.0) -> None:
        before, during = ms(idle[key], q), ms(busy[key], q)
        bench.rows.append(Row(sec, f"{metric}, idle", {"router": before}, "ms"))
        bench.rows.append(Row(sec, f"{metric}, {connected:,} viewers", {"router": during}, "ms",
                              f"{during - before:+.2f} ms", target, (during < limit) if limit else None))

    bench.rows.append(Row(sec, "viewers connected", {"router": float(connected)}, "", f"in {ramp_s:.1f} s",
                          f"{wanted:,}", connected == wanted, {"router": errors}))
    bench.rows.append(Row(sec, "connect -> history p99", {"router": ms(viewers.connect_s, 0.99)}, "ms"))
    pair("/health p50", "health", 0.5)
    pair("/health p99", "health", 0.99, "< 50 ms", 50.0)
    pair("start (running) p99", "start", 0.99, "< 50 ms", 50.0)
    pair("start via worker p50", "real_start", 0.5)
    bench.rows.append(Row(sec, "log line -> viewer p50", {"router": ms(viewers.delays, 0.5)}, "ms",
                          f"{viewers.received:,} deliveries"))
    bench.rows.append(Row(sec, "log line -> viewer p99", {"router": ms(viewers.delays, 0.99)}, "ms"))
    bench.rows.append(Row(sec, "router CPU per delivery", {"router": cpu_us}, "us",
                          f"{PROBES} lines to every viewer"))
    bench.rows.append(Row(sec, "router RSS idle", {"router": rss_idle}, "MB"))
    per_viewer = (rss_peak - rss_idle) * 1024 / max(connected, 1)
    bench.rows.append(Row(sec, f"router RSS, {connected:,} viewers", {"router": rss_peak}, "MB",
                          f"{rss_peak - rss_idle:+.1f} MB ({per_viewer:.0f} KB each)"))
    # a bound that does not grow with viewers: one live reader plus the history-page pool
    most = conns_idle + 1 + LOG_PAGE_CONNECTIONS
    bench.rows.append(Row(sec, "router Redis connections", {"router": float(conns_busy)}, "",
                          f"idle {conns_idle}", f"<= {most}", conns_busy <= most))
