"""Section ``scheduling``: swap-aware scheduling vs plain LRU eviction, side by side.

Two small clusters on the bench's Redis, each under its own key prefix: one worker whose single
stand-in GPU (the fake NVML of tests/fake_nvml.py) holds one of three models at a time (each
declares 12,000 of 20,000 MiB), mock engines whose start takes ``sched_delay`` seconds, and two
routers, ``LLM_ROUTER_SCHEDULER=swap`` in one cluster and ``lru`` in the other; the model configs
(``min_residency``, ``max_wait``) are the same in both, the lru router ignores them. Both get
the same seeded workload at the same time: ``sched_clients`` clients, each running agent-like
sessions (a few requests to one model, one after another, with a little "tool time" between
them; mostly its own model, sometimes another), then a pause (``workload``);
a client that gets a 429, a 5xx or a connection error retries after 0.5 s (as the OpenAI SDKs
do), and a request's latency runs from its first attempt to its answer.

Figures: swaps (model loads after the first, from the workers' log streams), and per 100
requests served (the clients wait for their answers, so a policy that serves fewer requests in
the same time also has fewer chances to swap: the target is on this ratio), requests served,
mean and p99 latency, the longest latency against the starvation bound (``max_wait``, then at
most two swaps of ``sched_delay`` + 1 s: one for a model that starved first, then its own), and
503s seen by clients. ``--json`` saves, per policy, every request's (model, start s into the
run, latency s) as ``samples`` and the model loads as ``loads`` (unix time, model; ``t0``: the
run's start), to see where a tail comes from.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import sys
import time
from typing import Callable

from llm_lab_router.lifeline import stop_group
from llm_lab_router.protocol import Keys, log_entry
from llm_lab_router.redis_server import free_port
from llm_lab_router.redis_url import async_client

from ..client import Response, Target
from ..cluster import MOCK_ENGINE, list_models
from ..context import Bench
from ..report import Row
from ..stats import pct

MODELS = ("sched-a", "sched-b", "sched-c")
GPU_MIB, MODEL_MIB = 20000, 12000  # one model at a time
POLICIES = ("lru", "swap")
ROUTERS = 2  # per cluster: the clients are spread over them, as in a lab
RETRY_DELAY = 0.5  # s a client waits after a 503/429
OWN_SHARE = 0.7  # of a client's sessions go to its own model
SESSION = 5  # requests per session, one after another
PAUSE = 6.0  # mean pause between sessions, in think times
ARRIVAL_WEIGHTS = (0.5, 0.3, 0.2)  # arrivals: the share of sessions of each model


def config(name: str, bench: Bench) -> str:
    o = bench.opts
    low = free_port()
    lines = ["[worker]", f'id = "{worker_id(name, bench)}"', "devices_interval = 0.5",
             f"port_range = [{low}, {low + 30}]", ""]
    for model in MODELS:
        argv = ["{python}", str(MOCK_ENGINE), "--port", "{port}", "--model", model, "--quiet",
                "--startup-delay", str(o.sched_delay), "--tokens-per-second", "50", "--max-tokens", "8"]
        lines += ["[[models]]", f"id = {json.dumps(model)}", f"command = {json.dumps(argv)}", 'devices = ["cuda"]',
                  f"vram_mb = {MODEL_MIB}", f"min_residency = {o.sched_residency}", f"max_wait = {o.sched_max_wait}",
                  f"idle_release = {o.sched_idle_release}",
                  "startup_timeout = 60", "stop_grace = 3", ""]
    return "\n".join(lines)


def agents(bench: Bench) -> list[list[tuple[str, float]]]:
    """Per client, its requests: (model, think time before it), the same for both policies.

    Agent-like sessions: a client picks a model (its own mostly), sends ``SESSION`` requests one
    after another with ``sched_think`` s of "tool time" between them, then pauses (exponential,
    mean ``PAUSE`` x think) before the next session. The gaps inside a session leave the model
    idle for a moment: exactly when plain LRU evicts it for another client's model."""
    o = bench.opts
    rng = random.Random(17)
    plans = []
    for c in range(o.sched_clients):
        own = MODELS[c % len(MODELS)]
        plan: list[tuple[str, float]] = []
        while len(plan) < 10_000:
            model = own if rng.random() < OWN_SHARE else rng.choice(MODELS)
            plan.append((model, rng.expovariate(1.0 / (PAUSE * o.sched_think))))
            plan += [(model, o.sched_think)] * (SESSION - 1)
        plans.append(plan)
    return plans


