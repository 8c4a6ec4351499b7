"""A host's model config: one TOML file, decoded with msgspec into typed structs.

A bad file is a ``ConfigError`` carrying every problem found in it at once, each one line
``file:line: model 'id': field: problem (did you mean ...)`` (``Problem``), never a traceback:
the schema is checked field by field (``schema_check``), the rules types cannot say after it
(unique names, devices, ...), and a TOML syntax error is reworded with its line
(``toml_text``). The CLI prints one line each and exits with status 2; the worker logs them
and keeps the config in force (reload).
"""

from __future__ import annotations

import os
import re
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Mapping

import msgspec
from llm_lab_router.model_config import DeviceProfile, ModelConfig
from llm_lab_router.presets import apply_preset
from llm_lab_router.protocol import valid_worker_id
from llm_lab_router.schema_check import check_table
from llm_lab_router.toml_text import TablePath, TomlLines, syntax_problem

ALIAS_FORBIDDEN = re.compile(r"[\s\x00-\x1f\x7f/?#%\\]")
DEVICE = re.compile(r"cpu|cuda|cuda:\d+")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config file, said where it is so that it can be fixed without
    reading the schema: ``file:line: model 'id': field: problem (did you mean ...)``.

    ``subject`` is ``model 'id'`` (``models[i]`` while the id itself is missing), ``worker``, or
    empty for the top level and for syntax errors; ``line`` is None where no line applies (an
    unreadable file)."""

    source: str
    line: int | None
    subject: str
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}" if self.line else self.source
        return ": ".join(part for part in (where, self.subject, self.field, self.message) if part)


class ConfigError(ValueError):
    """A bad config file: every ``Problem`` found in it (its ``str`` joins them with "; ", one
    log line; the CLI prints one line each)."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("; ".join(map(str, problems)))


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
    # Upgrade window to per-worker Redis users: also write the key layout routers of older
    # releases read, and take their commands (worker/legacy.py; docs/deploy.md). Needs the old
    # shared ``worker`` Redis user; turn it off (and log in as ``worker.<id>``) once every router is new.
    legacy_keys: bool = False
    # Prefetch (worker/prefetch.py): a model waiting to start here has its weight files read
    # into the page cache, at most prefetch_budget_mb (0 = no cap but RAM) and never below
    # prefetch_reserve_mb of MemAvailable, at prefetch_rate_mb MiB/s (0 = as fast as the disk).
    prefetch: bool = True
    prefetch_budget_mb: Annotated[int, msgspec.Meta(ge=0)] = 0
    prefetch_reserve_mb: Annotated[int, msgspec.Meta(ge=0)] = 4096
    prefetch_rate_mb: Annotated[float, msgspec.Meta(ge=0)] = 0.0


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


@dataclass
class Checked:
    """What ``check_config`` found: the config (None unless the file is valid), every problem,
    and where the file's keys are (``config check`` places the host's problems with it)."""

    config: HostConfig | None
    problems: list[Problem]
    lines: TomlLines

    def line(self, model: int, field: str) -> int | None:
        """The line of a model's ``field``; its ``engine`` line when the preset supplied the
        field (not written in the file); else the model's header."""
        return self.lines.line_of(("models", model), field, "engine")

    def valid(self) -> HostConfig:
        """The config; ``ConfigError`` with every problem if the file is not valid."""
        if self.config is None:
            raise ConfigError(self.problems)
        return self.config


class _Collector:
    """Collects ``Problem``s for one file, each placed by table and key (``schema_check.Report``)."""

    def __init__(self, source: str, lines: TomlLines, raw: dict) -> None:
        self.source, self.lines = source, lines
        models = raw.get("models")
        self.models = models if isinstance(models, list) else []
        self.problems: list[Problem] = []
        self.failed: set[TablePath] = set()  # ("worker",), ("models", i): tables with a problem

    def __call__(self, table: TablePath, key: str, detail: str, message: str) -> None:
        subject, inner = self.subject(table)
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in (*inner, key) if p != "")
        line = self.lines.line_of(table, key, "engine") if table[:1] == ("models",) and len(table) == 2 else \
            self.lines.line(table, key or None)
        self.problems.append(Problem(self.source, line, subject, path.lstrip(".") + detail, message))
        where = (*table, key)  # the model, the worker or the top-level key it belongs to
        self.failed.add(where[:2] if where[:1] == ("models",) else where[:1])

    def subject(self, table: TablePath) -> tuple[str, TablePath]:
        """(``model 'id'`` or ``worker`` or "", the rest of the table's path)."""
        if table[:1] == ("worker",):
            return "worker", table[1:]
        if table[:1] == ("models",) and len(table) > 1 and isinstance(table[1], int):
            entry = self.models[table[1]] if table[1] < len(self.models) else None
            mid = entry.get("id") if isinstance(entry, dict) else None
            return (f"model {mid!r}" if isinstance(mid, str) and mid else f"models[{table[1]}]"), table[2:]
        return "", table


