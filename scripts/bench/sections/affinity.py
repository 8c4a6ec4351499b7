"""Section ``affinity``: prefix-affinity routing against least-outstanding, side by side.

Two models with the same engines, one ``routing = "affinity"``, the other
``routing = "least-outstanding"``, each with 2 (and 4) replicas on workers of their own (one
instance per worker). The engines are mock engines with the prefix-cache model
(``--prefix-cache``: TTFT = base + a cost per prompt token not in the engine's cache, one
prompt computed at a time). The load is a multi-turn chat: N conversations at once, each of
several turns; every prompt starts with one long shared system prompt, each conversation's
first message carries its own document, later turns add a short question and the previous
answer. Rounds alternate the two models (ABAB), each round with new conversations.

Reported per replica count, least-outstanding in the ``direct`` column and affinity in the
``router`` column: TTFT p50/p99 of every request, requests/s (all turns of all conversations
over the round's wall time), the share of prompt tokens the engines found cached, max/mean
outstanding requests per instance (engines' ``/debug/stats`` sampled every 25 ms; Σ max / Σ mean
over the samples, and the share of samples within ``ceil(c × mean)``: sampled, so also after
requests left other instances, where the bound, which holds when a request is placed, no
longer applies) and max/mean requests served per instance over the round (the load target).
Plus the router's own cost of the routing decision (in-process CPU µs per request: key + ring
choice vs least outstanding), which is what affinity adds to the hot path.

With a ``llama-server`` (``$LLM_ROUTER_LLAMA_SERVER`` or on ``PATH``) and the tiny GGUF model
(``scripts/make_tiny_gguf.py``, needs the ``real`` extra), the same workload runs against two
real llama-servers as well (``affinity llama.cpp x2``), each conversation opening with a shared
prefix of a few thousand tokens. Whether affinity can shorten a real engine's TTFT depends on
what prefilling that prefix costs it, so a probe measures it first (``PrefixCost``: one prompt
computed, then the same prompt again, cached) and the TTFT row's target follows from it
(``ttft_target``): a prefix whose prefill is too small to measure (the tiny model computes
thousands of tokens in milliseconds) makes the row informational, never an expected FAIL.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import timeit
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import msgspec
from llm_lab_router.lifeline import stop_group
from llm_lab_router.redis_server import free_port

from ..client import Response, Target, now
from ..cluster import MOCK_ENGINE, list_models
from ..context import Bench
from ..procs import ROOT
from ..report import Row
from ..stats import median, pct

LOAD_FACTOR = 1.25  # the router's default (LLM_ROUTER_AFFINITY_LOAD_FACTOR)
ANSWER = "This is a deterministic reply from the mock engine."  # sent back as the assistant turn
SYSTEM = "You are a careful assistant for a research lab. Follow the lab's rules. "


@dataclass
class Workload:
    conversations_per_replica: int
    turns: int
    system_words: int
    document_words: int
    question_words: int
    answer_tokens: int
    engine_args: list[str] = field(default_factory=list)


def mock_workload(smoke: bool) -> Workload:
    if smoke:
        return Workload(1, 2, 50, 50, 5, 2, ["--prefix-cache", "1024", "--ttft-per-token", "0.00005"])
    # 200 µs a prompt token (5,000 tokens/s of prefill: a 1,000-token prompt takes 200 ms), 5 ms
    # base, 100 tokens/s generation
    return Workload(4, 6, 300, 800, 15, 8, ["--prefix-cache", "4096", "--ttft-base", "0.005",
                                            "--ttft-per-token", "0.0002", "--tokens-per-second", "100"])


def model_id(replicas: int, routing: str, engine: str = "mock") -> str:
    return f"aff-{engine}{replicas}-{'aff' if routing == 'affinity' else 'least'}"


ROUTINGS = ("least-outstanding", "affinity")  # the direct column, the router column
MOCK_TTFT_TARGET = 1 / 3  # the mock engines' cost model: prefill is nearly all of a turn's TTFT
MIN_SAVING_MS = 20.0  # a cached prefix must save at least this much TTFT to be measured ...
MAX_CACHED_SHARE = 0.5  # ... and at least halve it (else queueing noise hides the gain)


@dataclass(frozen=True)
class PrefixCost:
    """What a conversation's first prompt costs one real engine: TTFT computed from scratch
    (``cold_ms``) and again with the prompt in its cache (``warm_ms``): medians of a few probes."""

    cold_ms: float
    warm_ms: float

    @property
    def saving_ms(self) -> float:
        return self.cold_ms - self.warm_ms


def ttft_target(cost: PrefixCost | None) -> tuple[str, Callable[[float], bool] | None]:
    """The TTFT p50 row's target and check (on affinity / least-outstanding).

    Mock engines (``cost`` None): ``<= 1/3``. A real engine: affinity can at best bring TTFT
    down to ``warm / cold`` of least-outstanding's (every follow-up cached against none); the
    row passes with at least half of that gain, ``<= (1 + warm/cold) / 2``. When the cache
    saves less than ``MIN_SAVING_MS`` or less than half the TTFT, no gain is measurable and the
    row is informational (no check): a FAIL there would be expected, not found."""
    if cost is None:
        return "affinity <= 1/3 x least", lambda v: v <= MOCK_TTFT_TARGET
    if cost.cold_ms <= 0 or cost.saving_ms < MIN_SAVING_MS or cost.warm_ms > MAX_CACHED_SHARE * cost.cold_ms:
        return f"info: cached prefix saves {cost.saving_ms:.0f} ms (too little to measure)", None
    bound = (1 + cost.warm_ms / cost.cold_ms) / 2
    return f"affinity <= {bound:.2f} x least", lambda v: v <= bound


class Replicas:
    """Workers of their own (``count``), worker ``i`` running every model whose replica count
    is above ``i``; stopped (SIGINT: they stop their engines) when the section ends."""

    def __init__(self, bench: Bench, blocks: dict[str, tuple[int, str]]) -> None:
        self.bench = bench
        self.blocks = blocks  # model id -> (replicas, its [[models]] TOML body)
        self.procs: list[subprocess.Popen] = []

    async def start(self) -> None:
        cluster = self.bench.cluster
        count = max(n for n, _ in self.blocks.values())
        cli = [sys.executable, "-m", "llm_lab_router.cli"]
        for i in range(count):
            wid = f"bench-aff{i}-{cluster.procs.token[:6]}"
            low = free_port()
            text = (f'[worker]\nid = "{wid}"\nport_range = [{low}, {min(low + 60, 65535)}]\n'
                    "heartbeat_interval = 0.5\nlease_ttl = 3.0\n\n")
            text += "".join(f'[[models]]\nid = "{m}"\n{body}\n' for m, (n, body) in self.blocks.items() if i < n)
            cfg = cluster.work / f"affinity-{i}.toml"
            cfg.write_text(text)
            self.procs.append(cluster.procs.start(
                f"worker-aff{i}", [*cli, "worker", "--config", str(cfg), "--redis", cluster.redis.url,  # type: ignore
                                   "--worker-id", wid],
                env={"LLM_ROUTER_STATE_DIR": str(cluster.work / f"state-aff{i}")}))
        router = cluster.routers[0]
        deadline = now() + 120
        while True:  # every replica of every model is running
            models = await list_models(router)
            ready = {m: sum(i.get("state") == "running" for i in models.get(m, {}).get("instances", []))
                     for m in self.blocks}
            if all(ready[m] == n for m, (n, _) in self.blocks.items()):
                return
            if now() > deadline:
                raise RuntimeError(f"affinity replicas not all running: {ready}")
            cluster.procs.check_alive()
            await asyncio.sleep(0.2)

    async def stop(self) -> None:
        await asyncio.gather(*(asyncio.to_thread(stop_group, p, signal.SIGINT, 10.0, 2.0) for p in self.procs))
        procs = self.bench.cluster.procs
        procs.procs = [(name, p) for name, p in procs.procs if p not in self.procs]  # stopped on purpose


def engine_urls(models: dict[str, dict], model: str) -> list[str]:
    return [i["url"] for i in models.get(model, {}).get("instances", []) if i.get("state") == "running"]


async def sample_load(urls: list[str], stop: asyncio.Event, samples: list[list[int]]) -> None:
    """Outstanding requests of each engine (its own counters), every 25 ms until ``stop``."""
    targets = [Target("engine", u, "") for u in urls]
    conns = [await t.connect() for t in targets]
    try:
        while not stop.is_set():
            row = []
            for t, conn in zip(targets, conns):
                resp = await conn.request(t.raw("GET", "/debug/stats"), Response(keep_body=True))
                s = resp.json()
                row.append(s["requests"] - s["completed_requests"] - s["cancelled_requests"] - s["cancelled_streams"])
            samples.append(row)
            try:
                await asyncio.wait_for(stop.wait(), 0.025)
            except asyncio.TimeoutError:
                pass
    finally:
        for c in conns:
            c.close()


async def prompt_tokens(urls: list[str]) -> tuple[int, int]:
    """Prompt tokens the engines found in their prefix cache and computed, all together."""
    cached = computed = 0
    for url in urls:
        s = (await Target("engine", url, "").call("GET", "/debug/stats")).json()
        cached, computed = cached + s.get("prompt_tokens_cached", 0), computed + s.get("prompt_tokens_computed", 0)
    return cached, computed


def words(prefix: str, n: int) -> str:
    return " ".join(f"{prefix}{i}" for i in range(n))


def first_messages(w: Workload, tag: str) -> list[dict[str, str]]:
    """A conversation's opening: the shared system prompt, then its own document (``tag``)."""
    system = (SYSTEM * (w.system_words // len(SYSTEM.split()) + 1)).split()[:w.system_words]
    return [{"role": "system", "content": " ".join(system)},
            {"role": "user", "content": f"Document {tag}: {words(tag + 'd', w.document_words)}. Summarise it."}]


async def first_ttft(target: Target, model: str, msgs: list[dict[str, str]]) -> float:
    """TTFT of one streamed answer of one token, in seconds."""
    conn = await target.connect()
    try:
        body = msgspec.json.encode({"model": model, "stream": True, "max_tokens": 1, "messages": msgs})
        resp = Response(sse=True, keep_body=True)
        await conn.request(target.raw("POST", "/v1/chat/completions", body), resp)
        if resp.status != 200:
            raise RuntimeError(f"prefix probe: status {resp.status}")
        return resp.ttft
    finally:
        conn.close()


async def prefix_cost(url: str, model: str, w: Workload, probes: int = 3) -> PrefixCost:
    """``PrefixCost`` of this workload's first prompt on the engine at ``url`` (one slot: a
    prompt sent twice in a row is found in the cache the second time)."""
    target = Target("engine", url, model)
    cold, warm = [], []
    for n in range(probes):
        msgs = first_messages(w, f"probe{n}x{time.monotonic_ns()}")
        cold.append(await first_ttft(target, model, msgs))
        warm.append(await first_ttft(target, model, msgs))
    return PrefixCost(median(cold) * 1e3, median(warm) * 1e3)


async def conversation(target: Target, model: str, w: Workload, tag: str, out: dict) -> None:
    """One conversation, turn after turn on one keep-alive connection."""
    conn = await target.connect()
    msgs = first_messages(w, tag)
    try:
        for turn in range(w.turns):
            body = msgspec.json.encode({"model": model, "stream": True, "max_tokens": w.answer_tokens,
                                        "messages": msgs})
            resp = Response(sse=True, keep_body=True)
            try:
                await conn.request(target.raw("POST", "/v1/chat/completions", body), resp)
            except Exception:  # a broken connection: an error, and a new one
                out["errors"] += 1
                conn.close()
                conn = await target.connect()
                continue
            if resp.status != 200 or not resp.done_seen:
                out["errors"] += 1
            else:
                out["ttfts"].append(resp.ttft)
                out["served"][resp.headers.get("x-router-worker", "?")] += 1
            msgs += [{"role": "assistant", "content": ANSWER},
                     {"role": "user", "content": f"Question {turn}: {words(tag + 'q', w.question_words)}?"}]
            if conn.closed:
                conn = await target.connect()
    finally:
        conn.close()


async def one_round(bench: Bench, model: str, replicas: int, w: Workload, tag: str, engine: str = "mock") -> dict:
    router = bench.cluster.routers[0]
    target = Target("router", router.base, model)
    urls = engine_urls(await list_models(router), model)
    out: dict = {"ttfts": [], "errors": 0, "served": Counter()}
    # only the mock engine counts its outstanding requests and cached tokens (``/debug/stats``)
    stats_urls = urls if engine == "mock" else []
    before = await prompt_tokens(stats_urls)
    samples: list[list[int]] = []
    stop = asyncio.Event()
    sampler = asyncio.ensure_future(sample_load(stats_urls, stop, samples))
    n = w.conversations_per_replica * replicas
    t0 = now()
    await asyncio.gather(*(conversation(target, model, w, f"{tag}c{c}x", out) for c in range(n)))
    elapsed = now() - t0
    stop.set()
    await sampler
    cached, computed = (a - b for a, b in zip(await prompt_tokens(stats_urls), before))
    busy = [s for s in samples if sum(s)]
    load_ratio = (sum(max(s) for s in busy) / sum(sum(s) / len(s) for s in busy)) if busy else float("nan")
    served = list(out["served"].values()) + [0] * (replicas - len(out["served"]))
    mean_served = sum(served) / replicas
    return {"n": len(out["ttfts"]), "errors": out["errors"], "rps": len(out["ttfts"]) / elapsed,
            "ttft_p50_ms": pct(out["ttfts"], 0.5) * 1e3, "ttft_p99_ms": pct(out["ttfts"], 0.99) * 1e3,
            "cached_pct": 100 * cached / (cached + computed) if cached + computed else float("nan"),
            "load_ratio": load_ratio,
            "within_bound_pct": 100 * sum(max(s) <= math.ceil(LOAD_FACTOR * sum(s) / len(s)) for s in busy) / len(busy)
            if busy else float("nan"), "served_ratio": max(served) / mean_served if mean_served else float("nan")}


async def compare(bench: Bench, replicas: int, w: Workload, engine: str, section: str) -> None:
    o = bench.opts
    models = {"direct": model_id(replicas, ROUTINGS[0], engine), "router": model_id(replicas, ROUTINGS[1], engine)}
    bench.say(f"affinity vs least-outstanding, {engine} x{replicas}: {w.conversations_per_replica * replicas} "
              f"conversations x {w.turns} turns, {o.rounds} round(s) ...")
    cost = None
    if engine != "mock":  # what a cached prefix saves this engine decides the TTFT row's target
        url = engine_urls(await list_models(bench.cluster.routers[0]), models["direct"])[0]
        cost = await prefix_cost(url, models["direct"], w)
        bench.raw[f"affinity_{engine}{replicas}_prefix_cost_ms"] = {"cold": cost.cold_ms, "warm": cost.warm_ms}
        bench.rows.append(Row(section, "first prompt TTFT, computed | cached (probe)",
                              {"direct": cost.cold_ms, "router": cost.warm_ms}, "ms", f"{-cost.saving_ms:+.1f} ms"))
    runs: dict[str, list[dict]] = {"direct": [], "router": []}
    for r in range(o.rounds):
        order = ["direct", "router"] if r % 2 == 0 else ["router", "direct"]
        for side in order:
            runs[side].append(await one_round(bench, models[side], replicas, w, f"r{r}{side[0]}{engine}{replicas}",
                                              engine))
    bench.raw[f"affinity_{engine}{replicas}"] = runs
    bench.add(section, "TTFT p50 (least | affinity)", runs, "ttft_p50_ms", "ratio", "ms", *ttft_target(cost))
    bench.add(section, "TTFT p99 (least | affinity)", runs, "ttft_p99_ms", "ratio", "ms")
    bench.add(section, "requests/s (least | affinity)", runs, "rps", "ratio", "req/s",
              "affinity >= 0.95 x least", lambda v: v >= 0.95)
    med = {side: median([x["load_ratio"] for x in rs]) for side, rs in runs.items()}
    errors = {side: sum(int(x["errors"]) for x in rs) for side, rs in runs.items()}
    bench.rows.append(Row(section, "max/mean outstanding (least | affinity)", med, "ratio", "", "", None, errors))
    within = {side: median([x["within_bound_pct"] for x in rs]) for side, rs in runs.items()}
    # sampled, so after departures too: the bound holds when a request is placed (tests/test_affinity.py)
    bench.rows.append(Row(section, f"samples with max <= ceil({LOAD_FACTOR:g} x mean), %", within, "ratio", "", "",
                          None, errors))
    hits = {side: median([x["cached_pct"] for x in rs]) for side, rs in runs.items()}
    bench.rows.append(Row(section, "prompt tokens found cached, % (least | affinity)", hits, "ratio", "", "", None,
                          errors))
    served = {side: median([x["served_ratio"] for x in rs]) for side, rs in runs.items()}
    bench.rows.append(Row(section, "max/mean requests served (least | affinity)", served, "ratio", "",
                          f"affinity <= {LOAD_FACTOR:g}", served["router"] <= LOAD_FACTOR
                          if served["router"] == served["router"] else None, errors))


def routing_cost_us(w: Workload) -> dict[str, float]:
    """What the routing decision costs the router per request, in-process: least outstanding
    (``Balancer.pick``) against the affinity key and ring choice, on a turn-3 body of this
    workload, 4 instances; the best of 7 runs of 20,000, in CPU time."""
    from llm_lab_router.protocol import Instance
    from llm_lab_router.router.forward.affinity import routing_key
    from llm_lab_router.router.forward.balancer import Balancer

    msgs = [{"role": "system", "content": words("s", w.system_words)},
            {"role": "user", "content": words("d", w.document_words)}]
    for t in range(2):
        msgs += [{"role": "assistant", "content": ANSWER}, {"role": "user", "content": words("q", w.question_words)}]
    body = json.dumps({"model": "m", "stream": True, "messages": msgs}).encode()
    headers = [("Host", "x"), ("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    insts = [Instance(model="m", worker=f"w{i}", state="running", url=f"http://10.0.0.{i}:8000") for i in range(4)]
    b = Balancer(LOAD_FACTOR)
    n = 20000

    def best(f) -> float:  # CPU time, not wall time: a shared machine's other loads do not count
        return min(timeit.repeat(f, number=n, repeat=7, timer=time.process_time)) / n * 1e6

    least = best(lambda: b.choose("m", insts, None))
    aff = best(lambda: b.choose("m", insts, routing_key("m", body, headers)))
    return {"direct": least, "router": aff, "body_bytes": len(body)}


def mock_block(w: Workload, routing: str) -> str:
    argv = ["{python}", str(MOCK_ENGINE), "--port", "{port}", "--model", "{id}", "--quiet",
            "--max-tokens", str(w.answer_tokens), *w.engine_args]
    return (f"command = {json.dumps(argv)}\nrouting = {json.dumps(routing)}\nauto_start = true\n"
            'restart = "no"\nstartup_timeout = 60\nstop_grace = 3\n')


def llama_server() -> str | None:
    return os.environ.get("LLM_ROUTER_LLAMA_SERVER") or shutil.which("llama-server")


def llama_block(binary: str, gguf: str, routing: str) -> str:
    env_path = f"{os.path.dirname(binary)}{os.pathsep}{os.environ.get('PATH', os.defpath)}"
    # the tiny vocabulary makes ~5 tokens a word; 4 slots (8,192 tokens each) keep 4 conversations cached
    args = ["-c", "32768", "-t", "1", "--parallel", "4"]
    return (f'engine = "llama.cpp"\nmodel_path = {json.dumps(gguf)}\nengine_args = {json.dumps(args)}\n'
            f"env = {{ PATH = {json.dumps(env_path)} }}\nrouting = {json.dumps(routing)}\nauto_start = true\n"
            'restart = "no"\nstartup_timeout = 120\nstop_grace = 5\n')


def tiny_gguf(bench: Bench) -> str | None:
    path = bench.cluster.work / "tiny.gguf"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tiny_gguf.py"), str(path)],
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        bench.say(f"affinity llama.cpp: no tiny GGUF ({proc.stderr.strip()[-200:]}): skipped")
        return None
    return str(path)


async def run(bench: Bench) -> None:
    if not bench.cluster.routers:
        return
    o = bench.opts
    w = mock_workload(o.smoke)
    sizes = (2,) if o.smoke else (2, 4)
    cost = routing_cost_us(w)
    bench.raw["affinity_routing_cost_us"] = cost
    bench.rows.append(Row("affinity", f"routing decision, {cost['body_bytes'] / 1024:.0f} KiB body (least | affinity)",
                          {k: cost[k] for k in ("direct", "router")}, "µs",
                          f"{cost['router'] - cost['direct']:+.1f} us", "+<= 20 us",
                          cost["router"] - cost["direct"] <= 20.0))
    blocks = {model_id(n, r): (n, mock_block(w, r)) for n in sizes for r in ROUTINGS}
    binary = llama_server()
    gguf = tiny_gguf(bench) if binary else None
    if binary and gguf:
        blocks.update({model_id(2, r, "llama"): (2, llama_block(binary, gguf, r)) for r in ROUTINGS})
    replicas = Replicas(bench, blocks)
    await replicas.start()
    try:
        for n in sizes:
            await compare(bench, n, w, "mock", f"affinity x{n}")
        if binary and gguf:
            # the tiny vocabulary makes ~5 tokens a word: 700 words open each conversation (~3,500
            # tokens of shared prefix), six turns stay within a slot's 8,192
            lw = Workload(w.conversations_per_replica, w.turns, 100, 600, 10, 8)
            await compare(bench, 2, lw, "llama", "affinity llama.cpp x2")
    finally:
        await replicas.stop()
