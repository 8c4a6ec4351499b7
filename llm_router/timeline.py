"""The lab's timeline in Redis: what its history keys hold and how they are read back.

Shared by routers (request series, router events, roll-ups), workers (GPU and host series,
instance events) and the API that reads them (``router.observe.history_query``); key names
are spelled by ``protocol.Keys`` (``history``, ``history_series``, ``history_rolled``,
``timeline``). docs/redis-keys.md shows them with ``redis-cli``.

**Series.** One hash per series per time slot, ``llm:hist:{step}:{series}:{slot}`` (slot =
unix time // step), with a TTL of the resolution's retention, so history is bounded by
construction. Series: ``model:{id}`` (counters and histograms, added to by every router with
``HINCRBY``) and ``routers`` (``flushes``: one per router per slot flushed, so a slot no router
could write, Redis being away, reads as a gap, not as zero). A host's gauges (its GPUs' memory,
utilisation, power and temperature, each engine's VRAM, its CPU and RAM: series
``gpu:{host}:{index}`` and ``host:{host}``) are binary records (``RECORD``, layout
``RECORD_VERSION`` in the key) in strings of ``CHUNK`` slots, ``llm:w:{host}:hist:v3:{step}:{chunk}``,
written by the host's worker alone (its own keys; its own roll-up included), with its totals and
model numbers in ``llm:w:{host}:hist:gauges``; routers read them as the read-only user that
reads workers' keys, and one router per fine slot sums every host's into the series ``gpus``
(``router.observe.gpu_summary``).

**Mergeable histograms.** TTFT, total latency and wait are counted per bucket of fixed
boundaries (``BOUNDS``): field ``ttft:3`` = requests whose TTFT fell in bucket 3. Buckets of
several routers and slots add up exactly, so a percentile over any routers and any interval is
computed from summed buckets, never averaged from per-router percentiles.

**Resolutions.** The first (finest, 10 s for 24 h by default) is written; each coarser one (5 min
and 1 h for 30 days) is a roll-up of it (a host's gauges: averaged by its own worker, idempotently), made once per slot by whichever router first claims it
(``HINCRBY llm:hist:rolled:{step} {slot} 1`` answers 1 to one router only; ``ROLLUP_SCRIPT``): it adds up the fine slots and counts
them in ``slots``, so a gauge's coarse value is its sum / ``slots`` and a gap stays visible.
A read spanning more than ``SLOTS_READ`` slots of one resolution reads a coarser one
(the 1 h slots for 30 days: 720 slots, not 8,640; ``history_query.choose``).
``LLM_ROUTER_HISTORY_RESOLUTIONS`` ("10s:24h,5m:30d,1h:30d") changes them, for routers and workers alike.

**Events** (``TimelineEvent``) go to one stream, ``llm:timeline`` (``MAXLEN ~``, and trimmed to
the coarsest retention by the roll-up's winner).
"""

from __future__ import annotations

import os
import re
import struct
from bisect import bisect_left
from typing import Iterable, Literal, Mapping, Sequence

import msgspec

from llm_lab_router.protocol import Keys

# Upper bounds (s) of the histogram buckets; the last bucket (index len(BOUNDS)) is "more".
BOUNDS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0,
                             120.0, 300.0)
NBUCKETS = len(BOUNDS) + 1
HISTOGRAMS = ("ttft", "latency", "wait")
COUNTERS = ("requests", "errors_4xx", "errors_5xx", "tokens_in", "tokens_out")
GPU_FIELDS = ("memory_used", "memory_total", "utilization", "power", "temperature")  # MiB, MiB, %, W, °C
HOST_FIELDS = ("cpu_percent", "memory_used", "memory_total")  # percent, MiB, MiB
MODEL_FIELD = "model"  # field ``model{n}`` of a host's meta hash: the model numbered n in its records
GPUS_SERIES = "gpus"  # every host's GPUs summed, per fine slot (``router.observe.history``)
SLOTS = "slots"  # field of a rolled-up hash: how many fine slots it sums
COVERAGE = "routers"  # the series whose slots say that routers could write then
FLUSHES = "flushes"
EVENTS_MAXLEN = 100_000
RESOLUTIONS_ENV = "LLM_ROUTER_HISTORY_RESOLUTIONS"
DEFAULT_RESOLUTIONS = "10s:24h,5m:30d,1h:30d"

