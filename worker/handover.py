"""Handing a host's engines from one worker to the next, and the two explicit ways to stop.

- ``WorkerLock``: one worker per id and state directory. An ``flock`` on
  ``{state_dir}/worker.lock`` (0600 in a 0700 directory: nobody else can take it and fool the
  linger), held for the worker's whole life; the kernel releases it however the worker dies,
  so it also tells whether a worker is there at all.
- ``HostIdLock``: one live worker per id on the whole host, whatever its state directory (a
  second ``up`` with its own ``LLM_ROUTER_STATE_DIR`` must not run a second worker of that id).
  An abstract unix socket ``\\0llm-router-worker-<id>`` bound while the worker lives: the
  kernel frees the name however the process dies (no stale file to clean up, nothing in a
  shared /tmp to pre-create or chmod), and ``SO_PEERCRED`` names its holder's pid and uid. A
  local user may squat the name: the worker then refuses to start, naming that pid and uid (a
  denial of service, never a takeover). The name is per network namespace, as a host is.
- SIGTERM (systemd ``restart``, an upgrade): the worker exits and leaves its models running.
  It starts a *linger* (``python -P -m worker.handover``, in ``/``: it imports nothing from
  the directory the worker ran in): a small detached process that waits up
  to ``adopt_timeout`` for a worker to take the lock (and adopt the engines). If none does, it
  stops the engines and leaves a ``models-stopped`` mark, so that the worker that comes later
  does not start them again from the desired state in Redis.
- SIGINT (Ctrl-C, ``llm-router up``): the worker stops its models, then exits.
- ``llm-router worker --stop-models``: stops the models a worker left running, at once.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import hashlib
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
from llm_lab_router.config import HostConfig
from llm_lab_router.safepath import safe_python_m
from llm_lab_router.worker.orphans import Orphan, WorkerIdInUse, reap_orphans
from llm_lab_router.worker.private import open_private, private_dir, write_private

log = logging.getLogger("llm_router.worker")

LOCK_FILE = "worker.lock"
STOPPED_MARK = "models-stopped"
LINGER_POLL = 0.2  # seconds between two looks at the lock while lingering


class WorkerLock:
    """The exclusive lock of one worker id on this host (see the module doc)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / LOCK_FILE
        self.fd = -1
        self.host: HostIdLock | None = None  # a worker's lock also holds its id host-wide

    def try_acquire(self, role: str) -> bool:
        """Take the lock if nobody holds it, and say who holds it now (``"<pid> <role>"``)."""
        private_dir(self.path.parent)
        fd = open_private(self.path, os.O_RDWR)
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
        if self.host is not None:
            self.host.release()
            self.host = None


class HostIdLock:
    """The host-wide name of a live worker id (see the module doc)."""

    def __init__(self, worker_id: str) -> None:
        name = f"llm-router-worker-{worker_id}"
        if len(name) > 100:  # the limit of a unix socket name
            name = f"llm-router-worker-{hashlib.sha256(worker_id.encode()).hexdigest()}"
        self.address = "\0" + name
        self.sock: socket.socket | None = None

    def try_acquire(self) -> bool:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.address)
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                return False
            raise
        sock.listen(8)  # only so that ``holder`` can ask who binds it
        sock.setblocking(False)
        self.sock = sock
        return True

    def holder(self) -> tuple[int, int]:
        """(pid, uid) of the process holding the name, (0, -1) if unknown."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(0.5)
            try:
                probe.connect(self.address)
                creds = probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
            except OSError:
                return 0, -1
        pid, uid, _ = (int.from_bytes(creds[i:i + 4], "little", signed=True) for i in (0, 4, 8))
        return pid, uid

    def drop_probes(self) -> None:
        """Accept and close the connections of ``holder`` probes (so the backlog never fills)."""
        while self.sock is not None:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.close()

    def release(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def acquire_worker_lock(state_dir: Path, worker_id: str, wait: float) -> WorkerLock:
    """The locks for a worker starting now: the id host-wide, then its state directory. Raises
    ``WorkerIdInUse`` at once if a live worker holds either; a linger that is stopping the
    models (or a probe) is waited for up to ``wait`` s. Blocking: run it in a thread."""
    host = HostIdLock(worker_id)
    if not host.try_acquire():
        pid, uid = host.holder()
        raise _in_use(worker_id, f"pid {pid}, uid {uid}, whatever its state directory")
    lock = WorkerLock(state_dir)
    deadline = time.monotonic() + wait
    while not lock.try_acquire("worker"):
        pid, role = lock.holder()
        if (role == "worker" and pid != os.getpid() and psutil.pid_exists(pid)) or time.monotonic() > deadline:
            host.release()
            raise _in_use(worker_id, f"pid {pid}")
        time.sleep(0.05)
    lock.host = host
    return lock


def _in_use(worker_id: str, holder: str) -> WorkerIdInUse:
    return WorkerIdInUse(f"worker id {worker_id!r} is in use by a running worker on this host ({holder}); "
                         "give this one another id (--worker-id)")


def start_linger(state_dir: Path, worker_id: str, timeout: float, grace: float) -> None:
    """Leave behind the process that stops the models if no worker adopts them in time. It
    runs as root may: ``-P`` and cwd ``/`` keep the worker's directory off its import path."""
    state_dir = Path(state_dir).resolve()
    out = open_private(state_dir / "linger.log", os.O_WRONLY | os.O_APPEND)
    try:
        subprocess.Popen(safe_python_m("llm_lab_router.worker.handover", "--state-dir", str(state_dir),
                                       "--worker-id", worker_id, "--timeout", str(timeout), "--grace", str(grace),
                                       "--previous", str(os.getpid())),
                         stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                         cwd="/")
    finally:
        os.close(out)


def linger(state_dir: Path, worker_id: str, timeout: float, grace: float, previous: int = 0) -> list[Orphan]:
    """Wait ``timeout`` s for a worker to take the lock; if none does, stop the models.

    ``previous``: the pid of the worker that left (it wrote the lock file). A worker that took
    the lock since has written its own pid there, and that counts even if it is gone again by
    the time this process looks (a linger slow to start, a worker stopped at once): the models
    were that worker's to stop or hand over, and this linger has nothing left to wait for."""
    lock = WorkerLock(state_dir)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if lock.held_elsewhere() or _came_since(lock, previous):
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


def _came_since(lock: WorkerLock, previous: int) -> bool:
    """Whether a worker other than ``previous`` took the lock since (its pid in the lock file)."""
    pid, role = lock.holder()
    return previous > 0 and role == "worker" and pid not in (0, previous)


def stop_models(state_dir: Path, worker_id: str, grace: float) -> list[Orphan]:
    """Stop every engine of ``worker_id`` (the caller holds the lock) and mark them stopped on
    purpose, so the next worker does not start them again."""
    stopped = reap_orphans(worker_id, Path(state_dir), grace)
    write_private(Path(state_dir) / STOPPED_MARK, f"{time.time():.3f}\n".encode())
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
    p.add_argument("--previous", type=int, default=0, help="the pid of the worker that left")
    args = p.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s linger: %(message)s")
    try:
        linger(args.state_dir, args.worker_id, args.timeout, args.grace, args.previous)
    except WorkerIdInUse as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
