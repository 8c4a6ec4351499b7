"""What the bench prints: one ``Row`` per figure, the table, and the machine it ran on."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil


@dataclass
class Row:
    section: str
    metric: str
    values: dict[str, float]  # target name -> value
    unit: str = ""
    delta: str = ""
    target: str = ""
    ok: bool | None = None
    errors: dict[str, int] = field(default_factory=dict)



def fmt_value(v: float | None, unit: str) -> str:
    if v is None or v != v:
        return "-"
    if unit == "us":
        return f"{v:,.0f}"
    if unit in ("ms",):
        return f"{v:.3f}" if v < 10 else f"{v:.1f}"
    if unit in ("ratio", "µs"):
        return f"{v:.2f}"
    if unit == "MB":
        return f"{v:.1f}"
    return f"{v:,.0f}"


def table(rows: list[Row], columns: list[str]) -> str:
    head = ["section", "metric", "unit", *columns, "delta / ratio", "target", "ok", "errors"]
    body = []
    for r in rows:
        verdict = "" if r.ok is None else ("PASS" if r.ok else "FAIL")
        errs = "/".join(str(r.errors.get(c, "-")) for c in columns) if r.errors else ""
        body.append([r.section, r.metric, r.unit, *(fmt_value(r.values.get(c), r.unit) for c in columns),
                     r.delta, r.target, verdict, errs])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    right = {3 + i for i in range(len(columns))}

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [line(head), line(["-" * w for w in widths])]
    last = None
    for cells in body:
        if last is not None and cells[0] != last:
            out.append("")
        last = cells[0]
        out.append(line(cells))
    return "\n".join(out)


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "platform": platform.platform(),
            "loop": "uvloop" if _has_uvloop() else "asyncio"}


def _has_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True
