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
import subprocess
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import msgspec
from llm_lab_router.clock import CLOCK
from llm_lab_router.config import ModelConfig, WorkerSettings
from llm_lab_router.hostcheck import find_program, missing_program
from llm_lab_router.protocol import Instance, LogSource
from llm_lab_router.redact import Redactor, redact_argv
from llm_lab_router.worker.adoption import FoundEngine, engine_spec, foreign_engine_on, serves_its_port, wait_exit
from llm_lab_router.worker.engine_env import engine_env
from llm_lab_router.worker.learning import Learner, RunningEngine
from llm_lab_router.worker.logpipe import LogPipe
from llm_lab_router.worker.ownership import (
    MODEL_ENV,
    NONCE_ENV,
    PORT_ENV,
    WORKER_ENV,
    EngineRecord,
    ProcHandle,
    Records,
    file_id,
    new_nonce,
    proc_cmdline,
)
from llm_lab_router.worker.placement import NoFit, Placement, Placer, port_is_free
from llm_lab_router.worker.states import check_transition

log = logging.getLogger("llm_router.worker")

HEALTH_POLL = 0.1  # seconds between health probes during start-up
HEALTH_TIMEOUT = 1.0  # one probe; a server that accepts but does not answer is not healthy
MAX_BACKOFF = 30.0  # restart back-off: 1, 2, 4 ... 30 s
TAIL_LINES = 200
PORT_RETRIES = 3  # an auto-assigned port lost to another process during start-up: try another one
ADOPT_PROBE = 2.0  # seconds an engine found at start-up has to answer its health check
STOP_CANCELLED = "start cancelled by a stop request"
UNKNOWN_EXIT = -1000  # an adopted engine exited: not our child, so its status is not ours to read


@dataclass
class HostContext:
    """What every model of a worker shares: who it is, where it runs, where logs go."""

    worker_id: str
    settings: WorkerSettings
    config_dir: str  # {config_dir}; relative cwd values start from here
    logs: LogPipe
    placer: Placer
    learner: Learner | None = None  # measures cold starts and VRAM (worker.learning)
    records: Records | None = None  # spawn records: which processes are our engines (worker.ownership)


