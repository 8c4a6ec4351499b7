"""A plan an operator can read (``GET /api/plan``, ``llm-router plan``): per host and GPU, which
models fit together, what starting one now would do, which fit nowhere, and where the estimate
from a model's files was far from what its engine was measured to hold.

Pure: the cluster view's catalogs, device snapshots and instances in, a ``PlanResult`` out, with
the very rules placement uses (``llm_router.vram`` through ``router.control.host_rank``), so the
plan says what a start would do, not a second opinion. VRAM per profile is the larger of the
declaration and the measurement, else the estimate (``effective_profiles``); ``source`` says
which one it is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import combinations

from llm_lab_router.protocol import CatalogEntry, DeviceSnapshot, Instance, ModelUsage
from llm_lab_router.router.control.host_rank import (
    HOLDING,
    Fit,
    fit_on,
    host_free,
    plan_eviction,
    profiles_of,
)
from llm_lab_router.router.core.responses import (
    Disagreement,
    HostPlan,
    Nowhere,
    PlanGpu,
    PlanModel,
    PlanProfile,
    PlanResult,
)
from llm_lab_router.router.observe.vram_figures import vram_figures
from llm_lab_router.vram import Held, NoRoom, fit_profiles

DISAGREE = 0.2  # an estimate off the measurement by more than 20 % is listed
MAX_TOGETHER = 12  # GPU models per host above which ``together`` is not tried exhaustively


def _source(entry: CatalogEntry, i: int) -> str:
    devices = entry.devices[i] if i < len(entry.devices) else ["cpu"]
    if all(d == "cpu" for d in devices):
        return "cpu"
    declared, measured, estimated = (v[i] if i < len(v) else 0
                                     for v in (entry.vram_mb, entry.measured_vram_mb, entry.estimated_vram_mb))
    if measured and measured > declared:
        return "measured"
    if declared:
        return "declared"
    return "estimated" if estimated else "unknown"


def _empty(snapshot: DeviceSnapshot | None) -> tuple[dict[int, int], str]:
    """Free MiB per GPU of the host with nothing loaded (its totals)."""
    if snapshot is None:
        return {}, "no device information"
    if not snapshot.cuda.online:
        return {}, snapshot.cuda.error or "CUDA is offline on this host"
    return {g.index: g.memory_total for g in snapshot.cuda.gpus}, ""


def _packs(entries: Sequence[CatalogEntry], snapshot: DeviceSnapshot | None) -> bool:
    """Whether ``entries`` fit the host's GPUs at once (largest first, as they would be placed)."""
    totals, why = _empty(snapshot)
    held: list[Held] = []
    for entry in sorted(entries, key=lambda e: -max((p.vram_mb for p in profiles_of(e)), default=0)):
        free = {g: t - sum(h.vram_mb for h in held if g in h.gpus) for g, t in totals.items()}
        try:
            profile, gpus = fit_profiles(profiles_of(entry), free, why)
        except NoRoom:
            return False
        held.append(Held(tuple(gpus), profile.vram_mb if gpus else 0, False))
    return True


def together(entries: Sequence[CatalogEntry], snapshot: DeviceSnapshot | None) -> tuple[list[list[str]], bool]:
    """The largest sets of GPU models (by size, then id) that fit the host at once, and whether
    every set was tried (more than ``MAX_TOGETHER`` models: only sets built one model at a time)."""
    gpu = sorted((e for e in entries if any(p.vram_mb for p in profiles_of(e))), key=lambda e: e.id)
    if len(gpu) > MAX_TOGETHER:
        chosen: list[CatalogEntry] = []
        for e in gpu:
            if _packs([*chosen, e], snapshot):
                chosen.append(e)
        return [[e.id for e in chosen]], False
    for size in range(len(gpu), 0, -1):
        sets = [[e.id for e in combo] for combo in combinations(gpu, size) if _packs(combo, snapshot)]
        if sets:
            return sets, True
    return [], True


