"""Redis memory of the lab's timeline at full retention (issue 27), measured by filling a private
redis-server with the project's own writers driven by a simulated clock.

    python -m scripts.sim history [--hosts 500] [--gpus 4] [--models 10] [--routers 2]
                                  [--resolutions 10s:24h,5m:30d,1h:30d] [--out history-memory.json]

What writes, as in a lab (nothing here spells a key or a record):

- each host: a ``GaugeRecorder`` (``worker.timeline``) fed the fleet's ``DeviceSnapshot`` shape
  (``scripts.sim.fleet.SimHost.devices``, ``--gpus`` GPUs) and an ``EngineUse`` per running
  instance (its state changes at ``--change-rate`` per host per minute, as the fleet's), then its
  own ``roll_up``; each change is also an ``InstanceEvents`` event (``llm:timeline``);
- ``--routers`` routers: a ``History`` each, every model busy in every fine slot (10 requests per
  router per model: every counter set, 8 TTFT, 10 latency and 4 wait buckets), its ``flush`` and
  ``roll_up``, and its ``GpuSummary`` summing the hosts' records into series ``gpus``.

**The simulated clock.** ``History`` takes ``clock=``, ``GaugeRecorder`` the snapshot's ``ts``,
``GpuSummary.run_once`` and ``GaugeRecorder.roll_up`` a ``now``, ``InstanceEvents`` ``clock=``:
no product change was needed. The clock runs from ``retention + 2 coarse steps`` before the end
to the end (the start of this run). Writers set TTLs relative to Redis's real clock, so no key
expires during the fill (checked: ``expired_keys`` stays 0); what a real run's TTLs would have
dropped is dropped by ``ExpiryLedger``, which notes every ``EXPIRE`` the writers send (and the TTL
a script gave a key it created) with the simulated time and deletes each key once the simulated
clock passes its deadline, exactly when Redis would have. The end state is what a lab holds after
running for longer than the retention: every slot of every resolution, nothing older.

**Fast.** Before the last ``fine retention + 1 chunk + 1 coarse step`` the fine slots expire
anyway and only feed the coarse ones, so there one fine slot per slot of the first coarse
resolution is written (hosts, requests, the ``gpus`` summary), then rolled up as usual: every
coarse slot exists, each averaged (gauges) or summed (requests) from that one fine slot (the
``gpus`` summary of that slot is written by ``GpuSummary._sum_slot``, what ``run_once`` calls for
each slot it claims: ``run_once`` would also read every host for the 11 empty slots it looks back
at). Coarse
records are fixed-size and coarse hashes hold the same fields, so memory is the same; their
counts are those of one fine slot, not 30 (small integers either way in a listpack). The last
stretch writes every fine slot. Events: the stream keeps ``EVENTS_MAXLEN`` (about), so only the
events of the last ``1.2 × EVENTS_MAXLEN / rate`` seconds are written (state changes go on at a
lower rate before, so engines still come and go).

**Measured.** ``used_memory`` after the fill minus before, then each part by deleting it and
reading ``used_memory`` again: per resolution the hosts' gauge records, their meta hashes, per
resolution the request series, the ``gpus`` summary, the coverage marks, the events, the series
index and roll-up claims; "other" is the rest (the keyspace's tables). The bound:
bytes ≈ hosts × A + models × B + C (A: the hosts' parts / hosts, B: the request series / models,
C: the rest). Also checked: every slot within retention of every resolution has a record (hosts:
``--check-hosts`` of them read back with ``timeline.unpack``), a model hash, a ``gpus`` hash.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import random
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import msgspec
import redis as redis_sync
from llm_lab_router.protocol import DeviceSnapshot, Keys
from llm_lab_router.redis_server import RedisServer
from llm_lab_router.router.observe.history import History
from llm_lab_router.timeline import (
    BOUNDS,
    CHUNK,
    COVERAGE,
    DEFAULT_RESOLUTIONS,
    EVENTS_MAXLEN,
    GPUS_SERIES,
    RECORD_VERSION,
    EngineUse,
    Resolution,
    event_ops,
    gauge_chunk,
    model_series,
    parse_resolutions,
    unpack,
)
from llm_lab_router.worker.timeline import GaugeRecorder, InstanceEvents
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from scripts.sim.fleet import CHAT, SimHost, host_ids, make_host, model_ids

log = logging.getLogger("sim.history")

MIB = 1 << 20
SNAPSHOTS = 8  # distinct device snapshots per host, cycled (their readings are random anyway)
HOST_BATCH = 50  # hosts per pipeline / concurrent roll-ups


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hosts", type=int, default=500)
    p.add_argument("--gpus", type=int, default=4, help="GPUs per host")
    p.add_argument("--models", type=int, default=10)
    p.add_argument("--routers", type=int, default=2)
    p.add_argument("--resolutions", default=DEFAULT_RESOLUTIONS, help="as LLM_ROUTER_HISTORY_RESOLUTIONS")
    p.add_argument("--change-rate", type=float, default=1.0, help="instance state changes per host per minute")
    p.add_argument("--check-hosts", type=int, default=3, help="hosts whose every record is read back")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--end", type=float, help="unix time the simulated clock stops at (default: now); where the "
                   "last slots fall in their chunk strings decides their length, so two runs compare at the same one")
    p.add_argument("--read", action="store_true", help="then time what the dashboard's 30 d view reads, through a "
                   "router on the filled Redis (before the memory is measured: its few writes are counted)")
    p.add_argument("--out", type=Path, default=Path("history-memory.json"))


class SimClock:
    """The simulated time every writer reads (``clock()``)."""

    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class ExpiryLedger:
    """Key -> the simulated time its TTL ends; ``due`` hands over the keys Redis would have
    expired by then. Deadlines are bucketed by ``grain`` seconds so a sweep looks only at the
    buckets that ended (a key refreshed later sits in a later bucket too: checked against its
    latest deadline)."""

    def __init__(self, clock: SimClock, grain: float) -> None:
        self.clock = clock
        self.grain = grain
        self.deadline: dict[str, float] = {}
        self.buckets: dict[int, set[str]] = defaultdict(set)
        self.swept = 0

    def note(self, key: str, seconds: float) -> None:
        at = self.clock() + seconds
        self.deadline[key] = at
        self.buckets[int(at // self.grain)].add(key)

    def due(self, now: float) -> list[str]:
        out = []
        for b in sorted(b for b in self.buckets if b <= now // self.grain):
            keys = self.buckets[b]
            later = {k for k in keys if self.deadline.get(k, math.inf) > now}
            out += [k for k in keys - later if self.deadline.pop(k, None) is not None]
            if later and b == now // self.grain:
                self.buckets[b] = later
            else:
                del self.buckets[b]
        self.swept += len(out)
        return out


class _NotesExpiry:
    """Tells the ledger every ``EXPIRE`` a pipeline sends."""

    ledger: ExpiryLedger

    def expire(self, name, time, *args, **kwargs):
        self.ledger.note(name if isinstance(name, str) else name.decode(), int(time))
        return super().expire(name, time, *args, **kwargs)  # type: ignore[misc]


class LedgerPipeline(_NotesExpiry, Pipeline):
    """An asyncio pipeline that notes its ``EXPIRE``s, and after ``execute`` the TTL a script
    left on the key it writes (its first, as ``ROLLUP_SCRIPT``'s coarse hash) when the ledger
    does not know that key yet (the script created it)."""

    def evalsha(self, sha, numkeys, *keys_and_args):
        if int(numkeys):
            self._script_keys = [*getattr(self, "_script_keys", []), keys_and_args[0]]
        return super().evalsha(sha, numkeys, *keys_and_args)

    async def execute(self, raise_on_error: bool = True):
        out = await super().execute(raise_on_error)
        new = [k for k in getattr(self, "_script_keys", []) if k not in self.ledger.deadline]
        self._script_keys = []
        if new:
            async with Redis(connection_pool=self.connection_pool).pipeline(transaction=False) as pipe:
                for k in new:
                    pipe.ttl(k)
                for k, ttl in zip(new, await pipe.execute()):
                    if ttl > 0:
                        self.ledger.note(k, ttl)
        return out


class LedgerRedis(Redis):
    """The writers' client (asyncio, as routers and workers use): its pipelines note their TTLs."""

    ledger: ExpiryLedger

    def pipeline(self, transaction: bool = True, shard_hint=None) -> LedgerPipeline:
        pipe = LedgerPipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)
        pipe.ledger = self.ledger
        return pipe


