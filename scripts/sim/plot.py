"""Cost against hosts as a small SVG (no plotting library needed): one panel per measure,
one line per (run, router count)."""

from __future__ import annotations

import math
from pathlib import Path

PANELS = [("router_cpu_pct", "router CPU at rest, % of a core (median router)", False),
          ("redis_cpu_pct", "redis-server CPU, % of a core", False),
          ("prop_p99_ms", "state propagation p99 to every router, ms (log)", True),
          ("hot_added_p99_ms", "hot path: added latency p99, ms (log)", True)]
COLOURS = ["#d62728", "#ff7f0e", "#1f77b4", "#2ca02c", "#9467bd", "#8c564b"]
W, H, PAD = 420, 260, 48


def write_svg(path: Path, runs: list[dict]) -> None:
    series = []  # (label, colour, dashed, points): a colour per router count, the first run dashed
    counts = sorted({p["routers"] for run in runs for p in run["points"]})
    for n, run in enumerate(runs):
        for routers in counts:
            pts = sorted((p for p in run["points"] if p["routers"] == routers), key=lambda p: p["hosts"])
            if pts:
                series.append((f"{run.get('label') or 'run'}, {routers} routers", COLOURS[counts.index(routers)],
                               n == 0 and len(runs) > 1, pts))
    cols = 2
    rows = math.ceil(len(PANELS) / cols)
    legend_h = 18 * len(series) + 10
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W * cols}" height="{H * rows + legend_h}" '
           'font-family="sans-serif" font-size="11">', '<rect width="100%" height="100%" fill="white"/>']
    for n, (key, title, log) in enumerate(PANELS):
        out += _panel((n % cols) * W, (n // cols) * H, key, title, series, log)
    for n, (label, colour, dashed, _) in enumerate(series):
        y = H * rows + 14 + 18 * n
        out.append(f'<line x1="{PAD}" y1="{y - 4}" x2="{PAD + 24}" y2="{y - 4}" stroke="{colour}" '
                   f'stroke-width="2"{_dash(dashed)}/><text x="{PAD + 30}" y="{y}">{label}</text>')
    out.append("</svg>")
    path.write_text("\n".join(out) + "\n")


def _dash(dashed: bool) -> str:
    return ' stroke-dasharray="5,3"' if dashed else ""


def _ok(p: dict, key: str, log: bool) -> bool:
    v = p.get(key)
    return isinstance(v, (int, float)) and not math.isnan(v) and (v > 0 or not log)


def _panel(x0: float, y0: float, key: str, title: str, series: list, log: bool) -> list[str]:
    values = [(p["hosts"], p[key]) for *_, pts in series for p in pts if _ok(p, key, log)]
    if not values:
        return []
    xmax = max(h for h, _ in values) or 1
    f = math.log10 if log else (lambda v: v)
    ymax = f(max(v for _, v in values)) + (0.1 if log else 0) if log else max(max(v for _, v in values), 1e-9) * 1.1
    ymin = math.floor(f(min(v for _, v in values))) if log else min(0.0, min(v for _, v in values))
    left, top, pw, ph = x0 + PAD, y0 + 24, W - PAD - 16, H - 24 - 36

    def sx(h: float) -> float:
        return left + pw * h / xmax

    def sy(v: float) -> float:
        return top + ph * (1 - (f(v) - ymin) / (ymax - ymin))
    out = [f'<text x="{x0 + PAD}" y="{y0 + 14}" font-weight="bold">{title}</text>',
           f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" stroke="#444"/>',
           f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}" stroke="#444"/>',
           f'<text x="{left + pw / 2}" y="{top + ph + 28}" text-anchor="middle">hosts (x 10 models)</text>']
    ticks = ([10 ** e for e in range(int(ymin), int(math.ceil(ymax)) + 1) if e <= ymax] if log
             else [ymin + (ymax - ymin) * frac for frac in (0, 0.25, 0.5, 0.75, 1)])
    for v in ticks:
        out.append(f'<text x="{left - 4}" y="{sy(v) + 4:.1f}" text-anchor="end">{v:.4g}</text>'
                   f'<line x1="{left}" y1="{sy(v):.1f}" x2="{left + pw}" y2="{sy(v):.1f}" stroke="#eee"/>')
    for h in sorted({h for h, _ in values}):
        out.append(f'<text x="{sx(h):.1f}" y="{top + ph + 14}" text-anchor="middle">{h}</text>')
    for label, colour, dashed, pts in series:
        xy = [(sx(p["hosts"]), sy(p[key])) for p in pts if _ok(p, key, log)]
        if xy:
            out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2"{_dash(dashed)} points="'
                       + " ".join(f"{x:.1f},{y:.1f}" for x, y in xy) + '"/>')
            out += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{colour}"/>' for x, y in xy]
    return out
