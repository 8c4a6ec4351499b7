"""What every section gets: the options, the cluster, where its rows and raw figures go, and
the pairing of router and direct figures into one row."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

from .client import Target
from .cluster import Cluster
from .report import Row
from .stats import median

nan = float("nan")


class Bench:
    """The run's state shared by the sections."""

    def __init__(self, opts: argparse.Namespace, cluster: Cluster) -> None:
        self.opts = opts
        self.cluster = cluster
        self.rows: list[Row] = []
        self.raw: dict[str, Any] = {}

    def targets(self, model: str, compare: bool = False) -> list[Target]:
        ts = [Target("direct", self.cluster.urls[model], model)]
        if self.cluster.routers:
            ts.append(Target("router", self.cluster.routers[0].base, model))
        if compare and self.opts.compare:
            headers = {"Authorization": f"Bearer {self.opts.compare_key}"} if self.opts.compare_key else {}
            ts.append(Target("compare", self.opts.compare, self.opts.compare_model or model, headers))
        return ts

    def cpu_pid(self, t: Target) -> int:
        """Whose CPU a run is charged to: the engine's when direct, router A's through it."""
        if t.name == "router":
            return self.cluster.router_pid
        if t.name == "direct":
            return self.cluster.pids.get(t.model, 0)
        return 0

    def say(self, msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    def paired(self, runs: dict[str, list[dict]], key: str, how: str) -> tuple[dict[str, float], float, float]:
        """Medians per target, and the median of the per-round router-vs-direct delta / ratio
        (and compare-vs-direct)."""
        med = {name: median([r.get(key, float("nan")) for r in rs]) for name, rs in runs.items()}
        if not how:
            return med, float("nan"), float("nan")
        out = []
        for other in ("router", "compare"):
            if other not in runs:
                out.append(float("nan"))
                continue
            # a round may lack a figure (no stream ended within a short window): NaN, skipped by median
            pairs = [(d.get(key, nan), o.get(key, nan)) for d, o in zip(runs["direct"], runs[other])]
            vals = [(o - d) if how == "delta" else (o / d if d else nan) for d, o in pairs]
            out.append(median(vals))
        return med, out[0], out[1]

    def add(self, section: str, metric: str, runs: dict[str, list[dict]], key: str, how: str, unit: str,
            target: str = "", check: Callable[[float], bool] | None = None) -> None:
        med, d_router, d_compare = self.paired(runs, key, how)
        fmt = (lambda v: f"{v:+.3f} {unit}") if how == "delta" else (lambda v: f"x{v:.2f}")
        delta = " / ".join(fmt(v) for v in (d_router, d_compare) if v == v) if how else ""
        ok = check(d_router) if check and d_router == d_router else None
        errors = {name: sum(int(r["errors"]) for r in rs) for name, rs in runs.items()}
        self.rows.append(Row(section, metric, med, unit, delta, target, ok, errors))
