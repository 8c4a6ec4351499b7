"""Finding and ending model processes that outlived the worker that started them.

Engines outlive their worker on purpose (see ``worker.adoption``: the next worker adopts
them). Those that are not adopted (the config changed, they do not answer), or that no worker
came back for (``worker.handover``), are ended here.

Only processes that match a spawn record of this worker's state directory (``ownership``:
pid, start time, euid, spool files, command, port and a secret nonce) are ever stopped, and
only through a pidfd. What a process says about itself (``LLM_ROUTER_WORKER``,
``LLM_ROUTER_WORKER_PID`` ... in its environment) decides nothing: any local user can set it.
Whether the worker of an id still runs is the worker lock's to say (``handover``): a second
worker with the same id on the same host is refused (``WorkerIdInUse``).
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
from llm_lab_router.redact import redact_argv
from llm_lab_router.worker.ownership import (
    MODEL_ENV,
    WORKER_ENV,
    EngineRecord,
    ProcHandle,
    Records,
    log_claimants,
    verify,
)

__all__ = ["MODEL_ENV", "WORKER_ENV", "Orphan", "WorkerIdInUse", "find_engine_handles", "is_gone", "reap_orphans",
           "stop_processes"]


log = logging.getLogger("llm_router.worker")


class WorkerIdInUse(Exception):
    """Processes with this worker id belong to a worker that is still running."""


@dataclass
class Orphan:
    pid: int
    model: str
    cmdline: str
    killed: bool = False  # needed SIGKILL: SIGTERM was ignored for the whole grace period


def find_engine_handles(worker_id: str, state_dir: Path) -> list[tuple[ProcHandle, EngineRecord]]:
    """The engines the records of ``state_dir`` describe, each held by a pidfd; records of
    engines that are gone (or whose pid now names another process) are removed, processes
    that only claim ``worker_id`` are logged. Blocking: run it in a thread."""
    records = Records(state_dir)
    found = []
    for record in records.load():
        handle, why = verify(record, state_dir / "spool")
        if why == "gone":
            records.remove(record.pid)
        elif handle is None:  # the process we spawned, changed: neither adopted nor stopped; said each time
            log.warning("pid %d, spawned for model %s, is left alone: %s", record.pid, record.model, why)
        if handle is None:
            continue
        found.append((handle, record))
    log_claimants(worker_id, {h.pid for h, _ in found})
    return found


def reap_orphans(worker_id: str, state_dir: Path, grace: float) -> list[Orphan]:
    """SIGTERM every engine a previous worker of ``worker_id`` and ``state_dir`` left (and its
    process group), SIGKILL what is still there after ``grace`` seconds; return what was
    found. The caller holds the state directory's lock. Blocking: run it in a thread."""
    found = find_engine_handles(worker_id, state_dir)
    killed = set(stop_processes([h for h, _ in found], grace))
    records = Records(state_dir)
    for handle, record in found:
        records.remove(record.pid)
        handle.close()
    return [Orphan(pid=r.pid, model=r.model, cmdline=" ".join(redact_argv(r.cmdline)), killed=r.pid in killed)
            for _, r in found]


def stop_processes(handles: list[ProcHandle], grace: float) -> list[int]:
    """SIGTERM ``handles`` (and the process groups they lead), SIGKILL what is still there
    after ``grace`` seconds; return the pids that needed SIGKILL. Blocking: run it in a thread."""
    for handle in handles:
        handle.signal_group(signal.SIGTERM)
    alive = _wait_gone(handles, grace)
    for handle in alive:
        handle.signal_group(signal.SIGKILL)
    _wait_gone(alive, 5.0)
    for handle in handles:
        handle.signal_group(signal.SIGKILL)  # what the group leader left behind
    return [h.pid for h in alive]


def is_gone(proc: psutil.Process) -> bool:
    """Exited, or a zombie: an orphan's zombie is its new parent's to reap, not ours."""
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def _wait_gone(handles: list[ProcHandle], timeout: float) -> list[ProcHandle]:
    """Wait up to ``timeout`` s for the processes to exit; return those still there."""
    deadline = time.monotonic() + timeout
    alive = [h for h in handles if h.alive()]
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [h for h in alive if h.alive()]
    return alive
