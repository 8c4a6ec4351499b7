"""Which processes are this worker's engines: spawn records, and processes held by pidfd.

On a shared host any local user can start a process whose environment says
``LLM_ROUTER_WORKER=<id>`` with the right spec hash (the config and the code are readable).
So a worker never believes what a process says about itself. When it spawns an engine it
writes a *spawn record* into its state directory (``{state_dir}/engines/<pid>.json``, mode
0600 in a 0700 directory): the pid and the kernel's start time of the process, the euid, the
argv and port, the device and inode of the stdout/stderr spool files it gave the engine, and a
random per-spawn nonce that only the engine's environment carries (never Redis, never argv).
A later worker of the same id and state directory, the linger and ``worker --stop-models``
take as an engine only a process that matches a record on every point (``verify``):

- pid **and** start time (``/proc/PID/stat`` field 22): a reused pid has another start time;
- the same euid as ours (``/proc/PID/status``);
- its fd 1 and 2 are the model's own spool files (same ``st_dev``/``st_ino``);
- its command line and ``LLM_ROUTER_PORT`` are what was recorded;
- ``LLM_ROUTER_NONCE`` in ``/proc/PID/environ`` (readable only by its own uid and root) is the
  recorded nonce (compared in constant time).

From the moment it is found a process is held by a pidfd (``ProcHandle``) and signalled with
``pidfd_send_signal``, so a pid that was reused meanwhile is never signalled. Processes that
merely claim the worker id (``claimants``) are logged once and otherwise left alone.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import select
import signal
import time
from pathlib import Path

import msgspec
import psutil
from llm_lab_router.worker.private import private_dir, write_private

log = logging.getLogger("llm_router.worker")

WORKER_ENV = "LLM_ROUTER_WORKER"  # markers every engine carries (its children inherit them)
MODEL_ENV = "LLM_ROUTER_MODEL"
NONCE_ENV = "LLM_ROUTER_NONCE"
PORT_ENV = "LLM_ROUTER_PORT"
RECORDS_DIR = "engines"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")  # the unit of /proc/PID/stat's start time


class EngineRecord(msgspec.Struct, kw_only=True):
    """What the worker that spawned an engine knows of it (a 0600 file in its state directory)."""

    pid: int
    starttime: int  # /proc/PID/stat field 22, clock ticks after boot: pid + this = one process
    euid: int
    model: str
    argv: list[str]  # as spawned (also what the config's spec hash covers)
    cmdline: list[str]  # as the process shows it once running (an ``exec`` wrapper changes it)
    port: int
    profile: int  # index of its device profile in the model's config
    gpus: list[int]
    spec_hash: str
    nonce: str
    stdout: tuple[int, int]  # (st_dev, st_ino) of the spool file given as fd 1
    stderr: tuple[int, int]  # ... and as fd 2
    created: float  # unix time of the spawn


def new_nonce() -> str:
    return secrets.token_hex(16)


def file_id(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


class Records:
    """The spawn records of one worker state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir) / RECORDS_DIR

    def write(self, record: EngineRecord) -> None:
        private_dir(self.dir)
        write_private(self.dir / f"{record.pid}.json", msgspec.json.encode(record))

    def remove(self, pid: int) -> None:
        try:
            (self.dir / f"{pid}.json").unlink()
        except FileNotFoundError:
            pass

    def load(self) -> list[EngineRecord]:
        """Every readable record; one not owned by our euid or open to others is ignored."""
        try:
            paths = sorted(self.dir.glob("*.json"))
        except OSError:
            return []
        return [r for r in map(self._read, paths) if r is not None]

    def get(self, pid: int) -> EngineRecord | None:
        return self._read(self.dir / f"{pid}.json")

    @staticmethod
    def _read(path: Path) -> EngineRecord | None:
        try:
            st = path.lstat()
            if st.st_uid != os.geteuid() or st.st_mode & 0o077 or not path.is_file():
                log.warning("ignoring spawn record %s: not a private file of uid %d", path, os.geteuid())
                return None
            return msgspec.json.decode(path.read_bytes(), type=EngineRecord)
        except FileNotFoundError:
            return None
        except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("ignoring spawn record %s: %s", path, exc)
            return None