def arrivals(bench: Bench) -> list[list[tuple[str, float]]]:
    """Sessions that arrive by themselves (open loop), the same for both policies: a lab's users
    start their tasks when they want to, not when the last one's answer came, so a policy that
    answers slower does not get less work. They arrive at random (exponential gaps, mean
    ``sched_gap`` s) over the run, each on a model drawn with ``ARRIVAL_WEIGHTS`` (a popular
    model, a second one, a rare third), and send ``SESSION`` requests one after another with
    ``sched_think`` s between them. A session is a plan like a client's in ``agents``: its first
    "think time" is its arrival."""
    o = bench.opts
    rng = random.Random(18)
    plans, at = [], 0.0
    while (at := at + rng.expovariate(1.0 / o.sched_gap)) < o.sched_arrivals_duration:
        model = rng.choices(MODELS, ARRIVAL_WEIGHTS)[0]
        plans.append([(model, at)] + [(model, o.sched_think)] * (SESSION - 1))
    return plans


WORKLOADS: dict[str, Callable[[Bench], list[list[tuple[str, float]]]]] = {"agents": agents, "arrivals": arrivals}


async def start(bench: Bench, policy: str, workload: str) -> tuple[list[Target], list, str]:
    """One cluster: its worker and ``ROUTERS`` routers, under the prefix ``llm-sched-{name}:``
    (``name``: the policy and the workload, a fresh cluster for each)."""
    cl = bench.cluster
    name = f"{policy}-{workload}"
    prefix = f"llm-sched-{name}:"
    cfg = cl.work / f"sched-{name}.toml"
    cfg.write_text(config(name, bench))
    gpus = json.dumps([{"name": "NVIDIA H100", "memory_total": GPU_MIB, "memory_used": 0}])
    cli = [sys.executable, "-m", "llm_lab_router.cli"]
    worker = cl.procs.start(f"sched-worker-{name}", [*cli, "worker", "--config", str(cfg), "--redis", cl.redis.url,
                                                       "--prefix", prefix],
                            env={"LLM_ROUTER_STATE_DIR": str(cl.work / f"state-{name}"),
                                 "LLM_ROUTER_NVML_MODULE": "tests.fake_nvml", "LLM_ROUTER_FAKE_GPUS": gpus})
    routers, targets = [], []
    for n in range(ROUTERS):
        port = free_port()
        routers.append(cl.procs.start(f"sched-router-{name}-{n}", [
            *cli, "serve", "--redis", cl.redis.url, "--prefix", prefix, "--port", str(port)],
            env={"LLM_ROUTER_SCHEDULER": policy, "LLM_ROUTER_ACCESS_LOG": "false"}))
        targets.append(Target(f"router-{name}-{n}", f"http://127.0.0.1:{port}", MODELS[0]))
    deadline = time.monotonic() + 30
    for target in targets:
        while True:  # the router has the catalog and the stand-in GPU
            try:
                models = await list_models(target)
                devices = await target.call("GET", "/api/devices/info", timeout=2)
                if all(m in models for m in MODELS) and devices.status == 200:
                    break
            except (OSError, asyncio.TimeoutError):
                pass
            cl.procs.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"scheduling cluster {name} did not come up\n"
                                   + cl.procs.tail(f"sched-worker-{name}"))
            await asyncio.sleep(0.1)
    return targets, [*routers, worker], prefix


