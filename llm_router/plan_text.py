"""``llm-router plan``'s text: the ``GET /api/plan`` body worded for an operator (one block per
host: its GPUs, each model's VRAM and what starting it now would do, the sets that fit at once;
then the models that fit nowhere and the estimates far from their measurement)."""

from __future__ import annotations

from typing import Any


def _vram(model: dict[str, Any]) -> str:
    gpu = [p for p in model.get("profiles", []) if p.get("source") != "cpu"]
    if not gpu:
        return "cpu"
    return ", ".join(f"{p.get('vram_mb', 0)} {p.get('source', '')}" for p in gpu)


def _now(model: dict[str, Any]) -> str:
    now = model.get("now", "")
    if now == "fits":
        return f"fits (profile {model.get('profile', 0) + 1})"
    if now == "evicts":
        return "evicts " + ", ".join(model.get("evicts", []))
    if now == "no_room":
        return "no room" + ("" if model.get("fits_alone") else " even alone")
    return now


def plan_text(body: dict[str, Any]) -> str:
    """The plan as lines of text (MiB per GPU)."""
    lines: list[str] = []
    for host in body.get("hosts", []):
        lines.append(host.get("worker", "?"))
        for g in host.get("gpus", []):
            resident = ", ".join(g.get("resident", [])) or "-"
            lines.append(f"  cuda:{g.get('index')} {g.get('name', '')}  free {g.get('free_mb', 0)}/"
                         f"{g.get('total_mb', 0)} MiB  resident: {resident}")
        if host.get("gpu_error"):
            lines.append(f"  no GPU: {host['gpu_error']}")
        rows = [[m.get("model", ""), m.get("state", ""), _vram(m), _now(m)] for m in host.get("models", [])]
        widths = [max(len(r[i]) for r in [["MODEL", "STATE", "VRAM MiB/GPU", "NOW"], *rows]) for i in range(3)]
        for row in [["MODEL", "STATE", "VRAM MiB/GPU", "NOW"], *rows]:
            lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[3])
        sets = " | ".join("{" + ", ".join(s) + "}" for s in host.get("together", [])) or "-"
        partial = "" if host.get("together_complete", True) else " (not every set tried)"
        lines.append(f"  fit together{partial}: {sets}")
    for item in body.get("nowhere", []):
        why = "; ".join(f"{w}: {r}" for w, r in sorted(item.get("reasons", {}).items()))
        lines.append(f"fits nowhere: {item.get('model')} ({why})")
    for d in body.get("disagree", []):
        f = d.get("figures", {})
        lines.append(f"estimate off: {d.get('model')} on {f.get('worker')} profile {f.get('profile', 0) + 1}: "
                     f"estimated {f.get('estimated_mb')} MiB, measured {f.get('measured_mb')} MiB "
                     f"({f.get('estimate_error', 0):+.0%})")
    return "\n".join(lines) if lines else "no live hosts"
