"""Children that cannot outlive their parent: no orphans even when the parent is SIGKILLed.

``Popen(..., preexec_fn=die_with_parent(signal.SIGTERM))`` asks the Linux kernel
(``prctl(PR_SET_PDEATHSIG)``) to signal the child when the process that started it dies,
however it dies. ``llm-router up`` uses it for its Redis, worker and router (a worker that gets
SIGTERM still stops its own models), the test fixtures for everything they start. Elsewhere
than Linux it does nothing, and cleanup falls back to the parent's own shutdown path.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from typing import Callable

import psutil

PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child receive ``sig`` when its parent dies."""
    if not sys.platform.startswith("linux"):
        return None
    parent = os.getpid()

    def arm() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the prctl took effect
            os.kill(os.getpid(), sig)

    return arm


def processes_with_env(name: str, value: str) -> list[psutil.Process]:
    """Every process (but this one) whose environment has ``name=value``.

    Environment markers survive process groups, re-parenting and ``exec``: a worker finds the
    model processes of its previous run by them, and the tests and the bench find anything
    they started, wherever it ended up."""
    me = os.getpid()
    found = []
    for proc in psutil.process_iter(["pid"]):
        if proc.pid == me:
            continue
        try:
            if proc.environ().get(name) == value:
                found.append(proc)
        except (psutil.Error, OSError):  # gone, a zombie, or another user's process
            continue
    return found


def stop_group(proc: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = 10.0,
               reap: float | None = 5.0) -> bool:
    """Stop a child started with ``start_new_session=True``: ``sig`` to the process itself (as an
    operator would, so it can shut down its own children), ``grace`` seconds to exit, then
    SIGKILL to whatever is left of its process group. True if it exited within the grace."""
    in_time = True
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            in_time = False
        except ProcessLookupError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(reap)
    except subprocess.TimeoutExpired:
        pass
    return in_time
