"""What the cluster knows of a model's VRAM on each host: declared, estimated from its files,
measured once it ran, and how far the estimate was from the measurement.

Read from the catalogs workers publish (``CatalogEntry``), for ``/api/models/{alias}/info``,
``GET /api/plan`` and the ``llm_router_vram_estimate_error_ratio`` metric: one reading, so the
three never disagree.
"""

from __future__ import annotations

from llm_lab_router.estimate import estimate_error
from llm_lab_router.protocol import CatalogEntry
from llm_lab_router.router.core.responses import VramFigures


def _at(values: list[int], i: int) -> int:
    return values[i] if i < len(values) else 0


def vram_figures(worker: str, entry: CatalogEntry) -> list[VramFigures]:
    """One row per GPU profile of ``entry`` (CPU-only profiles need no VRAM: left out)."""
    rows = []
    for i, devices in enumerate(entry.devices):
        if all(d == "cpu" for d in devices):
            continue
        est, seen = _at(entry.estimated_vram_mb, i), _at(entry.measured_vram_mb, i)
        rows.append(VramFigures(worker=worker, profile=i, devices=list(devices), declared_mb=_at(entry.vram_mb, i),
                                estimated_mb=est, measured_mb=seen, estimate_error=estimate_error(est, seen)))
    return rows
