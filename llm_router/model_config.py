"""One model's entry in a host's config (``[[models]]``): the struct the worker, placement and
the presets all read.

It lives apart from ``config`` (the whole file: parsing, host settings, checks) because
``presets`` completes a ``ModelConfig`` and ``config`` applies the presets: with the struct in
either, the two would import each other. ``Engine`` is here for the same reason: it is a field.
"""

from __future__ import annotations

from typing import Annotated, Literal, get_args

import msgspec
from llm_lab_router.protocol import CatalogEntry, Mode, Routing

MODEL_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z"  # \Z: $ would accept a trailing newline
Engine = Literal["command", "llama.cpp", "vllm", "sglang", "tei", "llama-cpp-python"]
ENGINES: tuple[str, ...] = get_args(Engine)


class DeviceProfile(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One way to run a model. ``devices``: ``cuda:N`` (that GPU), ``cuda`` (any one GPU),
    ``cpu``; ``vram_mb`` is needed on each GPU. ``args``/``env`` are added for this profile
    only (e.g. ``-ngl 0`` for the CPU profile)."""

    devices: list[str] = msgspec.field(default_factory=lambda: ["cpu"])
    vram_mb: Annotated[int, msgspec.Meta(ge=0)] = 0
    args: list[str] = []
    env: dict[str, str] = {}


class ModelConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    id: Annotated[str, msgspec.Meta(pattern=MODEL_ID)]
    # ``engine`` other than "command": ``model_path`` + the preset give command, health, timeouts
    # and mode (see ``presets``); fields written in the file override the preset.
    engine: Engine = "command"
    command: list[str] = []  # required when engine = "command"; after parse_config, always set
    model_path: str = ""  # GGUF file (llama.cpp), Hub id or folder (vllm, sglang, tei)
    engine_args: list[str] = []  # appended to the command (preset or explicit)
    aliases: list[str] = []
    mode: Mode = "chat"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 0  # 0 = auto-assigned from port_range
    env: dict[str, str] = {}
    cwd: str = ""
    health: str = "/health"
    startup_timeout: Annotated[float, msgspec.Meta(gt=0)] = 120.0
    stop_grace: Annotated[float, msgspec.Meta(ge=0)] = 10.0
    auto_start: bool = False
    on_demand: bool = True  # start when a request for it arrives
    idle_ttl: Annotated[float, msgspec.Meta(ge=0)] = 0.0  # seconds unused before unload; 0 = never
    max_concurrency: Annotated[int, msgspec.Meta(ge=0)] = 0  # per instance; 0 = unlimited
    # Swap-aware scheduling (router/control/scheduler.py): once loaded, stay at least min_residency s
    # before a waiting model may evict it; a request waiting max_wait s overrides residency.
    min_residency: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    max_wait: Annotated[float, msgspec.Meta(ge=0)] = 0.0  # 0 = no bound
    # Opt-in: residency ends early once the model has had nothing queued or in flight for
    # idle_release s (0 = off: it stays its whole min_residency, used or not).
    idle_release: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    restart: Literal["no", "on-failure", "always"] = "on-failure"
    max_restarts: Annotated[int, msgspec.Meta(ge=0)] = 3  # within restart_window, then `failed`
    restart_window: Annotated[float, msgspec.Meta(gt=0)] = 300.0
    owned_by: str = "llm-router"
    created: int = 0
    api_key: str = ""  # the engine's own key, if its server wants one: routers send it as Bearer
    devices: list[str] = []  # shorthand for one profile
    vram_mb: Annotated[int, msgspec.Meta(ge=0)] = 0
    profiles: list[DeviceProfile] = []  # ordered fallbacks; the first that fits is used
    # Among several running instances: "affinity" (same conversation, same instance: its KV
    # cache) or "least-outstanding". fallbacks: models (ids or aliases, on any host) tried in
    # order when this one cannot serve a request (no room, failed start, unreachable, 429).
    routing: Routing = "affinity"
    fallbacks: list[str] = []

    @property
    def names(self) -> list[str]:
        """The id and every alias: all the names a request may use."""
        return [self.id, *[a for a in self.aliases if a != self.id]]

    def device_profiles(self) -> list[DeviceProfile]:
        if self.profiles:
            return self.profiles
        return [DeviceProfile(devices=self.devices or ["cpu"], vram_mb=self.vram_mb)]

    def catalog_entry(self) -> CatalogEntry:
        return CatalogEntry(
            id=self.id,
            aliases=self.names,
            mode=self.mode,
            owned_by=self.owned_by,
            created=self.created,
            auto_start=self.auto_start,
            on_demand=self.on_demand,
            idle_ttl=self.idle_ttl,
            max_concurrency=self.max_concurrency,
            vram_mb=[p.vram_mb if any(d.startswith("cuda") for d in p.devices) else 0
                     for p in self.device_profiles()],
            devices=[list(p.devices) for p in self.device_profiles()],
            startup_timeout=self.startup_timeout,
            routing=self.routing,
            fallbacks=list(self.fallbacks),
            min_residency=self.min_residency,
            max_wait=self.max_wait,
            idle_release=self.idle_release,
        )
