"""Where a model runs on this host: which device profile, which GPUs, which port.

``choose_profile`` and ``choose_port`` are pure decisions (state in, decision out) so they are
tested without GPUs or sockets. ``Placer`` is the small stateful part around them: it takes a
fresh device reading and remembers what this worker already promised to models that are still
loading, so two models starting at once are not both placed on the same free gigabytes.
The VRAM rule itself (``free_vram``, ``fit_profiles``) is shared with routers:
``llm_router.vram``.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Awaitable, Callable, Iterable, Mapping, Sequence

import msgspec
from llm_lab_router.config import DeviceProfile, ModelConfig, WorkerSettings
from llm_lab_router.protocol import DeviceSnapshot
from llm_lab_router.vram import Held, NoFit, NoRoom, effective_profiles, fit_profiles, free_vram


def choose_profile(model: ModelConfig, snapshot: DeviceSnapshot | None,
                   reserved: Mapping[int, int] | None = None,
                   held: Iterable[Held] = (), measured: Sequence[int] = (),
                   estimated: Sequence[int] = ()) -> tuple[DeviceProfile, list[int]]:
    """The first of ``model``'s device profiles that fits, and the GPU indices it gets.

    A GPU fits when its free memory (``free_vram``: the snapshot minus ``reserved`` MiB per GPU
    index and minus what ``held`` promises) is at least the profile's ``vram_mb``. ``cuda:N``
    needs that GPU; ``cuda`` takes the fitting GPU with the most free memory not already taken
    by the profile; ``cpu`` always fits. Without GPU information (no snapshot, NVML offline)
    only CPU profiles fit. Raises ``NoRoom`` naming each profile and why it did not fit.
    ``measured``: MiB seen per profile (``worker.learning``), used where above the declaration;
    ``estimated``: MiB from the model's files (``worker.estimates``), where neither is known.
    """
    free, no_gpu_reason = free_vram(snapshot, held, reserved or {})
    return fit_profiles(effective_profiles(model.device_profiles(), measured, estimated), free, no_gpu_reason)


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
    profile: DeviceProfile  # as placed: its vram_mb is the measured one where that is more
    gpus: list[int]
    port: int
    index: int = 0  # of the profile among the model's device profiles

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

    ``lost_on_vram(model)`` says whether that model's last ``place`` failed for want of VRAM
    (``NoRoom``), which the start's reply reports as ``no_room`` (a typed fact, not a reading
    of the error message).
    """

    def __init__(self, settings: WorkerSettings, snapshot: Callable[[], Awaitable[DeviceSnapshot | None]],
                 is_free: Callable[[str, int], bool] = port_is_free,
                 measured: Callable[[str], Sequence[int]] = lambda model_id: (),
                 estimated: Callable[[ModelConfig, DeviceSnapshot | None], Sequence[int]] = lambda m, s: ()) -> None:
        self.settings = settings
        self.snapshot = snapshot
        self.is_free = is_free
        self.measured = measured  # MiB seen per device profile of a model (worker.learning)
        self.estimated = estimated  # MiB per profile from the model's files (worker.estimates)
        self._held: dict[str, Placement] = {}
        self._loading: set[str] = set()
        self._no_room: set[str] = set()

    async def place(self, model: ModelConfig) -> Placement:
        needs_gpu = any(d != "cpu" for p in model.device_profiles() for d in p.devices)
        snapshot = await self.snapshot() if needs_gpu else None
        self.release(model.id)
        self._no_room.discard(model.id)
        try:
            estimated = self.estimated(model, snapshot) if needs_gpu else ()
            profile, gpus = choose_profile(model, snapshot, held=self.held(), measured=self.measured(model.id),
                                           estimated=estimated)
        except NoRoom:
            self._no_room.add(model.id)
            raise
        port = choose_port(model.port, self.settings.port_range, {p.port for p in self._held.values()},
                           lambda port: self.is_free(self.settings.bind_host, port))
        index = effective_profiles(model.device_profiles(), self.measured(model.id), estimated).index(profile)
        placement = self._held[model.id] = Placement(profile=profile, gpus=gpus, port=port, index=index)
        self._loading.add(model.id)
        return placement

    def hold(self, model_id: str, placement: Placement) -> None:
        """Record the placement of an engine this worker did not place (adopted), as loaded."""
        self._held[model_id] = placement
        self._loading.discard(model_id)

    def held(self) -> list[Held]:
        """What this worker has promised now: every placed model's VRAM (see ``free_vram``)."""
        return [Held(tuple(p.gpus), p.vram_mb, m in self._loading) for m, p in self._held.items()]

    def lost_on_vram(self, model_id: str) -> bool:
        return model_id in self._no_room

    def raise_vram(self, model_id: str, vram_mb: int) -> None:
        """A loaded model was measured using more than it was placed with: hold that much."""
        if (p := self._held.get(model_id)) is not None and p.gpus and vram_mb > p.profile.vram_mb:
            p.profile = msgspec.structs.replace(p.profile, vram_mb=vram_mb)

    def shares_gpus(self, model_id: str) -> bool:
        """Whether another model of this worker is placed on one of ``model_id``'s GPUs now."""
        mine = set(p.gpus) if (p := self._held.get(model_id)) is not None else set()
        return any(mine.intersection(q.gpus) for m, q in self._held.items() if m != model_id)

    def settle(self, model_id: str) -> None:
        self._loading.discard(model_id)

    def release(self, model_id: str) -> None:
        self._loading.discard(model_id)
        self._held.pop(model_id, None)
