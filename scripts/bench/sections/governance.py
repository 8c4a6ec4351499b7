"""Section ``governance``: what a key's permissions and its group's GPU-time budget add to a
request for a running model (issue 26): non-streamed chat at c=1 through a router of its own,
with a key that has none (``plain``) and a key with ``models``, ``start`` and a group budget
(``governed``), side by side in ABAB rounds, with the router's CPU time per request. A request
for a running model checks the models pattern (one regex match) and never reads the budget (it
is read only when a request would start a model)."""

from __future__ import annotations

from ..client import Target
from ..cluster import FAST
from ..context import Bench
from ..load import ab_rounds, closed_loop
from ..report import Row
from ..stats import median
from .quotas import start_quota_router

PLAIN_KEY = "bench-plain-0123456789abcdef"
GOVERNED_KEY = "bench-governed-0123456789abcdef"
KEYS_TOML = f"""
[groups.lab]
models = ["{FAST}", "other-*"]
start = "listed"
gpu_hours = 1000000
budget_period = "month"

[[keys]]
name = "plain"
key = "{PLAIN_KEY}"

[[keys]]
name = "governed"
key = "{GOVERNED_KEY}"
group = "lab"
"""


async def run(bench: Bench) -> None:
    if not bench.cluster.routers:
        return
    o = bench.opts
    bench.say("governance: c=1 chat with a plain key vs a key with models, start and a group budget ...")
    base, pid = await start_quota_router(bench, KEYS_TOML, "router-governance")
    targets = [Target("plain", base, FAST, {"Authorization": f"Bearer {PLAIN_KEY}"}),
               Target("governed", base, FAST, {"Authorization": f"Bearer {GOVERNED_KEY}"})]

    async def one(t: Target, prime: float = 0.0) -> dict:
        return (await closed_loop(t, t.chat(False, 16), 1, prime or o.duration, o.warmup, cpu_pid=pid)).summary()

    runs = await ab_rounds(targets, o.rounds, one, o.prime)
    bench.raw["governance_c1"] = runs
    errors = {name: sum(int(r["errors"]) for r in rs) for name, rs in runs.items()}
    for key in ("p50_ms", "p99_ms"):
        med = {name: median([r[key] for r in rs]) for name, rs in runs.items()}
        delta = median([g[key] - p[key] for p, g in zip(runs["plain"], runs["governed"])])
        label = key.split("_")[0]
        bench.rows.append(Row("governance c=1", f"latency {label}, plain key", {"router": med["plain"]}, "ms",
                              errors={"router": errors["plain"]}))
        bench.rows.append(Row("governance c=1", f"latency {label}, key with models+start+budget",
                              {"router": med["governed"]}, "ms", f"{delta:+.3f} ms vs plain",
                              errors={"router": errors["governed"]}))
    cpu = {name: median([r.get("cpu_us", float("nan")) for r in runs[name]]) for name in ("plain", "governed")}
    cpu_delta = median([g.get("cpu_us", float("nan")) - p.get("cpu_us", float("nan"))
                        for p, g in zip(runs["plain"], runs["governed"])])
    bench.rows.append(Row("governance c=1", "router CPU/request, plain key", {"router": cpu["plain"]}, "us"))
    bench.rows.append(Row("governance c=1", "router CPU/request, key with models+start+budget",
                          {"router": cpu["governed"]}, "us", f"{cpu_delta:+.0f} us vs plain"))
