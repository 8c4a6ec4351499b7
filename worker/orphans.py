"""Finding and ending model processes that outlived the worker that started them.

Engines outlive their worker on purpose (see ``worker.adoption``: the next worker adopts
them). Every model process is started with ``LLM_ROUTER_WORKER=<worker id>``,
``LLM_ROUTER_WORKER_PID=<worker pid>`` and ``LLM_ROUTER_MODEL=<model id>`` in its environment,
which its own children inherit, forks and wrappers included. Those that are not adopted (the
config changed, they do not answer), or that no worker came back for (``worker.handover``),
are ended here.

If that worker is still alive, the id is simply taken: a second worker with the same id on the
same host would kill the first one's models and fight over its command stream, so it refuses
to start (``WorkerIdInUse``) instead.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

import psutil
from llm_lab_router.lifeline import processes_with_env
from llm_lab_router.redact import redact_argv

WORKER_ENV = "LLM_ROUTER_WORKER"
WORKER_PID_ENV = "LLM_ROUTER_WORKER_PID"
MODEL_ENV = "LLM_ROUTER_MODEL"


class WorkerIdInUse(Exception):
    """Processes with this worker id belong to a worker that is still running."""


@dataclass
class Orphan:
    pid: int
    model: str  # "" when the process does not say
    cmdline: str
    killed: bool = False  # needed SIGKILL: SIGTERM was ignored for the whole grace period


def find_orphans(worker_id: str) -> list[psutil.Process]:
    """Processes (other than this one) whose environment names ``worker_id``."""
    return processes_with_env(WORKER_ENV, worker_id)


def reap_orphans(worker_id: str, grace: float) -> list[Orphan]:
    """SIGTERM every orphan of ``worker_id`` (and its process group), SIGKILL what is still
    there after ``grace`` seconds; return what was found. Blocking: run it in a thread.
    Raises ``WorkerIdInUse`` (and touches nothing) if their worker is still running."""
    procs = find_orphans(worker_id)
    orphans: dict[int, Orphan] = {}
    for proc in procs:
        try:
            env = proc.environ()
            owner = _live_owner(proc, env)
            if owner:
                raise WorkerIdInUse(f"worker id {worker_id!r} is in use by a running worker on this host "
                                    f"(pid {owner}); give this one another id (--worker-id)")
            orphans[proc.pid] = Orphan(pid=proc.pid, model=env.get(MODEL_ENV, ""),
                                       cmdline=" ".join(redact_argv(proc.cmdline())))  # it is logged
        except (psutil.Error, OSError):
            continue
    for pid in stop_processes(procs, grace):
        if pid in orphans:
            orphans[pid].killed = True
    return list(orphans.values())


def stop_processes(procs: list[psutil.Process], grace: float) -> list[int]:
    """SIGTERM ``procs`` (and the process groups they lead), SIGKILL what is still there after
    ``grace`` seconds; return the pids that needed SIGKILL. Blocking: run it in a thread."""
    _signal_all(procs, signal.SIGTERM)
    alive = _wait_gone(procs, grace)
    if alive:
        _signal_all(alive, signal.SIGKILL)
        _wait_gone(alive, 5.0)
    return [proc.pid for proc in alive]


def _live_owner(proc: psutil.Process, env: dict[str, str]) -> int:
    """The pid of the worker that started ``proc`` if it still runs, else 0."""
    try:
        pid = int(env.get(WORKER_PID_ENV, "0"))
    except ValueError:
        return 0
    if pid <= 0 or pid == os.getpid():
        return 0
    try:
        owner = psutil.Process(pid)
        if is_gone(owner) or owner.create_time() > proc.create_time():  # dead, or its pid reused since
            return 0
    except psutil.Error:
        return 0
    return pid


def is_gone(proc: psutil.Process) -> bool:
    """Exited, or a zombie: an orphan's zombie is its new parent's to reap, not ours."""
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait up to ``timeout`` s for ``procs`` to go; return those still there."""
    deadline = time.monotonic() + timeout
    alive = [p for p in procs if not is_gone(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [p for p in alive if not is_gone(p)]
    return alive


def _signal_all(procs: list[psutil.Process], sig: int) -> None:
    """Signal each process and each process group they lead, ignoring the ones already gone."""
    for proc in procs:
        try:
            pgid = os.getpgid(proc.pid)
            if pgid == proc.pid:  # a group leader (how models are started): take its group too
                os.killpg(pgid, sig)
            else:
                proc.send_signal(sig)
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
