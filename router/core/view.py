"""``ClusterView``: what this router knows about the cluster, in memory, for the hot path.

Routers are stateless: the view is built from Redis and kept current by the workers' event
channels (``llm:events:{wid}``). Instance events carry the whole ``Instance`` and the worker's new
version (``llm:w:{wid}:version``) and are applied with no Redis read; catalog and worker events, and an event
whose version skips one (an event was missed), make the view re-read that one worker. A
resync (at start, every ``resync_interval`` and after every pub/sub reconnect) checks the
leases and re-reads only the workers whose version moved, so its cost grows with the changes
missed, not with the cluster.

Only live workers (their lease key exists) take part in routing. When Redis cannot be
reached, the view is *kept as it was*: nothing is evicted because the control plane is away
(a whole cluster dropping its models at once is a top complaint about other routers). For the
same reason, when every lease vanishes at once (Redis restarted empty or was flushed, far
likelier than every host dying together) the view is kept for ``empty_grace`` seconds while
the workers publish themselves again.
Lookups are plain dict reads; ``wait_until`` lets callers await a condition instead of polling.

Whose a record is comes from where it was found, never from what it says: an event counts only
for the worker whose channel carried it, a record only for the worker whose keys hold it
(only that worker's Redis user may write there: docs/security.md). One that claims another
worker is dropped with a warning, so one compromised host cannot redirect another's traffic.
The view reads with the router's read-only Redis user (``RouterOptions.redis_read_url``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable, Iterable, TypeVar

import msgspec
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoPermissionError, RedisError

from llm_lab_router.backoff import Backoff
from llm_lab_router.protocol import (
    CatalogEntry, DeviceSnapshot, Event, Instance, Keys, State, WorkerInfo, from_hash, from_json, valid_worker_id,
)

PUBSUB_DEAD = 3  # silent checks (``pubsub_check`` s each, a PING sent) before a subscription is dead
log = logging.getLogger("router.view")
T = TypeVar("T")

# When several instances disagree, the model's status is the most useful one to show.
STATUS_ORDER: tuple[State, ...] = ("running", "starting", "stopping", "failed", "stopped")


def model_status(instances: Iterable[Instance]) -> State:
    """``running`` if any instance runs, else the first of starting/stopping/failed seen."""
    states = {i.state for i in instances}
    return next((s for s in STATUS_ORDER if s in states), "stopped")


class Snapshot(msgspec.Struct, kw_only=True):
    """Everything one full read of Redis found (only live workers and what they own)."""

    workers: dict[str, WorkerInfo] = {}
    catalogs: dict[str, dict[str, CatalogEntry]] = {}
    devices: dict[str, DeviceSnapshot] = {}
    instances: list[Instance] = []
    began: int = 0  # how many instance events the view had applied when the read began
    versions: dict[str, str] = {}  # worker -> its version read (``llm:w:{wid}:version``; absent: an older worker)


class ClusterView:
    def __init__(self, redis: Redis, keys: Keys, *, pubsub_redis: Redis | None = None,
                 resync_interval: float = 2.0, empty_grace: float = 5.0, pubsub_check: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """``redis`` serves short reads; ``pubsub_redis`` (no socket timeout) holds the
        subscription, which sits idle for as long as nothing changes: after ``pubsub_check``
        s of silence it is PINGed, and one that stays silent ``PUBSUB_DEAD`` checks long is
        taken for dead (a master that lost power leaves a half-open socket that TCP keepalive
        notices only after about 2 h)."""
        self.redis = redis
        self.pubsub_redis = pubsub_redis or redis
        self.keys = keys
        self.resync_interval = resync_interval
        self.empty_grace = empty_grace
        self.pubsub_check = pubsub_check
        self._clock = clock
        self._emptied_at: float | None = None  # when a read first found no lease at all
        self.redis_ok = False  # set by the first successful read
        self._workers: dict[str, WorkerInfo] = {}
        self._catalogs: dict[str, dict[str, CatalogEntry]] = {}
        self._devices: dict[str, DeviceSnapshot] = {}
        self._instances: dict[str, dict[str, Instance]] = {}  # model -> worker -> instance
        # Instance events are ordered against reads on this router's own count, never by a
        # timestamp: ``updated_at`` is another host's clock (and anyone who can write the hash
        # chooses it). ``_arrived``: (model, worker) -> the count when its last event came.
        self._events = 0
        self._arrived: dict[tuple[str, str], int] = {}
        self._models: dict[str, CatalogEntry] = {}  # union over live workers, aliases merged
        self._names: dict[str, str] = {}  # id or alias -> model id
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        # Incremental resync: the version of each worker the view holds ("" for a worker of an
        # older release, which writes none and is re-read in full at every resync), when each
        # worker was last read (in reads), and how many resyncs ran (a SCAN for such older
        # workers every ``LEGACY_SCAN_EVERY``).
        self._versions: dict[str, str] = {}
        self._reads = 0
        self._read_at: dict[str, int] = {}
        self._resyncs = 0
        self._details_at = float("-inf")  # when devices and leases were last read (``refresh_details``)
        self._dead: dict[str, str] = {}  # worker -> its version when its lease was found gone
        self._forgers: set[str] = set()  # workers that sent a record claiming another (logged once each)
        self._gen = 0  # bumped on every change: the key of the per-model caches below
        self._sorted: dict[str, tuple[int, list[Instance]]] = {}

    # --- lookups (hot path: dict reads only) ---

    def resolve(self, name: str) -> str | None:
        """The model id a request name (id or alias) means, among live workers' catalogs."""
        return self._names.get(name)

    def catalog_entry(self, model: str) -> CatalogEntry | None:
        return self._models.get(model)

    def models(self) -> list[CatalogEntry]:
        return list(self._models.values())

    def workers(self) -> dict[str, WorkerInfo]:
        return dict(self._workers)

    def devices(self) -> dict[str, DeviceSnapshot]:
        return dict(self._devices)

    def instances(self, model: str) -> list[Instance]:
        """Instances of a model on live workers, in worker order (cached until the view
        changes: the hot path asks on every request, and a model may run on hundreds of hosts)."""
        cached = self._sorted.get(model)
        if cached is not None and cached[0] == self._gen:
            return list(cached[1])
        by_worker = self._instances.get(model, {})
        found = [by_worker[w] for w in sorted(by_worker) if w in self._workers]
        self._sorted[model] = (self._gen, found)
        return list(found)

    def running_instances(self, model: str) -> list[Instance]:
        return [i for i in self.instances(model) if i.state == "running" and i.url]

    def status(self, model: str) -> State:
        return model_status(self.instances(model))

    def catalog_workers(self, model: str) -> list[str]:
        """Live workers whose catalog has the model."""
        return [w for w in sorted(self._catalogs) if model in self._catalogs[w] and w in self._workers]

    def catalog_entries(self, model: str) -> dict[str, CatalogEntry]:
        """The model's catalog entry per live worker that has it (hosts may differ: devices)."""
        return {w: self._catalogs[w][model] for w in self.catalog_workers(model)}

    def all_instances(self) -> list[Instance]:
        return [i for model in self._instances for i in self.instances(model)]

    # --- waiting for changes ---

    async def wait_until(self, predicate: Callable[[], T], timeout: float) -> T:
        """Await until ``predicate()`` is truthy (checked after every update); return its last value.

        Returns the falsy value when ``timeout`` passes first, so callers decide what a
        timeout means."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            value = predicate()
            remaining = deadline - loop.time()
            if value or remaining <= 0:
                return value
            changed = self._changed
            try:
                async with asyncio.timeout(remaining):
                    await changed.wait()
            except TimeoutError:
                pass

    async def next_change(self) -> None:
        """Until the view changes next (any worker, instance, catalog or device update)."""
        await self._changed.wait()

    def _notify(self) -> None:
        self._gen += 1
        self._changed.set()
        self._changed = asyncio.Event()

    # --- applying updates (no I/O: unit-testable) ---

    def apply_event(self, event: Event) -> str | None:
        """Apply one ``llm:events:{wid}`` message (its channel already checked); return a worker
        id the caller should re-read.

        Instance events are applied as carried. A worker that announces its end leaves at
        once; any other worker or catalog event (or an instance of a worker not yet known)
        asks for that worker to be re-read."""
        if event.kind == "instance" and event.instance is not None:
            wid = event.instance.worker
            self._events += 1
            self._arrived[(event.instance.model, wid)] = self._events
            self._put_instance(event.instance)
            self._notify()
            if event.version and wid in self._versions:
                if not follows(event.version, self._versions[wid]):
                    return wid  # an event of this worker was missed: catch up with a read
                self._versions[wid] = event.version
            return None if wid in self._workers else wid
        if event.kind == "worker" and not event.alive:
            self.drop_worker(event.worker)
            return None
        return event.worker

    def apply_worker(self, wid: str, snap: Snapshot) -> None:
        """Replace what the view knows of one worker with a read of just that worker."""
        self.apply_workers([wid], snap)

    def apply_workers(self, wids: list[str], snap: Snapshot) -> None:
        """Replace what the view knows of these workers with a read of just them. The union of
        catalogs is rebuilt only when one of them changed (it spans every worker)."""
        self._reads += 1
        rebuild = False
        old: list[Instance] = []
        for wid in wids:
            self._read_at[wid] = self._reads
            if wid not in snap.workers:
                if wid in self._workers or wid in self._catalogs:
                    self._drop(wid)
                    rebuild = True
                continue
            old += [by_w[wid] for by_w in self._instances.values() if wid in by_w]
            self._forget_instances(wid)
            catalog = snap.catalogs.get(wid, {})
            rebuild = rebuild or wid not in self._workers or self._catalogs.get(wid) != catalog
            self._workers[wid] = snap.workers[wid]
            self._dead.pop(wid, None)
            self._catalogs[wid] = catalog
            self._versions[wid] = snap.versions.get(wid, "")
            if wid in snap.devices:
                self._devices[wid] = snap.devices[wid]
        self._merge_instances(snap, old, rebuild=rebuild, only=set(wids))

    def _merge_instances(self, snap: Snapshot, old: list[Instance], rebuild: bool = True,
                         only: set[str] | None = None) -> None:
        """Take the instances read, except where an event that came after the read began left
        the view something newer: a later ``seq`` of the same record, or a record the read
        could not see yet. Anything else the read did not find is gone (its key was deleted)."""
        for inst in snap.instances:
            self._put_instance(inst)
        for inst in old:
            if self._arrived.get((inst.model, inst.worker), 0) <= snap.began or inst.worker not in snap.workers:
                continue
            read = self._instances.get(inst.model, {}).get(inst.worker)
            if read is None or inst.seq > read.seq:
                self._put_instance(inst)
        self._arrived = {k: n for k, n in self._arrived.items()
                         if (only is not None and k[1] not in only) or k[1] in self._instances.get(k[0], {})}
        if rebuild:
            self._rebuild_models()
        self._notify()

    def _all_vanished(self, any_lease: bool) -> bool:
        if any_lease or not self._workers:
            self._emptied_at = None
            return False
        now = self._clock()
        if self._emptied_at is None:
            self._emptied_at = now
            log.warning("every worker lease vanished at once (Redis restarted or flushed?): keeping the "
                        "cluster view for %gs while workers publish again", self.empty_grace)
        return now - self._emptied_at < self.empty_grace

    def drop_worker(self, wid: str) -> None:
        """A worker whose lease is gone leaves routing, with everything it owned."""
        if wid not in self._workers and wid not in self._catalogs:
            return
        self._drop(wid)
        self._rebuild_models()
        self._notify()

    def _drop(self, wid: str) -> None:
        self._workers.pop(wid, None)
        self._catalogs.pop(wid, None)
        self._devices.pop(wid, None)
        self._versions.pop(wid, None)
        self._read_at.pop(wid, None)
        self._forget_instances(wid)

    def _put_instance(self, inst: Instance) -> None:
        self._instances.setdefault(inst.model, {})[inst.worker] = inst

    def _forget_instances(self, wid: str) -> None:
        for by_worker in self._instances.values():
            by_worker.pop(wid, None)

    def _rebuild_models(self) -> None:
        """The union of live catalogs: one entry per id, aliases merged; first name wins."""
        models: dict[str, CatalogEntry] = {}
        for wid in sorted(self._catalogs):
            if wid not in self._workers:
                continue
            for model_id, entry in self._catalogs[wid].items():
                seen = models.get(model_id)
                if seen is None:
                    models[model_id] = entry
                elif missing := [a for a in entry.aliases if a not in seen.aliases]:
                    models[model_id] = msgspec.structs.replace(seen, aliases=[*seen.aliases, *missing])
        names: dict[str, str] = {}
        for model_id, entry in models.items():
            names.setdefault(model_id, model_id)
        for model_id, entry in models.items():
            for alias in entry.aliases:
                names.setdefault(alias, model_id)
        self._models, self._names = models, names

    # --- reading Redis ---
    #
    # What a resync costs grows with changes, not with the cluster: one SMEMBERS of
    # ``llm:workers`` (the index of workers) with one MGET of their versions (what each last
    # changed, each in the worker's own key), one EXISTS of every lease (liveness), and a full
    # read only of the workers whose version moved (events were missed) or that write no version.
    # No keyspace SCAN but a rare one for workers missing from the index (another worker may have
    # removed them: the index is shared); device snapshots are read when asked for (``refresh_details``).

    LEGACY_SCAN_EVERY = 15  # resyncs between SCANs for workers of older releases (no version)
    CHUNK = 64  # workers per pipeline; the loop serves requests between chunks

    async def read_worker(self, wid: str) -> Snapshot:
        return await self._read([wid], self._events)

    async def _read_versions(self) -> dict[str, str]:
        """Worker id -> version of every worker in the index or in the view that has one: one
        round trip, a second only for workers new to the index."""
        known = sorted(self._workers.keys() | self._dead.keys())
        pipe = self.redis.pipeline(transaction=False)
        pipe.smembers(self.keys.workers())
        if known:
            pipe.mget([self.keys.version(w) for w in known])
        index, *found = await pipe.execute()
        versions = dict(zip(known, found[0])) if known else {}
        if new := sorted(w for w in map(_text, index) if w not in versions and valid_worker_id(w)):
            versions.update(zip(new, await self.redis.mget([self.keys.version(w) for w in new])))
        return {w: _text(v) for w, v in versions.items() if v is not None}

    async def _read(self, wids: list[str], began: int) -> Snapshot:
        """Read these workers: version, lease and catalog, then the instance of each catalog
        model (a worker keeps exactly those: ``worker.publish``). The version is read before the
        rest: what follows is at least as new as it, so nothing can be missed, at most read twice."""
        snap = Snapshot(workers={}, catalogs={}, devices={}, instances=[], began=began, versions={})
        pipe = self.redis.pipeline(transaction=False)
        for wid in wids:
            pipe.get(self.keys.version(wid))
        for wid in wids:
            pipe.hgetall(self.keys.worker(wid))
            pipe.hgetall(self.keys.catalog(wid))
        results = await pipe.execute()
        versions, results = results[:len(wids)], results[len(wids):]
        for n, wid in enumerate(wids):
            lease, catalog = results[2 * n: 2 + 2 * n]
            info = self._lease(wid, lease)
            if info is None:
                continue  # expired (or never was)
            snap.workers[wid] = info
            if versions[n] is not None:
                snap.versions[wid] = _text(versions[n])
            snap.catalogs[wid] = {}
            for model_id, spec in catalog.items():
                entry = _decode(lambda: from_json(spec, CatalogEntry), f"catalog entry {_text(model_id)} of {wid}")
                if entry is not None:
                    snap.catalogs[wid][entry.id] = entry
        owners = [(wid, model) for wid in snap.workers for model in snap.catalogs[wid]]
        if owners:
            pipe = self.redis.pipeline(transaction=False)
            for wid, model in owners:
                pipe.hgetall(self.keys.instance(model, wid))
            for (wid, model), data in zip(owners, await pipe.execute()):
                if data:
                    inst = _decode(lambda: from_hash(data, Instance), f"instance {self.keys.instance(model, wid)}")
                    if inst is not None and self._owned(wid, inst, model):
                        snap.instances.append(inst)
        return snap

    def _owned(self, wid: str, inst: Instance, model: str | None = None) -> bool:
        """Whether a record found in worker ``wid``'s keys (or on its channel) is about its own
        instance: another worker's would be a forgery (logged once per worker that sent one)."""
        if inst.worker == wid and (model is None or inst.model == model):
            return True
        self._forged(wid, f"an instance of {inst.model!r} on worker {inst.worker!r}")
        return False

    def _forged(self, wid: str, what: str) -> None:
        if wid not in self._forgers:
            self._forgers.add(wid)
            log.warning("ignoring %s written by worker %r: a worker speaks only for itself "
                        "(a compromised host? docs/security.md); further ones are dropped silently", what, wid)

    def _lease(self, wid: str, data: dict) -> WorkerInfo | None:
        return _decode(lambda: from_hash(data, WorkerInfo), f"lease of worker {wid}") if data else None

    async def _read_leases(self, wids: list[str]) -> dict[str, WorkerInfo]:
        leases: dict[str, WorkerInfo] = {}
        pipe = self.redis.pipeline(transaction=False)
        for wid in wids:
            pipe.hgetall(self.keys.worker(wid))
        for wid, data in zip(wids, await pipe.execute()):
            if (info := self._lease(wid, data)) is not None:
                leases[wid] = info
        return leases

    async def _alive(self, wids: list[str]) -> set[str]:
        """Which of these workers hold a lease: one ``EXISTS`` of them all, which is enough
        when none expired (the usual case); else one ``EXISTS`` each to find which."""
        if not wids:
            return set()
        if await self.redis.exists(*(self.keys.worker(w) for w in wids)) == len(wids):
            return set(wids)
        pipe = self.redis.pipeline(transaction=False)
        for wid in wids:
            pipe.exists(self.keys.worker(wid))
        return {wid for wid, n in zip(wids, await pipe.execute()) if n}

    async def _read_devices(self, wids: list[str]) -> dict[str, DeviceSnapshot]:
        pipe = self.redis.pipeline(transaction=False)
        for wid in wids:
            pipe.get(self.keys.devices(wid))
        found: dict[str, DeviceSnapshot] = {}
        for wid, data in zip(wids, await pipe.execute()):
            if data and (dev := _decode(lambda: from_json(data, DeviceSnapshot), f"devices of {wid}")) is not None:
                found[wid] = dev
        return found

    async def refresh_details(self, max_age: float = 1.0) -> None:
        """Read the device snapshots and leases (heartbeat time, log counters) of the live
        workers if the view's are older than ``max_age`` s. Both change every few seconds on
        every host and routing needs neither (a resync checks only that each lease exists), so
        they are read when someone asks (``/api/devices/info``, ``/metrics``, a placement), not
        at every resync. Redis unreachable: the last ones read are kept."""
        if self._clock() - self._details_at < max_age:
            return
        wids = sorted(self._workers)
        try:
            devices = await self._read_devices(wids)
            leases = await self._read_leases(wids)
        except (RedisError, OSError) as exc:
            log.debug("device snapshots not refreshed: %s", exc)
            return
        self._devices = {w: d for w, d in devices.items() if w in self._workers}
        for wid, info in leases.items():
            if wid in self._workers:
                self._workers[wid] = info
        self._details_at = self._clock()

    async def resync(self) -> None:
        """Catch up with Redis: drop the workers whose lease is gone, re-read the workers whose
        version moved since the view read them (or that are new, or write no version), in
        chunks so requests are served in between. Every ``LEGACY_SCAN_EVERY`` resyncs (and the
        first), a SCAN finds workers that are not in the index."""
        began, reads = self._events, self._reads
        scan = self._resyncs % self.LEGACY_SCAN_EVERY == 0
        self._resyncs += 1
        versions = await self._read_versions()
        legacy = {w for w, v in self._versions.items() if not v}
        if scan:
            found = {self.keys.worker_id_of(_text(k))
                     async for k in self.redis.scan_iter(match=self.keys.worker_pattern(), count=1000)}
            legacy |= {w for w in found if valid_worker_id(w)}
            for wid in legacy:
                self._dead.pop(wid, None)  # its lease exists again
        # An index entry whose lease was gone at an earlier resync is checked again only once
        # its version moves (the worker came back): dead hosts cost nothing per resync.
        candidates = sorted(self._workers.keys() | {w for w in versions.keys() | legacy
                                                    if w not in self._dead or self._dead[w] != versions.get(w, "")})
        alive = await self._alive(candidates)
        if self._all_vanished(bool(alive)):
            return
        for wid in candidates:
            if wid not in alive:
                self._dead[wid] = versions.get(wid, "")
            else:
                self._dead.pop(wid, None)
        gone = [w for w in self._workers if w not in alive and self._read_at.get(w, 0) <= reads]
        for wid in gone:
            self._drop(wid)
        if gone:
            self._rebuild_models()
            self._notify()
        stale = [w for w in sorted(alive) if w not in self._workers or not versions.get(w)
                 or versions[w] != self._versions.get(w)]
        for n in range(0, len(stale), self.CHUNK):
            chunk = stale[n: n + self.CHUNK]
            self.apply_workers(chunk, await self._read(chunk, began))
            began = self._events

    async def refresh_worker(self, wid: str) -> None:
        self.apply_worker(wid, await self.read_worker(wid))

    # --- background upkeep ---

    async def start(self) -> None:
        """First resync (best effort: a router may start before Redis), then the upkeep tasks."""
        try:
            await self.resync()
            self._mark(True)
        except (RedisError, OSError) as exc:
            self._mark(False, exc)
        self._tasks = [asyncio.create_task(self._resync_loop(), name="view-resync"),
                       asyncio.create_task(self._event_loop(), name="view-events")]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    def _mark(self, ok: bool, exc: BaseException | None = None) -> None:
        """Log the transitions only: one line when Redis goes away, one when it is back."""
        if ok and not self.redis_ok:
            log.info("redis reachable: cluster view synced (%d workers, %d models)",
                     len(self._workers), len(self._models))
        elif not ok and (self.redis_ok or not self._tasks):
            hint = (" (the view's Redis user may not read the workers' records: give the router the "
                    "reader user's URL in LLM_ROUTER_REDIS_READ_URL, docs/security.md)"
                    if isinstance(exc, NoPermissionError) else "")
            log.warning("redis unreachable (%s: %s)%s: keeping the last cluster view, retrying",
                        type(exc).__name__, exc, hint)
        self.redis_ok = ok

    async def _resync_loop(self) -> None:
        backoff = Backoff(self.resync_interval)
        while True:
            await asyncio.sleep(backoff.delay if not self.redis_ok else self.resync_interval)
            try:
                await self.resync()
                self._mark(True)
                backoff.reset()
            except (RedisError, OSError) as exc:
                self._mark(False, exc)
                backoff.grow()
            except Exception:  # a bug must not freeze the view: say so and keep going
                log.exception("cluster view resync failed")

    async def _event_loop(self) -> None:
        """Follow every worker's events (``llm:events:*``); after each (re)subscribe, resync so
        nothing between is missed."""
        backoff = Backoff(self.resync_interval)
        while True:
            pubsub = self.pubsub_redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.psubscribe(self.keys.events_pattern())
                await self.resync()
                self._mark(True)
                backoff.reset()
                await self._follow(pubsub)
            except (RedisError, OSError) as exc:
                self._mark(False, exc)
            except Exception:  # a bug must not end the subscription for good
                log.exception("cluster view event handling failed")
            finally:
                await _quietly(pubsub.aclose())
            await backoff.sleep()

    async def _follow(self, pubsub) -> None:
        """Apply each event; PING a silent subscription, and raise ``ConnectionError`` when
        nothing at all (not even the pong) came for ``PUBSUB_DEAD`` checks."""
        loop = asyncio.get_running_loop()
        heard = loop.time()
        while True:
            message = await pubsub.get_message(timeout=self.pubsub_check)
            now = loop.time()
            if message is not None:
                heard = now
                if message["type"] == "pmessage":
                    await self._on_message(_text(message["channel"]), message["data"])
            elif now - heard >= PUBSUB_DEAD * self.pubsub_check:
                raise RedisConnectionError(f"the events subscription answered nothing for {now - heard:.1f}s")
            else:
                await pubsub.ping()  # its pong is a message: proof of life

    async def _on_message(self, channel: str, data: bytes) -> None:
        try:
            event = from_json(data, Event)
        except msgspec.DecodeError as exc:
            log.warning("ignoring malformed event %r: %s", data[:200], exc)
            return
        sender = self.keys.worker_of_channel(channel)
        if not valid_worker_id(sender):
            return
        if event.worker != sender:
            self._forged(sender, f"an event of worker {event.worker!r}")
            return
        if event.instance is not None and not self._owned(sender, event.instance):
            return
        wid = self.apply_event(event)
        if wid is not None:
            await self.refresh_worker(wid)


def follows(version: str, known: str) -> bool:
    """Whether ``version`` (``<epoch>:<n>``, ``llm:w:{wid}:version``) is ``known`` or the one right
    after it: then no change of that worker was missed in between."""
    if version == known:
        return True
    epoch, _, n = version.rpartition(":")
    k_epoch, _, k_n = known.rpartition(":")
    return epoch == k_epoch and n.isdigit() and k_n.isdigit() and int(n) == int(k_n) + 1


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _decode(parse: Callable[[], T], what: str) -> T | None:
    """Decode one value; a malformed one is logged and skipped, never fatal to the view."""
    try:
        return parse()
    except (msgspec.DecodeError, msgspec.ValidationError, TypeError, ValueError) as exc:
        log.warning("skipping malformed %s: %s", what, exc)
        return None


async def _quietly(awaitable) -> None:
    try:
        await awaitable
    except (RedisError, OSError):
        pass
