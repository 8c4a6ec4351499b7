"""The docs' plots (scripts/plots.py): ``python -m scripts.plots`` draws every one from its data
in docs/data/; each is a valid SVG with its titles and one line or set of bars per series the
data holds; the SVGs committed in docs/ are what their data draws today.

The expected series are read from the data files here, independently of the plotting code, so
a series the plot leaves out (or a category it drops) fails. The plotting code tags every
series it draws with an SVG id, ``series-<slug>`` for a line, ``series-<slug>.<n>`` for the
n-th bar of a series in a panel."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import matplotlib
import pytest
from conftest import ROOT

DATA = ROOT / "docs" / "data"
DOCS = ROOT / "docs"
NAMES = ["scale", "swap", "router_cost", "timeline_render"]
SVG = "{http://www.w3.org/2000/svg}"
CREATOR = re.compile(r"matplotlib (\S+) \(scripts/plots\.py\)")


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def data(name: str) -> dict:
    return json.loads((DATA / f"{name}.json").read_text())


def run_plots(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scripts.plots", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


@pytest.fixture(scope="module")
def drawn(tmp_path_factory) -> Path:
    """Every plot, drawn by the command into a fresh directory."""
    out = tmp_path_factory.mktemp("plots")
    proc = run_plots("--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(out / f"{name}.svg") for name in NAMES]
    return out


def parse(path: Path) -> ET.Element:
    root = ET.parse(path).getroot()
    assert root.tag == f"{SVG}svg"
    return root


def texts(root: ET.Element) -> set[str]:
    return {"".join(el.itertext()).strip() for el in root.iter(f"{SVG}text")}


def series_ids(root: ET.Element) -> Counter:
    """How many elements each series id names: 1 for a line, its bar count for bars."""
    ids = [el.get("id") for el in root.iter() if el.get("id")]
    assert len(ids) == len(set(ids)), f"SVG ids must be unique: {[i for i, n in Counter(ids).items() if n > 1]}"
    return Counter(i.split(".")[0] for i in ids if i.startswith("series-"))


def lines(*labels: str) -> set[str]:
    return {line for label in labels for line in label.split("\n")}


def expected(name: str) -> tuple[set[str], Counter]:
    """The texts a plot must show and its series ids with their element counts, from its data."""
    d = data(name)
    if name == "scale":
        keys = ["router_cpu_pct", "redis_cpu_pct", "prop_p99_ms", "hot_added_p99_ms"]
        series = {f"{run['label']}, {p['routers']} routers" for run in d["runs"] for p in run["points"]}
        titles = {"router CPU at rest, % of a core (median router)", "redis-server CPU, % of a core",
                  "state propagation p99 to every router, ms (log)", "hot path: added latency p99, ms (log)",
                  "hosts (× 10 models)"} | series
        return titles, Counter({f"series-{slug(f'{s} {k}')}": 1 for s in series for k in keys})
    if name == "swap":
        sides = ["prefetch off (file evicted)", "prefetch on"]
        titles = {d["title"], "cold start: the worker's starting → running",
                  "first token: includes the residency wait", *sides} | lines(*(r["label"] for r in d["runs"]))
        return titles, Counter({f"series-{slug(f'{s} {k}')}": len(d["runs"])
                                for s in sides for k in ("cold_start", "first_token")})
    if name == "router_cost":
        titles = {d["title"], f"router CPU per request at c=32, µs (target < {d['target_cpu_us']:g} µs)",
                  f"added latency at c=1, p50, ms (target < {d['target_c1_added_ms']:g} ms)",
                  f"throughput at c=32, × direct (target ≥ ×{d['target_c32_ratio']:g})",
                  "before", "after", "target"} | lines(*(s["label"] for s in d["steps"]))
        return titles, Counter({f"series-{slug(f'{s} {k}')}": len(d["steps"])
                                for s in ("before", "after") for k in ("cpu_us", "c1_added_ms", "c32_ratio")})
    assert name == "timeline_render"
    titles = {d["title"], "30 d view drawn in Chromium, ms (the page's own measure)",
              f"limit {d['limit_ms']:,} ms"} | lines(*(r["label"] for r in d["runs"]))
    return titles, Counter({f"series-{slug(r['label'])}": len(r["ms"]) for r in d["runs"]})


@pytest.mark.parametrize("name", NAMES)
def test_each_plot_shows_its_titles_and_every_series_of_its_data(drawn: Path, name: str):
    root = parse(drawn / f"{name}.svg")
    titles, series = expected(name)
    assert titles <= texts(root), titles - texts(root)
    assert series_ids(root) == series
    meta = root.find(f"{SVG}metadata")
    assert meta is not None and f"matplotlib {matplotlib.__version__} (scripts/plots.py)" in "".join(meta.itertext())


def test_every_data_file_has_a_plot_and_every_plot_is_in_the_docs(drawn: Path):
    assert sorted(p.stem for p in DATA.glob("*.json")) == sorted(NAMES)
    docs = (DOCS / "BENCHMARKS.md").read_text()
    for name in NAMES:
        assert f"]({name}.svg)" in docs, f"docs/BENCHMARKS.md does not embed {name}.svg"
        d = data(name)
        assert d.get("command") or all(r.get("command") for r in d.get("runs", d.get("steps", []))), \
            f"{name}.json: no command that measured it"


@pytest.mark.parametrize("name", NAMES)
def test_the_committed_svg_is_what_its_data_draws(drawn: Path, name: str):
    committed = (DOCS / f"{name}.svg").read_bytes()
    version = CREATOR.search(committed.decode())
    assert version, f"docs/{name}.svg was not drawn by scripts/plots.py"
    if version.group(1) != matplotlib.__version__:
        pytest.skip(f"docs/{name}.svg was drawn with matplotlib {version.group(1)}, this is "
                    f"{matplotlib.__version__}: the bytes may differ (redraw: ./dev.sh plots)")
    assert (drawn / f"{name}.svg").read_bytes() == committed, \
        f"docs/{name}.svg is out of date with docs/data/{name}.json: run ./dev.sh plots"


def test_the_swap_plot_reads_bench_swap_json(tmp_path: Path):
    """A run in ``scripts/bench_swap.py --json``'s own format (every round) is drawn from the
    medians of its rounds."""
    d = data("swap")
    d["runs"] = [{"label": "fresh run", "engine": "mock", "mib": 1024, "residency": 4.0,
                  "rounds": {"cold": [{"first_token": 5.0, "cold_start": 1.25}, {"first_token": 7.0, "cold_start": 1.5},
                                      {"first_token": 6.0, "cold_start": 9.0}],
                             "prefetch": [{"first_token": 4.5, "cold_start": 0.25},
                                          {"first_token": 4.0, "cold_start": 0.5}]}}]
    (tmp_path / "swap.json").write_text(json.dumps(d))
    proc = run_plots("--data", str(tmp_path), "--out", str(tmp_path), "swap")
    assert proc.returncode == 0, proc.stderr
    shown = texts(parse(tmp_path / "swap.svg"))
    assert {"1.50", "0.38", "6.00", "4.25", "fresh run"} <= shown, shown


def test_an_unknown_plot_name_is_refused():
    proc = run_plots("--out", "/nonexistent", "nope")
    assert proc.returncode == 2
    assert "no plot named nope (there are: scale, swap, router_cost, timeline_render)" in proc.stderr
