"""Where a model runs on this host: which device profile, which GPUs, which port.

``choose_profile`` and ``choose_port`` are pure decisions (state in, decision out) so they are
tested without GPUs or sockets. ``Placer`` is the small stateful part around them: it takes a
fresh device reading and remembers what this worker already promised to models that are still
loading, so two models starting at once are not both placed on the same free gigabytes.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Awaitable, Callable, Iterable, Mapping

from llm_router.config import DeviceProfile, ModelConfig, WorkerSettings
from llm_router.protocol import DeviceSnapshot


class NoFit(Exception):
    """The model cannot be placed on this host now; the message says why, for the operator."""


NO_ROOM = "no device profile fits this host now"  # how a start that lost on VRAM fails


@dataclass(frozen=True)
class Held:
    """VRAM promised to one model: ``vram_mb`` MiB on each of ``gpus``. ``loading``: its
    process may not show that memory in NVML yet (it is starting)."""

    gpus: tuple[int, ...]
    vram_mb: int
    loading: bool


def choose_profile(model: ModelConfig, snapshot: DeviceSnapshot | None,
                   reserved: Mapping[int, int] | None = None,
                   held: Iterable[Held] = ()) -> tuple[DeviceProfile, list[int]]:
    """The first of ``model``'s device profiles that fits, and the GPU indices it gets.

    A GPU fits when its free memory (``free_vram``: the snapshot minus ``reserved`` MiB per GPU
    index and minus what ``held`` promises) is at least the profile's ``vram_mb``. ``cuda:N``
    needs that GPU; ``cuda`` takes the fitting GPU with the most free memory not already taken
    by the profile; ``cpu`` always fits. Without GPU information (no snapshot, NVML offline)
    only CPU profiles fit. Raises ``NoFit`` naming each profile and why it did not fit.
    """
    free, no_gpu_reason = free_vram(snapshot, held, reserved or {})
    return fit_profiles(model.device_profiles(), free, no_gpu_reason)


def fit_profiles(profiles: Iterable[DeviceProfile], free: Mapping[int, int],
                 no_gpu_reason: str = "no device information") -> tuple[DeviceProfile, list[int]]:
    """The first profile that fits ``free`` (MiB per GPU index) and its GPUs; else ``NoFit``.
    Shared by the worker (its live reading) and routers (the published snapshots)."""
    reasons = []
    for n, profile in enumerate(profiles, 1):
        gpus, why = _fit(profile, dict(free), no_gpu_reason)
        if why is None:
            return profile, gpus
        reasons.append(f"profile {n} [{', '.join(profile.devices)}]: {why}")
    raise NoFit(f"{NO_ROOM}: " + "; ".join(reasons))


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


def port_is_free(host: str, port: int) -> bool:
    """Whether a server could bind ``host:port`` now (tested by binding it, as engines do)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def choose_port(fixed: int, port_range: Iterable[int], taken: set[int],
                is_free: Callable[[int], bool]) -> int:
    """``fixed`` if it is free, else the first free port of ``port_range`` (``[low, high]``)
    that no other model of this worker holds (``taken``: an engine still loading may not
    have bound its port yet). Raises ``NoFit``."""
    if fixed:
        if fixed in taken or not is_free(fixed):
            raise NoFit(f"port {fixed} is already in use")
        return fixed
    low, high = port_range
    for port in range(low, high + 1):
        if port not in taken and is_free(port):
            return port
    raise NoFit(f"no free port in worker.port_range [{low}, {high}]")


@dataclass
class Placement:
    profile: DeviceProfile
    gpus: list[int]
    port: int

    @property
    def vram_mb(self) -> int:
        return self.profile.vram_mb if self.gpus else 0


class Placer:
    """Places models of one worker and keeps its promises (ports, VRAM) until released.

    ``snapshot`` reads this host's devices now. A model's VRAM and port are promised from
    ``place`` until ``release``; until ``settle`` (it is loaded) its VRAM is also subtracted
    from NVML's free memory, which may not show it yet (see ``free_vram``). ``place`` has no
    await between reading the promises and recording its own, so concurrent starts on one
    host are decided one after the other: a host never overcommits its own GPUs.
    """

    def __init__(self, settings: WorkerSettings, snapshot: Callable[[], Awaitable[DeviceSnapshot | None]],
                 is_free: Callable[[str, int], bool] = port_is_free) -> None:
        self.settings = settings
        self.snapshot = snapshot
        self.is_free = is_free
        self._held: dict[str, Placement] = {}
        self._loading: set[str] = set()

    async def place(self, model: ModelConfig) -> Placement:
        needs_gpu = any(d != "cpu" for p in model.device_profiles() for d in p.devices)
        snapshot = await self.snapshot() if needs_gpu else None
        self.release(model.id)
        profile, gpus = choose_profile(model, snapshot, held=self.held())
        port = choose_port(model.port, self.settings.port_range, {p.port for p in self._held.values()},
                           lambda port: self.is_free(self.settings.bind_host, port))
        placement = self._held[model.id] = Placement(profile=profile, gpus=gpus, port=port)
        self._loading.add(model.id)
        return placement

    def hold(self, model_id: str, placement: Placement) -> None:
        """Record the placement of an engine this worker did not place (adopted), as loaded."""
        self._held[model_id] = placement
        self._loading.discard(model_id)

    def held(self) -> list[Held]:
        """What this worker has promised now: every placed model's VRAM (see ``free_vram``)."""
        return [Held(tuple(p.gpus), p.vram_mb, m in self._loading) for m, p in self._held.items()]

    def settle(self, model_id: str) -> None:
        self._loading.discard(model_id)

    def release(self, model_id: str) -> None:
        self._loading.discard(model_id)
        self._held.pop(model_id, None)
