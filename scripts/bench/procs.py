"""The processes the bench starts (own process groups, logs, all stopped at the end, also on
Ctrl-C: ``llm_router.lifeline``) and what it reads of them (CPU, RSS, descriptors)."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import uuid
from pathlib import Path

import psutil
from llm_lab_router.lifeline import die_with_parent, processes_with_env, stop_group

ROOT = Path(__file__).resolve().parents[2]
SESSION_ENV = "LLM_ROUTER_BENCH_SESSION"


class Procs:
    """Every process the bench starts: own process group, log file, stopped at the end."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.token = uuid.uuid4().hex
        os.environ[SESSION_ENV] = self.token  # inherited by children *and* their children
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None,
              cwd: Path | None = None) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "wb")
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=cwd or ROOT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                                start_new_session=True, preexec_fn=die_with_parent(signal.SIGTERM))
        log.close()
        self.procs.append((name, proc))
        return proc

    def tail(self, name: str, n: int = 30) -> str:
        path = self.log_dir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])

    def check_alive(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.tail(name)}")

    def stop_all(self, grace: float = 8.0) -> None:
        """SIGINT to the worker (it stops its engines; SIGTERM would leave them running for the
        next worker), SIGTERM to the others, then SIGKILL to each process group, the last
        started first; Redis last, so the worker can still report while it stops."""
        order = [p for p in reversed(self.procs) if p[0] != "redis"] + [p for p in self.procs if p[0] == "redis"]
        for name, proc in order:
            stop_group(proc, signal.SIGINT if name.startswith("worker") else signal.SIGTERM, grace, reap=2.0)
        # Engines live in process groups of their own: anything still carrying our token goes.
        for p in processes_with_env(SESSION_ENV, self.token):
            try:
                p.kill()
            except psutil.Error:
                pass


def raise_fd_limit() -> int:
    """1,000 streams need ~3,000 descriptors in the router; children inherit the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def rss_mb(pid: int) -> float:
    try:
        return psutil.Process(pid).memory_info().rss / 2**20
    except psutil.Error:
        return float("nan")



def cpu_seconds(pid: int) -> float:
    if not pid:
        return 0.0
    try:
        t = psutil.Process(pid).cpu_times()
        return t.user + t.system
    except psutil.Error:
        return float("nan")


def pin(procs: Procs) -> None:
    """This process (the load generator) on the first CPU, every process it started and their
    children on the others."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return
    os.sched_setaffinity(0, {cpus[0]})
    others = set(cpus[1:])
    for _, proc in procs.procs:
        try:
            for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
                p.cpu_affinity(sorted(others))
        except psutil.Error:
            pass
