"""The docs' plots, drawn with matplotlib from their data: ``python -m scripts.plots``.

Each plot is a JSON file under ``docs/data/`` (the figures exactly as docs/BENCHMARKS.md
tables them, with the command and date that measured them) and the SVG of the same name in
``docs/``, which the Markdown embeds. One command redraws every one of them, so a plot is
never edited by hand and never drifts from its data (tests/test_plots.py checks both).

Deterministic output: the same data and the same matplotlib version give the same bytes
(a fixed ``svg.hashsalt`` for the clip-path ids, no date in the metadata, matplotlib's own
DejaVu Sans for the text layout), so regenerating an unchanged plot is no diff. Text stays
text (``svg.fonttype: none``): smaller files, searchable titles. The matplotlib version is
written in each SVG's metadata (``Creator``).

Every series is drawn with an SVG id ``series-<slug>`` (a line) or ``series-<slug>.<n>`` (the
bars of one series), so a test can count what was drawn against what the data holds.

Needs the ``plots`` extra (``pip install -e '.[plots]'``; the ``test`` extra includes it).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = ROOT / "docs" / "data"
OUT_DIR = ROOT / "docs"
STYLE = {
    "svg.hashsalt": "llm-router docs",  # clip-path ids from a fixed salt, not a random one
    "svg.fonttype": "none",  # <text> elements, not glyph paths
    "font.family": "DejaVu Sans",  # ships with matplotlib: the same text metrics on every machine
    "font.size": 9,
    "xtick.labelsize": 8,
    "axes.grid": True,
    "axes.axisbelow": True,
    "grid.color": "#e6e6e6",
    "axes.spines.top": False,
    "axes.spines.right": False,
    "legend.frameon": False,
}
COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]  # tab10
BEFORE, AFTER, TARGET = "#9e9e9e", "#1f77b4", "#d62728"

Data = dict[str, Any]


def slug(text: str) -> str:
    """The part of an SVG id that names a series: lower case letters, digits and dashes."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def tag_bars(bars: Any, series: str) -> None:
    """Give each bar of one series (in one panel) the id ``series-<slug>.<n>``: SVG ids are unique."""
    for n, bar in enumerate(bars):
        bar.set_gid(f"series-{slug(series)}.{n}")


def bar_pairs(ax: Axes, panel: str, labels: list[str], before: list[float], after: list[float],
              names: tuple[str, str], fmt: str) -> None:
    """Two bars per category (before grey, after blue), each value written above its bar; the
    bars' ids name the series and the panel."""
    width = 0.38
    for offset, values, colour, name in ((-width / 2, before, BEFORE, names[0]), (width / 2, after, AFTER, names[1])):
        bars = ax.bar([n + offset for n in range(len(labels))], values, width, color=colour, label=name)
        tag_bars(bars, f"{name} {panel}")
        ax.bar_label(bars, labels=[format(v, fmt) for v in values], fontsize=7, padding=1)
    ax.set_xticks(range(len(labels)), labels)
    ax.grid(axis="x", visible=False)


def target_line(ax: Axes, value: float, label: str) -> None:
    """The goal a figure is held to, dashed red across the panel."""
    ax.axhline(value, color=TARGET, linestyle="--", linewidth=1, label=label)


# --------------------------------------------------------------------------- scale


SCALE_PANELS = [("router_cpu_pct", "router CPU at rest, % of a core (median router)", False),
                ("redis_cpu_pct", "redis-server CPU, % of a core", False),
                ("prop_p99_ms", "state propagation p99 to every router, ms (log)", True),
                ("hot_added_p99_ms", "hot path: added latency p99, ms (log)", True)]


def scale_series(data: Data) -> list[tuple[str, int, bool, list[dict]]]:
    """(label, colour index, dashed, points by hosts): a colour per router count, the first run
    dashed when there are several (the "before" side of ``measure --baseline``)."""
    runs = data["runs"]
    counts = sorted({p["routers"] for run in runs for p in run["points"]})
    out = []
    for n, run in enumerate(runs):
        for routers in counts:
            pts = sorted((p for p in run["points"] if p["routers"] == routers), key=lambda p: p["hosts"])
            if pts:
                out.append((f"{run.get('label') or 'run'}, {routers} routers", counts.index(routers),
                            n == 0 and len(runs) > 1, pts))
    return out


