"""Section ``scaling``: non-streamed chat at c=64 through a router of 1, 2, 4 and 8 processes
(``serve --workers N``; as many of those as this machine has CPUs), against engine replicas
enough not to be the limit.

The engines: ``REPLICAS`` more workers (one per replica, as a lab has one per host), each
auto-starting the same model ``bench-scale`` (an unpaced mock engine). The routers: one
``serve --workers N`` per N, all started up front and measured in ABAB rounds, so every figure
comes from the same moments of the same machine. The "direct" column is the load spread over
the replicas without a router (one closed loop per replica, c=64 in all): the most this load
generator gets out of the engines. Router CPU is the whole process tree (supervisor and children)
per answered request.

On a machine with fewer cores than router processes + engines + load generator the figures are
bounded by the shared cores, not by the router: read the ratio to one process, not the rate.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

import psutil
from llm_lab_router.redis_server import free_port

from ..client import Target
from ..cluster import MOCK_ENGINE, list_models, wait_http
from ..context import Bench
from ..load import ab_rounds, closed_loop
from ..report import Row
from ..stats import median

MODEL = "bench-scale"
CONCURRENCY = 64


def cpus() -> int:
    return len(os.sched_getaffinity(0))


def process_counts() -> list[int]:
    return [n for n in (1, 2, 4, 8) if n == 1 or n <= cpus()]


def replicas() -> int:
    return max(2, min(8, cpus() // 2))


def tree_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and its living children (a supervisor and its router processes)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return float("nan")
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def worker_config(worker_id: str, port: int) -> str:
    argv = ["{python}", str(MOCK_ENGINE), "--port", "{port}", "--model", MODEL, "--max-tokens", "16", "--quiet"]
    return "\n".join(["[worker]", f'id = "{worker_id}"', "", "[[models]]", f"id = {json.dumps(MODEL)}",
                      f"port = {port}", f"command = {json.dumps(argv)}", "startup_timeout = 30", "stop_grace = 3",
                      'restart = "no"', "auto_start = true", ""])


async def start(bench: Bench) -> tuple[list[str], dict[int, tuple[Target, int]]]:
    """The replicas (their URLs) and a router per process count (target, supervisor pid)."""
    cluster, procs = bench.cluster, bench.cluster.procs
    assert cluster.redis is not None
    cli = [sys.executable, "-m", "llm_lab_router.cli"]
    for i in range(replicas()):
        wid = f"{cluster.worker_id}-scale{i}"
        cfg = cluster.work / f"scale{i}.toml"
        cfg.write_text(worker_config(wid, free_port()))
        procs.start(f"worker-scale{i}", [*cli, "worker", "--config", str(cfg), "--redis", cluster.redis.url,
                                         "--worker-id", wid], env={"LLM_ROUTER_STATE_DIR": str(cluster.work / f"state-scale{i}")})
    routers: dict[int, tuple[Target, int]] = {}
    for n in process_counts():
        port = free_port()
        proc = procs.start(f"router-x{n}", [*cli, "serve", "--redis", cluster.redis.url, "--port", str(port),
                                            "--workers", str(n)])
        routers[n] = (Target(f"x{n}", f"http://127.0.0.1:{port}", MODEL), proc.pid)
    for n, (target, pid) in routers.items():
        await wait_http(target, "/health", 30, procs)
        deadline = time.monotonic() + 30
        while n > 1 and len(psutil.Process(pid).children()) < n and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
    urls: list[str] = []
    deadline = time.monotonic() + 60
    while len(urls) < replicas():
        card = (await list_models(cluster.routers[0])).get(MODEL, {})
        urls = [i["url"] for i in card.get("instances", []) if i.get("state") == "running"]
        if time.monotonic() > deadline:
            raise RuntimeError(f"{MODEL}: {len(urls)} of {replicas()} replicas running after 60 s")
        procs.check_alive()
        await asyncio.sleep(0.1)
    await asyncio.sleep(2.5)  # every router process's own view: at most one resync interval behind
    return urls, routers


async def run(bench: Bench) -> None:
    o = bench.opts
    if not bench.cluster.routers:
        return
    bench.say(f"scaling: {replicas()} engine replicas, routers of {process_counts()} processes, c={CONCURRENCY} ...")
    urls, routers = await start(bench)
    direct = Target("direct", urls[0], MODEL)
    targets = [direct, *(t for t, _ in routers.values())]
    pids = {t.name: pid for t, pid in routers.values()}

    async def one(t: Target, prime: float = 0.0) -> dict:
        duration = prime or o.duration
        if t.name == "direct":  # the same load, spread over the replicas by hand
            per = [CONCURRENCY // len(urls) + (i < CONCURRENCY % len(urls)) for i in range(len(urls))]
            runs = await asyncio.gather(*(closed_loop(Target("direct", u, MODEL), t.chat(False, 16), c, duration,
                                                      o.warmup) for u, c in zip(urls, per)))
            parts = [r.summary() for r in runs]
            return {"n": sum(p["n"] for p in parts), "errors": sum(p["errors"] for p in parts),
                    "rps": sum(p["rps"] for p in parts), "p50_ms": median([p["p50_ms"] for p in parts])}
        cpu0 = tree_cpu(pids[t.name])
        run_ = await closed_loop(t, t.chat(False, 16), CONCURRENCY, duration, o.warmup)
        out = run_.summary()
        out["cpu_us"] = (tree_cpu(pids[t.name]) - cpu0) / max(1, run_.n) * 1e6
        return out

    runs = await ab_rounds(targets, o.rounds, one, o.prime)
    bench.raw["scaling"] = {"cpus": cpus(), "replicas": len(urls), "runs": runs}
    base = median([r["rps"] for r in runs["x1"]])
    direct_rps = median([r["rps"] for r in runs["direct"]])
    for n in routers:
        rs = runs[f"x{n}"]
        rps = median([r["rps"] for r in rs])
        cpu = median([r["cpu_us"] for r in rs])
        bench.rows.append(Row(f"scaling c={CONCURRENCY}", f"requests/s, {n} router process{'es' * (n > 1)}",
                              {"direct": direct_rps, "router": rps}, "req/s",
                              f"x{rps / base:.2f} of 1 process; {cpu:.0f} us CPU/req", "",
                              None, {"direct": sum(int(r["errors"]) for r in runs["direct"]),
                                     "router": sum(int(r["errors"]) for r in rs)}))
