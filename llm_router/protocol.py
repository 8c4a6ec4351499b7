"""The wire format: every Redis key name and every message that crosses Redis.

This is the one module that knows how keys are spelled and how messages are encoded
(the redis-py lesson: one place owns the wire format). Routers and workers import
``Keys`` and the structs from here; nothing else builds a key string by hand.

Layout (prefix ``llm:`` by default; docs/redis-keys.md documents each key for ``redis-cli``).

key                             type        writer  content
==============================  ==========  ======  ==================================================
llm:worker:{wid}                hash, TTL   worker  ``WorkerInfo``: the worker's lease
llm:catalog:{wid}               hash        worker  model id -> JSON ``CatalogEntry``
llm:instance:{model}:{wid}      hash        worker  ``Instance``: state, url, pid, last error
llm:devices:{wid}               string,TTL  worker  JSON ``DeviceSnapshot``
llm:logs:{model}                stream      worker  fields ts, host, stream, msg (``MAXLEN ~``)
llm:logpos:{wid}:{model}:{s}    string,TTL  worker  ``<spool file id>:<offset>`` shipped (``LOG_SHIP_SCRIPT``)
llm:commands:{wid}              stream      router  ``Command`` fields; consumer group ``workers``
llm:reply:{command id}          list, TTL   worker  one JSON ``Reply`` (the sender BLPOPs it)
llm:events                      pub/sub     worker  JSON ``Event`` on every change
llm:versions                    hash        worker  worker id -> ``<epoch>:<n>``, bumped with every change
llm:used:{model}                hash        router  ``last_used`` + one JSON ``RouterUsage`` per router
llm:quota:{scope}:{name}        hash, TTL   router  per-second requests/tokens of a key or group (router/limits/quotas.py)
llm:quota:{scope}:{name}:inflight zset,TTL  router  leases of requests in flight, score = deadline (ms)
llm:waiting                     hash        router  ``{model}@{rid}`` -> JSON ``WaitEntry`` (models waiting for a swap)
llm:learned:{wid}:{model}       list, TTL   worker  JSON ``Learned``: measured cold starts and VRAM, newest first
llm:hist:{step}:{series}:{slot} hash, TTL   both    one time slot of a series: counters, histogram buckets, gauges (``timeline``)
llm:hist:{step}:gauges:{wid}:{chunk} string,TTL worker  a host's GPU/CPU/RAM records of 360 slots (``timeline.RECORD``)
llm:hist:gauges:{wid}           hash, TTL   worker  that host's totals (MiB) and GPU count
llm:hist:series                 hash        both    series name -> unix time it was last written
llm:hist:rolled:{step}          hash        router  slot -> routers that tried to roll it up (the one that got 1 did)
llm:timeline                    stream      both    ``TimelineEvent`` fields: starts, evictions, crashes, reloads (``MAXLEN ~``)
==============================  ==========  ======  ==================================================
=======
Who may write what is part of the wire format (docs/security.md, examples/redis-users.acl):
everything a worker owns is under ``llm:w:{wid}:`` (its id in a fixed place, which Redis 6.2 ACL
key patterns can express: worker ``wid``'s user gets ``~llm:w:{wid}:*``), as are its command
stream, its replies and its event channel (``llm:cmd:{wid}``, ``llm:reply:{wid}:*``,
``llm:events:{wid}``); routers write only the keys they own and read the workers' through a
read-only user. Worker ids are ``WORKER_ID`` (no ``:`` and no glob character), so no worker's
pattern covers another's keys.

==================================  ==========  ======  ==================================================
key                                 type        writer  content
==================================  ==========  ======  ==================================================
llm:w:{wid}:lease                   hash, TTL   worker  ``WorkerInfo``: the worker's lease
llm:w:{wid}:version                 string      worker  ``<epoch>:<n>`` (``WorkerVersion``), bumped with every change
llm:w:{wid}:catalog                 hash        worker  model id -> JSON ``CatalogEntry``
llm:w:{wid}:instance:{model}        hash        worker  ``Instance``: state, url, pid, last error
llm:w:{wid}:devices                 string,TTL  worker  JSON ``DeviceSnapshot``
llm:w:{wid}:logpos:{model}:{s}      string,TTL  worker  ``<spool file id>:<offset>`` shipped (``LOG_SHIP_SCRIPT``)
llm:w:{wid}:learned:{model}         list, TTL   worker  JSON ``Learned``: measured cold starts and VRAM, newest first
llm:workers                         set         worker  worker ids: the routers' index instead of a SCAN (a hint)
llm:events:{wid}                    pub/sub     worker  JSON ``Event`` on every change of worker ``wid``
llm:logs:{model}                    stream      worker  fields ts, host, stream, msg (``MAXLEN ~``)
llm:cmd:{wid}                       stream      router  ``Command`` fields; consumer group ``workers``
llm:reply:{wid}:{command id}        list, TTL   worker  one JSON ``Reply`` (the sender BLPOPs it)
llm:used:{model}                    hash        router  ``last_used`` + one JSON ``RouterUsage`` per router
llm:quota:{scope}:{name}            hash, TTL   router  per-second requests/tokens of a key or group (limits/quotas)
llm:quota:{scope}:{name}:inflight   zset,TTL    router  leases of requests in flight, score = deadline (ms)
llm:waiting                         hash        router  ``{model}@{rid}`` -> JSON ``WaitEntry`` (waiting for a swap)
llm:hist:{step}:{series}:{slot}     hash, TTL   router  one time slot of a request series: counters, histogram buckets (``timeline``)
llm:hist:series                     hash        both    series name -> unix time it was last written
llm:hist:rolled:{step}              hash        router  slot -> routers that claimed its roll-up (the one that got 1 did it)
llm:hist:claims:{what}              hash, TTL   router  period -> routers that claimed a once-per-lab task (``redis-memory``)
llm:timeline                        stream      both    ``TimelineEvent`` fields: starts, evictions, crashes, reloads (``MAXLEN ~``)
llm:hist:{step}:gpus:{slot}         hash, TTL   router  every host's GPUs summed in one slot, VRAM per model (``timeline``)
llm:w:{wid}:hist:v3:{step}:{chunk}  string,TTL  worker  the host's GPU/CPU/RAM/engine records of 360 slots (``timeline.RECORD``)
llm:w:{wid}:hist:gauges             hash, TTL   worker  the host's totals (MiB), GPU count, model numbers
==================================  ==========  ======  ==================================================
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Literal

import msgspec
from llm_lab_router.clock import CLOCK

State = Literal["stopped", "starting", "running", "stopping", "failed"]
Mode = Literal["chat", "base", "embedding"]
Routing = Literal["affinity", "least-outstanding"]
CommandOp = Literal["start", "stop", "stop_all", "restart_autostart", "clear_logs"]
LogSource = Literal["stdout", "stderr", "event"]

COMMAND_GROUP = "workers"


# A worker id: the host name by default. No ``:`` (a worker's ACL pattern ``llm:w:{wid}:*``
# must not cover a worker whose id starts with ``{wid}:``) and no glob character (``* ? [ ] \``).
WORKER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def valid_worker_id(wid: str) -> bool:
    return WORKER_ID.fullmatch(wid) is not None


class Keys:
    """Builds every key name from one prefix, so deployments can share a Redis."""

    def __init__(self, prefix: str = "llm:") -> None:
        self.prefix = prefix

    # --- owned by worker ``wid``: all under ``owned(wid)``, its ACL user's key pattern ---

    def owned(self, wid: str) -> str:
        """The pattern of every key worker ``wid`` owns (its ACL user's ``~`` pattern)."""
        return f"{self.prefix}w:{wid}:*"

    def _own(self, wid: str, what: str) -> str:
        return f"{self.prefix}w:{wid}:{what}"

    def worker(self, wid: str) -> str:
        return self._own(wid, "lease")

    def worker_pattern(self) -> str:
        return f"{self.prefix}w:*:lease"

    def worker_id_of(self, key: str) -> str:
        return key[len(self.prefix) + len("w:"): -len(":lease")]

    def version(self, wid: str) -> str:
        """The worker's change counter (``WorkerVersion``): routers re-read only the workers
        whose version moved (events were missed)."""
        return self._own(wid, "version")

    def workers(self) -> str:
        """The set of worker ids, so routers find workers without a keyspace SCAN. Every worker
        adds itself; it is a hint only (what a router trusts is read from each worker's own keys)."""
        return f"{self.prefix}workers"

    def catalog(self, wid: str) -> str:
        return self._own(wid, "catalog")

    def instance(self, model: str, wid: str) -> str:
        return self._own(wid, f"instance:{model}")

    def devices(self, wid: str) -> str:
        return self._own(wid, "devices")

    def log_position(self, wid: str, model: str, stream: str) -> str:
        """How far worker ``wid`` has shipped one spool file of ``model`` (``LOG_SHIP_SCRIPT``)."""
        return self._own(wid, f"logpos:{model}:{stream}")

    def learned(self, wid: str, model: str) -> str:
        """Measured cold starts and peak VRAM of ``model`` on worker ``wid`` (``Learned``)."""
        return self._own(wid, f"learned:{model}")

    def events(self, wid: str) -> str:
        """Worker ``wid``'s event channel: only its ACL user may publish there, so the channel
        a router got an event on, not the event's content, says whose it is."""
        return f"{self.prefix}events:{wid}"

    def events_pattern(self) -> str:
        return f"{self.prefix}events:*"

    def worker_of_channel(self, channel: str) -> str:
        return channel[len(self.prefix) + len("events:"):]

    def commands(self, wid: str) -> str:
        """Commands to worker ``wid``: routers add, only that worker reads."""
        return f"{self.prefix}cmd:{wid}"

    def reply(self, wid: str, command_id: str) -> str:
        """Worker ``wid``'s answer to one command: no other worker may push it."""
        return f"{self.prefix}reply:{wid}:{command_id}"

    # --- shared by all workers of a model ---

    def logs(self, model: str) -> str:
        return f"{self.prefix}logs:{model}"

    # --- owned by routers ---

    def used(self, model: str) -> str:
        return f"{self.prefix}used:{model}"

    def quota_window(self, scope: str, name: str) -> str:
        """A key's or group's (``scope``) requests and tokens of the last minute (router/limits/quotas.py)."""
        return f"{self.prefix}quota:{scope}:{name}"

    def quota_leases(self, scope: str, name: str) -> str:
        """A key's or group's requests in flight, one lease per request (router/limits/quotas.py)."""
        return f"{self.prefix}quota:{scope}:{name}:inflight"

    def waiting(self) -> str:
        """Models waiting for a swap: one field per (model, router), see ``WaitEntry``."""
        return f"{self.prefix}waiting"

    def hint(self, wid: str) -> str:
        """The ``waiting`` entries that name worker ``wid`` as the host a swap will start on,
        copied there by the routers: its prefetcher reads them (the worker's Redis user may read
        this key, never the routers' line itself, which it could then also write)."""
        return f"{self.prefix}hint:{wid}"

    def history(self, step: int, series: str, slot: int) -> str:
        """One ``step``-second slot of a history series (``llm_router.timeline``)."""
        return f"{self.prefix}hist:{step}:{series}:{slot}"

    def history_series(self) -> str:
        """Every history series -> when it was last written (readers list series here, no SCAN)."""
        return f"{self.prefix}hist:series"

    def history_gauges(self, wid: str) -> str:
        """Host ``wid``'s gauge totals (RAM and each GPU's memory, MiB) and GPU count (``timeline``):
        its worker's own key, as are its records (``gauge_chunk``)."""
        return f"{self.prefix}w:{wid}:hist:gauges"

    def gauge_chunk(self, wid: str, step: int, chunk: int, version: int) -> str:
        """Host ``wid``'s gauge records of ``CHUNK`` ``step``-second slots (``timeline.RECORD``, of
        layout ``version``)."""
        return f"{self.prefix}w:{wid}:hist:v{version}:{step}:{chunk}"

    def history_rolled(self, step: int) -> str:
        """Slot -> how many routers claimed its roll-up (``HINCRBY``: the one that got 1 does it)."""
        return f"{self.prefix}hist:rolled:{step}"

    def history_claims(self, what: str) -> str:
        """Period -> how many routers claimed ``what`` then (the one that got 1 does it)."""
        return f"{self.prefix}hist:claims:{what}"

    def timeline(self) -> str:
        """The stream of ``TimelineEvent``: what happened to models and hosts, and who asked."""
        return f"{self.prefix}timeline"
    def ledger(self, hour: int) -> str:
        """The usage ledger of the hour starting at unix time ``hour``, see ``llm_router.ledger``."""
        return f"{self.prefix}ledger:{hour}"

    def audit(self) -> str:
        """The audit trail: a bounded stream of actions, see ``llm_router.audit``."""
        return f"{self.prefix}audit"


class LegacyKeys(Keys):
    """The layout of releases before per-worker Redis users (one shared ``worker`` user), which
    their routers read: ``llm:worker:{wid}``, ``llm:catalog:{wid}``, ``llm:instance:{model}:{wid}``,
    ``llm:devices:{wid}``, the ``llm:versions`` hash, the ``llm:events`` channel,
    ``llm:commands:{wid}`` and ``llm:reply:{id}``. Only for the upgrade window: a worker with
    ``legacy_keys = true`` writes its records under these names too and takes commands from
    both streams, so routers of either release see it (docs/deploy.md). Nothing else uses it."""

    def worker(self, wid: str) -> str:
        return f"{self.prefix}worker:{wid}"

    def catalog(self, wid: str) -> str:
        return f"{self.prefix}catalog:{wid}"

    def instance(self, model: str, wid: str) -> str:
        return f"{self.prefix}instance:{model}:{wid}"

    def devices(self, wid: str) -> str:
        return f"{self.prefix}devices:{wid}"

    def versions(self) -> str:
        return f"{self.prefix}versions"

    def events(self, wid: str = "") -> str:
        return f"{self.prefix}events"

    def commands(self, wid: str) -> str:
        return f"{self.prefix}commands:{wid}"

    def reply(self, wid: str, command_id: str) -> str:
        return f"{self.prefix}reply:{command_id}"

    def of(self, key: str, keys: Keys) -> tuple[str, str] | None:
        """The legacy name of one of ``keys``' worker-owned keys or channels: (kind, name), kind
        ``version`` (a field ``name`` of ``versions()``) or ``key``; None: routers of older
        releases read no such key (log positions, measurements, the index of workers)."""
        rest = key[len(keys.prefix):] if key.startswith(keys.prefix) else ""
        if rest.startswith("events:"):
            return "key", self.events()
        if not rest.startswith("w:"):
            return None
        wid, _, what = rest[2:].partition(":")
        if what == "version":
            return "version", wid
        if what.startswith("instance:"):
            return "key", self.instance(what[len("instance:"):], wid)
        named = {"lease": self.worker, "catalog": self.catalog, "devices": self.devices}.get(what)
        return ("key", named(wid)) if named else None

class WorkerInfo(msgspec.Struct, kw_only=True):
    """The worker's lease hash; it exists only while the worker heartbeats."""

    id: str
    host: str
    pid: int
    version: str
    started_at: float
    heartbeat_at: float
    log_lines_shipped: int = 0  # model log lines this worker process put into Redis
    log_lines_dropped: int = 0  # lines its spool dropped (over ``log_spool_mb`` while Redis was away)


class CatalogEntry(msgspec.Struct, kw_only=True):
    """What a host says about a model it can run: the public part of its config."""

    id: str
    aliases: list[str] = []
    mode: Mode = "chat"
    owned_by: str = "llm-router"
    created: int = 0
    auto_start: bool = False
    on_demand: bool = True
    idle_ttl: float = 0.0
    max_concurrency: int = 0
    vram_mb: list[int] = []  # per device profile, in order: VRAM per GPU in MiB
    devices: list[list[str]] = []  # per device profile, in order: its devices (cpu, cuda, cuda:N)
    startup_timeout: float = 0.0  # the model's own start timeout (s): routers wait for a start that long
    routing: Routing = "affinity"  # how routers choose among its running instances (router/forward/affinity.py)
    fallbacks: list[str] = []  # models (ids or aliases) that serve its requests when it cannot
    min_residency: float = 0.0  # s a loaded model stays before a waiting one may evict it (router.control.scheduler)
    max_wait: float = 0.0  # s after which a waiting model overrides residency (0 = no bound)
    idle_release: float = 0.0  # s unused after which residency ends early (0 = off; router.control.scheduler)
    # Learned on this host (``Learned``): the newest peak VRAM per device profile (0 = not
    # measured), and the typical cold start (s, start to healthy; 0 = never measured): the upper
    # quartile of the kept starts of the profile last started (worker.learning.typical_cold_start).
    measured_vram_mb: list[int] = []
    cold_start_s: float = 0.0
    # Estimated from the model's files on this host (llm_router.estimate), per device profile:
    # MiB per GPU (0 = no estimate, or a CPU profile); used where neither declared nor measured.
    estimated_vram_mb: list[int] = []


class Instance(msgspec.Struct, kw_only=True):
    """One model on one host. Stored as a flat Redis hash so ``HGETALL`` reads well."""

    model: str
    worker: str
    state: State = "stopped"
    url: str = ""
    pid: int = 0
    started_at: float = 0.0
    updated_at: float = 0.0
    last_error: str = ""
    last_error_at: float = 0.0  # unix time (the worker's) of last_error; both stay after a recovery
    restarts: int = 0
    gpus: str = ""  # the CUDA_VISIBLE_DEVICES it was started with
    vram_mb: int = 0  # MiB reserved on each of ``gpus`` while starting/running (placement)
    # Its weight files being read into the page cache before a start (worker.prefetch): bytes
    # read of the total to read (0, 0 = not prefetching; done = total: prefetched).
    prefetch_done: int = 0
    prefetch_total: int = 0
    api_key: str = ""  # the engine's own key (model config); routers send it upstream, the API never shows it
    # The writer's count of changes to this record (+1 each; from 0 again when the worker
    # restarts, which a router's next resync settles). Routers order an event against a read
    # by it, never by ``updated_at``: that is the worker's clock, not theirs.
    seq: int = 0


class Event(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Published on ``llm:events:{worker}``. Instance events carry the whole instance, so a router
    updates its view without reading Redis; catalog and worker events make it re-read
    that worker."""

    kind: Literal["instance", "catalog", "worker"]
    worker: str
    instance: Instance | None = None
    alive: bool = True
    # The worker's version (``llm:w:{wid}:version``) written with this change ("" from older workers):
    # a router that holds the one before knows it missed nothing; otherwise it re-reads the worker.
    version: str = ""


class WorkerVersion:
    """A worker's change counter, ``<epoch>:<n>``: ``epoch`` is new for each worker process
    (so a restarted worker never repeats a version), ``n`` counts its transactions that changed
    its catalog or instances. Routers compare versions only for equality and succession."""

    def __init__(self) -> None:
        self.epoch = uuid.uuid4().hex[:12]
        self.n = 0

    def next(self) -> str:
        self.n += 1
        return f"{self.epoch}:{self.n}"


class Command(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A request to a worker, added to ``llm:cmd:{wid}``."""

    op: CommandOp
    id: str = msgspec.field(default_factory=lambda: uuid.uuid4().hex)
    model: str = ""
    keep_minutes: int = 0
    sent_at: float = msgspec.field(default_factory=time.time)
    # s the sender waits for the reply, from the moment Redis added the entry (its id is
    # Redis's time): the worker does not run it later (worker.commands.expired); 0 = no bound.
    timeout: float = 0.0
    # start: for a request (True) or an operator (False). An on-demand start of a failed model is a
    # restart (counted, backed off, bounded by max_restarts); only an operator's resets the budget.
    on_demand: bool = False


class Reply(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The outcome of a ``Command``, pushed to ``llm:reply:{id}``."""

    id: str
    worker: str
    ok: bool
    message: str = ""
    state: str = ""
    models: list[str] = []  # started (restart_autostart) or stopped (stop_all) models
    deleted: int = 0  # log entries removed (clear_logs)
    log_tail: list[str] = []  # last log lines of a model that failed to start
    no_room: bool = False  # a start failed because no device profile fits this host now


class GpuInfo(msgspec.Struct, kw_only=True):
    index: int
    name: str
    uuid: str = ""
    memory_total: int = 0  # MiB
    memory_used: int = 0
    memory_free: int = 0
    utilization: int = 0  # percent
    power: int = 0  # W (NVML reports mW); 0 where the GPU does not say
    temperature: int = 0  # °C of the GPU die; 0 where the GPU does not say


class CudaInfo(msgspec.Struct, kw_only=True):
    online: bool = False
    error: str = ""
    driver: str = ""
    gpus: list[GpuInfo] = []


class CpuInfo(msgspec.Struct, kw_only=True):
    online: bool = True
    cpu_count: int = 0
    cpu_percent: float = 0.0
    memory_total: int = 0  # MiB
    memory_used: int = 0
    memory_free: int = 0


class DeviceSnapshot(msgspec.Struct, kw_only=True):
    worker: str
    host: str
    ts: float
    cuda: CudaInfo
    cpu: CpuInfo


class RouterUsage(msgspec.Struct, kw_only=True):
    """One router's use of one model, a field ``router:{rid}`` of ``llm:used:{model}``.

    ``at`` is when the router last wrote it (it rewrites it every second while requests are in
    flight): readers ignore entries older than ``USAGE_STALE`` s, so a dead router cannot pin
    a model."""

    inflight: int = 0  # requests queued or being served by this router now
    last_used: float = 0.0  # unix time (Redis's clock) of this router's last request start or end
    at: float = 0.0  # Redis's clock
    # Of ``inflight``, those being served now, per worker id (the instance they were sent to);
    # the rest are queued, not yet sent to any instance.
    serving: dict[str, int] = {}
    # key priority -> unix time (Redis's clock) of this router's last use of the model at that
    # priority (``at`` while such a request is in flight): a swap for a lower priority may not
    # evict it (router/control/scheduler.py, ``held_by_priority``)
    priorities: dict[int, float] = {}


USAGE_STALE = 10.0  # seconds after which a router's usage entry no longer counts
USED_LAST = "last_used"  # field of ``llm:used:{model}``: unix time of the latest use anywhere
USED_ROUTER = "router:"  # prefix of the per-router fields of ``llm:used:{model}``


class ModelUsage(msgspec.Struct, kw_only=True):
    """``llm:used:{model}`` read back: when it was last used and how many requests are in
    flight now across live routers (``serving``: of those, the ones being served, per worker)."""

    last_used: float = 0.0
    inflight: int = 0
    priorities: dict[int, float] = {}  # key priority -> last use at it, any router
    serving: dict[str, int] = {}

    def requests_on(self, worker: str) -> int:
        """The requests that stopping the model's instance on ``worker`` would cut or send back
        to wait: those it serves, and those queued (not yet sent to any instance: any copy may be
        the one that serves them). Requests served by a copy on another host do not count: an
        idle copy may go while a busy one serves (drain is per instance)."""
        queued = max(0, self.inflight - sum(self.serving.values()))
        return self.serving.get(worker, 0) + queued


def usage_of(fields: dict, now: float, exclude: str = "") -> ModelUsage:
    """Decode ``HGETALL llm:used:{model}`` (bytes or str), dropping stale router entries and
    the in-flight count of router ``exclude`` (a router knows its own better)."""
    out = ModelUsage()
    for k, v in fields.items():
        k = k.decode() if isinstance(k, bytes) else k
        if k == USED_LAST:
            out.last_used = max(out.last_used, float(v))
        elif k.startswith(USED_ROUTER):
            try:
                entry = from_json(v, RouterUsage)
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue
            out.last_used = max(out.last_used, entry.last_used)
            for prio, at in entry.priorities.items():
                out.priorities[prio] = max(at, out.priorities.get(prio, 0.0))
            if now - entry.at <= USAGE_STALE and k != USED_ROUTER + exclude:
                out.inflight += entry.inflight
                for wid, n in entry.serving.items():
                    out.serving[wid] = out.serving.get(wid, 0) + n
    return out


class Blocked(msgspec.Struct, kw_only=True, frozen=True, omit_defaults=True):
    """Why a swap may not happen now. ``kind``: ``residency`` (``model`` loaded less than its
    min_residency ago; ``until`` when that ends), ``draining`` (``model`` has ``requests``
    queued or in flight), ``turn`` (``model`` has waited longer and swaps first), ``priority``
    (a key of a higher ``priority`` than the waiting requests' used ``model`` since it was
    loaded)."""

    kind: Literal["residency", "draining", "turn", "priority"]
    model: str
    until: float = 0.0  # unix time; 0 = unknown (draining, turn)
    requests: int = 0
    priority: int = 0  # the higher priority that holds it (kind ``priority``)


class WaitEntry(msgspec.Struct, kw_only=True):
    """One router's requests waiting for a swap to ``model``: a field ``{model}@{rid}`` of
    ``llm:waiting``. ``at`` is rewritten every few seconds while they wait; readers ignore
    entries older than ``USAGE_STALE`` (a dead router's waiters vanish)."""

    model: str
    router: str
    since: float  # unix time its oldest waiting request began waiting
    count: int = 1  # requests waiting on this router
    at: float = 0.0
    # Loaded models this starving waiter must evict but whose requests hold them (drain):
    # every router stops sending them new requests until they are stopped (router.control.client).
    claims: list[str] = []
    # Why it waits, as this router's scheduler decided last, and when it should be served (unix
    # time, 0 = unknown): every router shows the same reason for it (router.control.pending).
    blocked: list[Blocked] = []
    eta: float = 0.0
    # The host it will start on once unblocked ("" = not decided: behind another model's turn);
    # that host's worker prefetches its weight files (worker.prefetch).
    worker: str = ""


class Learned(msgspec.Struct, kw_only=True):
    """One measured start of a model on one host (an item of ``llm:learned:{wid}:{model}``)."""

    profile: int  # index of the device profile it ran with
    gpus: str = ""  # CUDA_VISIBLE_DEVICES
    device: str = ""  # the GPU model (NVML name) or "cpu": the device profile the figures hold for
    cold_start_s: float = 0.0  # start to healthy
    vram_mb: int = 0  # peak per GPU (NVML per process, else the delta of used memory), raised while it runs; 0 = unknown
    how: str = ""  # "process" (NVML per-process memory) or "delta" (used memory before/after)
    at: float = 0.0


class LogEntry(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One line of a model's log, as stored in its stream and as sent over SSE."""

    timestamp: float
    message: str
    host: str = ""
    stream: LogSource = "stdout"


# --- encoding helpers: the only place that turns structs into Redis values and back ---

_encoder = msgspec.json.Encoder()


def to_json(obj: msgspec.Struct) -> bytes:
    return _encoder.encode(obj)


def from_json(data: bytes | str, kind: type[msgspec.Struct]):
    return msgspec.json.decode(data, type=kind)


def to_hash(obj: msgspec.Struct) -> dict[str, str]:
    """Flatten a struct of scalars into Redis hash fields (all strings, bools as 0/1)."""
    out: dict[str, str] = {}
    for name, value in msgspec.structs.asdict(obj).items():
        if isinstance(value, bool):
            value = int(value)
        out[name] = str(value)
    return out


def from_hash(data: dict, kind: type[msgspec.Struct]):
    """Read back a hash written by ``to_hash`` (redis-py gives bytes or str)."""
    fields = {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in data.items()
    }
    return msgspec.convert(fields, kind, strict=False)


def log_fields(entry: LogEntry) -> dict[str, str]:
    """Fields of one ``XADD`` to a log stream."""
    return {"ts": f"{entry.timestamp:.6f}", "host": entry.host, "stream": entry.stream, "msg": entry.message}


# Appends many lines of one spool file to one log stream in one round trip, and records how
# far that file is shipped in the same atomic step, so a batch is in the stream exactly once
# even when a worker dies between sending it and hearing the answer: the next worker sends
# it again and the script sees the position is already past it. Why a script, and why the
# lines travel as one argument: one ``XADD`` per line through a redis-py pipeline tops out
# near 45,000 lines/s, and even one argument per line costs redis-py more time packing it
# than Redis takes to append it; splitting the batch is cheap in Lua.
# KEYS[1] = the stream, KEYS[2] = the position key (``Keys.log_position``); ARGV = maxlen,
# host, stream, file id, first offset, last offset, ts, then the lines joined by "\n" (see
# ``log_ship_args``); with ts = "" each line is "<ts> <msg>" (event lines carry their own
# time). Returns -1 when appended, else the position already recorded for this file
# (> first offset): nothing was written, the caller resumes from there.
LOG_SHIP_SCRIPT = """
local pos = redis.call('GET', KEYS[2])
if pos then
  local id, off = string.match(pos, '^(.+):(%d+)$')
  if id == ARGV[4] and tonumber(off) > tonumber(ARGV[5]) then return tonumber(off) end
end
local key, maxlen, host, stream, ts, blob = KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[7], ARGV[8]
local at = 1
while true do
  local nl = string.find(blob, '\\n', at, true)
  local line = string.sub(blob, at, (nl or 0) - 1)
  local t, msg = ts, line
  if ts == '' then
    local sp = string.find(line, ' ', 1, true) or (#line + 1)
    t, msg = string.sub(line, 1, sp - 1), string.sub(line, sp + 1)
  end
  redis.call('XADD', key, 'MAXLEN', '~', maxlen, '*', 'ts', t, 'host', host, 'stream', stream, 'msg', msg)
  if not nl then break end
  at = nl + 1
end
redis.call('SET', KEYS[2], ARGV[4] .. ':' .. ARGV[6], 'EX', 604800)
return -1
"""


def log_ship_args(maxlen: int, host: str, stream: LogSource, file_id: str, first: int, last: int, ts: str,
                  lines: list[bytes]) -> list[str | int | bytes]:
    """ARGV of ``LOG_SHIP_SCRIPT``: ``lines`` (at least one, none containing "\n") are bytes
    ``[first, last)`` of one spool file, all stamped ``ts`` (or, with ts = "", each line is
    ``"<ts> <msg>"``)."""
    return [maxlen, host, stream, file_id, first, last, ts, b"\n".join(lines)]


def log_entry(fields: dict) -> LogEntry:
    """Decode the fields of a log stream entry (bytes or str)."""
    get = {(k.decode() if isinstance(k, bytes) else k): (v.decode("utf-8", "replace") if isinstance(v, bytes) else v)
           for k, v in fields.items()}
    stream = get.get("stream", "stdout")
    return LogEntry(
        timestamp=float(get.get("ts", 0) or 0),
        message=get.get("msg", ""),
        host=get.get("host", ""),
        stream=stream if stream in ("stdout", "stderr", "event") else "stdout",
    )


def command_fields(cmd: Command) -> dict[str, bytes]:
    """A command travels as one ``data`` field holding its JSON (readable in ``XRANGE``)."""
    return {"data": to_json(cmd)}


def command_of(fields: dict) -> Command:
    data = fields.get(b"data", fields.get("data"))
    return from_json(data, Command)


async def trim_logs(redis, keys: Keys, model: str, keep_minutes: int) -> int:
    """Delete log entries older than ``keep_minutes`` (0 = all); return how many went.

    Stream ids are millisecond timestamps, so this is ``XTRIM MINID``. Used by routers
    (clear endpoint) and by workers (``clear_logs`` command) alike.
    """
    key = keys.logs(model)
    before = await redis.xlen(key)
    if keep_minutes <= 0:
        if before:
            await redis.xtrim(key, maxlen=0, approximate=False)
    else:
        min_id = max(0, int((CLOCK.now() - keep_minutes * 60) * 1000))  # ids are Redis's time  # more than all: keep all
        await redis.xtrim(key, minid=f"{min_id}-0", approximate=False)
    after = await redis.xlen(key)
    return max(0, before - after)


async def read_usage(redis, keys: Keys, models, now: float, exclude: str = "") -> dict[str, ModelUsage]:
    """``llm:used:{model}`` of each model, decoded (stale router entries dropped), in one
    round trip. Used by workers (idle unload) and routers (eviction) alike."""
    models = list(models)
    if not models:
        return {}
    async with redis.pipeline(transaction=False) as pipe:
        for m in models:
            pipe.hgetall(keys.used(m))
        rows = await pipe.execute()
    return {m: usage_of(row, now, exclude) for m, row in zip(models, rows)}