def draw_scale(data: Data) -> Figure:
    """``scripts/sim measure``'s JSON: cost against hosts, one panel per measure, one line per
    (run, router count)."""
    series = scale_series(data)
    fig, axes = plt.subplots(2, 2, figsize=(9, 6.4), layout="constrained")
    for ax, (key, title, log) in zip(axes.flat, SCALE_PANELS):
        for label, colour, dashed, pts in series:
            xy = [(p["hosts"], p[key]) for p in pts if _usable(p.get(key), log)]
            ax.plot([x for x, _ in xy], [y for _, y in xy], marker="o", markersize=3, linewidth=1.5,
                    color=COLOURS[colour % len(COLOURS)], linestyle="--" if dashed else "-", label=label,
                    gid=f"series-{slug(label + ' ' + key)}")
        ax.set_title(title, loc="left", fontsize=9, fontweight="bold")
        ax.set_xlabel("hosts (× 10 models)")
        if log:
            ax.set_yscale("log")
        else:
            ax.set_ylim(bottom=0)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(4, len(labels)))
    return fig


def _usable(v: Any, log: bool) -> bool:
    return isinstance(v, (int, float)) and v == v and (v > 0 or not log)


# --------------------------------------------------------------------------- swap


SWAP_SIDES = [("cold", "prefetch off (file evicted)"), ("prefetch", "prefetch on")]


def swap_medians(run: Data) -> dict[str, dict[str, float]]:
    """Per side ("cold", "prefetch"): median first token and cold start, in seconds. A run is
    ``scripts/bench_swap.py --json``'s output (``rounds``: every round's figures) or, for a run
    the docs kept only as medians, ``medians`` in the same shape as this result."""
    if "medians" in run:
        return run["medians"]
    return {side: {k: statistics.median(r[k] for r in rounds) for k in ("first_token", "cold_start")}
            for side, rounds in run["rounds"].items()}


def draw_swap(data: Data) -> Figure:
    """Cold start and first token with prefetch off and on, one pair of bars per run."""
    runs = data["runs"]
    medians = [swap_medians(run) for run in runs]
    labels = [run["label"] for run in runs]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
    fig.suptitle(data["title"], x=0.01, ha="left", fontsize=10, fontweight="bold")
    for ax, key, title in ((axes[0], "cold_start", "cold start: the worker's starting → running"),
                           (axes[1], "first_token", "first token: includes the residency wait")):
        bar_pairs(ax, key, labels, [m["cold"][key] for m in medians], [m["prefetch"][key] for m in medians],
                  (SWAP_SIDES[0][1], SWAP_SIDES[1][1]), ".2f")
        ax.set_title(title, loc="left", fontsize=9, fontweight="bold")
        ax.set_ylabel("seconds (median of rounds)")
        ax.margins(y=0.15)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncols=2)
    return fig


# --------------------------------------------------------------------------- router cost


ROUTER_PANELS = [("cpu_us", "router CPU per request at c=32, µs (target < {:g} µs)", "target_cpu_us", ".0f"),
                 ("c1_added_ms", "added latency at c=1, p50, ms (target < {:g} ms)", "target_c1_added_ms", ".2f"),
                 ("c32_ratio", "throughput at c=32, × direct (target ≥ ×{:g})", "target_c32_ratio", ".2f")]