async def drive(targets: list[Target], plans: list[list[tuple[str, float]]], duration: float) -> dict:
    """Run the clients for ``duration`` s, client i on router i % ROUTERS (requests begun by
    then are finished)."""
    latencies: list[float] = []
    samples: list[tuple[str, float, float]] = []  # (model, began s into the run, latency s)
    stats = {"retries": 0, "errors": 0}
    t0 = time.monotonic()
    end = t0 + duration

    async def client(plan: list[tuple[str, float]], target: Target) -> None:
        for model, think in plan:
            await asyncio.sleep(think)
            if time.monotonic() >= end:
                return
            began = time.monotonic()
            while True:
                try:
                    conn = await target.connect()
                    try:
                        resp = await conn.request(target.chat(False, 8, model), Response())
                    finally:
                        conn.close()
                except (OSError, asyncio.TimeoutError):
                    resp = None
                if resp is not None and resp.status == 200:
                    latencies.append(time.monotonic() - began)
                    samples.append((model, round(began - t0, 3), round(latencies[-1], 3)))
                    break
                if resp is not None and resp.status < 500 and resp.status != 429:
                    stats["errors"] += 1
                    break
                stats["retries"] += 1  # as the OpenAI SDKs do: 429, 5xx, connection errors
                await asyncio.sleep(RETRY_DELAY)

    await asyncio.gather(*(client(p, targets[i % len(targets)]) for i, p in enumerate(plans)))
    return {"latencies": latencies, "samples": samples, **stats}


async def loads(redis_url: str, prefix: str) -> list[tuple[float, str]]:
    """Model loads in this cluster: the worker's ``running on`` events in the log streams,
    (unix time, model) in time order."""
    rds = async_client(redis_url)
    try:
        got = []
        for model in MODELS:
            for _, fields in await rds.xrange(Keys(prefix).logs(model)):
                if (e := log_entry(fields)).message.startswith("running on"):
                    got.append((e.timestamp, model))
        return sorted(got)
    finally:
        await rds.aclose()


async def cold_start(redis_url: str, prefix: str, wid: str) -> float:
    """The longest cold start the worker measured (its catalog's ``cold_start_s``)."""
    rds = async_client(redis_url)
    try:
        entries = (await rds.hgetall(Keys(prefix).catalog(wid))).values()
        return max((float(json.loads(e).get("cold_start_s") or 0) for e in entries), default=0.0)
    finally:
        await rds.aclose()


def worker_id(name: str, bench: Bench) -> str:
    return f"sched-{name}-{bench.cluster.procs.token[:6]}"


async def run(bench: Bench) -> None:
    cl = bench.cluster
    if cl.redis is None:
        return
    o = bench.opts
    for workload in [w for w in WORKLOADS if w in o.sched_workloads.split(",")]:
        plans = WORKLOADS[workload](bench)
        duration = o.sched_duration if workload == "agents" else o.sched_arrivals_duration
        who = (f"{o.sched_clients} agents" if workload == "agents"
               else f"{len(plans)} sessions arriving every {o.sched_gap:g}s on average")
        bench.say(f"scheduling, {workload}: {who} on 3 models that do not fit together, {duration:g}s, "
                  f"cold start {o.sched_delay:g}s, min_residency {o.sched_residency:g}s, "
                  f"max_wait {o.sched_max_wait:g}s; swap scheduler vs LRU side by side ...")
        report(bench, workload, await compare(bench, workload, plans, duration))


