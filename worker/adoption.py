"""Engines that outlive their worker, and the worker that takes them over.

When a worker spawns an engine it writes a spawn record into its state directory
(``ownership``: pid and start time, euid, spool files, argv, port, a secret nonce, and the
placement: device profile, GPUs, the spec hash of argv, env, cwd). A worker that starts reads
the records of its id and state directory (``find_engines``), holds each process that is still
that very engine by a pidfd, and adopts it if its spec hash still matches the config
(``spec_hash`` of ``engine_spec``) and it answers its health check: same pid, same URL. It is
not their parent, so it watches them through the pidfd (``wait_exit``) and still sees a crash
at once. A process that merely says in its environment that it is an engine of this worker
is never adopted, probed or stopped: it is logged once.
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
from llm_lab_router.worker.orphans import WORKER_ENV, find_engine_handles
from llm_lab_router.worker.ownership import EngineRecord, ProcHandle, pgid_of


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
    """An engine a previous worker of this id and state directory spawned, as its spawn
    record describes it, held by a pidfd (``handle``) since it was found."""

    handle: ProcHandle
    record: EngineRecord


def find_engines(worker_id: str, state_dir: Path) -> list[FoundEngine]:
    """The engines this worker's spawn records name and that are still those processes
    (``ownership.verify``); records of the others are dropped, and processes that merely claim
    ``worker_id`` are logged once and left alone. Blocking: run it in a thread."""
    return [FoundEngine(handle, record) for handle, record in find_engine_handles(worker_id, state_dir)]


def matches(found: FoundEngine, model: ModelConfig, settings: WorkerSettings, config_dir: str) -> str:
    """"" when ``found`` is what ``model`` would run now, else why not."""
    rec = found.record
    profiles = model.device_profiles()
    if not 0 <= rec.profile < len(profiles):
        return f"device profile {rec.profile + 1} is no longer in the config"
    spec = engine_spec(model, profiles[rec.profile], port=rec.port, gpus=rec.gpus, settings=settings,
                       config_dir=config_dir)
    same = spec.hash == rec.spec_hash and spec.argv == rec.argv
    return "" if same else "its command, env, cwd or devices differ from the config"


def listeners(port: int) -> list[int]:
    """The pids of the processes listening on TCP ``port`` (any address). Blocking."""
    try:
        conns = psutil.net_connections(kind="tcp")
    except (psutil.Error, OSError):
        return []
    return [c.pid for c in conns if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid]


def foreign_engine_on(port: int, pgid: int) -> int:
    """The pid of another model process (any worker's: it carries ``LLM_ROUTER_WORKER``) that
    listens on ``port`` and is not in process group ``pgid``, else 0. Two workers on one host
    may pick the same free port at once; the loser's health check is then answered by the
    winner's engine. Blocking: run it in a thread."""
    for pid in listeners(port):
        try:
            if os.getpgid(pid) != pgid and WORKER_ENV in psutil.Process(pid).environ():
                return pid
        except (psutil.Error, OSError):
            continue
    return 0


def serves_its_port(found: FoundEngine) -> bool:
    """Whether every listener on the recorded port is in the engine's process group: the
    health check an adoption relies on is then answered by the engine, not by a process of
    another user that took the port. Blocking: run it in a thread."""
    pids = listeners(found.record.port)
    return bool(pids) and all(pgid_of(pid) == found.record.pid for pid in pids)


async def wait_exit(handle: ProcHandle) -> None:
    """Return when the process ``handle`` holds has exited (its pidfd becomes readable)."""
    if not handle.alive():
        return
    loop = asyncio.get_running_loop()
    exited = loop.create_future()
    loop.add_reader(handle.fd, lambda: exited.done() or exited.set_result(None))
    try:
        await exited
    finally:
        loop.remove_reader(handle.fd)
    handle.alive()  # notes when it exited