class ProcHandle:
    """One process held by a pidfd: it is signalled through the pidfd only, so a reused pid
    is never hit. ``pgid`` is its process group (engines lead their own)."""

    def __init__(self, pid: int, fd: int, starttime: int) -> None:
        self.pid = pid
        self.fd = fd
        self.starttime = starttime
        self.exited_ticks = 0  # when the exit was first seen, in /proc/PID/stat starttime units (0: not yet)

    @classmethod
    def open(cls, pid: int, starttime: int | None = None) -> ProcHandle | None:
        """Hold ``pid``, if it is the process started at ``starttime`` (None: whatever runs
        there now). The pidfd is opened *before* the start time is read: if that still
        matches, the pidfd refers to that very process."""
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            return None
        now = proc_starttime(pid)
        if now is None or (starttime is not None and now != starttime):
            os.close(fd)
            return None
        return cls(pid, fd, now)

    def alive(self) -> bool:
        """Not exited yet (a pidfd becomes readable once its process exits)."""
        if self.fd < 0 or self.exited_ticks:
            return False
        if select.select([self.fd], [], [], 0)[0]:
            self.exited_ticks = int(time.clock_gettime(time.CLOCK_BOOTTIME) * CLOCK_TICKS) + 1
            return False
        return True

    def signal(self, sig: int) -> bool:
        """``sig`` to the process itself; False if it has exited."""
        if self.fd < 0:
            return False
        try:
            signal.pidfd_send_signal(self.fd, sig)
            return True
        except (ProcessLookupError, OSError):
            return False

    def signal_group(self, sig: int) -> None:
        """``sig`` to the process and every member of the group it leads, each through its own
        pidfd (no ``killpg``: a group id, like a pid, can be reused once its group is gone).
        While the leader lives its pid cannot be another group's, so every process in that
        group is its member; after it exited, only the members that were already there when it
        exited are."""
        if self.fd < 0:
            return
        if self.alive():
            self.signal(sig)
        for member in self._members():
            member.signal(sig)
            member.close()

    def _members(self) -> list[ProcHandle]:
        born_by = None if self.alive() else self.exited_ticks
        members = []
        for proc in psutil.process_iter(["pid"]):
            if proc.pid == self.pid or pgid_of(proc.pid) != self.pid:
                continue
            handle = ProcHandle.open(proc.pid)  # then checked again: the pidfd is that process
            if handle is None:
                continue
            if pgid_of(proc.pid) == self.pid and (born_by is None or handle.starttime <= born_by):
                members.append(handle)
            else:
                handle.close()
        return members

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def verify(record: EngineRecord, spool_dir: Path) -> tuple[ProcHandle | None, str]:
    """Hold the process ``record`` describes if it is still that engine: (handle, "") — or
    (None, why not). ``why`` is "gone" when no process with that pid and start time exists."""
    handle = ProcHandle.open(record.pid, record.starttime)
    if handle is None:
        return None, "gone"
    why = _mismatch(record, spool_dir)
    if why or not handle.alive():
        handle.close()
        return None, why or "gone"
    return handle, ""


def _mismatch(record: EngineRecord, spool_dir: Path) -> str:
    pid = record.pid
    try:
        if _euid(pid) != os.geteuid() or record.euid != os.geteuid():
            return "it runs as another user"
        for fd, expected, stream in ((1, record.stdout, "stdout"), (2, record.stderr, "stderr")):
            own = spool_dir / record.model / f"{stream}.log"
            if file_id(os.stat(f"/proc/{pid}/fd/{fd}")) != tuple(expected) or file_id(own.stat()) != tuple(expected):
                return f"its {stream} is not the model's spool file"
        if proc_cmdline(pid) != record.cmdline:
            return "its command line is not the recorded one"
        env = _environ(pid)
        if env.get(PORT_ENV) != str(record.port):
            return "its port is not the recorded one"
        if not hmac.compare_digest(env.get(NONCE_ENV, "").encode(), record.nonce.encode()):
            return "it lacks the secret of its spawn"
    except (OSError, ValueError):
        return "its /proc entry cannot be read"
    return ""


def proc_cmdline(pid: int) -> list[str]:
    """The argv ``pid`` shows now (``/proc/PID/cmdline``). Raises OSError."""
    raw = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
    return [a.decode(errors="surrogateescape") for a in raw]


def proc_starttime(pid: int) -> int | None:
    """Field 22 of ``/proc/PID/stat`` (after the parenthesised name, which may hold spaces)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
        return int(stat[stat.rindex(b")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def claimants(worker_id: str, known: set[int]) -> list[tuple[int, int, str]]:
    """Processes (pid, uid, command) whose environment names ``worker_id`` but that are not in
    the process group of a verified engine (``known``: their pids). Blocking."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.pid == os.getpid() or proc.environ().get(WORKER_ENV) != worker_id:
                continue
            if os.getpgid(proc.pid) in known or proc.status() == psutil.STATUS_ZOMBIE:
                continue
            found.append((proc.pid, proc.uids().effective, " ".join(proc.cmdline())[:200]))
        except (psutil.Error, OSError):
            continue
    return found


def log_claimants(worker_id: str, known: set[int]) -> None:
    """One warning per process that claims to be an engine of ``worker_id`` and is not."""
    for pid, uid, cmd in claimants(worker_id, known):
        log.warning("pid %d (uid %d: %s) claims to be an engine of worker %s but matches no spawn record: "
                    "left alone", pid, uid, cmd, worker_id)


def _euid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[2])
    raise ValueError("no Uid line")


def _environ(pid: int) -> dict[str, str]:
    data = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = (item.split(b"=", 1) for item in data.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def pgid_of(pid: int) -> int:
    """The process group of ``pid`` (-1: gone)."""
    try:
        return os.getpgid(pid)
    except OSError:
        return -1