def _model_plan(wid: str, entry: CatalogEntry, snapshot: DeviceSnapshot | None, mine: Sequence[Instance],
                usage: Mapping[str, ModelUsage]) -> PlanModel:
    profiles = profiles_of(entry)
    rows = [PlanProfile(devices=list(p.devices), vram_mb=p.vram_mb if any(d != "cpu" for d in p.devices) else 0,
                        source=_source(entry, i)) for i, p in enumerate(profiles)]
    inst = next((i for i in mine if i.model == entry.id), None)
    state = inst.state if inst is not None else "stopped"
    base = PlanModel(model=entry.id, state=state, profiles=rows, fits_alone=not _alone_reason(entry, snapshot),
                     now="no_room")
    if state in HOLDING:
        base.now = state
        return base
    got = fit_on(wid, entry, snapshot, mine)
    if isinstance(got, Fit):
        base.now, base.profile = "fits", got.profile
        return base
    eviction = plan_eviction(entry.id, {wid: entry}, {wid: snapshot} if snapshot else {}, list(mine), usage)
    if eviction is not None:
        base.now, base.evicts = "evicts", eviction.victims
        return base
    base.why = got
    return base


def build_plan(catalogs: Mapping[str, Mapping[str, CatalogEntry]], snapshots: Mapping[str, DeviceSnapshot],
               instances: Sequence[Instance], usage: Mapping[str, ModelUsage], host: str | None = None) -> PlanResult:
    """The plan of every live host (``catalogs``: host -> model -> entry), or of ``host`` only;
    ``usage``: in-flight requests per model (a busy model is never an eviction victim)."""
    hosts, alone_anywhere, reasons, disagree = [], set(), {}, []
    for wid in sorted(catalogs):
        entries = [catalogs[wid][m] for m in sorted(catalogs[wid])]
        snapshot = snapshots.get(wid)
        mine = [i for i in instances if i.worker == wid]
        plans = [_model_plan(wid, e, snapshot, mine, usage) for e in entries]
        for e, p in zip(entries, plans):
            if p.fits_alone:
                alone_anywhere.add(e.id)
            else:
                reasons.setdefault(e.id, {})[wid] = _alone_reason(e, snapshot)
            disagree += [Disagreement(model=e.id, figures=f) for f in vram_figures(wid, e)
                         if f.estimate_error is not None and abs(f.estimate_error) > DISAGREE]
        if host is not None and wid != host:
            continue
        free, why = host_free(snapshot, mine)
        gpus = [PlanGpu(index=g.index, name=g.name, total_mb=g.memory_total, free_mb=free.get(g.index, 0),
                        resident=sorted(i.model for i in mine if _holds(i, g.index)))
                for g in (snapshot.cuda.gpus if snapshot is not None and snapshot.cuda.online else [])]
        sets, complete = together(entries, snapshot)
        hosts.append(HostPlan(worker=wid, gpus=gpus, models=plans, together=sets, together_complete=complete,
                              gpu_error=why))
    nowhere = [Nowhere(model=m, reasons=r) for m, r in sorted(reasons.items()) if m not in alone_anywhere]
    if host is not None:
        disagree = [d for d in disagree if d.figures.worker == host]
    return PlanResult(hosts=hosts, nowhere=nowhere, disagree=disagree)


def _holds(i: Instance, gpu: int) -> bool:
    """Whether the instance holds VRAM on GPU ``gpu`` (as ``host_rank.held_by`` counts it)."""
    return i.state in HOLDING and bool(i.vram_mb) and str(gpu) in i.gpus.split(",")


def _alone_reason(entry: CatalogEntry, snapshot: DeviceSnapshot | None) -> str:
    """Why no profile of ``entry`` fits the host even with nothing loaded ("": one does)."""
    try:
        fit_profiles(profiles_of(entry), *_empty(snapshot))
    except NoRoom as exc:
        return str(exc)
    return ""