def draw_router_cost(data: Data) -> Figure:
    """Each hot-path optimisation's A/B (before and after, same machine, same minutes): the
    three figures the targets are set on, against their targets."""
    steps = data["steps"]
    labels = [step["label"] for step in steps]
    fig, axes = plt.subplots(3, 1, figsize=(9, 8), layout="constrained", sharex=True)
    fig.suptitle(data["title"], x=0.01, ha="left", fontsize=10, fontweight="bold")
    for ax, (key, title, target_key, fmt) in zip(axes, ROUTER_PANELS):
        bar_pairs(ax, key, labels, [s["before"][key] for s in steps], [s["after"][key] for s in steps],
                  ("before", "after"), fmt)
        target_line(ax, data[target_key], "target")
        ax.set_title(title.format(data[target_key]), loc="left", fontsize=9, fontweight="bold")
        ax.margins(y=0.12)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncols=3)
    return fig


# --------------------------------------------------------------------------- timeline


def draw_timeline_render(data: Data) -> Figure:
    """The dashboard's 30 d view of 500 hosts: time to draw, every run a bar, against the limit."""
    runs = data["runs"]
    fig, ax = plt.subplots(figsize=(9, 3.2), layout="constrained")
    y = 0
    ticks: list[tuple[float, str]] = []
    for run in runs:
        ys = [y + k for k in range(len(run["ms"]))]
        bars = ax.barh(ys, run["ms"], 0.7, color=AFTER if run["side"] == "after" else BEFORE, label=run["label"])
        tag_bars(bars, run["label"])
        ax.bar_label(bars, labels=[f"{v:,.0f} ms" for v in run["ms"]], fontsize=7, padding=2)
        ticks.append((sum(ys) / len(ys), run["label"]))
        y += len(run["ms"]) + 0.6
    ax.axvline(data["limit_ms"], color=TARGET, linestyle="--", linewidth=1)
    ax.text(data["limit_ms"], 1.0, f" limit {data['limit_ms']:,} ms", color=TARGET, fontsize=8,
            transform=ax.get_xaxis_transform(), va="top")
    ax.set_yticks([t for t, _ in ticks], [label for _, label in ticks])
    ax.invert_yaxis()
    ax.set_xlabel("30 d view drawn in Chromium, ms (the page's own measure)")
    ax.set_title(data["title"], loc="left", fontsize=9, fontweight="bold")
    ax.grid(axis="y", visible=False)
    ax.margins(x=0.12)
    return fig


# --------------------------------------------------------------------------- the list


@dataclass(frozen=True)
class Plot:
    """One docs plot: ``docs/data/<name>.json`` drawn into ``docs/<name>.svg``."""
    name: str
    draw: Callable[[Data], Figure]

    def render(self, data_dir: Path, out_dir: Path) -> Path:
        """Draw from ``<data_dir>/<name>.json`` into ``<out_dir>/<name>.svg``."""
        out = out_dir / f"{self.name}.svg"
        self.write(json.loads((data_dir / f"{self.name}.json").read_text()), out)
        return out

    def write(self, data: Data, out: Path) -> None:
        """Draw ``data`` into the SVG file ``out`` (also what ``scripts.sim measure --svg`` calls)."""
        with plt.rc_context(STYLE):
            fig = self.draw(data)
            fig.savefig(out, format="svg", metadata={
                "Date": None, "Title": data.get("title", self.name), "Source": f"docs/data/{self.name}.json",
                "Creator": f"matplotlib {matplotlib.__version__} (scripts/plots.py)"})
        plt.close(fig)


PLOTS = {plot.name: plot for plot in (Plot("scale", draw_scale), Plot("swap", draw_swap),
                                      Plot("router_cost", draw_router_cost),
                                      Plot("timeline_render", draw_timeline_render))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.plots", description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DATA_DIR, help="where the JSON data files are")
    p.add_argument("--out", type=Path, default=OUT_DIR, help="where the SVGs go")
    p.add_argument("names", nargs="*", metavar="NAME", help=f"only these plots (default: all of {', '.join(PLOTS)})")
    opts = p.parse_args(argv)
    if unknown := sorted(set(opts.names) - set(PLOTS)):
        p.error(f"no plot named {', '.join(unknown)} (there are: {', '.join(PLOTS)})")
    opts.out.mkdir(parents=True, exist_ok=True)
    for name in opts.names or PLOTS:
        print(PLOTS[name].render(opts.data, opts.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
