"""The worker agent of one host: wires supervisors, logs, devices and commands to Redis.

The logic lives elsewhere (``ModelProcess``: the state machine; ``LogPipe``: log shipping;
``placement``: where a model runs; ``commands``: the command stream; ``orphans``: leftovers of
a previous run). This module only connects them and owns the worker's own keys:

- the lease ``llm:w:{wid}:lease`` (heartbeat, with a TTL), the catalog, the instance hashes and
  the events on ``llm:events:{wid}``, all written by one publisher task in order, so an old state
  can never overwrite a newer one;
- the device snapshot ``llm:w:{wid}:devices``.

Redis may vanish at any time: every loop logs one line, backs off, and the whole state is
published again when Redis answers (it may have restarted empty). Model processes keep running
meanwhile.

Engines outlive the worker: on start it adopts those a previous run of its id left (``adoption``)
and, once Redis answers, starts again the models that were running before but whose engine is
gone (the instance hashes are the desired state). ``main`` runs it until SIGTERM (exit, leaving
the models running for the next worker: ``handover``) or SIGINT (stop every model, then exit).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import time
from collections import deque
from pathlib import Path

import redis.asyncio as aredis
from llm_lab_router import __version__
from llm_lab_router.audit import AuditTrail, maxlen_from as audit_maxlen
from llm_lab_router.ledger import retention_days as ledger_retention_days
from llm_lab_router.backoff import REDIS_ERRORS, RedisLink, stop_if_cancelled
from llm_lab_router.clock import CLOCK
from llm_lab_router.config import ConfigError, HostConfig, ModelConfig, load_config
from llm_lab_router.protocol import DeviceSnapshot, Instance, Keys, LegacyKeys, WorkerInfo, WorkerVersion, from_hash
from llm_lab_router.loops import supervised
from llm_lab_router.redis_url import async_client
from llm_lab_router.worker.adoption import FoundEngine, find_engines, matches
from llm_lab_router.worker.commands import CommandIntake, Operations
from llm_lab_router.worker.devices import DeviceProbe
from llm_lab_router.worker.estimates import FileEstimates
from llm_lab_router.worker.handover import acquire_worker_lock, start_linger, take_stopped_mark
from llm_lab_router.worker.idle import IdleReaper
from llm_lab_router.worker.learning import Learner
from llm_lab_router.worker.legacy import LegacyMirror
from llm_lab_router.worker.logpipe import LogPipe
from llm_lab_router.worker.orphans import WorkerIdInUse, stop_processes
from llm_lab_router.worker.ownership import Records
from llm_lab_router.worker.placement import Placement, Placer
from llm_lab_router.worker.private import private_dir
from llm_lab_router.worker.prefetch import Prefetcher
from llm_lab_router.worker.process import HostContext, ModelProcess
from llm_lab_router.worker.publish import change_ops, devices_ops, goodbye_ops, lease_ops, publish_all_ops
from llm_lab_router.worker.gpu_time import GpuClock
from llm_lab_router.worker.reload import ReloadTrigger, apply_plan, plan_reload
from llm_lab_router.timeline import EngineUse
from llm_lab_router.worker.timeline import GaugeRecorder, InstanceEvents
from llm_lab_router.timeline import event_ops, resolutions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

log = logging.getLogger("llm_router.worker")

SHUTDOWN_TIMEOUT = 3.0  # for each last Redis step of a shutdown (Redis may be gone)


class WorkerAgent:
    """One host's agent. ``run(stop)`` serves until ``stop`` is set, then shuts down cleanly."""

    def __init__(self, cfg: HostConfig, redis_url: str, prefix: str = "llm:",
                 probe: DeviceProbe | None = None) -> None:
        self.cfg = cfg
        self.settings = cfg.worker
        self.wid = cfg.worker_id
        self.keys = Keys(prefix)
        self.legacy = LegacyKeys(prefix) if self.settings.legacy_keys else None  # worker.legacy
        self.hostname = socket.gethostname()
        # No retries inside redis-py: our loops retry with their own back-off and log once.
        self.redis = async_client(redis_url, socket_connect_timeout=2, socket_timeout=10,
                                  retry=Retry(NoBackoff(), 0))
        self.probe = probe or DeviceProbe()
        self.info = WorkerInfo(id=self.wid, host=self.hostname, pid=os.getpid(), version=__version__,
                               started_at=time.time(), heartbeat_at=time.time())
        self.version = WorkerVersion()  # bumped with every change it publishes (``llm:w:{wid}:version``)
        self.audit = AuditTrail(self.redis, self.keys, f"worker:{self.wid}", audit_maxlen())  # reloads, adoption
        self.gpu_clock = GpuClock(self.redis, self.keys, self.wid, ledger_retention_days(), log)  # the usage ledger
        self.state_dir = cfg.state_dir
        self.logs = LogPipe(self.redis, self.keys, host=self.wid, maxlen=self.settings.log_maxlen,
                            buffer_lines=self.settings.log_buffer, spool_dir=self.state_dir / "spool",
                            spool_bytes=int(self.settings.log_spool_mb * (1 << 20)))
        config_dir = str(Path(cfg.path).resolve().parent) if cfg.path and Path(cfg.path).exists() else os.getcwd()
        self.estimates = FileEstimates(config_dir)  # VRAM from the model files, before a first run
        self.learner = Learner(self.redis, self.keys, self.wid, self.probe, self.logs, self.snapshot,
                               on_learned=self._request_resync)  # a new measurement: publish the catalog
        self.host = HostContext(worker_id=self.wid, settings=self.settings, config_dir=config_dir, logs=self.logs,
                                placer=Placer(self.settings, self.snapshot, measured=self.learner.measured,
                                              estimated=self.estimates.mb),
                                learner=self.learner, records=Records(self.state_dir))
        self.timeline = InstanceEvents(self.wid, self.hostname, clock=CLOCK.now)  # for llm:timeline (worker.timeline)
        self.gauges = GaugeRecorder(self.keys, self.wid, resolutions())  # its GPU and host series
        self.models = {m.id: self._supervise(m) for m in cfg.models}
        self.prefetcher = Prefetcher(self.redis, self.keys, self.wid, config_dir, self.settings,
                                     lambda: {i: mp.model for i, mp in self.models.items()},
                                     lambda m: (mp := self.models.get(m)) is not None and mp.idle,
                                     self._prefetched)
        self.reload_trigger = ReloadTrigger(cfg.path, self.settings.watch_config)  # SIGHUP calls request()
        self._withdrawn: set[str] = set()  # models removed by a reload whose instance hash must go
        self._starts: set[asyncio.Task] = set()  # starts of models a reload added or replaced
        self.operations = Operations(self.wid, self.models, self.redis, self.keys)
        self.idle = IdleReaper(self.redis, self.keys, self.models, on_idle=self.timeline.cause)
        self.intakes = [CommandIntake(self.redis, keys, self.wid, self.operations.execute,
                                      before_reply=self.changes_published)
                        for keys in (self.keys, self.legacy) if keys is not None]
        self._changes: deque[tuple[int, Instance]] = deque()  # (number, change) not yet published, in order
        self._queued = 0  # instance changes so far
        self._done = 0  # the last change known to be in Redis
        self._progress = asyncio.Condition()
        self._resync = True  # publish everything (first run, or Redis may have lost it)
        self._wake = asyncio.Event()
        self._published = asyncio.Event()  # the first full publish went through
        self._restored = False  # the desired state of the previous run was read back from Redis
        self.leave_models_running = False  # how ``run`` ends: SIGTERM (upgrade) or SIGINT (stop)
        self.lock = None

    async def snapshot(self) -> DeviceSnapshot:
        """A device reading now (NVML blocks: it runs in a thread)."""
        return await asyncio.to_thread(self.probe.snapshot, self.wid, self.hostname)

    # --- life cycle ---

    async def run(self, stop: asyncio.Event) -> None:
        log.info("worker %s starting (pid %d, %d models, redis %s)", self.wid, os.getpid(), len(self.models),
                 _safe_url(self.redis))
        try:
            grace = max((m.stop_grace for m in self.cfg.models), default=5.0)
            self.lock = await asyncio.to_thread(acquire_worker_lock, self.state_dir, self.wid, grace + 10.0)
        except WorkerIdInUse:
            await self.redis.aclose()
            self.probe.close()
            raise
        self.timeline.note("worker_started", detail=f"pid {os.getpid()}, version {__version__}")
        await CLOCK.first(self.redis)  # before the first stamp it publishes (llm_lab_router.clock)
        private_dir(self.state_dir / "spool")  # one a previous version left 0755 is narrowed
        host_lock = self.lock.host.sock if self.lock.host is not None else None
        if host_lock is not None:  # answer "who holds this id?" probes (``HostIdLock.holder``)
            asyncio.get_running_loop().add_reader(host_lock, self.lock.host.drop_probes)
        await self._adopt()
        self.logs.start()
        loops = [supervised(name, fn, log) for name, fn in [
            ("publisher", self._publisher), ("heartbeat", self._heartbeat), ("devices", self._devices),
            ("idle", self.idle.run), ("clock", lambda: CLOCK.keep(self.redis)), ("prefetch", self.prefetcher.run),
            ("gpu time", self._gpu_time)]]
        intakes = [supervised("commands", i.run, log) for i in self.intakes]
        reloads = supervised("reload", self._reloads, log)
        autostart = [asyncio.create_task(mp.ensure_running(persistent=True))
                     for mp in self.models.values() if mp.model.auto_start]
        try:
            await stop.wait()
        finally:
            await _cancel([reloads])  # from here on, no reload adds or starts a model
            if self.leave_models_running:
                await self._leave(intakes, loops, [*autostart, *self._starts])
            else:
                await self._shutdown(intakes, loops, [*autostart, *self._starts])
            self._release_lock()

    async def _leave(self, intakes: list[asyncio.Task], loops: list[asyncio.Task], starts: list[asyncio.Task]) -> None:
        """Exit for an upgrade: the models keep running and the lease is left to expire, so
        routers keep routing to them; commands in flight stay pending for the next worker.
        A linger stops the models if no worker adopts them within ``adopt_timeout``."""
        log.info("worker %s exiting; its models keep running for the next worker (adopt_timeout %gs)",
                 self.wid, self.settings.adopt_timeout)
        await _cancel(intakes)
        for intake in self.intakes:
            await intake.drain(timeout=0)  # not answered: re-run by the next worker
        for mp in self.models.values():
            mp.detach()
        await _cancel(starts)
        await self.changes_published(SHUTDOWN_TIMEOUT)
        self.timeline.note("worker_stopped", detail="exiting: its models keep running for the next worker")
        try:
            await asyncio.wait_for(self._publish_events(), SHUTDOWN_TIMEOUT)
        except (asyncio.TimeoutError, *REDIS_ERRORS) as exc:
            log.warning("could not record the worker's exit in the timeline (redis: %s)", exc)
        await _cancel(loops)
        await self.logs.close(timeout=SHUTDOWN_TIMEOUT)
        await self.redis.aclose()
        self.probe.close()
        if any(mp.instance.pid for mp in self.models.values()):
            grace = max((m.stop_grace for m in self.cfg.models), default=5.0)
            self._release_lock()  # before the linger looks at it
            start_linger(self.state_dir, self.wid, self.settings.adopt_timeout, grace)
        log.info("worker %s exited, models left running", self.wid)

    def _release_lock(self) -> None:
        if self.lock.host is not None and self.lock.host.sock is not None:
            asyncio.get_running_loop().remove_reader(self.lock.host.sock)
        self.lock.release()

    async def _shutdown(self, intakes: list[asyncio.Task], loops: list[asyncio.Task],
                        autostart: list[asyncio.Task]) -> None:
        """Stop taking commands, stop every model, say goodbye. Every step is bounded in time."""
        log.info("worker %s shutting down", self.wid)
        await _cancel(intakes)
        await self._stop_models()
        await _wait(autostart, SHUTDOWN_TIMEOUT)
        for intake in self.intakes:
            await intake.drain(timeout=SHUTDOWN_TIMEOUT)  # in-flight commands answer
        await _cancel(loops)
        await self._publish_goodbye()
        await self.logs.close(timeout=SHUTDOWN_TIMEOUT)
        await self.redis.aclose()
        self.probe.close()
        log.info("worker %s stopped", self.wid)

    async def _stop_models(self) -> None:
        """Stop all models for good, in parallel (commands still in flight cannot start them
        again); if that hangs (it should not), SIGKILL their process groups."""
        limit = max((m.stop_grace for m in self.cfg.models), default=0.0) + SHUTDOWN_TIMEOUT
        stops = [asyncio.create_task(mp.close()) for mp in self.models.values()]
        if await _wait(stops, limit):
            log.error("models still stopping after %gs: killing their process groups", limit)
            for mp in self.models.values():
                mp.kill()

    async def _adopt(self) -> None:
        """Adopt the engines a previous run of this worker id left running, if they match the
        config and answer their health check; stop the others (see ``adoption``)."""
        found = await asyncio.to_thread(find_engines, self.wid, self.state_dir)
        rejected: list[tuple[FoundEngine, str]] = []  # engine, why
        claims = {}
        for engine in found:
            mp = self.models.get(engine.record.model)
            why = ("its model is no longer in the config" if mp is None
                   else "another engine of this model was adopted" if mp in claims
                   else matches(engine, mp.model, self.settings, self.host.config_dir))
            if why:
                rejected.append((engine, why))
            else:
                claims[mp] = engine
        results = await asyncio.gather(*(mp.adopt(engine, Placement(
            profile=mp.model.device_profiles()[engine.record.profile], gpus=engine.record.gpus, port=engine.record.port,
            index=engine.record.profile))
            for mp, engine in claims.items()))
        rejected += [(engine, why) for (mp, engine), why in zip(claims.items(), results) if why]
        if found:
            await self.audit.record(f"worker:{self.wid}", "adopt", host=self.wid,
                                    models=[mp.model.id for mp, why in zip(claims, results) if not why],
                                    detail="; ".join(f"not adopted: pid {engine.record.pid} ({engine.record.model or '?'}): {why}"
                                                     for engine, why in rejected))
        if not rejected:
            return
        grace = max((m.stop_grace for m in self.cfg.models), default=5.0)
        killed = await asyncio.to_thread(stop_processes, [engine.handle for engine, _ in rejected], grace)
        for engine, why in rejected:
            engine.handle.close()
            pid, model_id = engine.record.pid, engine.record.model
            self.host.records.remove(pid)
            how = "killed (SIGKILL)" if pid in killed else "stopped"
            log.warning("%s pid %d (model %s) left by a previous run: %s", how, pid, model_id or "?", why)
            if model_id in self.models:
                self.logs.write(model_id, "event", f"{how} process {pid} left by a previous run of worker "
                                f"{self.wid}: {why}")

    async def _restore(self) -> None:
        """Read the previous run's instance hashes (the desired state): keep the restarts count
        and start time of adopted engines, and start again the models that were running or
        starting but whose engine is gone, unless they were stopped on purpose meanwhile."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for model_id in self.models:
                pipe.hgetall(self.keys.instance(model_id, self.wid))
                if self.legacy:  # the previous run may be of an older release
                    pipe.hgetall(self.legacy.instance(model_id, self.wid))
            rows = await pipe.execute()
        if self.legacy:
            rows = [new or old for new, old in zip(rows[::2], rows[1::2])]
        stopped_on_purpose = take_stopped_mark(self.state_dir)
        await self.learner.load(list(self.models))
        for mp, row in zip(list(self.models.values()), rows):
            if not row:
                continue
            was = from_hash(row, Instance)
            if mp.state == "running" and mp.instance.pid == was.pid:
                mp.keep_counters(was.restarts, was.started_at)
            elif was.state in ("running", "starting") and mp.state == "stopped" and not stopped_on_purpose:
                log.info("%s was %s before this worker started: starting it again", mp.model.id, was.state)
                mp.keep_counters(was.restarts, 0.0)
                task = asyncio.create_task(mp.ensure_running(persistent=True), name=f"restore {mp.model.id}")
                self._starts.add(task)
                task.add_done_callback(self._starts.discard)
        self._restored = True

    # --- config reload (see worker.reload) ---

    def _prefetched(self, model_id: str, done: int, total: int) -> None:
        if (mp := self.models.get(model_id)) is not None:
            mp.prefetched(done, total)

    def _supervise(self, model: ModelConfig) -> ModelProcess:
        return ModelProcess(model, self.host, self._instance_changed)

    async def _reloads(self) -> None:
        while True:
            await self.reload_trigger.wait()
            await self.reload()

    async def reload(self) -> None:
        """Apply the config file as it is now: models added, removed, restarted or updated in
        place; unchanged ones untouched. A bad file is one logged line and changes nothing."""
        try:
            new = await asyncio.to_thread(load_config, self.cfg.path)
        except ConfigError as exc:
            log.error("config reload failed, keeping the config in force: %s", exc)
            self.timeline.note("reload_failed", detail=str(exc))
            await self.audit.record(f"worker:{self.wid}", "reload", host=self.wid, result=f"config error: {exc}")
            self._wake.set()
            return
        new.worker.id = self.settings.id  # a --worker-id override stays
        new.worker.state_dir = self.settings.state_dir  # and a --state-dir one
        if new.worker != self.settings:
            log.warning("[worker] settings changed in %s: they apply when the worker restarts", new.path)
        new.worker = self.settings
        plan = plan_reload(self.cfg.models, new.models)
        log.info("config reloaded from %s: %s", new.path, plan.summary())
        self.timeline.note("reload", detail=plan.summary())
        await self.audit.record(f"worker:{self.wid}", "reload", host=self.wid, detail=plan.summary())
        to_start = await apply_plan(plan, self.models, self._supervise)
        self.cfg = new
        self._withdrawn.update(plan.removed)
        self._request_resync()  # the new catalog, every instance, the removed ones deleted
        for mp in to_start:
            task = asyncio.create_task(mp.ensure_running(), name=f"reload start {mp.model.id}")
            self._starts.add(task)
            task.add_done_callback(self._starts.discard)

    # --- publishing: one task writes the worker's keys, in order ---

    def _instance_changed(self, inst: Instance) -> None:
        self.timeline.changed(inst)
        self._queued += 1
        self._changes.append((self._queued, inst))
        self._wake.set()

    async def changes_published(self, timeout: float = 5.0) -> None:
        """Wait until every instance change made so far is in Redis, so that a reply is never
        ahead of the state it reports (bounded: Redis may be away)."""
        target = self._queued
        async with self._progress:
            try:
                await asyncio.wait_for(self._progress.wait_for(lambda: self._done >= target), timeout)
            except asyncio.TimeoutError:
                pass

    async def _advance(self, done: int) -> None:
        async with self._progress:
            self._done = max(self._done, done)
            self._progress.notify_all()

    def _request_resync(self) -> None:
        self._resync = True
        self._wake.set()

    async def _publisher(self) -> None:
        link = RedisLink("publish")
        while True:
            stop_if_cancelled()
            if not (self._resync or self._changes or self.timeline.pending):
                await self._wake.wait()
            self._wake.clear()
            try:
                if not self._restored:  # before the first publish overwrites it
                    await self._restore()
                if self._resync:
                    self._resync = False
                    self._changes.clear()  # the full publish below carries the current states
                    covered = self._queued
                    await self._publish_all()
                    self._published.set()
                    await self._advance(covered)
                while self._changes:
                    stop_if_cancelled()
                    number, inst = self._changes[0]
                    await self._publish_instance(inst)
                    self._changes.popleft()
                    await self._advance(number)
                await self._publish_events()
            except REDIS_ERRORS as exc:
                link.failed(exc)
                self._request_resync()  # whatever was lost is re-sent in full
                await link.pause()
                continue
            link.ok()

    async def _publish_all(self) -> None:
        """Lease, catalog, every instance and the events saying so, in one transaction."""
        self.info.heartbeat_at = CLOCK.now()
        withdrawn = self._withdrawn - self.models.keys()
        self._sync_log_counts()
        async with self.redis.pipeline(transaction=True) as pipe:
            publish_all_ops(self._mirrored(pipe), self.keys, self.info, self.settings.lease_ttl,
                            [self.estimates.annotate(self.learner.annotate(m.catalog_entry()), m)
                             for m in self.cfg.models],
                            [mp.instance for mp in self.models.values()], self.version, withdrawn)
            await pipe.execute()
        self._withdrawn -= withdrawn
        log.info("published lease, catalog and %d instances", len(self.models))

    async def _publish_instance(self, inst: Instance) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            change_ops(self._mirrored(pipe), self.keys, self.wid, inst, self.version)
            await pipe.execute()

    async def _publish_events(self) -> None:
        """The timeline events of the changes just published (kept for the next try on failure)."""
        if not (events := self.timeline.take()):
            return
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                event_ops(pipe, self.keys, events)
                await pipe.execute()
        except REDIS_ERRORS:
            self.timeline.put_back(events)
            raise

    def _mirrored(self, pipe):
        """The pipeline the publish steps write to: in the upgrade window (``legacy_keys``), one
        that also writes the old key names (``worker.legacy``)."""
        return LegacyMirror(pipe, self.keys, self.legacy) if self.legacy else pipe

    def _sync_log_counts(self) -> None:
        self.info.log_lines_shipped, self.info.log_lines_dropped = self.logs.shipped, self.logs.dropped

    def _lease_ops(self, pipe) -> None:
        self._sync_log_counts()
        lease_ops(self._mirrored(pipe), self.keys, self.info, self.settings.lease_ttl)

    async def _publish_goodbye(self) -> None:
        """Last words: every instance (stopped now), no lease, and an event saying we are gone."""
        try:
            self.timeline.note("worker_stopped", detail="its models stopped")
            async with self.redis.pipeline(transaction=True) as pipe:
                goodbye_ops(self._mirrored(pipe), self.keys, self.wid, [mp.instance for mp in self.models.values()],
                            self.version)
                event_ops(pipe, self.keys, self.timeline.take())
                await asyncio.wait_for(pipe.execute(), SHUTDOWN_TIMEOUT)
        except (asyncio.TimeoutError, *REDIS_ERRORS) as exc:
            log.warning("could not withdraw the lease (redis unreachable: %s); it expires in %gs",
                        exc, self.settings.lease_ttl)

    # --- periodic loops ---

    async def _heartbeat(self) -> None:
        """Renew the lease. A lease that had vanished (expired, Redis restarted or flushed)
        means Redis may have lost everything else too: publish it all again."""
        await self._published.wait()
        # Retry at least every heartbeat: a lease must be renewed on a new master (Sentinel
        # fail-over) as soon as one answers, not after a back-off grown during the switch.
        link = RedisLink("heartbeat", max_delay=self.settings.heartbeat_interval)
        while True:
            stop_if_cancelled()
            self.info.heartbeat_at = CLOCK.now()
            try:
                async with self.redis.pipeline(transaction=True) as pipe:
                    self._lease_ops(pipe)
                    added, *_ = await pipe.execute()
            except REDIS_ERRORS as exc:
                link.failed(exc)
                await link.pause()
                continue
            if link.ok() or added:
                self._request_resync()
                self.logs.check_tail()
            await asyncio.sleep(self.settings.heartbeat_interval)

    async def _gpu_time(self) -> None:
        """Add the running models' GPU-seconds to the usage ledger, every heartbeat interval."""
        while True:
            stop_if_cancelled()
            self.gpu_clock.tick(mp.instance for mp in self.models.values())
            await self.gpu_clock.flush()
            await asyncio.sleep(self.settings.heartbeat_interval)

    async def _devices(self) -> None:
        link = RedisLink("devices")
        interval = self.settings.devices_interval
        while True:
            stop_if_cancelled()
            snap = await self.snapshot()
            await self._sample_peaks(snap)  # first: the timeline's record holds what each engine uses now
            try:
                await self.gauges.load(self.redis)
                async with self.redis.pipeline(transaction=False) as pipe:
                    devices_ops(self._mirrored(pipe), self.keys, snap, interval)
                    recorded = self.gauges.ops(pipe, snap, self._engine_use())  # at most one record per fine slot
                    await pipe.execute()
                if recorded:
                    await self.gauges.roll_up(self.redis, snap.ts)
                link.ok()
            except REDIS_ERRORS as exc:
                link.failed(exc)
            if self.estimates.observe(snap):
                self._request_resync()  # estimates that take a share of the GPU changed with it
            await asyncio.sleep(interval)

    def _engine_use(self) -> list[EngineUse]:
        """What each engine on a GPU holds now: as measured (``Learner.using``), else what
        placement holds for it (``Instance.vram_mb``: the driver shows no process, e.g. in a
        container without the host's PID namespace)."""
        out = []
        for mp in self.models.values():
            if (e := mp.engine) is not None and e.placement.gpus:
                mib = self.learner.using(e.model.id, e.pid) or mp.instance.vram_mb
                out.append(EngineUse(model=e.model.id, gpus=tuple(e.placement.gpus), mib=mib))
        return out

    async def _sample_peaks(self, snap: DeviceSnapshot) -> None:
        """The running peak of every engine on a GPU (``Learner.sample``); an engine that grew
        is held at its new size."""
        engines = [e for mp in self.models.values() if (e := mp.engine) is not None]
        grown = await self.learner.sample(snap, engines, self.host.placer.shares_gpus)
        for model_id, vram in grown.items():
            if (mp := self.models.get(model_id)) is not None:
                mp.grew(vram)


