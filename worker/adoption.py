"""Engines that outlive their worker, and the worker that takes them over.

A model process carries in its environment who started it and what it is:
``LLM_ROUTER_WORKER`` (the worker id), ``LLM_ROUTER_MODEL``, ``LLM_ROUTER_SPEC_HASH`` (a hash of
what makes up the process: argv, the config's env, cwd, GPUs) and the placement needed to
recompute that hash (``LLM_ROUTER_PORT``, ``LLM_ROUTER_PROFILE``; the GPUs are its
``CUDA_VISIBLE_DEVICES``). A worker that starts finds the engines of its id (``find_engines``)
and adopts each one whose hash still matches its config (``spec_hash`` of ``engine_spec``) and
that answers its health check: same pid, same URL. It is not their parent, so it watches them
through a pidfd (``wait_exit``; psutil polling where there is none) and still sees a crash at
once.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import msgspec
import psutil
from llm_lab_router.config import DeviceProfile, ModelConfig, WorkerSettings, expand_command
from llm_lab_router.lifeline import processes_with_env
from llm_lab_router.worker.orphans import MODEL_ENV, WORKER_ENV, is_gone

SPEC_HASH_ENV = "LLM_ROUTER_SPEC_HASH"
PORT_ENV = "LLM_ROUTER_PORT"
PROFILE_ENV = "LLM_ROUTER_PROFILE"
POLL_EXIT = 0.1  # seconds between two looks at a process without a pidfd


@dataclass(frozen=True)
class EngineSpec:
    """What makes up an engine process: its argv, the environment the config gives it, its cwd."""

    argv: list[str]
    env: dict[str, str]
    cwd: str

    @property
    def hash(self) -> str:
        data = msgspec.json.encode([self.argv, sorted(self.env.items()), self.cwd])
        return hashlib.sha256(data).hexdigest()[:32]


def engine_spec(model: ModelConfig, profile: DeviceProfile, *, port: int, gpus: list[int],
                settings: WorkerSettings, config_dir: str) -> EngineSpec:
    """The process ``model`` runs as with this placement (also what an adopted one must match)."""
    argv = expand_command(model, profile, port=port, host=settings.bind_host, config_dir=config_dir)
    env = {**model.env, **profile.env, "CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus))}
    return EngineSpec(argv=argv, env=env, cwd=str(Path(config_dir, model.cwd)))


@dataclass
class FoundEngine:
    """A model process of this worker id, as its environment describes it."""

    pid: int
    model: str
    spec_hash: str
    port: int
    profile: int
    gpus: list[int]
    created: float  # unix time the process started
    cmdline: str


def find_engines(worker_id: str) -> list[FoundEngine]:
    """Engines (process-group leaders) carrying ``worker_id``; blocking: run it in a thread.
    Children of an engine carry the id too; they go with their group."""
    found = []
    for proc in processes_with_env(WORKER_ENV, worker_id):
        try:
            if is_gone(proc) or os.getpgid(proc.pid) != proc.pid:
                continue
            env = proc.environ()
            gpus = [int(g) for g in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip().isdigit()]
            found.append(FoundEngine(pid=proc.pid, model=env.get(MODEL_ENV, ""), spec_hash=env.get(SPEC_HASH_ENV, ""),
                                     port=_int(env.get(PORT_ENV)), profile=_int(env.get(PROFILE_ENV)), gpus=gpus,
                                     created=proc.create_time(), cmdline=" ".join(proc.cmdline())))
        except (psutil.Error, OSError):
            continue
    return found


def matches(found: FoundEngine, model: ModelConfig, settings: WorkerSettings, config_dir: str) -> str:
    """"" when ``found`` is what ``model`` would run now, else why not."""
    profiles = model.device_profiles()
    if not 0 <= found.profile < len(profiles):
        return f"device profile {found.profile + 1} is no longer in the config"
    if found.port <= 0:
        return "it does not say its port"
    spec = engine_spec(model, profiles[found.profile], port=found.port, gpus=found.gpus, settings=settings,
                       config_dir=config_dir)
    return "" if spec.hash == found.spec_hash else "its command, env, cwd or devices differ from the config"


def foreign_engine_on(port: int, pgid: int) -> int:
    """The pid of another model process (any worker's: it carries ``LLM_ROUTER_WORKER``) that
    listens on ``port`` and is not in process group ``pgid``, else 0. Two workers on one host
    may pick the same free port at once; the loser's health check is then answered by the
    winner's engine. Blocking: run it in a thread."""
    try:
        conns = psutil.net_connections(kind="tcp")
    except (psutil.Error, OSError):
        return 0
    for conn in conns:
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
            try:
                if os.getpgid(conn.pid) != pgid and WORKER_ENV in psutil.Process(conn.pid).environ():
                    return conn.pid
            except (psutil.Error, OSError):
                continue
    return 0


async def wait_exit(pid: int) -> None:
    """Return when ``pid`` (not our child) has exited: a pidfd wakes us at once on Linux;
    elsewhere psutil is asked every ``POLL_EXIT`` s."""
    try:
        fd = os.pidfd_open(pid)  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        fd = -1
    if fd < 0:
        while _alive(pid):
            await asyncio.sleep(POLL_EXIT)
        return
    loop = asyncio.get_running_loop()
    exited = loop.create_future()
    loop.add_reader(fd, lambda: exited.done() or exited.set_result(None))
    try:
        await exited
    finally:
        loop.remove_reader(fd)
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        return not is_gone(psutil.Process(pid))
    except psutil.Error:
        return False


def _int(value: str | None) -> int:
    try:
        return int(value or "")
    except ValueError:
        return -1