EventKind = Literal["start_requested", "swap_wait", "starting", "ready", "start_failed", "stop_requested", "stopping", "stopped",
                    "evicted", "crashed", "restart", "adopted", "worker_started", "worker_stopped", "reload",
                    "reload_failed", "redis_lost", "redis_back", "redis_evicted", "redis_memory_high"]


class Resolution(msgspec.Struct, frozen=True):
    step: int  # seconds per slot
    keep: int  # seconds kept


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _seconds(text: str) -> int:
    match = re.fullmatch(r"(\d+)([smhd]?)", text.strip())
    if not match:
        raise ValueError(f"not a duration: {text!r} (e.g. 10s, 5m, 24h, 30d)")
    return int(match[1]) * _UNITS[match[2] or "s"]


def parse_resolutions(text: str) -> tuple[Resolution, ...]:
    """``"10s:24h,5m:30d"`` → resolutions, finest first. Each coarser step must be a multiple of
    the finest (its slots are sums of whole fine slots)."""
    out = []
    for part in text.split(","):
        step, _, keep = part.partition(":")
        out.append(Resolution(_seconds(step), _seconds(keep or "0")))
    out.sort(key=lambda r: r.step)
    fine = out[0]
    if fine.step <= 0 or any(r.keep < r.step or r.step % fine.step for r in out):
        raise ValueError(f"{RESOLUTIONS_ENV}={text!r}: steps > 0, each a multiple of the finest, kept ≥ one step")
    return tuple(out)


def resolutions(env: Mapping[str, str] = os.environ) -> tuple[Resolution, ...]:
    """The resolutions in force (``LLM_ROUTER_HISTORY_RESOLUTIONS``); a bad value raises
    ``ValueError`` naming the variable."""
    text = env.get(RESOLUTIONS_ENV) or DEFAULT_RESOLUTIONS
    try:
        return parse_resolutions(text)
    except ValueError as exc:
        raise ValueError(str(exc) if RESOLUTIONS_ENV in str(exc) else f"{RESOLUTIONS_ENV}={text!r}: {exc}") from None


def model_series(model: str) -> str:
    return f"model:{model}"


def gpu_series(host: str, index: int) -> str:
    return f"gpu:{host}:{index}"


def host_series(host: str) -> str:
    return f"host:{host}"


def bucket_of(seconds: float) -> int:
    """The histogram bucket of a duration: the first whose upper bound is ≥ it."""
    return bisect_left(BOUNDS, seconds)


def bucket_fields(name: str) -> list[str]:
    return [f"{name}:{i}" for i in range(NBUCKETS)]


def percentile(counts: Sequence[int], q: float) -> float | None:
    """The ``q`` quantile (0..1) of a histogram of ``NBUCKETS`` counts, interpolated linearly in
    its bucket (as Prometheus's ``histogram_quantile``); the last bucket answers its lower
    bound. None without samples."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(counts):
        if n and seen + n >= rank:
            low = BOUNDS[i - 1] if i > 0 else 0.0
            if i >= len(BOUNDS):
                return low
            return low + (BOUNDS[i] - low) * max(0.0, rank - seen) / n
        seen += n
    return BOUNDS[-1]


def bucket_range(value: float) -> tuple[float, float]:
    """The bounds of the bucket ``value`` falls in (tests compare raw percentiles with it)."""
    i = bucket_of(value)
    return (BOUNDS[i - 1] if i > 0 else 0.0, BOUNDS[i] if i < len(BOUNDS) else float("inf"))


class TimelineEvent(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One entry of ``llm:timeline``: what happened to which model on which host, and who asked.

    ``kind``: ``EventKind``; ``key``: the API key's name that caused it (a start requested, an
    eviction); ``models``: the other models concerned (those evicted for ``model``);
    ``seconds``: a cold start's duration (``ready``); ``detail``: why, in words."""

    ts: float
    kind: str
    model: str = ""
    host: str = ""
    key: str = ""
    models: list[str] = []
    seconds: float = 0.0
    detail: str = ""
    by: str = ""  # "router:{rid}" or "worker:{wid}": who wrote it


