"""Section ``quotas``: what a key's limits add to a request (router/limits/quotas.py): non-streamed
chat at c=1 through a third router that has a TOML keys file, with a key without limits and
a key with rpm, tpm and max_concurrent (each request: one ``EVALSHA`` before, one after the
answer), side by side in ABAB rounds, with the router's CPU time per request (a figure that
hardly moves on a busy machine, unlike latency); and a Redis ``PING`` at c=1 for scale."""

from __future__ import annotations

import asyncio
import sys
import time

from llm_lab_router.redis_server import free_port
from redis.asyncio import Redis

from ..client import Target
from ..cluster import FAST, list_models, wait_http
from ..context import Bench
from ..load import ab_rounds, closed_loop
from ..report import Row
from ..stats import median

FREE_KEY = "bench-free-0123456789abcdef"
LIMITED_KEY = "bench-limited-0123456789abcdef"
KEYS_TOML = f"""
[[keys]]
name = "free"
key = "{FREE_KEY}"

[[keys]]
name = "limited"
key = "{LIMITED_KEY}"
rpm = 100000000
tpm = 1000000000000
max_concurrent = 100000
"""


async def start_quota_router(bench: Bench, keys_toml: str = KEYS_TOML, name: str = "router-quotas") -> tuple[str, int]:
    """A router of its own with the keys file ``keys_toml``; its URL and pid, once it routes."""
    cluster = bench.cluster
    assert cluster.redis is not None
    keys_file = cluster.work / f"{name}-keys.toml"
    keys_file.write_text(keys_toml)
    port = free_port()
    proc = cluster.procs.start(name, [sys.executable, "-m", "llm_lab_router.cli", "serve", "--redis",
                                      cluster.redis.url, "--port", str(port), "--api-keys-file", str(keys_file)],
                               env={"LLM_ROUTER_READ_ACCESS": "public"})
    base = f"http://127.0.0.1:{port}"
    probe = Target(name, base, FAST)
    await wait_http(probe, "/health", 30, cluster.procs)
    deadline = time.monotonic() + 30
    while (await list_models(probe)).get(FAST, {}).get("status") != "running":
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} does not see the fast model running")
        await asyncio.sleep(0.05)
    return base, proc.pid


async def redis_ping_ms(url: str, n: int = 2000) -> float:
    client = Redis.from_url(url)
    try:
        await client.ping()
        times = []
        for _ in range(n):
            t = time.perf_counter()
            await client.ping()
            times.append(time.perf_counter() - t)
        return median(times) * 1000
    finally:
        await client.aclose()


async def run(bench: Bench) -> None:
    if not bench.cluster.routers:
        return
    o = bench.opts
    bench.say("quotas: c=1 chat with a key without limits vs a key with limits ...")
    base, pid = await start_quota_router(bench)
    targets = [Target("direct", bench.cluster.urls[FAST], FAST),
               Target("free", base, FAST, {"Authorization": f"Bearer {FREE_KEY}"}),
               Target("limited", base, FAST, {"Authorization": f"Bearer {LIMITED_KEY}"})]

    async def one(t: Target, prime: float = 0.0) -> dict:
        cpu_pid = 0 if t.name == "direct" else pid
        return (await closed_loop(t, t.chat(False, 16), 1, prime or o.duration, o.warmup, cpu_pid=cpu_pid)).summary()

    runs = await ab_rounds(targets, o.rounds, one, o.prime)
    bench.raw["quotas_c1"] = runs
    assert bench.cluster.redis is not None
    ping = await redis_ping_ms(bench.cluster.redis.url)
    bench.raw["quotas_redis_ping_ms"] = ping
    errors = {name: sum(int(r["errors"]) for r in rs) for name, rs in runs.items()}
    for key in ("p50_ms", "p99_ms"):
        med = {name: median([r[key] for r in rs]) for name, rs in runs.items()}
        delta = median([lim[key] - free[key] for free, lim in zip(runs["free"], runs["limited"])])
        label = key.split("_")[0]
        bench.rows.append(Row("quotas c=1", f"latency {label}, key without limits", {"direct": med["direct"],
                              "router": med["free"]}, "ms", errors={"direct": errors["direct"],
                                                                    "router": errors["free"]}))
        bench.rows.append(Row("quotas c=1", f"latency {label}, key with rpm+tpm+concurrency", {
            "direct": med["direct"], "router": med["limited"]}, "ms", f"{delta:+.3f} ms vs no limits",
            "+~1 Redis round trip" if key == "p50_ms" else "", errors={"direct": errors["direct"],
                                                                       "router": errors["limited"]}))
    cpu = {name: median([r.get("cpu_us", float("nan")) for r in runs[name]]) for name in ("free", "limited")}
    cpu_delta = median([lim.get("cpu_us", float("nan")) - free.get("cpu_us", float("nan"))
                        for free, lim in zip(runs["free"], runs["limited"])])
    bench.rows.append(Row("quotas c=1", "router CPU/request, key without limits", {"router": cpu["free"]}, "us"))
    bench.rows.append(Row("quotas c=1", "router CPU/request, key with limits", {"router": cpu["limited"]}, "us",
                          f"{cpu_delta:+.0f} us vs no limits"))
    bench.rows.append(Row("quotas c=1", "Redis PING round trip p50 (for scale)", {"router": ping}, "ms"))
