"""Handing a host's engines from one worker to the next, and the two explicit ways to stop.

- ``WorkerLock``: one worker per id and state directory. An ``flock`` on
  ``{state_dir}/worker.lock``, held for the worker's whole life; the kernel releases it however
  the worker dies, so it also tells whether a worker is there at all.
- SIGTERM (systemd ``restart``, an upgrade): the worker exits and leaves its models running.
  It starts a *linger* (``python -m worker.handover``): a small detached process that waits up
  to ``adopt_timeout`` for a worker to take the lock (and adopt the engines). If none does, it
  stops the engines and leaves a ``models-stopped`` mark, so that the worker that comes later
  does not start them again from the desired state in Redis.
- SIGINT (Ctrl-C, ``llm-router up``): the worker stops its models, then exits.
- ``llm-router worker --stop-models``: stops the models a worker left running, at once.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
from llm_lab_router.config import HostConfig
from llm_lab_router.worker.orphans import Orphan, WorkerIdInUse, reap_orphans

log = logging.getLogger("llm_router.worker")

LOCK_FILE = "worker.lock"
STOPPED_MARK = "models-stopped"
LINGER_POLL = 0.2  # seconds between two looks at the lock while lingering


class WorkerLock:
    """The exclusive lock of one worker id on this host (see the module doc)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / LOCK_FILE
        self.fd = -1

    def try_acquire(self, role: str) -> bool:
        """Take the lock if nobody holds it, and say who holds it now (``"<pid> <role>"``)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {role}\n".encode(), 0)
        self.fd = fd
        return True

    def held_elsewhere(self) -> bool:
        """Whether another process holds the lock now (probed without writing anything)."""
        try:
            fd = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # releases our probe's lock too
        return False

    def holder(self) -> tuple[int, str]:
        """The pid and role the holder wrote (0, "" when unreadable)."""
        try:
            pid, role = self.path.read_text().split()
            return int(pid), role
        except (OSError, ValueError):
            return 0, ""

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def acquire_worker_lock(state_dir: Path, worker_id: str, wait: float) -> WorkerLock:
    """The lock for a worker starting now. Raises ``WorkerIdInUse`` at once if a live worker
    holds it; a linger that is stopping the models (or a probe) is waited for up to ``wait`` s.
    Blocking: run it in a thread."""
    lock = WorkerLock(state_dir)
    deadline = time.monotonic() + wait
    while not lock.try_acquire("worker"):
        pid, role = lock.holder()
        if (role == "worker" and pid != os.getpid() and psutil.pid_exists(pid)) or time.monotonic() > deadline:
            raise WorkerIdInUse(f"worker id {worker_id!r} is in use by a running worker on this host "
                                f"(pid {pid}); give this one another id (--worker-id)")
        time.sleep(0.05)
    return lock


def start_linger(state_dir: Path, worker_id: str, timeout: float, grace: float) -> None:
    """Leave behind the process that stops the models if no worker adopts them in time."""
    with open(Path(state_dir) / "linger.log", "ab") as out:
        subprocess.Popen([sys.executable, "-m", "llm_lab_router.worker.handover", "--state-dir", str(state_dir),
                          "--worker-id", worker_id, "--timeout", str(timeout), "--grace", str(grace)],
                         stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def linger(state_dir: Path, worker_id: str, timeout: float, grace: float) -> list[Orphan]:
    """Wait ``timeout`` s for a worker to take the lock; if none does, stop the models."""
    lock = WorkerLock(state_dir)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if lock.held_elsewhere():
            log.info("a worker took over: its models are adopted")
            return []
        time.sleep(LINGER_POLL)
    if not lock.try_acquire("linger"):
        return []
    try:
        log.warning("no worker %s came back within %gs: stopping its models", worker_id, timeout)
        return stop_models(state_dir, worker_id, grace)
    finally:
        lock.release()


def stop_models(state_dir: Path, worker_id: str, grace: float) -> list[Orphan]:
    """Stop every engine of ``worker_id`` (the caller holds the lock) and mark them stopped on
    purpose, so the next worker does not start them again."""
    stopped = reap_orphans(worker_id, grace)
    (Path(state_dir) / STOPPED_MARK).write_text(f"{time.time():.3f}\n")
    for orphan in stopped:
        log.info("stopped pid %d (model %s)%s", orphan.pid, orphan.model or "?",
                 " with SIGKILL" if orphan.killed else "")
    return stopped


def stop_models_now(cfg: HostConfig) -> int:
    """``llm-router worker --stop-models``: exit status 0, or 2 when a worker of this id runs."""
    lock = WorkerLock(cfg.state_dir)
    if not lock.try_acquire("stop-models"):
        pid, _ = lock.holder()
        print(f"error: worker {cfg.worker_id!r} is running (pid {pid}): send it SIGINT to stop it with its "
              "models, or stop them through the API (POST /api/models/stop-all)", file=sys.stderr)
        return 2
    try:
        stopped = stop_models(cfg.state_dir, cfg.worker_id, max((m.stop_grace for m in cfg.models), default=10.0))
    finally:
        lock.release()
    print(f"stopped {len(stopped)} model processes of worker {cfg.worker_id!r}"
          + "".join(f"\n  {o.pid} {o.model or '?'}" for o in stopped))
    return 0


def take_stopped_mark(state_dir: Path) -> bool:
    """Whether the models were stopped on purpose while no worker ran (and forget it)."""
    try:
        (Path(state_dir) / STOPPED_MARK).unlink()
        return True
    except FileNotFoundError:
        return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="stop a worker's models unless a worker adopts them in time")
    p.add_argument("--state-dir", required=True, type=Path)
    p.add_argument("--worker-id", required=True)
    p.add_argument("--timeout", type=float, required=True)
    p.add_argument("--grace", type=float, default=10.0)
    args = p.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s linger: %(message)s")
    try:
        linger(args.state_dir, args.worker_id, args.timeout, args.grace)
    except WorkerIdInUse as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
