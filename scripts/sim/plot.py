"""Cost against hosts as a small SVG (no plotting library needed): one panel per measure,
one line per (run, router count)."""

from __future__ import annotations

import math
from pathlib import Path

PANELS = [("router_cpu_pct", "router CPU at rest, % of a core (median router)"),
          ("redis_cpu_pct", "redis-server CPU, % of a core"),
          ("prop_p99_ms", "state propagation p99 to every router, ms"),
          ("hot_added_p99_ms", "hot path: added latency p99, ms")]
COLOURS = ["#d62728", "#ff7f0e", "#1f77b4", "#2ca02c", "#9467bd", "#8c564b"]
W, H, PAD = 420, 260, 48


def write_svg(path: Path, runs: list[dict]) -> None:
    series = []  # (label, points)
    for run in runs:
        for routers in sorted({p["routers"] for p in run["points"]}):
            pts = sorted((p for p in run["points"] if p["routers"] == routers), key=lambda p: p["hosts"])
            series.append((f"{run.get('label') or 'run'}, {routers} routers", pts))
    cols = 2
    rows = math.ceil(len(PANELS) / cols)
    legend_h = 18 * len(series) + 10
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W * cols}" height="{H * rows + legend_h}" '
           'font-family="sans-serif" font-size="11">', '<rect width="100%" height="100%" fill="white"/>']
    for n, (key, title) in enumerate(PANELS):
        out += _panel((n % cols) * W, (n // cols) * H, key, title, series)
    for n, (label, _) in enumerate(series):
        y = H * rows + 14 + 18 * n
        out.append(f'<line x1="{PAD}" y1="{y - 4}" x2="{PAD + 24}" y2="{y - 4}" stroke="{COLOURS[n % len(COLOURS)]}" '
                   f'stroke-width="2"{_dash(label)}/><text x="{PAD + 30}" y="{y}">{label}</text>')
    out.append("</svg>")
    path.write_text("\n".join(out) + "\n")


def _dash(label: str) -> str:
    return ' stroke-dasharray="5,3"' if label.startswith("before") else ""


def _panel(x0: float, y0: float, key: str, title: str, series: list) -> list[str]:
    values = [(p["hosts"], p.get(key)) for _, pts in series for p in pts
              if isinstance(p.get(key), (int, float)) and not math.isnan(p[key])]
    if not values:
        return []
    xmax = max(h for h, _ in values) or 1
    ymax = max(max(v for _, v in values), 1e-9) * 1.1
    ymin = min(0.0, min(v for _, v in values))
    left, top, pw, ph = x0 + PAD, y0 + 24, W - PAD - 16, H - 24 - 36

    def sx(h: float) -> float:
        return left + pw * h / xmax

    def sy(v: float) -> float:
        return top + ph * (1 - (v - ymin) / (ymax - ymin))
    out = [f'<text x="{x0 + PAD}" y="{y0 + 14}" font-weight="bold">{title}</text>',
           f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" stroke="#444"/>',
           f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}" stroke="#444"/>',
           f'<text x="{left + pw / 2}" y="{top + ph + 28}" text-anchor="middle">hosts (x 10 models)</text>']
    for frac in (0, 0.25, 0.5, 0.75, 1):
        v = ymin + (ymax - ymin) * frac
        out.append(f'<text x="{left - 4}" y="{sy(v) + 4:.1f}" text-anchor="end">{v:.4g}</text>'
                   f'<line x1="{left}" y1="{sy(v):.1f}" x2="{left + pw}" y2="{sy(v):.1f}" stroke="#eee"/>')
    for h in sorted({h for h, _ in values}):
        out.append(f'<text x="{sx(h):.1f}" y="{top + ph + 14}" text-anchor="middle">{h}</text>')
    for n, (label, pts) in enumerate(series):
        xy = [(sx(p["hosts"]), sy(p[key])) for p in pts
              if isinstance(p.get(key), (int, float)) and not math.isnan(p[key])]
        colour = COLOURS[n % len(COLOURS)]
        if xy:
            out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2"{_dash(label)} points="'
                       + " ".join(f"{x:.1f},{y:.1f}" for x, y in xy) + '"/>')
            out += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{colour}"/>' for x, y in xy]
    return out