class SyncLedgerPipeline(_NotesExpiry, redis_sync.client.Pipeline):
    """The hosts' records go through a blocking pipeline: ``GaugeRecorder.ops`` only queues
    commands, and redis-py's blocking client reads a reply in a third of the asyncio client's
    time (500 hosts × 5 commands per simulated slot)."""


class SyncLedgerRedis(redis_sync.Redis):
    ledger: ExpiryLedger

    def pipeline(self, transaction: bool = True, shard_hint=None) -> SyncLedgerPipeline:
        pipe = SyncLedgerPipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)
        pipe.ledger = self.ledger
        return pipe


# The 10 requests a busy model gets per router per fine slot (status, latency, TTFT, tokens in,
# tokens out; then the wait): together they set every counter, TTFT buckets 3-10, latency
# buckets 4-13 and wait buckets 0-3, as under steady mixed load.
REQUESTS = [(404 if j == 8 else 502 if j == 9 else 200, BOUNDS[4 + j] * 0.9, BOUNDS[3 + j % 8] * 0.9,
             200 + 37 * j, 150 + 41 * j, BOUNDS[j % 4] * 0.9) for j in range(10)]


class SimLab:
    """The hosts and routers of one fill, and the clock they share."""

    def __init__(self, redis: LedgerRedis, hosts_redis: SyncLedgerRedis, keys: Keys, opts: argparse.Namespace,
                 end: float) -> None:
        self.redis, self.hosts_redis, self.keys, self.opts = redis, hosts_redis, keys, opts
        self.res = parse_resolutions(opts.resolutions)
        self.fine, self.coarse = self.res[0], self.res[1:]
        self.rng = random.Random(opts.seed)
        random.seed(opts.seed)  # the fleet's snapshots
        top = max(r.step for r in self.res)
        self.keep = max(r.keep for r in self.res)
        self.end_slot = int(end // self.fine.step)
        self.first_slot = int((end - self.keep - 2 * top) // top) * top // self.fine.step
        self.dense_slot = self.end_slot - (self.fine.keep + CHUNK * self.fine.step + top) // self.fine.step
        self.stride = self.coarse[0].step // self.fine.step if self.coarse else 1
        self.clock = SimClock(self.first_slot * self.fine.step)
        self.ev_clock = SimClock(self.clock.t)
        self.ledger = redis.ledger = hosts_redis.ledger = ExpiryLedger(self.clock, top)
        self.models = model_ids(opts.models)
        self.wids = host_ids(opts.hosts, "hist")
        self.hosts = [make_host(w, self.models, "http://127.0.0.1:9/v1") for w in self.wids]
        self.recorders = [GaugeRecorder(keys, w, self.res) for w in self.wids]
        self.events = [InstanceEvents(w, h.info.host, clock=self.ev_clock) for w, h in zip(self.wids, self.hosts)]
        self.snaps = [[self._snapshot(h) for _ in range(SNAPSHOTS)] for h in self.hosts]
        self.engines = [self._engines(h) for h in self.hosts]
        self.routers = [History(redis, keys, f"sim-router-{n}", self.res, clock=self.clock) for n in range(opts.routers)]
        for h in self.routers:
            h.inflight = lambda: {m: 2 for m in self.models}
            h.queued = lambda: {m: 1 for m in self.models}
        self.rate = opts.change_rate * opts.hosts / 60.0  # state changes per second, all hosts
        self.events_from = end - min(self.keep, 1.2 * EVENTS_MAXLEN / self.rate) if self.rate else end
        self.counts = {"host_records": 0, "changes": 0, "events": 0}

    def _snapshot(self, host: SimHost) -> DeviceSnapshot:
        """The fleet's snapshot of ``host``, with ``--gpus`` GPUs (the fleet's four, repeated)."""
        snap = host.devices()
        gpus = [msgspec.structs.replace(snap.cuda.gpus[i % len(snap.cuda.gpus)], index=i) for i in range(self.opts.gpus)]
        return msgspec.structs.replace(snap, cuda=msgspec.structs.replace(snap.cuda, gpus=gpus))

    def _engines(self, host: SimHost) -> list[EngineUse]:
        """An engine per running instance: model k on GPU k mod gpus, every third over two GPUs."""
        g = self.opts.gpus
        return [EngineUse(model=m, gpus=tuple(sorted({k % g, (k + 1) % g})) if k % 3 == 2 else (k % g,),
                          mib=6000 + 1000 * (k % 5))
                for k, m in enumerate(self.models) if host.instances[m].state == "running"]

    async def fill(self) -> None:
        for n in range(0, len(self.recorders), HOST_BATCH):
            await asyncio.gather(*(r.load(self.redis) for r in self.recorders[n:n + HOST_BATCH]))
        s, last_day = self.first_slot, None
        t0 = time.monotonic()
        while s < self.end_slot:
            dense = s >= self.dense_slot
            await self._slot(s, dense)
            day = int(self.clock() // 86400)
            if day != last_day:
                last_day = day
                log.info("simulated %.1f of %.1f days (%s) in %.0f s; %d keys tracked", (s - self.first_slot) *
                         self.fine.step / 86400, (self.end_slot - self.first_slot) * self.fine.step / 86400,
                         "every fine slot" if dense else "one fine slot per coarse slot", time.monotonic() - t0,
                         len(self.ledger.deadline))
            s += 1 if dense or s + self.stride > self.dense_slot else self.stride
        await self._hosts_roll_up()
        await self._sweep()

    async def _slot(self, s: int, dense: bool) -> None:
        """Slot ``s``: hosts record, routers count requests; then, once it is closed, the routers
        flush and sum it, every writer rolls up what closed, changes happen, expired keys go."""
        step = self.fine.step
        before = self.clock()
        self.clock.t = s * step + step / 2
        self._record_hosts(s)
        for h in self.routers:
            for m in self.models:
                for status, latency, ttft, tokens_in, tokens_out, wait in REQUESTS:
                    h.request(m, status, latency, ttft, tokens_in, tokens_out)
                    h.waited(m, wait)
        self.clock.t = (s + 1) * step + step / 2
        await self._changes(before, self.clock())
        for h in self.routers:
            await h.flush()
        if dense:
            for h in self.routers:
                await h.summary.run_once(self.clock())
        else:  # only slot s has records: summing the 11 empty ones run_once looks back at would cost 11× more
            await self.routers[0].summary._sum_slot(s, self.wids)
        for h in self.routers:
            await h.roll_up()
        top = self.ledger.grain
        if int(before // top) != int(self.clock() // top):
            await self._hosts_roll_up()
            await self._sweep()

    def _record_hosts(self, s: int) -> None:
        for n in range(0, len(self.hosts), HOST_BATCH):
            with self.hosts_redis.pipeline(transaction=False) as pipe:
                for i in range(n, min(n + HOST_BATCH, len(self.hosts))):
                    snap = msgspec.structs.replace(self.snaps[i][s % SNAPSHOTS], ts=self.clock())
                    self.counts["host_records"] += self.recorders[i].ops(pipe, snap, self.engines[i])
                pipe.execute()

    async def _hosts_roll_up(self) -> None:
        for n in range(0, len(self.recorders), HOST_BATCH):
            await asyncio.gather(*(r.roll_up(self.redis, self.clock()) for r in self.recorders[n:n + HOST_BATCH]))

    async def _changes(self, since: float, now: float) -> None:
        """The fleet's state changes between ``since`` and ``now`` (fewer before the events
        written: they only move engines then), and the events they tell, written."""
        n = int(self.rate * (now - since) + self.rng.random())
        write = now > self.events_from
        if not write:
            n = min(n, len(self.hosts) // 10 + 1)
        for t in sorted(self.rng.uniform(since, now) for _ in range(n)):
            i = self.rng.randrange(len(self.hosts))
            host = self.hosts[i]
            model = self.rng.choice([m for m in host.instances if m != CHAT])
            self.ev_clock.t = t
            self.events[i].changed(host.change(model, "http://127.0.0.1:9/v1"))
            self.engines[i] = self._engines(host)
            self.counts["changes"] += 1
        events = [e for ev in self.events for e in ev.take()]
        if write and events:
            async with self.redis.pipeline(transaction=False) as pipe:
                event_ops(pipe, self.keys, events)
                await pipe.execute()
            self.counts["events"] += len(events)

    async def _sweep(self) -> None:
        due = self.ledger.due(self.clock())
        for n in range(0, len(due), 10_000):
            async with self.redis.pipeline(transaction=False) as pipe:
                for m in range(n, min(n + 10_000, len(due)), 500):
                    pipe.delete(*due[m:m + 500])
                await pipe.execute()

    # --- checks ---

    def _expected(self, res: Resolution, last: int) -> range:
        """The slots of ``res`` within retention at the end, up to ``last`` (the last one written)."""
        return range(math.ceil((self.clock() - res.keep) / res.step), last + 1)

    def _last_host_slot(self, res: Resolution) -> int:
        """The last slot a host has a record of (``GaugeRecorder.roll_up``'s last closed slot)."""
        return self.end_slot - 1 if res is self.fine else int((self.clock() - self.fine.step) // res.step) - 1

    async def check(self) -> dict:
        """Per resolution: slots within retention that hold a record (the first ``--check-hosts``
        hosts), a hash of each model, a ``gpus`` hash; and what expired in Redis's own time."""
        out: dict = {}
        for res in self.res:
            host_slots = self._expected(res, self._last_host_slot(res))
            present = 0
            for wid in self.wids[:self.opts.check_hosts]:
                chunks = sorted({s // CHUNK for s in host_slots})
                data = dict(zip(chunks, await self.redis.mget([gauge_chunk(self.keys, res.step, wid, c * CHUNK)[0]
                                                               for c in chunks])))
                present += sum(1 for s in host_slots if unpack(data[s // CHUNK] or b"", s % CHUNK, self.opts.gpus).samples)
            if res is self.fine:
                series_last = self.end_slot - 1
                gpus_last = series_last
            else:  # History.roll_up's last closed slot
                series_last = gpus_last = int((self.clock() - self.fine.step * 1.5) // res.step) - 1
            series_slots = self._expected(res, series_last)
            names = [model_series(m) for m in self.models]
            async with self.redis.pipeline(transaction=False) as pipe:
                for name in names:
                    for s in series_slots:
                        pipe.exists(self.keys.history(res.step, name, s))
                for s in self._expected(res, gpus_last):
                    pipe.exists(self.keys.history(res.step, GPUS_SERIES, s))
                found = await pipe.execute()
            nm = len(names) * len(series_slots)
            out[f"{res.step}s"] = {
                "host_records": [present, len(host_slots) * min(self.opts.check_hosts, len(self.wids))],
                "model_hashes": [sum(found[:nm]), nm], "gpus_hashes": [sum(found[nm:]), len(found) - nm]}
        stats = await self.redis.info("stats")
        out["expired_in_redis_time"] = int(stats["expired_keys"])
        out["evicted"] = int(stats["evicted_keys"])
        out["keys_with_ttl_past_retention"] = len([k for k, at in self.ledger.deadline.items() if at <= self.clock()])
        out["keys_swept"] = self.ledger.swept
        return out

    # --- memory ---

    def parts(self) -> list[tuple[str, str, list[str]]]:
        """(name, kind, SCAN patterns) of each part, in the order they are deleted; kind ``host``
        and ``model`` parts make A and B of the bound. Patterns come from ``Keys``."""
        k = self.keys
        out: list[tuple[str, str, list[str]]] = [("events (llm:timeline)", "lab", [k.timeline()])]
        for res in self.res:
            out.append((f"hosts' gauge records, {res.step} s", "host",
                        [k.gauge_chunk("*", res.step, "*", RECORD_VERSION)]))  # type: ignore[arg-type]
        out.append(("hosts' meta (totals, model numbers)", "host", [k.history_gauges("*")]))
        for res in self.res:
            out.append((f"request series, {res.step} s", "model", [k.history(res.step, model_series("*"), "*")]))  # type: ignore[arg-type]
        out.append(("gpus summary, all resolutions", "lab", [k.history(r.step, GPUS_SERIES, "*") for r in self.res]))  # type: ignore[arg-type]
        out.append(("coverage (routers), all resolutions", "lab", [k.history(r.step, COVERAGE, "*") for r in self.res]))  # type: ignore[arg-type]
        out.append(("series index and roll-up claims", "lab", [k.history_series(), *(k.history_rolled(r.step) for r in self.res)]))
        return out


def dashboard_reads(url: str, resolutions: str) -> list[tuple[str, float]]:
    """What the dashboard's 30 d view asks a router for (its series list, each model's series,
    the first 32 GPUs', the events), six at a time as a browser does."""
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    from llm_lab_router.timeline import RESOLUTIONS_ENV

    from scripts.timeline_demo import router_on

    os.environ[RESOLUTIONS_ENV] = resolutions  # the router reads the resolutions filled
    with router_on(url) as base:
        get = lambda path: json.load(urllib.request.urlopen(base + path, timeout=60))
        out = []
        t0 = time.monotonic()
        names = get("/api/history")["available"]
        out.append((f"series list ({len(names)} series)", time.monotonic() - t0))
        window = "from=-30d&step=7200"
        paths = [f"/api/history?series=model&model={n[6:]}&{window}" for n in names if n.startswith("model:")]
        paths += [f"/api/history?series=gpu&host={n[4:].rpartition(':')[0]}&gpu={n.rpartition(':')[2]}&{window}"
                  for n in sorted(n for n in names if n.startswith("gpu:"))[:32]]
        paths.append("/api/events?from=-30d&limit=2000")
        for path in (paths[0], paths[-2]):
            t = time.monotonic()
            get(path)
            out.append((f"one: {path.split('&')[0]}", time.monotonic() - t))
        t1 = time.monotonic()
        with ThreadPoolExecutor(6) as pool:
            list(pool.map(get, paths))
        out.append((f"{len(paths)} series and events, 6 at a time", time.monotonic() - t1))
        out.append(("total", time.monotonic() - t0))
        return out


async def used(redis: Redis) -> int:
    """``used_memory`` with this one connection open (each client costs Redis some KiB: the fill's
    concurrent pipelines' connections are closed first, so they are not counted as timeline)."""
    await redis.connection_pool.disconnect()
    return int((await redis.info("memory"))["used_memory"])


async def delete_measured(redis: Redis, patterns: Iterable[str]) -> tuple[int, int]:
    """Delete the keys matching ``patterns``; return (keys, bytes freed)."""
    keys: list[bytes] = []
    for pattern in patterns:
        if "*" in pattern:
            keys += [k async for k in redis.scan_iter(match=pattern, count=2000)]
        elif await redis.exists(pattern):
            keys.append(pattern.encode())
    before = await used(redis)
    for n in range(0, len(keys), 500):
        await redis.delete(*keys[n:n + 500])
    return len(keys), before - await used(redis)


async def measure(lab: SimLab, base: int) -> dict:
    redis = lab.redis
    total = await used(redis) - base
    rows = []
    for name, kind, patterns in lab.parts():
        count, freed = await delete_measured(redis, patterns)
        rows.append({"part": name, "kind": kind, "keys": count, "bytes": freed})
    before = await used(redis)
    await redis.script_flush()
    rows.append({"part": "Lua scripts (the roll-up's)", "kind": "lab", "keys": 0, "bytes": before - await used(redis)})
    o = lab.opts
    host_bytes = sum(r["bytes"] for r in rows if r["kind"] == "host")
    model_bytes = sum(r["bytes"] for r in rows if r["kind"] == "model")
    a, b = host_bytes / o.hosts, model_bytes / o.models
    rows.append({"part": "other (the keyspace's hash tables)", "kind": "lab", "keys": 0,
                 "bytes": total - sum(r["bytes"] for r in rows)})
    return {"hosts": o.hosts, "gpus": o.gpus, "models": o.models, "routers": o.routers,
            "resolutions": o.resolutions, "used_memory": total, "parts": rows,
            "bound": {"A_per_host": round(a), "B_per_model": round(b), "C": round(total - a * o.hosts - b * o.models)}}


def table(report: dict) -> str:
    lines = [(f"Timeline at full retention ({report['resolutions']}): {report['hosts']} hosts × {report['gpus']} GPUs "
             f"× {report['models']} models, {report['routers']} routers"), "",
             "| part | keys | MiB | per host / model |", "|---|---|---|---|"]
    for r in report["parts"]:
        per = {"host": f"{r['bytes'] / report['hosts'] / 1024:.1f} KiB per host",
               "model": f"{r['bytes'] / report['models'] / MIB:.2f} MiB per model"}.get(r["kind"], "")
        lines.append(f"| {r['part']} | {r['keys']:,} | {r['bytes'] / MIB:.1f} | {per} |")
    lines.append(f"| **used_memory** | | **{report['used_memory'] / MIB:.1f}** | |")
    b = report["bound"]
    lines += ["", (f"bytes ≈ hosts × {b['A_per_host'] / MIB:.3f} MiB + models × {b['B_per_model'] / MIB:.2f} MiB "
              f"+ {b['C'] / MIB:.1f} MiB   (A = {b['A_per_host']:,}, B = {b['B_per_model']:,}, C = {b['C']:,} bytes)"),
              f"filled in {report['fill_seconds']:.0f} s; checks: {json.dumps(report['check'])}"]
    lines += [f"dashboard, 30 d: {what}: {seconds:.2f} s" for what, seconds in report["reads"]]
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> int:
    end = args.end or time.time()
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp), extra=["--appendonly", "no", "--save", "", "--maxmemory", "0"]).start()
        redis = LedgerRedis.from_url(server.url)
        hosts_redis = SyncLedgerRedis.from_url(server.url)
        try:
            base = await used(redis)
            lab = SimLab(redis, hosts_redis, Keys(), args, end)
            t0 = time.monotonic()
            await lab.fill()
            fill_seconds = time.monotonic() - t0
            hosts_redis.close()  # its connection is not the timeline's memory
            check = await lab.check()
            reads = await asyncio.to_thread(dashboard_reads, server.url, args.resolutions) if args.read else []
            report = await measure(lab, base)
            report.update(end=end, fill_seconds=fill_seconds, check=check, counts=lab.counts, reads=reads,
                          date=time.strftime("%Y-%m-%d", time.gmtime()), load_average=list(os.getloadavg()))
        finally:
            await redis.aclose()
            hosts_redis.close()
            server.stop()
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    return 0