async def compare(bench: Bench, workload: str, plans: list[list[tuple[str, float]]],
                  duration: float) -> dict[str, dict]:
    """The same ``plans`` against a fresh cluster of each policy at the same time."""
    cl = bench.cluster
    started = []
    try:
        for policy in POLICIES:
            started.append(await start(bench, policy, workload))
        t0 = time.time()
        results = dict(zip(POLICIES, await asyncio.gather(
            *(drive(targets, plans, duration) for targets, _, _ in started))))
        for policy, (_, _, prefix) in zip(POLICIES, started):
            results[policy]["loads"] = await loads(cl.redis.url, prefix)
            results[policy]["swaps"] = max(0, len(results[policy]["loads"]) - 1)
            results[policy]["t0"] = t0
            results[policy]["cold_start_s"] = await cold_start(cl.redis.url, prefix,
                                                               worker_id(f"{policy}-{workload}", bench))
    finally:
        mine = [proc for _, procs, _ in started for proc in procs]
        for proc in mine:  # SIGINT: the worker stops its engines before it exits
            await asyncio.to_thread(stop_group, proc, signal.SIGINT, 8.0, 2.0)
        cl.procs.procs = [(name, p) for name, p in cl.procs.procs if p not in mine]  # stopped on purpose
    return results


def report(bench: Bench, workload: str, results: dict[str, dict]) -> None:
    """The rows of one workload. Its target on swaps: per 100 requests served for ``agents``
    (closed loop: a policy that answers slower is sent less, so it also has fewer chances to
    swap), the raw count for ``arrivals`` (open loop: both policies get the same sessions)."""
    o = bench.opts
    section = "scheduling" if workload == "agents" else f"scheduling {workload}"
    lat = {p: r["latencies"] for p, r in results.items()}
    mean = {p: (sum(v) / len(v) * 1000 if v else float("nan")) for p, v in lat.items()}
    p50 = {p: pct(v, 0.5) * 1000 if v else float("nan") for p, v in lat.items()}
    p99 = {p: pct(v, 0.99) * 1000 if v else float("nan") for p, v in lat.items()}
    worst = {p: max(v) * 1000 if v else float("nan") for p, v in lat.items()}
    swaps = {p: float(r["swaps"]) for p, r in results.items()}
    errors = {p: int(r["errors"]) for p, r in results.items()}
    fewer = swaps["lru"] / swaps["swap"] if swaps["swap"] else float("inf")
    # max_wait, then the swap of a model that starved first (if any), then its own: two cold
    # starts as the worker measured them (this machine may be slower than --startup-delay), 1 s
    # of stop and poll each
    cold = results["swap"].get("cold_start_s") or o.sched_delay
    bound = (o.sched_max_wait + 2 * (cold + 1.0)) * 1000
    per_100 = {p: 100 * swaps[p] / len(lat[p]) if lat[p] else float("nan") for p in POLICIES}
    fewer_per = per_100["lru"] / per_100["swap"] if per_100["swap"] else float("inf")
    raw_target = workload != "agents"
    rows = [
        Row(section, "swaps", swaps, "", f"x{fewer:.1f} fewer", ">= 3x fewer" if raw_target else "",
            fewer >= 3 if raw_target else None, errors),
        Row(section, "swaps per 100 requests served", per_100, "", f"x{fewer_per:.1f} fewer",
            "" if raw_target else ">= 3x fewer", None if raw_target else fewer_per >= 3, errors),
        Row(section, "requests served", {p: float(len(v)) for p, v in lat.items()}, "", "", "", None, errors),
        Row(section, "latency mean", mean, "ms", f"x{mean['lru'] / mean['swap']:.2f}" if mean["swap"] else "",
            "", None, errors),
        Row(section, "latency p50", p50, "ms", f"x{p50['lru'] / p50['swap']:.2f}" if p50["swap"] else "",
            "", None, errors),
        Row(section, "latency p99", p99, "ms", f"x{p99['lru'] / p99['swap']:.2f}" if p99["swap"] else "",
            "lower with swap", p99["swap"] < p99["lru"], errors),
        Row(section, "latency max (swap: <= max_wait bound)", worst, "ms", f"bound {bound / 1000:.0f} s",
            "no starvation", worst["swap"] <= bound, errors),
        Row(section, "retries (429/5xx) by clients", {p: float(r["retries"]) for p, r in results.items()}, "", "", "",
            None, errors),
    ]
    bench.rows.extend(rows)
    bench.raw[section] = {p: {k: v for k, v in r.items() if k != "latencies"} | {"latencies": r["latencies"]}
                          for p, r in results.items()}
