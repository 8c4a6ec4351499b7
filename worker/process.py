"""The per-model supervisor: start a model server, watch it, stop it, restart it.

One ``ModelProcess`` per configured model. Commands, on-demand starts and shutdown only ever
call ``ensure_running()`` / ``ensure_stopped()``; whether a start or a stop is needed is decided
inside, from the supervisor's own state (llama-swap's ``EnsureReady`` lesson), so no caller
reads the state first and races a transition in flight.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import shlex
import signal
import time
from collections import deque
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import msgspec

from llm_router.config import ModelConfig, WorkerSettings, expand_command
from llm_router.hostcheck import find_program, missing_program
from llm_router.protocol import Instance, LogSource
from worker.logpipe import LogPipe, pump
from worker.orphans import MODEL_ENV, WORKER_ENV, WORKER_PID_ENV
from worker.placement import NoFit, Placement, Placer

log = logging.getLogger("llm_router.worker")

HEALTH_POLL = 0.1  # seconds between health probes during start-up
HEALTH_TIMEOUT = 1.0  # one probe; a server that accepts but does not answer is not healthy
DRAIN_TIMEOUT = 0.25  # after an exit, how long to wait for the pipes' last lines
MAX_BACKOFF = 30.0  # restart back-off: 1, 2, 4 ... 30 s
TAIL_LINES = 200
STOP_CANCELLED = "start cancelled by a stop request"


@dataclass
class HostContext:
    """What every model of a worker shares: who it is, where it runs, where logs go."""

    worker_id: str
    settings: WorkerSettings
    config_dir: str  # {config_dir}; relative cwd values start from here
    logs: LogPipe
    placer: Placer


class _Run:
    """One spawned process: its handle, where it listens, and the tasks that serve it."""

    def __init__(self, proc: asyncio.subprocess.Process, placement: Placement, url: str) -> None:
        self.proc = proc
        self.placement = placement
        self.url = url
        self.pumps: list[asyncio.Task] = []
        self.exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.watcher: asyncio.Task | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid


class ModelProcess:
    """Supervises one model server; the state machine lives here.

    =========  ===========================  ==============================  =============================
    state      ``ensure_running()``         ``ensure_stopped()``            the process exits by itself
    =========  ===========================  ==============================  =============================
    stopped    start it: → starting         nothing                         (no process)
    starting   wait for that start          cancel it: stop the process     → failed ("… during start-up")
                                            group → stopping → stopped
    running    nothing                      SIGTERM the group, SIGKILL      → failed ("exited with code N")
                                            after ``stop_grace``:           then the ``restart`` policy:
                                            → stopping → stopped            back-off, → starting again
    stopping   wait for the stop, then      wait for that stop              (expected)
               start: → starting
    failed     start it: → starting         → stopped                       (no process)
               (a pending restart is        (a pending restart is
               cancelled)                   cancelled)
    =========  ===========================  ==============================  =============================

    A start goes: pick a port and a device profile (``Placer``), spawn the command in its own
    process group with stdout/stderr piped into the log, then probe ``GET {health}`` every
    0.1 s until it answers 200 (→ running), the process exits, or ``startup_timeout`` passes
    (→ failed; the process group is stopped). Concurrent ``ensure_running`` calls share one
    start. Both calls return a copy of the ``Instance``; a start that did not reach running
    says why in ``last_error`` (and ``log_tail()`` has the model's last lines).

    ``close()`` is ``ensure_stopped()`` for good (worker shutdown): afterwards nothing starts
    the model again, neither a command still in flight nor the restart policy.

    Every change of the instance goes to ``on_change`` (the agent publishes it) and is logged
    as an "event" line in the model's log stream.
    """

    def __init__(self, model: ModelConfig, host: HostContext, on_change: Callable[[Instance], None]) -> None:
        self.model = model
        self.host = host
        self._on_change = on_change
        self._instance = Instance(model=model.id, worker=host.worker_id, updated_at=time.time(),
                                  api_key=model.api_key)
        self._tail: deque[str] = deque(maxlen=TAIL_LINES)
        self._run: _Run | None = None
        self._start_task: asyncio.Task | None = None
        self._stop_task: asyncio.Task | None = None
        self._restart_task: asyncio.Task | None = None
        self._cancel_start: asyncio.Future | None = None  # resolved: the start in flight gives up
        self._restart_times: deque[float] = deque()  # monotonic times of recent restarts
        self._closed = False  # the worker is shutting down: nothing may start any more

    # --- public API ---

    @property
    def state(self) -> str:
        return self._instance.state

    @property
    def instance(self) -> Instance:
        """A copy of the current instance (callers may keep it; it will not change under them)."""
        return msgspec.structs.replace(self._instance)

    def log_tail(self, n: int = 20) -> list[str]:
        """The last ``n`` lines of this model's log (output and events), oldest first."""
        return list(self._tail)[-n:]

    async def ensure_running(self) -> Instance:
        """Start the model unless it runs already; return the instance once settled."""
        while True:
            if self._stop_task is not None:
                await asyncio.wait([self._stop_task])
                continue
            if self._start_task is not None:
                cancelled_before_us = self._cancel_start is not None and self._cancel_start.done()
                await asyncio.wait([self._start_task])
                if cancelled_before_us:  # a stop came first and we came after it: start again
                    continue
                break
            if self.state == "running" or self._closed:
                break
            self._cancel_restart()
            self._restart_times.clear()  # an operator's start gets a fresh restart budget
            self._begin_start()
        return self.instance

    async def ensure_stopped(self) -> Instance:
        """Stop the model (cancelling a start or a pending restart); idempotent."""
        self._cancel_restart()
        while True:
            if self._start_task is not None:
                if self._cancel_start is not None and not self._cancel_start.done():
                    self._cancel_start.set_result(None)
                await asyncio.wait([self._start_task])
            elif self._stop_task is not None:
                await asyncio.wait([self._stop_task])
            elif self._run is not None:
                self._stop_task = asyncio.create_task(self._stop(self._run), name=f"stop {self.model.id}")
            else:
                break
        self._cancel_restart()  # in case the process crashed while we waited
        if self.state == "failed":
            self._set(state="stopped")
        return self.instance

    async def close(self) -> Instance:
        """Stop for good (worker shutdown): from now on ``ensure_running`` starts nothing."""
        self._closed = True
        return await self.ensure_stopped()

    def kill(self) -> None:
        """Last resort at shutdown: SIGKILL the process group now, without waiting."""
        if self._run is not None:
            _killpg(self._run.pid, signal.SIGKILL)

    # --- start ---

    def _begin_start(self, restart: bool = False) -> None:
        """Launch the one start in flight; ``ensure_stopped`` cancels it through ``_cancel_start``."""
        self._cancel_start = asyncio.get_running_loop().create_future()
        self._start_task = asyncio.create_task(self._start(self._cancel_start, restart),
                                               name=f"start {self.model.id}")

    async def _start(self, cancel: asyncio.Future, restart: bool) -> None:
        try:
            await self._start_once(cancel)
        finally:
            self._start_task = None
            self._cancel_start = None
        if restart and self.state == "failed":  # a restart that failed is one more failure
            self._schedule_restart()

    async def _start_once(self, cancel: asyncio.Future) -> None:
        self._tail.clear()  # a failure quotes this attempt's lines, not the previous one's
        self._set(state="starting", last_error="", url="", pid=0, gpus="", vram_mb=0, started_at=0.0)
        try:
            placement = await self.host.placer.place(self.model)
        except NoFit as exc:
            self._fail(str(exc))
            return
        try:
            run = await self._spawn(placement)
        except OSError as exc:
            self.host.placer.release(self.model.id)
            self._fail(f"cannot start: {exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""))
            return
        if cancel.done():
            await self._stop(run, reason=STOP_CANCELLED)
            return
        why = await self._await_healthy(run, cancel)
        if why is None:
            self.host.placer.settle(self.model.id)
            self._set(state="running", url=run.url, started_at=time.time())
            self._event(f"running on {run.url} (pid {run.pid})")
        elif why == STOP_CANCELLED:
            await self._stop(run, reason=why)
        else:
            await self._terminate(run)
            self._fail(why)

    async def _spawn(self, placement: Placement) -> _Run:
        settings = self.host.settings
        argv = expand_command(self.model, placement.profile, port=placement.port, host=settings.bind_host,
                              config_dir=self.host.config_dir)
        gpus = ",".join(map(str, placement.gpus))
        env = {**os.environ, **self.model.env, **placement.profile.env,
               "CUDA_VISIBLE_DEVICES": gpus, WORKER_ENV: self.host.worker_id,
               WORKER_PID_ENV: str(os.getpid()), MODEL_ENV: self.model.id}
        if placement.gpus:
            env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # CUDA's numbering = NVML's = ours
        cwd = str(Path(self.host.config_dir, self.model.cwd))
        path = env.get("PATH", os.defpath)
        if argv and Path(cwd).is_dir() and find_program(argv[0], path, cwd) is None:
            raise FileNotFoundError(errno.ENOENT, missing_program(argv[0], path))
        self._event(f"starting: {shlex.join(argv)}" + (f" (CUDA_VISIBLE_DEVICES={gpus})" if gpus else ""))
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=env, cwd=cwd, start_new_session=True)
        run = _Run(proc, placement, f"http://{settings.advertise_host}:{placement.port}")
        assert proc.stdout is not None and proc.stderr is not None
        run.pumps = [asyncio.create_task(pump(proc.stdout, partial(self._line, "stdout"))),
                     asyncio.create_task(pump(proc.stderr, partial(self._line, "stderr")))]
        run.watcher = asyncio.create_task(self._watch(run), name=f"watch {self.model.id}")
        self._run = run
        self._set(pid=proc.pid, gpus=gpus, vram_mb=placement.vram_mb)
        return run

    async def _await_healthy(self, run: _Run, cancel: asyncio.Future) -> str | None:
        """None once the health check answers 200; otherwise why the start failed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.model.startup_timeout
        host = _local_address(self.host.settings.bind_host)
        status = 0  # the last answer of the health path (0: none yet)
        while True:
            if cancel.done():
                return STOP_CANCELLED
            if run.exited.done():
                return f"{exit_reason(run.exited.result())} during start-up"
            left = deadline - loop.time()
            if left <= 0:
                return f"did not become healthy within {self.model.startup_timeout:g}s" + (
                    f" (GET {self.model.health} answered 404: the server has no such route;"
                    " set `health` to a path it serves)" if status == 404 else "")
            status = await http_status(host, run.placement.port, self.model.health, min(HEALTH_TIMEOUT, left)) or status
            if status == 200:
                return None
            await asyncio.wait([run.exited, cancel], timeout=min(HEALTH_POLL, max(0.0, deadline - loop.time())))

    # --- exit, stop, restart ---

    async def _watch(self, run: _Run) -> None:
        """Notice the exit at once, keep the last lines, and handle a crash of a running model."""
        try:
            code = await run.proc.wait()
            await asyncio.wait(run.pumps, timeout=DRAIN_TIMEOUT)  # the lines printed just before dying
        finally:
            if not run.exited.done():
                run.exited.set_result(run.proc.returncode if run.proc.returncode is not None else -9)
        if self._run is run and self.state == "running":
            self._run = None
            _killpg(run.pid, signal.SIGKILL)  # whatever the crashed server left behind
            self.host.placer.release(self.model.id)
            self._fail(exit_reason(code))
            self._schedule_restart()  # even after code 0: vLLM exits 0 when its engine core dies

    async def _stop(self, run: _Run, reason: str = "") -> None:
        """running/starting → stopping → stopped. ``reason``: why a start did not complete."""
        try:
            self._set(state="stopping", **({"last_error": reason} if reason else {}))
            self._event("stopping")
            await self._terminate(run)
            self._set(state="stopped", pid=0, url="")
            self._event("stopped")
        finally:
            if self._stop_task is asyncio.current_task():
                self._stop_task = None

    async def _terminate(self, run: _Run) -> None:
        """SIGTERM the process group, SIGKILL it after ``stop_grace``; wait for the exit."""
        grace = self.model.stop_grace
        if not run.exited.done():
            _killpg(run.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.shield(run.exited), grace)
            except asyncio.TimeoutError:
                self._event(f"still running {grace:g}s after SIGTERM: sending SIGKILL")
                _killpg(run.pid, signal.SIGKILL)
                await asyncio.shield(run.exited)
        _killpg(run.pid, signal.SIGKILL)  # children that outlived their parent
        if self._run is run:
            self._run = None
        self.host.placer.release(self.model.id)

    def _schedule_restart(self) -> None:
        """Apply the restart policy after a crash (or a failed restart). Any exit the worker did
        not ask for is a failure, whatever its code: "on-failure" and "always" both restart."""
        policy = self.model.restart
        if policy == "no" or self._closed:
            return
        now = time.monotonic()
        while self._restart_times and now - self._restart_times[0] > self.model.restart_window:
            self._restart_times.popleft()
        recent = len(self._restart_times)
        if recent >= self.model.max_restarts:
            self._event(f"not restarting: {recent} restarts within {self.model.restart_window:g}s "
                        f"(max_restarts = {self.model.max_restarts})")
            return
        delay = min(MAX_BACKOFF, 2.0 ** recent)
        self._event(f"restarting in {delay:g}s (restart = {policy!r})")
        self._restart_task = asyncio.create_task(self._restart_after(delay), name=f"restart {self.model.id}")

    async def _restart_after(self, delay: float) -> None:
        await asyncio.sleep(delay)  # cancelled here by ensure_running/ensure_stopped
        self._restart_task = None
        self._restart_times.append(time.monotonic())
        self._set(restarts=self._instance.restarts + 1)
        self._begin_start(restart=True)

    def _cancel_restart(self) -> None:
        if self._restart_task is not None:
            self._restart_task.cancel()
            self._restart_task = None

    # --- bookkeeping ---

    def _set(self, **changes) -> None:
        self._instance = msgspec.structs.replace(self._instance, **changes, updated_at=time.time())
        self._on_change(self.instance)

    def _fail(self, reason: str) -> None:
        self._set(state="failed", last_error=reason, pid=0, url="")
        self._event(reason)

    def _event(self, message: str) -> None:
        log.info("%s: %s", self.model.id, message)
        self._emit("event", message)

    def _line(self, stream: LogSource, text: str) -> None:
        self._emit(stream, text)

    def _emit(self, stream: LogSource, text: str) -> None:
        self._tail.append(text)
        self.host.logs.write(self.model.id, stream, text)


def exit_reason(code: int) -> str:
    """``exited with code 1`` or ``killed by SIGKILL`` (asyncio reports signals as -N)."""
    if code >= 0:
        return f"exited with code {code}"
    try:
        return f"killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"killed by signal {-code}"


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass  # already gone


def _local_address(bind_host: str) -> str:
    """Where this host reaches a server bound to ``bind_host``."""
    return "127.0.0.1" if bind_host in ("", "0.0.0.0", "::", "localhost") else bind_host


async def http_status(host: str, port: int, path: str, timeout: float) -> int:
    """The status ``GET path`` answers within ``timeout`` (0: no answer): a minimal HTTP/1.0
    probe, no session."""

    async def probe() -> bytes:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(f"GET {path} HTTP/1.0\r\nHost: {host}:{port}\r\n\r\n".encode())
            return await reader.readline()
        finally:
            writer.close()

    try:
        status = await asyncio.wait_for(probe(), timeout)
    except (OSError, asyncio.TimeoutError):
        return 0
    parts = status.split()
    return int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else 0