async def _wait(tasks: list[asyncio.Task], timeout: float) -> set[asyncio.Task]:
    """Wait up to ``timeout`` for ``tasks``; return those still running."""
    if not tasks:
        return set()
    _, pending = await asyncio.wait(tasks, timeout=timeout)
    return pending


async def _cancel(tasks: list[asyncio.Task]) -> None:
    for task in tasks:
        task.cancel()
    await _wait(tasks, SHUTDOWN_TIMEOUT)


def _safe_url(client: aredis.Redis) -> str:
    if service := getattr(client.connection_pool, "service_name", None):
        return f"via sentinel, master {service}"
    kw = client.connection_pool.connection_kwargs
    return kw.get("path") or f"{kw.get('host')}:{kw.get('port')}/{kw.get('db', 0)}"


def main(cfg: HostConfig, redis_url: str, prefix: str = "llm:") -> int:
    """Run the worker agent until SIGTERM or SIGINT; 0 after a clean shutdown."""
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s %(levelname)s worker: %(message)s")
    try:
        resolutions()
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    return runner(_serve(cfg, redis_url, prefix))


async def _serve(cfg: HostConfig, redis_url: str, prefix: str) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    try:
        agent = WorkerAgent(cfg, redis_url, prefix)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, _on_signal, sig, stop, agent)
        loop.add_signal_handler(signal.SIGHUP, agent.reload_trigger.request)
        await agent.run(stop)
    except (ValueError, WorkerIdInUse) as exc:  # a malformed Redis URL, a taken worker id
        log.error("cannot start: %s", exc)
        return 2
    return 0


def _on_signal(sig: int, stop: asyncio.Event, agent: WorkerAgent) -> None:
    """SIGTERM: exit, models keep running (an upgrade); SIGINT: stop the models, then exit."""
    if stop.is_set():
        log.info("%s received: already shutting down", signal.Signals(sig).name)
        return
    agent.leave_models_running = sig == signal.SIGTERM
    how = "leaving the models running" if agent.leave_models_running else "stopping the models"
    log.info("%s received: shutting down, %s", signal.Signals(sig).name, how)
    stop.set()
