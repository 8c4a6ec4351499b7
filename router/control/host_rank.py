"""Where a router starts a model, by VRAM, and which idle models it stops to make room.

Pure decisions over the cluster view (state in, decision out), tested without I/O:

- ``host_free``: a host's free VRAM per GPU as the router sees it: its published device
  snapshot (``llm:w:{wid}:devices``) minus what the instances on it hold (``Instance.gpus`` and
  ``Instance.vram_mb``, written by the worker from the moment it places a model), with the same
  rule the worker uses (``llm_router.vram.free_vram``); a model that stopped after the snapshot
  was taken gives its VRAM back to it (``freed_since``);
- ``rank_hosts``: the hosts where some device profile of the model fits, best first;
- ``plan_eviction``: when it fits nowhere, the fewest least-recently-used idle models to stop
  on one host so that it fits there.

The router's picture may be a moment old, and another router may be placing at the same time:
the worker re-checks under its own serialisation and answers ``no_room`` when it lost, and the
router then tries the next host (see ``router.control.client``).
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, Sequence

import msgspec

from llm_lab_router.config import DeviceProfile
from llm_lab_router.protocol import CatalogEntry, DeviceSnapshot, Instance, ModelUsage
from llm_lab_router.vram import Held, NoRoom, effective_profiles, fit_profiles, free_vram

HOLDING = ("starting", "running", "stopping")  # states whose VRAM is taken


class Fit(msgspec.Struct, frozen=True):
    worker: str
    profile: int  # index of the first profile that fits: lower is better
    gpus: list[int]


class Eviction(msgspec.Struct, frozen=True):
    """Stop ``victims`` (model ids, least recently used first) on ``worker``, then start there."""

    worker: str
    victims: list[str]


def profiles_of(entry: CatalogEntry) -> list[DeviceProfile]:
    """The device profiles a catalog entry declares (CPU only for an entry without devices),
    with the VRAM its worker measured where that is more than declared."""
    if not entry.devices:
        return [DeviceProfile(devices=["cpu"])]
    vram = list(entry.vram_mb) + [0] * (len(entry.devices) - len(entry.vram_mb))
    declared = [DeviceProfile(devices=list(d), vram_mb=v) for d, v in zip(entry.devices, vram)]
    # the worker's measurement where above; its estimate where neither is known
    return effective_profiles(declared, entry.measured_vram_mb, entry.estimated_vram_mb)


def held_by(instances: Iterable[Instance]) -> list[Held]:
    return [Held(tuple(int(g) for g in i.gpus.split(",")), i.vram_mb, i.state == "starting")
            for i in instances if i.state in HOLDING and i.gpus and i.vram_mb]


def freed_since(snapshot: DeviceSnapshot | None, instances: Iterable[Instance]) -> list[Instance]:
    """The instances of ``snapshot``'s host that were running when it was taken and have
    stopped (or failed) since: NVML still showed their memory then. A snapshot is up to
    ``devices_interval`` (plus this router's ``refresh_details`` age) old, so without this a start
    right after a stop is refused for want of the very room the stop made. Both times are the
    worker's clock (``DeviceSnapshot.ts``, ``Instance.started_at``/``updated_at``)."""
    if snapshot is None:
        return []
    return [i for i in instances if i.state not in HOLDING and i.gpus and i.vram_mb
            and 0 < i.started_at <= snapshot.ts < i.updated_at]


def host_free(snapshot: DeviceSnapshot | None, instances: Iterable[Instance]) -> tuple[dict[int, int], str]:
    """Free MiB per GPU of one host (``instances``: those on that host)."""
    instances = list(instances)
    return free_vram(_give_back(snapshot, freed_since(snapshot, instances)), held_by(instances))


def fit_on(wid: str, entry: CatalogEntry, snapshot: DeviceSnapshot | None,
           instances: Iterable[Instance]) -> Fit | str:
    """Where ``entry`` fits on host ``wid`` now (``instances``: those on it), or why it does not."""
    profiles = profiles_of(entry)
    try:
        profile, gpus = fit_profiles(profiles, *host_free(snapshot, instances))
    except NoRoom as exc:
        return str(exc)
    return Fit(worker=wid, profile=profiles.index(profile), gpus=gpus)


def rank_hosts(model: str, entries: Mapping[str, CatalogEntry], snapshots: Mapping[str, DeviceSnapshot],
               instances: Sequence[Instance]) -> tuple[list[str], dict[str, str]]:
    """The hosts to try for ``model``, best first, and why each other host has no room.

    ``entries``: the model's catalog entry per live candidate host. Ranking: the earliest
    device profile that fits (two GPUs before one before CPU), then a host where the model did
    not just fail, then the fewest active models, then by id."""
    fits: list[Fit] = []
    reasons: dict[str, str] = {}
    for wid, entry in entries.items():
        got = fit_on(wid, entry, snapshots.get(wid), [i for i in instances if i.worker == wid])
        if isinstance(got, Fit):
            fits.append(got)
        else:
            reasons[wid] = got
    load = {f.worker: 0 for f in fits}
    failed = set()
    for inst in instances:
        if inst.worker in load and inst.state in ("starting", "running"):
            load[inst.worker] += 1
        if inst.model == model and inst.state == "failed":
            failed.add(inst.worker)
    fits.sort(key=lambda f: (f.profile, f.worker in failed, load[f.worker], f.worker))
    return [f.worker for f in fits], reasons


def plan_eviction(model: str, entries: Mapping[str, CatalogEntry], snapshots: Mapping[str, DeviceSnapshot],
                  instances: Sequence[Instance], usage: Mapping[str, ModelUsage],
                  may_evict: Callable[[Instance], bool] | None = None) -> Eviction | None:
    """The fewest idle models to stop on one host so that ``model`` fits there, or None.

    Only ``running`` models with VRAM and no request in flight on them (``usage``: per model id,
    across routers; ``ModelUsage.requests_on`` the instance) are candidates, least recently used first (the later of their last use and their
    start). Among hosts, the fewest victims win, then the earlier profile, then the host id.
    ``may_evict`` replaces the in-flight rule (``router.control.scheduler`` adds residency to it)."""
    if may_evict is None:
        def may_evict(i: Instance) -> bool:
            return usage.get(i.model, ModelUsage()).requests_on(i.worker) == 0
    best: tuple[tuple[int, int, str], Eviction] | None = None
    for wid, entry in entries.items():
        mine = [i for i in instances if i.worker == wid]
        idle = [i for i in mine if i.model != model and i.state == "running" and i.gpus and i.vram_mb
                and may_evict(i)]
        idle.sort(key=lambda i: (max(usage.get(i.model, ModelUsage()).last_used, i.started_at), i.model))
        for n in range(1, len(idle) + 1):
            gone = {i.model for i in idle[:n]}
            got = fit_on(wid, entry, _give_back(snapshots.get(wid), idle[:n]), [i for i in mine if i.model not in gone])
            if isinstance(got, Fit):
                key = (n, got.profile, wid)
                if best is None or key < best[0]:
                    best = (key, Eviction(worker=wid, victims=[i.model for i in idle[:n]]))
                break
    return best[1] if best else None


def _give_back(snapshot: DeviceSnapshot | None, victims: Sequence[Instance]) -> DeviceSnapshot | None:
    """The snapshot as it will read once ``victims`` are stopped (or as it reads now that they
    are): a loaded model's memory shows in NVML, so stopping it frees its VRAM there too
    (``Instance.vram_mb``, capped at the GPU's total)."""
    if snapshot is None or not snapshot.cuda.online or not victims:
        return snapshot
    back: dict[int, int] = {}
    for i in victims:
        for gpu in (int(g) for g in i.gpus.split(",")):
            back[gpu] = back.get(gpu, 0) + i.vram_mb
    gpus = [msgspec.structs.replace(g, memory_free=min(g.memory_total, g.memory_free + back.get(g.index, 0)))
            for g in snapshot.cuda.gpus]
    return msgspec.structs.replace(snapshot, cuda=msgspec.structs.replace(snapshot.cuda, gpus=gpus))


def no_room_message(model: str, reasons: Mapping[str, str]) -> str:
    """Why ``model`` cannot be placed anywhere, host by host (for the 503)."""
    detail = "; ".join(f"{wid}: {why}" for wid, why in sorted(reasons.items()))
    return f"no host has room for model '{model}' and no idle model can be stopped to make room" + (
        f" ({detail})" if detail else "")