class _Run:
    """One engine process: spawned by this worker (``proc``) or adopted from a previous one
    (``proc`` None: not our child), held by a pidfd either way (``handle``: it is watched and
    signalled through it), where it listens, its watcher."""

    def __init__(self, handle: ProcHandle, placement: Placement, url: str,
                 proc: subprocess.Popen | None = None) -> None:
        self.handle = handle
        self.pid = handle.pid
        self.proc = proc
        self.placement = placement
        self.url = url
        self.exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.watcher: asyncio.Task | None = None

    async def wait(self) -> int:
        """The exit code (-N: killed by signal N); an adopted engine's is unknown: ``UNKNOWN_EXIT``."""
        await wait_exit(self.handle)
        if self.proc is not None:
            return self.proc.wait()  # it has exited: this only reaps it
        return UNKNOWN_EXIT


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
    session with stdout/stderr written into the model's spool files (``worker.spool``: the
    engine outlives the worker), then probe ``GET {health}`` every 0.1 s until it answers 200
    (→ running), the process exits, or ``startup_timeout`` passes (→ failed; the process group
    is stopped). An auto-assigned port lost to another process meanwhile (two workers on one
    host) is retried on another port. ``adopt()`` takes over an engine a previous worker left
    running instead (``worker.adoption``); ``detach()`` lets go of it for the next one. Concurrent ``ensure_running`` calls share one
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
        self._instance = Instance(model=model.id, worker=host.worker_id, updated_at=CLOCK.now(),
                                  api_key=model.api_key)
        self._tail: deque[str] = deque(maxlen=TAIL_LINES)
        self._redact = Redactor.for_model(model)  # renewed at each spawn: a reload may change the model
        self._run: _Run | None = None
        self._start_task: asyncio.Task | None = None
        self._stop_task: asyncio.Task | None = None
        self._restart_task: asyncio.Task | None = None
        self._cancel_start: asyncio.Future | None = None  # resolved: the start in flight gives up
        self._restart_times: deque[float] = deque()  # monotonic times of recent restarts
        self.refusal = ""  # why the last restart was refused (out of budget), for the start reply
        self._closed = False  # the worker is shutting down: nothing may start any more
        host.logs.attach(model.id, self._line)
        host.logs.redact(model.id, self._redact)

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

    async def ensure_running(self, persistent: bool = False, on_demand: bool = False) -> Instance:
        """Start the model unless it runs already; return the instance once settled.

        ``persistent`` (``auto_start``, or a model that was running before a worker restart):
        a start that fails is retried with the restart policy's back-off, as a crash is.

        ``on_demand`` (a router starting it for a request): a restart already scheduled is
        waited for, not cut short, and a start of a failed model is a restart — counted, backed
        off and bounded by ``max_restarts`` within ``restart_window`` — so steady traffic cannot
        restart a crash-looping engine as fast as requests arrive. Only an operator's start
        (not ``on_demand``) cancels the back-off and gives a fresh restart budget."""
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
            if on_demand and self._restart_task is not None:
                await asyncio.wait([self._restart_task])  # its start follows at once
                continue
            if on_demand and self.state == "failed":
                if not self._schedule_restart(on_demand=True):
                    break  # out of restarts: it stays failed, and the reply says why
                continue
            self._cancel_restart()
            self._restart_times.clear()  # an operator's start gets a fresh restart budget
            self.refusal = ""
            self._begin_start(restart=persistent)
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
            self._run.handle.signal_group(signal.SIGKILL)

    def detach(self) -> None:
        """Let go of the engine without stopping it (the worker exits for an upgrade: the next
        one adopts it). Nothing starts, stops or restarts the model from here on."""
        self._closed = True
        self._cancel_restart()
        for task in (self._start_task, self._stop_task, self._run.watcher if self._run else None):
            if task is not None:
                task.cancel()

    async def adopt(self, found: FoundEngine, placement: Placement) -> str:
        """Take over ``found``, an engine a previous worker started for this model, if it alone
        listens on its port and answers its health check within ``ADOPT_PROBE`` s: state
        running, same pid and URL. Returns "" or why not."""
        host = _local_address(self.host.settings.bind_host)
        rec = found.record
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ADOPT_PROBE
        self.host.placer.hold(self.model.id, placement)  # its port and VRAM are taken meanwhile
        why = "" if await asyncio.to_thread(serves_its_port, found) else f"port {rec.port} is not its own"
        while not why and await http_status(host, rec.port, self.model.health,
                                            min(HEALTH_TIMEOUT, ADOPT_PROBE)) != 200:
            if loop.time() >= deadline:
                why = "it did not answer its health check"
            else:
                await asyncio.sleep(HEALTH_POLL)
        if why:
            self.host.placer.release(self.model.id)
            return why
        run = _Run(found.handle, placement, f"http://{self.host.settings.advertise_host}:{rec.port}")
        run.watcher = asyncio.create_task(self._watch(run), name=f"watch {self.model.id}")
        self._run = run
        self._set(state="running", pid=rec.pid, url=run.url, gpus=",".join(map(str, placement.gpus)),
                  vram_mb=placement.vram_mb, started_at=CLOCK.now() - max(0.0, time.time() - rec.created),
                  last_error="")  # its age, by this host's clock, on the shared one
        self._event(f"adopted pid {rec.pid} on {run.url}, left running by a previous worker")
        return ""

    @property
    def engine(self) -> RunningEngine | None:
        """Its engine while it is running (for ``Learner.sample``)."""
        if self.state != "running" or self._run is None:
            return None
        return RunningEngine(self.model, self._run.pid, self._run.placement)

    def grew(self, vram_mb: int) -> None:
        """Its engine was measured using ``vram_mb`` MiB per GPU: if that is more than it was
        placed with, this worker and the routers (``Instance.vram_mb``) hold that much."""
        if self._run is not None and self._run.placement.gpus and vram_mb > self._instance.vram_mb:
            self.host.placer.raise_vram(self.model.id, vram_mb)
            self._set(vram_mb=vram_mb)

    def prefetched(self, done: int, total: int) -> None:
        """Its weight files are being read into the page cache (worker.prefetch): publish how
        far (0, 0: no prefetch, or it ended because the model starts or stopped waiting)."""
        if (done, total) != (self._instance.prefetch_done, self._instance.prefetch_total):
            self._set(prefetch_done=done, prefetch_total=total)

    @property
    def idle(self) -> bool:
        """Not loaded here: nothing runs, starts or stops (a prefetch would be worth it)."""
        return self._instance.state in ("stopped", "failed")

    def keep_counters(self, restarts: int, started_at: float) -> None:
        """Carry over what the previous worker published for the adopted engine."""
        self._set(restarts=restarts, started_at=started_at or self._instance.started_at)

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
        self._set(state="starting", url="", pid=0, gpus="", vram_mb=0, started_at=0.0)  # last_error stays
        for attempt in range(PORT_RETRIES + 1):
            try:
                placement = await self.host.placer.place(self.model)
            except NoFit as exc:
                self._fail(str(exc))
                return
            # the routers see the room taken from now on, not only once the engine is spawned
            self._set(gpus=",".join(map(str, placement.gpus)), vram_mb=placement.vram_mb)
            learner = self.host.learner
            alone = not self.host.placer.shares_gpus(self.model.id)
            before = await learner.before_start(placement) if learner else {}
            spawned = time.monotonic()
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
            if why is None and not self.model.port:
                other = await asyncio.to_thread(foreign_engine_on, placement.port, run.pid)
                why = f"port {placement.port} is served by another engine (pid {other})" if other else None
            if why is None:
                self.host.placer.settle(self.model.id)
                if learner is not None:
                    self.grew(await learner.started(self.model, placement, run.pid, time.monotonic() - spawned,
                                                    before, alone))
                self._set(state="running", url=run.url, started_at=CLOCK.now())
                self._event(f"running on {run.url} (pid {run.pid})")
                self._record_cmdline(run)
                return
            if why == STOP_CANCELLED:
                await self._stop(run, reason=why)
                return
            await self._terminate(run)
            if not (attempt < PORT_RETRIES and self._lost_its_port(run)):
                self._fail(why)
                return
            self._event(f"{why}: port {run.placement.port} was taken meanwhile; trying another port")

    def _lost_its_port(self, run: _Run) -> bool:
        """Whether an engine whose start failed (it exited, or another engine answered for it)
        lost an auto-assigned port to another process: two workers on one host may pick the
        same free port at once. Asked once ours is gone, so a port still taken is not ours."""
        return not self.model.port and not port_is_free(self.host.settings.bind_host, run.placement.port)

    async def _spawn(self, placement: Placement) -> _Run:
        settings = self.host.settings
        spec = engine_spec(self.model, placement.profile, port=placement.port, gpus=placement.gpus,
                           settings=settings, config_dir=self.host.config_dir)
        argv = spec.argv
        gpus = ",".join(map(str, placement.gpus))
        # Only an allow-listed part of the worker's environment (never its secrets), then the
        # model's own env, then the markers: who started it (for operators and leak sweeps;
        # never trusted) and the spawn's secret nonce that adoption checks (``ownership``).
        nonce = new_nonce()
        env = engine_env(os.environ, spec.env,
                         markers={WORKER_ENV: self.host.worker_id, MODEL_ENV: self.model.id,
                                  PORT_ENV: str(placement.port), NONCE_ENV: nonce})
        if placement.gpus:
            env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # CUDA's numbering = NVML's = ours
        self._redact = Redactor.for_model(self.model)
        self.host.logs.redact(self.model.id, self._redact)
        path = env.get("PATH", os.defpath)
        if argv and Path(spec.cwd).is_dir() and find_program(argv[0], path, spec.cwd) is None:
            raise FileNotFoundError(errno.ENOENT, missing_program(argv[0], path))
        shown = shlex.join(redact_argv(argv))
        self._event(f"starting: {shown}" + (f" (CUDA_VISIBLE_DEVICES={gpus})" if gpus else ""))
        # Output goes to the model's spool files, not pipes: the engine must outlive this
        # worker (an upgrade, a crash) without dying of SIGPIPE or blocking on a full pipe.
        out, err = self.host.logs.engine_output(self.model.id)
        # Popen, not asyncio's subprocess: an asyncio transport SIGKILLs its child when it is
        # closed or collected, and this engine must survive the worker; its exit is watched
        # through a pidfd like an adopted engine's.
        try:
            outputs = file_id(os.fstat(out)), file_id(os.fstat(err))
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env, cwd=spec.cwd,
                                    start_new_session=True)
        finally:
            os.close(out)
            os.close(err)
        handle = ProcHandle.open(proc.pid)  # our unreaped child: the pid is still that process
        try:
            if handle is None:
                raise OSError(errno.ESRCH, "the engine vanished at once")
            self._record(EngineRecord(
                pid=proc.pid, starttime=handle.starttime, euid=os.geteuid(), model=self.model.id, argv=argv,
                cmdline=argv, port=placement.port, profile=placement.index,
                gpus=placement.gpus, spec_hash=spec.hash, nonce=nonce, stdout=outputs[0], stderr=outputs[1],
                created=time.time()))
        except OSError as exc:  # an engine no later worker could tell from an impostor is not left running
            os.killpg(proc.pid, signal.SIGKILL)  # our unreaped child leads its group: the group is ours
            proc.wait()
            if handle is not None:
                handle.close()
            raise OSError(exc.errno, f"cannot record the engine: {exc.strerror or exc}") from exc
        run = _Run(handle, placement, f"http://{settings.advertise_host}:{placement.port}", proc)
        run.watcher = asyncio.create_task(self._watch(run), name=f"watch {self.model.id}")
        self._run = run
        self._set(pid=proc.pid)  # its GPUs and VRAM are published from its placement on (``_start_once``)
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
        code = -9
        try:
            code = await run.wait()
            self.host.logs.seal(self.model.id)  # its last line, even without a newline
        finally:
            if not run.exited.done():
                run.exited.set_result(code)
        if self._run is run and self.state == "running":
            self._run = None
            run.handle.signal_group(signal.SIGKILL)  # whatever the crashed server left behind (rare: inline)
            run.handle.close()
            self.host.placer.release(self.model.id)
            self._fail(exit_reason(code))
            self._schedule_restart()  # even after code 0: vLLM exits 0 when its engine core dies

    async def _stop(self, run: _Run, reason: str = "") -> None:
        """running/starting → stopping → stopped. ``reason``: why a start did not complete."""
        try:
            self._set(state="stopping", **({"last_error": reason, "last_error_at": CLOCK.now()} if reason else {}))
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
        # signal_group reads /proc for the group's members: off the event loop
        if not run.exited.done():
            await asyncio.to_thread(run.handle.signal_group, signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.shield(run.exited), grace)
            except asyncio.TimeoutError:
                self._event(f"still running {grace:g}s after SIGTERM: sending SIGKILL")
                await asyncio.to_thread(run.handle.signal_group, signal.SIGKILL)
                await asyncio.shield(run.exited)
        await asyncio.to_thread(run.handle.signal_group, signal.SIGKILL)  # children that outlived their parent
        run.handle.close()
        if self.host.records is not None:
            self.host.records.remove(run.pid)
        if self._run is run:
            self._run = None
        self.host.placer.release(self.model.id)

    def _schedule_restart(self, on_demand: bool = False) -> bool:
        """Apply the restart policy after a crash (or a failed restart); ``on_demand``: a
        request asks for a failed model, which restarts it whatever the policy, within the
        same budget. Any exit the worker did not ask for is a failure, whatever its code:
        "on-failure" and "always" both restart. Returns whether a restart is scheduled."""
        policy = self.model.restart
        self.refusal = ""
        if (policy == "no" and not on_demand) or self._closed:
            return False
        now = time.monotonic()
        while self._restart_times and now - self._restart_times[0] > self.model.restart_window:
            self._restart_times.popleft()
        recent = len(self._restart_times)
        if recent >= self.model.max_restarts:
            refused = (f"not restarting: {recent} restarts within {self.model.restart_window:g}s "
                       f"(max_restarts = {self.model.max_restarts})")
            self._event(refused)
            self.refusal = f"{refused}; an operator's start resets this"
            return False
        delay = min(MAX_BACKOFF, 2.0 ** recent)
        self._event(f"restarting in {delay:g}s ({'for a request' if on_demand else f'restart = {policy!r}'})")
        self._restart_task = asyncio.create_task(self._restart_after(delay), name=f"restart {self.model.id}")
        return True

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

    def _record(self, record: EngineRecord) -> None:
        """Write the spawn record of a new engine, then drop this model's older ones (engines
        that crashed: a record is not removed at a crash, so that a full disk does not get
        room back in the middle of the crash handling; ``ownership.verify`` drops any that
        outlived its process anyway)."""
        records = self.host.records
        if records is None:
            return
        records.write(record)
        for old in records.load():
            if old.model == record.model and old.pid != record.pid:
                records.remove(old.pid)

    def _record_cmdline(self, run: _Run) -> None:
        """Record the command line the engine shows once running: an ``exec`` wrapper (``sh -c
        '... exec vllm ...'``) replaced the one it was spawned with, and adoption compares it."""
        records = self.host.records
        if records is None or not run.handle.alive():
            return
        try:
            cmdline = proc_cmdline(run.pid)
        except OSError:
            return
        if (record := records.get(run.pid)) is not None and record.cmdline != cmdline:
            records.write(msgspec.structs.replace(record, cmdline=cmdline))

    def _set(self, **changes) -> None:
        check_transition(self._instance.state, changes.get("state"))
        self._instance = msgspec.structs.replace(self._instance, **changes, updated_at=CLOCK.now(),
                                                 seq=self._instance.seq + 1)
        self._on_change(self.instance)

    def _fail(self, reason: str) -> None:
        reason = self._redact.scrub(reason)
        self._set(state="failed", last_error=reason, last_error_at=CLOCK.now(), pid=0, url="")
        self._event(reason)

    def _event(self, message: str) -> None:
        message = self._redact.scrub(message)
        log.info("%s: %s", self.model.id, message)
        self._emit("event", message)

    def _line(self, stream: LogSource, text: str) -> None:
        """An engine line, read from the spool by the log pipe (which ships it itself, masked)."""
        self._tail.append(self._redact.scrub(text))

    def _emit(self, stream: LogSource, text: str) -> None:
        text = self._redact.scrub(text)
        self._tail.append(text)
        self.host.logs.write(self.model.id, stream, text)


def exit_reason(code: int) -> str:
    """``exited with code 1`` or ``killed by SIGKILL`` (asyncio reports signals as -N)."""
    if code == UNKNOWN_EXIT:
        return "exited (adopted: exit status unknown)"
    if code >= 0:
        return f"exited with code {code}"
    try:
        return f"killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"killed by signal {-code}"


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
