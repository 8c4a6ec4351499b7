"""The VRAM fitting rule, shared by the worker (its live reading) and routers (the published
snapshots): how much memory a GPU has left, and which device profile of a model fits.

Both sides must decide with the same rule, or a router would send a start to a host whose
worker then refuses it (or the reverse); so the rule lives once, here, as pure functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from llm_lab_router.config import DeviceProfile
from llm_lab_router.protocol import DeviceSnapshot
from msgspec.structs import replace

NO_ROOM = "no device profile fits this host now"  # how the message of a start that lost on VRAM begins


class NoFit(Exception):
    """The model cannot be placed on this host now; the message says why, for the operator."""


class NoRoom(NoFit):
    """No device profile fits the free VRAM: another host (or an eviction) may have room, which
    a taken port or a missing GPU index do not promise. A start that fails with it answers
    ``Reply.no_room``."""


@dataclass(frozen=True)
class Held:
    """VRAM promised to one model: ``vram_mb`` MiB on each of ``gpus``. ``loading``: its
    process may not show that memory in NVML yet (it is starting)."""

    gpus: tuple[int, ...]
    vram_mb: int
    loading: bool


def fit_profiles(profiles: Iterable[DeviceProfile], free: Mapping[int, int],
                 no_gpu_reason: str = "no device information") -> tuple[DeviceProfile, list[int]]:
    """The first profile that fits ``free`` (MiB per GPU index) and its GPUs; else ``NoRoom``
    naming each profile and why it did not fit.

    ``cuda:N`` needs that GPU; ``cuda`` takes the fitting GPU with the most free memory not
    already taken by the profile; ``cpu`` always fits. Without GPU information only CPU
    profiles fit."""
    reasons = []
    for n, profile in enumerate(profiles, 1):
        gpus, why = _fit(profile, dict(free), no_gpu_reason)
        if why is None:
            return profile, gpus
        reasons.append(f"profile {n} [{', '.join(profile.devices)}]: {why}")
    raise NoRoom(f"{NO_ROOM}: " + "; ".join(reasons))


def effective_profiles(profiles: Sequence[DeviceProfile], measured: Sequence[int],
                       estimated: Sequence[int] = ()) -> list[DeviceProfile]:
    """``profiles`` with each GPU profile's ``vram_mb`` raised to what was measured for it
    (``measured``: MiB per profile index, 0 = not measured): a declaration is a floor, never
    trusted below what the engine was seen to use (worker.learning). A profile neither declared
    nor measured takes its estimate from the model's files (``estimated``, llm_router.estimate):
    a guess is better than placing it as if it needed nothing."""
    out = []
    for i, p in enumerate(profiles):
        seen = measured[i] if i < len(measured) else 0
        if not seen and not p.vram_mb:
            seen = estimated[i] if i < len(estimated) else 0
        gpu = any(d != "cpu" for d in p.devices)
        out.append(replace(p, vram_mb=seen) if gpu and seen > p.vram_mb else p)
    return out


def free_vram(snapshot: DeviceSnapshot | None, held: Iterable[Held] = (),
              reserved: Mapping[int, int] | None = None) -> tuple[dict[int, int], str]:
    """Usable MiB per GPU index, or ({}, why there are none).

    Per GPU: ``min(NVML free - loading promises - reserved, total - all promises)``. NVML is the
    truth for everything it sees (other users, a model using more than it declared); a model
    still loading may not show its memory yet, so its promise is subtracted from NVML's free;
    and the declared VRAM of every placed model is a floor on what it holds, so a model whose
    memory NVML never shows (stand-in GPUs, MIG, containers) is still counted.
    """
    if snapshot is None:
        return {}, "no device information"
    if not snapshot.cuda.online:
        return {}, snapshot.cuda.error or "CUDA is offline on this host"
    loading: dict[int, int] = dict(reserved or {})
    promised: dict[int, int] = {}
    for h in held:
        for gpu in h.gpus:
            promised[gpu] = promised.get(gpu, 0) + h.vram_mb
            if h.loading:
                loading[gpu] = loading.get(gpu, 0) + h.vram_mb
    return {g.index: min(g.memory_free - loading.get(g.index, 0), g.memory_total - promised.get(g.index, 0))
            for g in snapshot.cuda.gpus}, ""


def _fit(profile: DeviceProfile, free: dict[int, int], no_gpu_reason: str) -> tuple[list[int], str | None]:
    need = profile.vram_mb
    chosen: list[int] = []
    for device in profile.devices:
        if device == "cpu":
            continue
        if not free:
            return [], f"no GPU ({no_gpu_reason})"
        if device == "cuda":
            candidates = [i for i in sorted(free, key=lambda i: -free[i]) if i not in chosen]
            if not candidates or free[candidates[0]] < need:
                most = max((free[i] for i in candidates), default=0)
                return [], f"no GPU has {need} MiB free (the most is {most} MiB)"
            chosen.append(candidates[0])
            continue
        index = int(device.split(":", 1)[1])
        if index in chosen:
            continue
        if index not in free:
            return [], f"{device} does not exist on this host"
        if free[index] < need:
            return [], f"{device} has {free[index]} MiB free, {need} MiB needed"
        chosen.append(index)
    return chosen, None