_STR_FIELDS = ("kind", "model", "host", "key", "detail", "by")


def event_fields(ev: TimelineEvent) -> dict[str, str]:
    """Flat stream fields, readable in ``XRANGE`` (``models`` comma-separated)."""
    out = {"ts": f"{ev.ts:.3f}", "kind": ev.kind}
    for name in _STR_FIELDS[1:]:
        if value := getattr(ev, name):
            out[name] = value
    if ev.models:
        out["models"] = ",".join(ev.models)
    if ev.seconds:
        out["seconds"] = f"{ev.seconds:.3f}"
    return out


def event_of(fields: Mapping) -> TimelineEvent:
    get = {(k.decode() if isinstance(k, bytes) else k): (v.decode("utf-8", "replace") if isinstance(v, bytes) else v)
           for k, v in fields.items()}
    return TimelineEvent(ts=float(get.get("ts") or 0), kind=get.get("kind", ""),
                         models=[m for m in get.get("models", "").split(",") if m],
                         seconds=float(get.get("seconds") or 0), **{n: get.get(n, "") for n in _STR_FIELDS[1:]})


def event_ops(pipe, keys: Keys, events: Iterable[TimelineEvent]) -> None:
    """Append events to ``llm:timeline`` (for a pipeline)."""
    for ev in events:
        pipe.xadd(keys.timeline(), event_fields(ev), maxlen=EVENTS_MAXLEN, approximate=True)


# --- gauges: one fixed-size binary record per host per slot, in strings of CHUNK slots ---
# A hash per GPU per 10 s slot costs ~210 bytes of Redis memory (key, TTL, hash): 500 hosts × 4
# GPUs for 24 h + 30 d would be ~9 GB. One 118-byte record per host per slot, written with
# SETRANGE at its place in a string of CHUNK slots, holds the same and each engine's VRAM.
# The record's layout is versioned in its key (``RECORD_VERSION``): records of another layout
# are never read as this one (they expire with their TTL).
RECORD_VERSION = 3  # 1: 46 bytes (no power, temperature); 2: 70 bytes (no engines); 3: this
GPU_SLOTS = 8  # GPUs recorded per host (the first 8 by index)
GPU_VALUES = 4  # per GPU: MiB used, utilisation %, power W, temperature °C
ENGINE_SLOTS = 8  # engines recorded per host (the 8 holding most VRAM; the rest counts as "other")
ENGINE_VALUES = 3  # per engine: its model's number on this host (0: none), GPU mask, MiB per GPU
MAX_MODELS = 255  # model numbers a host can give (``GaugeRecorder``); a model beyond is not recorded
# samples (0: none), CPU %, RAM MiB used, then per GPU the GPU_VALUES, then per engine the ENGINE_VALUES
RECORD = struct.Struct("<BBI" + "IBHB" * GPU_SLOTS + "BBI" * ENGINE_SLOTS)
_GPU_MAX = (2**32 - 1, 255, 65535, 255)  # what each GPU value's field holds
CHUNK = 360  # slots per string: 1 h of 10 s slots, 30 h of 5 min ones
MAX_SAMPLES = 255
_ENGINES_AT = 3 + GPU_VALUES * GPU_SLOTS  # where the engines start in an unpacked RECORD


class EngineUse(msgspec.Struct, frozen=True):
    """What one engine holds now: ``mib`` on each GPU of ``gpus`` (its placement)."""

    model: str
    gpus: tuple[int, ...]
    mib: int


