"""``llm-router serve --workers N``: N router processes on one port, and the parent that minds them.

One router process forwards on one core. With ``--workers N`` the ``serve`` process becomes a
supervisor: it starts N children (each an ordinary ``llm-router serve``, its own view, Redis
clients, router id, log fan-out and usage entry) that each bind the port with ``SO_REUSEPORT``,
so the kernel spreads new connections across them. The parent binds nothing itself (a socket in
the group that never accepts would swallow connections).

- A child that exits without being asked to is started again after a back-off (0.5 s doubling
  to 10 s, back to 0.5 s once a child has run for a minute), with one log line each time.
- SIGTERM or SIGINT to the parent: every child gets SIGTERM and drains as a lone router does
  (stops accepting, streams say ``stream_end``, in-flight requests get ``shutdown_grace``);
  a child still running ``grace`` seconds later is killed with its process group. Then the
  parent exits.
- No orphans: each child runs in its own session and gets SIGTERM from the kernel when the
  parent dies, however it dies (``lifeline.die_with_parent``).
- Metrics: the children share a private Prometheus multiprocess directory (router/observe/metrics.py),
  removed when the parent exits; a dead child's live gauges are dropped (``mark_process_dead``)
  while its counters stay counted.
- Concurrency limits: child ``i`` of N admits its share of each model's capacity
  (``process_share``), so the router as a whole never runs more than the model allows.
"""

from __future__ import annotations

import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

from llm_lab_router.lifeline import die_with_parent, stop_group

log = logging.getLogger("router.supervisor")

FIRST_DELAY = 0.5
MAX_DELAY = 10.0
STABLE_AFTER = 60.0  # a child that ran this long resets the back-off
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
INDEX_ENV = "LLM_ROUTER_PROCESS_INDEX"
COUNT_ENV = "LLM_ROUTER_PROCESSES"


def worker_count(requested: int) -> int:
    """``--workers``: 0 means one per core this process may run on."""
    if requested > 0:
        return requested
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def port_is_free(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on (``None``: it can). Checked by the parent before
    it starts children, with a plain bind: with ``SO_REUSEPORT`` alone a child would silently
    join another program's group of listeners instead of failing."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return str(exc)
    for family, kind, proto, _, addr in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(addr)
            except OSError as exc:
                return exc.strerror or str(exc)
    return None


@dataclass
class Child:
    index: int
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    delay: float = FIRST_DELAY
    due: float = 0.0  # when to start it again (monotonic), after a crash


@dataclass
class Supervisor:
    """Starts ``count`` copies of ``argv`` (the child ``serve`` command) and keeps them running."""

    argv: list[str]
    count: int
    grace: float = 15.0  # after SIGTERM: the children's shutdown_grace plus closing time
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    children: list[Child] = field(default_factory=list)

    def run(self) -> int:
        """Until SIGTERM/SIGINT; returns the exit status."""
        metrics_dir = tempfile.mkdtemp(prefix="llm-router-metrics-")
        stopping: list[int] = []
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)  # signals wake the wait below at once

        def on_signal(signum: int, _frame) -> None:
            stopping.append(signum)

        old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        old[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, lambda *_: None)
        try:
            self.children = [Child(i) for i in range(self.count)]
            for child in self.children:
                self._start(child, metrics_dir)
            log.info("supervising %d router processes", self.count)
            while not stopping:
                self._reap(metrics_dir)
                self._wait(wake_r, self._next_due())
            log.info("stopping %d router processes", self.count)
            return 0
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the cleanup
            self._stop_all()
            signal.set_wakeup_fd(-1)
            for sig, handler in old.items():
                if sig != signal.SIGINT:
                    signal.signal(sig, handler)
            os.close(wake_r)
            os.close(wake_w)
            shutil.rmtree(metrics_dir, ignore_errors=True)

    def _start(self, child: Child, metrics_dir: str) -> None:
        env = {**self.env, MULTIPROC_ENV: metrics_dir, INDEX_ENV: str(child.index), COUNT_ENV: str(self.count)}
        child.proc = subprocess.Popen(self.argv, env=env, stdin=subprocess.DEVNULL, start_new_session=True,
                                      preexec_fn=die_with_parent(signal.SIGTERM))
        child.started_at = time.monotonic()
        child.due = 0.0

    def _reap(self, metrics_dir: str) -> None:
        """Restart children that exited (once their back-off is over)."""
        now = time.monotonic()
        for child in self.children:
            proc = child.proc
            if proc is not None and proc.poll() is not None:
                _mark_dead(proc.pid, metrics_dir)
                stop_group(proc, grace=0, reap=1)  # whatever it left in its group
                if now - child.started_at >= STABLE_AFTER:
                    child.delay = FIRST_DELAY
                child.due = now + child.delay
                log.warning("router process %d (pid %d) exited with status %s; restarting in %.1fs",
                            child.index, proc.pid, proc.returncode, child.delay)
                child.delay = min(MAX_DELAY, child.delay * 2)
                child.proc = None
            if child.proc is None and child.due <= now:
                self._start(child, metrics_dir)
                log.info("router process %d restarted (pid %d)", child.index, child.proc.pid)  # type: ignore[union-attr]

    def _next_due(self) -> float | None:
        pending = [c.due for c in self.children if c.proc is None]
        return max(0.0, min(pending) - time.monotonic()) if pending else None

    @staticmethod
    def _wait(wake_r: int, timeout: float | None) -> None:
        """Until a signal arrives (SIGCHLD, SIGTERM, SIGINT) or ``timeout`` passes."""
        ready, _, _ = select.select([wake_r], [], [], timeout)
        if ready:
            try:
                os.read(wake_r, 512)
            except BlockingIOError:
                pass

    def _stop_all(self) -> None:
        """SIGTERM to every child at once (they drain in parallel), then wait for each."""
        running = [c.proc for c in self.children if c.proc is not None and c.proc.poll() is None]
        for proc in running:
            try:
                proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + self.grace
        for proc in running:
            if not stop_group(proc, grace=max(0.0, deadline - time.monotonic()), reap=5):
                log.warning("router process (pid %d) did not stop in %gs; killed", proc.pid, self.grace)


def _mark_dead(pid: int, metrics_dir: str) -> None:
    """Drop a dead child's live gauges (in flight) from the shared metrics; counters stay."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, metrics_dir)