def check_config(text: str | bytes, source: str = "<config>") -> Checked:
    """Every problem of a config text at once, each ``file:line: model 'id': field: problem``
    (a TOML syntax error stops the reading: it is the one problem then)."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = text[:exc.start].count(b"\n") + 1
            return Checked(None, [Problem(source, line, "", "", "not UTF-8 text")], TomlLines())
    lines = TomlLines.scan(text)
    try:
        raw = msgspec.toml.decode(text)
    except msgspec.DecodeError as exc:
        line, message = syntax_problem(str(exc), lines)
        return Checked(None, [Problem(source, line, "", "", message)], lines)
    report = _Collector(source, lines, raw)
    check_table(raw, HostConfig, (), report)
    models: list[ModelConfig] = []
    seen: dict[str, str] = {}
    for i, written in enumerate(report.models):
        if isinstance(written, dict) and ("models", i) not in report.failed and (model := _model(i, written, report)):
            _model_rules(i, model, seen, report)
            models.append(model)
        elif isinstance(written, dict):  # an entry with problems: its names still count against the next ones
            for name in _written_names(written):
                seen.setdefault(name, str(written.get("id")))
    if ("worker",) not in report.failed:
        settings = msgspec.convert(raw.get("worker", {}), WorkerSettings)
        lo, hi = settings.port_range
        if not 0 < lo <= hi <= 65535:
            report(("worker",), "port_range", "", f"{[lo, hi]} is not [low, high] within 1..65535")
        if settings.id and not valid_worker_id(settings.id):
            report(("worker",), "id", "", f"{settings.id!r} {WORKER_ID_RULE}")
    if report.problems:
        return Checked(None, report.problems, lines)
    cfg = msgspec.convert({k: v for k, v in raw.items() if k != "models"}, HostConfig)
    cfg.models, cfg.path = models, source
    return Checked(cfg, [], lines)


def _model(i: int, written: dict, report: _Collector) -> ModelConfig | None:
    """The entry with its engine preset applied (the keys ``written`` in the file win); None,
    reported, if the preset cannot complete it."""
    try:
        return apply_preset(msgspec.convert(written, ModelConfig), given=written.keys())
    except (ValueError, msgspec.ValidationError) as exc:  # apply_preset says "field: problem"
        field, _, message = str(exc).partition(": ")
        report(("models", i), field, "", message)
        return None


def _written_names(written: dict) -> list[str]:
    """The id and aliases as written in an entry, those that are strings."""
    aliases = written.get("aliases")
    return [n for n in [written.get("id"), *(aliases if isinstance(aliases, list) else [])] if isinstance(n, str)]


def _model_rules(i: int, m: ModelConfig, seen: dict[str, str], report: _Collector) -> None:
    """Rules msgspec's types cannot say: unique names (``seen``: name -> model, across the
    file), sane aliases, devices, fallbacks and health path."""
    at = ("models", i)
    for name in m.names:
        field = "id" if name == m.id else "aliases"
        if not name or ALIAS_FORBIDDEN.search(name):
            report(at, field, "", f"{name!r} is not a valid alias "
                                  "(no spaces, control characters, '/', '?', '#', '%' or '\\')")
        elif name in seen:
            report(at, field, "", f"{name!r} is already used by model {seen[name]!r}")
        else:
            seen[name] = m.id
    for j, p in enumerate(m.device_profiles()):
        for d in p.devices:
            if not DEVICE.fullmatch(d):
                table = (*at, "profiles", j) if m.profiles else at
                report(table, "devices", "", f"{d!r} is not 'cpu', 'cuda' or 'cuda:N'")
    for name in m.fallbacks:
        if name in m.names or not name or ALIAS_FORBIDDEN.search(name):
            report(at, "fallbacks", "", f"{name!r} is not another model's id or alias")
    if m.health and not m.health.startswith("/"):
        report(at, "health", "", f"must be a path starting with '/', got {m.health!r}")


# A worker id names its Redis user and its keys (``llm:w:{wid}:*``, an ACL pattern): no ``:``
# and no glob character, so no worker's pattern can cover another's keys.
WORKER_ID_RULE = "is not 1-64 of A-Z a-z 0-9 . _ - starting with a letter or digit"


def check_worker_id(wid: str) -> str:
    """``wid`` if it is a valid worker id (``WORKER_ID_RULE``), else ``ValueError`` saying so."""
    if not valid_worker_id(wid):
        raise ValueError(f"worker id {wid!r} {WORKER_ID_RULE} (set [worker] id or --worker-id)")
    return wid


def parse_config(text: str | bytes, source: str = "<config>") -> HostConfig:
    """The config of a valid text; else ``ConfigError`` with every problem (``check_config``)."""
    return check_config(text, source).valid()


def read_config(path: str | os.PathLike) -> Checked:
    """``check_config`` of a file; an unreadable file is its one problem."""
    p = Path(path)
    try:
        text = p.read_bytes()
    except OSError as exc:
        return Checked(None, [Problem(str(p), None, "", "", f"cannot read: {exc.strerror}")], TomlLines())
    return check_config(text, str(p))


def load_config(path: str | os.PathLike) -> HostConfig:
    return read_config(path).valid()


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