class Gauges(msgspec.Struct, kw_only=True):
    """One host's gauges in one slot: ``samples`` readings (0: none) averaged."""

    samples: int = 0
    cpu_percent: int = 0
    memory_used: int = 0  # MiB
    # per GPU index: (MiB used, utilisation %, power W, temperature °C); shorter tuples: the rest 0
    gpus: list[tuple[int, ...]] = []
    # per engine: (model number, GPU mask, MiB per GPU); the model's name is in the host's meta
    engines: list[tuple[int, int, int]] = []

    def pack(self) -> bytes:
        gpus = [(*g, 0, 0, 0)[:GPU_VALUES] for g in self.gpus[:GPU_SLOTS]]
        gpus += [(0,) * GPU_VALUES] * (GPU_SLOTS - len(gpus))
        engines = sorted((e for e in self.engines if 0 < e[0] <= MAX_MODELS and e[1] & 0xFF),
                         key=lambda e: -e[2])[:ENGINE_SLOTS]
        engines += [(0, 0, 0)] * (ENGINE_SLOTS - len(engines))
        return RECORD.pack(min(self.samples, MAX_SAMPLES), max(0, min(255, self.cpu_percent)),
                           max(0, self.memory_used),
                           *(max(0, min(top, v)) for g in gpus for v, top in zip(g, _GPU_MAX)),
                           *(v for n, mask, mib in engines for v in (n, mask & 0xFF, max(0, min(2**32 - 1, mib)))))


def unpack(chunk: bytes, index: int, gpus: int) -> Gauges:
    """The record of slot ``index`` of a chunk (missing bytes: no sample)."""
    raw = chunk[index * RECORD.size:(index + 1) * RECORD.size]
    if len(raw) < RECORD.size or raw[0] == 0:
        return Gauges()
    v = RECORD.unpack(raw)
    return Gauges(samples=v[0], cpu_percent=v[1], memory_used=v[2],
                  gpus=[tuple(v[gpu_at(i):gpu_at(i) + GPU_VALUES]) for i in range(min(gpus, GPU_SLOTS))],
                  engines=engines_of(v))


def engines_of(row: Sequence[int]) -> list[tuple[int, int, int]]:
    """The engines of an unpacked ``RECORD``: (model number, GPU mask, MiB per GPU)."""
    return [(row[at], row[at + 1], row[at + 2]) for at in range(_ENGINES_AT, len(row), ENGINE_VALUES) if row[at]]


def engine_mask(gpus: Iterable[int]) -> int:
    """The GPU mask of a placement (GPUs beyond ``GPU_SLOTS`` are not recorded)."""
    return sum(1 << g for g in gpus if 0 <= g < GPU_SLOTS)


def vram_by_model(engines: Iterable[tuple[int, int, int]], gpu: int | None = None) -> dict[int, int]:
    """MiB per model number on GPU ``gpu`` (None: on all the host's GPUs together)."""
    out: dict[int, int] = {}
    for n, mask, mib in engines:
        held = mib * (bin(mask).count("1") if gpu is None else (mask >> gpu) & 1)
        if held:
            out[n] = out.get(n, 0) + held
    return out


def gpu_at(index: int, value: int = 0) -> int:
    """Where GPU ``index``'s ``value`` (0: MiB used … 3: °C) sits in an unpacked ``RECORD``."""
    return 3 + GPU_VALUES * index + value


def average(records: Sequence[Gauges]) -> Gauges:
    """Several slots' records as one, weighted by their samples (a coarser slot); an engine
    absent from a slot counts as holding nothing then."""
    have = [r for r in records if r.samples]
    n = sum(r.samples for r in have)
    if not n:
        return Gauges()
    width = max(len(r.gpus) for r in have)
    mean = lambda get: round(sum(get(r) * r.samples for r in have) / n)  # noqa: E731
    held: dict[tuple[int, int], int] = {}
    for r in have:
        for num, mask, mib in r.engines:
            held[num, mask] = held.get((num, mask), 0) + mib * r.samples
    return Gauges(samples=n, cpu_percent=mean(lambda r: r.cpu_percent), memory_used=mean(lambda r: r.memory_used),
                  gpus=[tuple(mean(lambda r, i=i, j=j: r.gpus[i][j] if i < len(r.gpus) and j < len(r.gpus[i]) else 0)
                              for j in range(GPU_VALUES)) for i in range(width)],
                  engines=[(num, mask, round(total / n)) for (num, mask), total in held.items()])


