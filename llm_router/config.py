"""A host's model config: one TOML file, decoded with msgspec into typed structs.

A bad file is a ``ConfigError`` whose message is one line naming the file, the field and
the problem (``models.toml: Expected `int`, got `str` - at `$.models[0].port```), never a
traceback. The CLI prints it and exits with status 2.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from pathlib import Path
from typing import Annotated, Literal, Mapping

import msgspec
from llm_lab_router.presets import Engine, apply_preset
from llm_lab_router.protocol import CatalogEntry, Mode, Routing

MODEL_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
ALIAS_FORBIDDEN = re.compile(r"[\s\x00-\x1f\x7f/?#%\\]")
DEVICE = re.compile(r"^(cpu|cuda|cuda:\d+)$")


class ConfigError(ValueError):
    """A config problem, worded for the operator: ``file: field: problem``."""


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


class WorkerSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    id: str = ""  # default: the host name
    advertise_host: str = "127.0.0.1"  # address routers use to reach this host's models
    bind_host: str = "127.0.0.1"  # what {host} expands to in commands
    port_range: Annotated[list[int], msgspec.Meta(min_length=2, max_length=2)] = msgspec.field(
        default_factory=lambda: [20000, 20999])
    heartbeat_interval: Annotated[float, msgspec.Meta(gt=0)] = 1.0
    lease_ttl: Annotated[float, msgspec.Meta(gt=0)] = 5.0
    devices_interval: Annotated[float, msgspec.Meta(gt=0)] = 5.0
    log_maxlen: Annotated[int, msgspec.Meta(ge=100)] = 10000
    log_buffer: Annotated[int, msgspec.Meta(ge=100)] = 100000  # lines read ahead of shipping (the rest wait on disk)
    watch_config: bool = False  # reload the file when it changes (as on SIGHUP); polled every 2 s
    # Where the worker keeps its log spool and lock: "" = $LLM_ROUTER_STATE_DIR, else
    # ~/.local/state/llm-router; the worker id is appended either way.
    state_dir: str = ""
    log_spool_mb: Annotated[float, msgspec.Meta(gt=0)] = 64.0  # per model: log lines kept on disk until shipped
    # After SIGTERM (an upgrade) the models keep running this long for the next worker to adopt.
    adopt_timeout: Annotated[float, msgspec.Meta(ge=0)] = 300.0


class HostConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    worker: WorkerSettings = msgspec.field(default_factory=WorkerSettings)
    models: list[ModelConfig] = []
    path: str = ""  # the file it came from (set by load_config)

    def model(self, name: str) -> ModelConfig | None:
        for m in self.models:
            if name in m.names:
                return m
        return None

    @property
    def worker_id(self) -> str:
        return self.worker.id or socket.gethostname()

    @property
    def state_dir(self) -> Path:
        """This worker's own state directory (log spool, lock): see ``WorkerSettings.state_dir``."""
        return state_base(self.worker.state_dir) / self.worker_id


def state_base(configured: str = "") -> Path:
    """Where this host's llm-router state lives: ``configured`` (``[worker] state_dir``,
    ``--state-dir``), else ``$LLM_ROUTER_STATE_DIR``, else ``~/.local/state/llm-router``."""
    base = configured or os.environ.get("LLM_ROUTER_STATE_DIR") or \
        os.path.join(os.path.expanduser("~"), ".local", "state", "llm-router")
    return Path(base).expanduser()


def _check(cfg: HostConfig) -> None:
    """Rules msgspec's types cannot say: unique names, sane aliases and devices."""
    seen: dict[str, str] = {}
    for i, m in enumerate(cfg.models):
        for alias in m.names:
            if not alias or ALIAS_FORBIDDEN.search(alias):
                raise ConfigError(f"models[{i}].aliases: {alias!r} is not a valid alias "
                                  "(no spaces, control characters, '/', '?', '#', '%' or '\\')")
            if alias in seen:
                raise ConfigError(f"models[{i}].aliases: {alias!r} is already used by model {seen[alias]!r}")
            seen[alias] = m.id
        for j, p in enumerate(m.device_profiles()):
            for d in p.devices:
                if not DEVICE.match(d):
                    where = f"models[{i}].profiles[{j}].devices" if m.profiles else f"models[{i}].devices"
                    raise ConfigError(f"{where}: {d!r} is not 'cpu', 'cuda' or 'cuda:N'")
        for name in m.fallbacks:
            if name in m.names or not name or ALIAS_FORBIDDEN.search(name):
                raise ConfigError(f"models[{i}].fallbacks: {name!r} is not another model's id or alias")
        if m.health and not m.health.startswith("/"):
            raise ConfigError(f"models[{i}].health: must be a path starting with '/', got {m.health!r}")
    lo, hi = cfg.worker.port_range
    if not 0 < lo <= hi <= 65535:
        raise ConfigError(f"worker.port_range: {cfg.worker.port_range} is not [low, high] within 1..65535")


def parse_config(text: str | bytes, source: str = "<config>") -> HostConfig:
    try:
        raw = msgspec.toml.decode(text)
        cfg = msgspec.convert(raw, HostConfig)
        cfg.models = [_complete(i, m, raw["models"][i]) for i, m in enumerate(cfg.models)]
        _check(cfg)
    except (msgspec.ValidationError, msgspec.DecodeError, ConfigError) as exc:
        raise ConfigError(f"{source}: {exc}") from None
    cfg.path = source
    return cfg


def _complete(i: int, model: ModelConfig, written: dict) -> ModelConfig:
    """The entry with its engine preset applied; the keys ``written`` in the file win."""
    try:
        return apply_preset(model, given=written.keys())
    except ValueError as exc:
        raise ConfigError(f"models[{i}].{exc}") from None


def load_config(path: str | os.PathLike) -> HostConfig:
    p = Path(path)
    try:
        text = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read: {exc.strerror}") from None
    return parse_config(text, str(p))


def expand_command(model: ModelConfig, profile: DeviceProfile, *, port: int, host: str,
                   config_dir: str) -> list[str]:
    """The argv of a model: its command plus the profile's args, placeholders filled in.

    ``{port}``, ``{host}``, ``{id}``, ``{python}`` (this interpreter) and ``{config_dir}``
    (the folder of the config file, so examples can use relative paths)."""
    values = {"port": str(port), "host": host, "id": model.id, "python": sys.executable,
              "config_dir": config_dir}
    pattern = re.compile(r"\{(port|host|id|python|config_dir)\}")
    return [pattern.sub(lambda mt: values[mt.group(1)], arg) for arg in [*model.command, *profile.args]]


def default_config_path() -> Path:
    """The demo config (``examples/models.toml``, shipped with the package): what ``llm-router
    up`` serves by default. Raises ``shipped.MissingFile`` on a broken installation."""
    from llm_lab_router.shipped import DEMO_CONFIG, shipped

    return shipped(DEMO_CONFIG)


def env_int(name: str, default: int, minimum: int, env: Mapping[str, str] = os.environ) -> int:
    """A whole-number setting a worker reads from the environment (a router reads the same
    variable through ``RouterOptions``): ``default`` when unset; a bad value is the default,
    with a warning on stderr (a worker must not fail to start over a retention setting)."""
    raw = env.get(name, "")
    if not raw:
        return default
    if raw.isdigit() and int(raw) >= minimum:
        return int(raw)
    print(f"warning: {name}={raw!r} is not a whole number >= {minimum}: using {default}", file=sys.stderr)
    return default