def gauge_chunk(keys: Keys, step: int, wid: str, slot: int) -> tuple[str, int]:
    """The string holding ``slot`` of host ``wid``'s gauges, and the record's offset in it."""
    return keys.gauge_chunk(wid, step, slot // CHUNK, RECORD_VERSION), (slot % CHUNK) * RECORD.size


def model_numbers(meta: Mapping) -> dict[int, str]:
    """A host's model numbers from its meta hash (``gauge_meta_ops``): number -> model id."""
    out = {}
    for k, v in meta.items():
        k = k.decode() if isinstance(k, bytes) else k
        if k.startswith(MODEL_FIELD) and k[len(MODEL_FIELD):].isdigit():
            out[int(k[len(MODEL_FIELD):])] = v.decode() if isinstance(v, bytes) else v
    return out


def gauge_ops(pipe, keys: Keys, res: Resolution, wid: str, slot: int, record: Gauges) -> None:
    """Write one host's record of one slot (for a pipeline): ``SETRANGE`` (a later sample of the
    same slot replaces it) and the string's TTL."""
    key, offset = gauge_chunk(keys, res.step, wid, slot)
    pipe.setrange(key, offset, record.pack())
    pipe.expire(key, res.keep)


def gauge_meta_ops(pipe, keys: Keys, wid: str, keep: int, memory_total: int, gpu_totals: Sequence[int],
                   now: float, models: Mapping[int, str] | None = None) -> None:
    """What does not change slot to slot (totals, in MiB; ``models``: the host's model numbers,
    field ``model{n}``) and the series the host has."""
    meta = keys.history_gauges(wid)
    pipe.hset(meta, mapping={"memory_total": memory_total, "gpus": len(gpu_totals),
                             **{f"gpu{i}_memory_total": t for i, t in enumerate(gpu_totals)},
                             **{f"{MODEL_FIELD}{n}": m for n, m in (models or {}).items()}})
    pipe.expire(meta, keep)
    pipe.hset(keys.history_series(), mapping={host_series(wid): int(now),
                                              **{gpu_series(wid, i): int(now) for i in range(len(gpu_totals))}})


class HostMeta(msgspec.Struct, frozen=True):
    """What a host's records leave out, from its meta hash (``gauge_meta_ops``)."""

    models: dict[int, str] = {}  # model number -> model id
    gpus: int = 0
    totals: dict[int, int] = {}  # GPU index -> MiB
    memory_total: int = 0  # the host's RAM, MiB

    @classmethod
    def of(cls, meta: Mapping) -> HostMeta:
        text = {(k.decode() if isinstance(k, bytes) else k): v for k, v in meta.items()}
        return cls(models=model_numbers(meta), gpus=int(text.get("gpus", 0) or 0),
                   totals={i: int(text.get(f"gpu{i}_memory_total", 0)) for i in range(GPU_SLOTS)},
                   memory_total=int(text.get("memory_total", 0) or 0))


# Rolls one series' fine slots up into one coarse slot, once (the caller won the slot's lock):
# KEYS[1] = the coarse hash, KEYS[2..] = the fine hashes it covers; ARGV[1] = the coarse TTL.
# Every field is added up (integers), and ``slots`` counts the fine hashes that existed; a
# coarse slot without any is not written (a gap stays a gap). Returns the fine slots found.
ROLLUP_SCRIPT = """
local sums, found = {}, 0
for i = 2, #KEYS do
  local row = redis.call('HGETALL', KEYS[i])
  if #row > 0 then
    found = found + 1
    for j = 1, #row, 2 do sums[row[j]] = (sums[row[j]] or 0) + tonumber(row[j + 1]) end
  end
end
if found == 0 then return 0 end
for f, v in pairs(sums) do
  if f ~= 'slots' then redis.call('HINCRBY', KEYS[1], f, string.format('%d', v)) end
end
redis.call('HINCRBY', KEYS[1], 'slots', found)
redis.call('EXPIRE', KEYS[1], ARGV[1])
return found
"""
