"""Reading the timeline back (``GET /api/history``, ``GET /api/events``; ``llm_router.timeline``
says what is stored).

A point sums the slots it spans: counters add up, histogram buckets add up and percentiles
come from the summed buckets, gauges are averaged over the slots that have a sample. A point is
only as good as its coverage: request series count the fine slots some router flushed
(``routers`` series), gauges the slots with a sample (a host's records, ``timeline.RECORD``); a point without any is a gap (values
null), and rates divide by the seconds covered, so a Redis outage never reads as a quiet spell.
"""

from __future__ import annotations

import math
from typing import Sequence

from llm_lab_router.protocol import Keys
from llm_lab_router.router.core.errors import ApiError
from llm_lab_router.router.core.responses import EventsResult, HistoryResult
from llm_lab_router.timeline import (
    COUNTERS,
    COVERAGE,
    GPU_FIELDS,
    GPUS_SERIES,
    HISTOGRAMS,
    HOST_FIELDS,
    CHUNK,
    GPU_SLOTS,
    RECORD,
    HostMeta,
    Resolution,
    bucket_fields,
    engines_of,
    gauge_chunk,
    gpu_at,
    event_of,
    vram_by_model,
    gpu_series,
    host_series,
    model_series,
    percentile,
)
from redis.asyncio import Redis

# Sums a request series' slots in groups, in Redis: 30 days are 8,640 slot hashes (and as many
# coverage ones), which cost the router ~0.8 s to decode one by one and Redis ~20 ms to add up
# here. The slot keys are built here from their prefixes (one key string per slot sent from the
# router cost more than the sums): ARGV = the series' key prefix, the coverage's, the first and
# last slot, the slots per group, 1 for the finest resolution (a coverage slot counts 1 if
# written) else 0 (its ``slots`` field counts). Returns, per group: the fine slots covered, then
# [field, sum, ...] of the series.
SUM_SCRIPT = """
local series, cover = ARGV[1], ARGV[2]
local first, last, per, fine = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6] == '1'
local out = {}
for g = first, last, per do
  local sums, order, covered = {}, {}, 0
  for slot = g, math.min(g + per - 1, last) do
    local row = redis.call('HGETALL', series .. slot)
    for j = 1, #row, 2 do
      local f = row[j]
      if not sums[f] then sums[f] = 0; order[#order + 1] = f end
      sums[f] = sums[f] + tonumber(row[j + 1])
    end
    local c = redis.call('HGETALL', cover .. slot)
    if #c > 0 then
      if fine then covered = covered + 1 else
        for j = 1, #c, 2 do if c[j] == 'slots' then covered = covered + tonumber(c[j + 1]) end end
      end
    end
  end
  local flat = {}
  for _, f in ipairs(order) do flat[#flat + 1] = f; flat[#flat + 1] = string.format('%d', sums[f]) end
  out[#out + 1] = covered
  out[#out + 1] = flat
end
return out
"""
MAX_POINTS = 10_000  # a step finer than (to - from) / MAX_POINTS is made coarser
SLOTS_READ = 5_000  # slots one read may cost before a coarser resolution is read (``choose``): ~50 ms
EVENTS_PAGE = 1000
EVENTS_SCAN = 100_000  # entries looked at, at most, for one filtered read
MODEL_FIELDS = ("requests", "errors_4xx", "errors_5xx", "tokens_in", "tokens_out", "rate", "tokens_per_s",
                "inflight", "queued",
                *(f"{h}_{p}" for h in HISTOGRAMS for p in ("p50", "p95")), "covered_s")
QUANTILES = (("p50", 0.5), ("p95", 0.95))
GPUS_FIELDS = ("hosts", "gpus", "memory_used", "memory_total", "utilization", "power")
OTHER = "other"  # GPU memory used by no engine of the lab (another process, the driver)


def series_fields(series: str) -> tuple[str, ...]:
    """The values a point of ``series`` carries."""
    kind = series.split(":", 1)[0]
    return {"model": MODEL_FIELDS, "gpu": GPU_FIELDS, "host": HOST_FIELDS, GPUS_SERIES: GPUS_FIELDS}.get(kind, ())


def choose(resolutions: Sequence[Resolution], start: float, end: float, step: int,
           now: float) -> tuple[Resolution, float, int]:
    """The finest resolution still holding ``start`` (else the coarsest), ``start`` clamped to
    what it holds, and the step: a multiple of its slot, at least ``step``, coarse enough for
    ``MAX_POINTS``. Where that resolution would read more than ``SLOTS_READ`` slots, a coarser
    one that holds ``start`` and whose slot fits in the step is read instead (30 days at a 2 h
    step: 720 slots of 1 h, not 8,640 of 5 min — what keeps the dashboard's 30 d view fast)."""
    holding = [r for r in resolutions if now - r.keep <= start] or [resolutions[-1]]
    res = holding[0]
    start = min(max(start, now - res.keep), now)
    want = max(step, res.step, math.ceil((end - start) / MAX_POINTS))
    if (end - start) / res.step > SLOTS_READ:
        res = max((r for r in holding if r.step <= want), key=lambda r: r.step)
    return res, start, math.ceil(want / res.step) * res.step


async def read_history(redis: Redis, reader: Redis, keys: Keys, resolutions: Sequence[Resolution], series: str,
                       start: float, end: float, step: int, now: float, sum_slots) -> HistoryResult:
    """``sum_slots``: ``SUM_SCRIPT`` registered on ``redis``; ``reader`` reads the hosts' gauges."""
    fields = list(series_fields(series))
    available: list[str] = []
    if not series:
        index = await redis.hgetall(keys.history_series())
        available = sorted(k.decode() if isinstance(k, bytes) else k for k in index)
        return HistoryResult(series="", start=start, end=end, step=step, resolution=resolutions[0].step,
                             fields=[], points=[], available=available)
    end = min(end, now + resolutions[0].step)  # nothing is recorded ahead: the slots read stay bounded
    res, start, step = choose(resolutions, start, end, step, now)
    per = step // res.step
    first = int(start // step) * step // res.step
    last = max(first, math.ceil(end / res.step) - 1)  # the slot holding ``end``
    slots = range(first, last + 1)
    if series.startswith(("gpu:", "host:")):
        points = await _gauge_points(reader, keys, res, series, slots, per)
        return HistoryResult(series=series, start=start, end=end, step=step, resolution=res.step,
                             fields=_with_vram(fields, points), points=points, available=available)
    fine_res = res is resolutions[0]
    # a request series' coverage is the routers' flushes; the gpus summary covers its own slots
    cover = GPUS_SERIES if series == GPUS_SERIES else COVERAGE
    summed = await sum_slots(keys=[], args=[keys.history(res.step, series, 0)[:-1],
                                            keys.history(res.step, cover, 0)[:-1], first, last, per, int(fine_res)])
    points = []
    for g, (covered, flat) in enumerate(zip(summed[::2], summed[1::2])):
        t = float((first + g * per) * res.step)
        if not covered:
            points.append({"t": t, **dict.fromkeys(fields)})
            continue
        total = {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in zip(flat[::2], flat[1::2])}
        point = _gpus_point(total, int(covered)) if series == GPUS_SERIES else _model_point(
            total, int(covered), resolutions[0].step)
        points.append({"t": t, **point})
    if series == GPUS_SERIES:
        fields = _with_vram(fields, points)
    return HistoryResult(series=series, start=start, end=end, step=step, resolution=res.step, fields=fields,
                         points=points, available=available)


def _with_vram(fields: list[str], points: list[dict[str, float | None]]) -> list[str]:
    """A GPU series' fields and, where its points hold any, ``vram:{model}`` (sorted) and ``other``;
    every point gets every field (null in a gap, 0 where the model held nothing)."""
    models = sorted({k for p in points for k in p if k.startswith("vram:")})
    if not models and not any(OTHER in p for p in points):
        return fields
    extra = [*models, OTHER]
    for p in points:
        gap = p.get("memory_used") is None
        for name in extra:
            p[name] = None if gap else p.get(name, 0.0)
    return [*fields, *extra]


def _gpus_point(total: dict[str, int], covered: int) -> dict[str, float | None]:
    """A point of the ``gpus`` summary (``router.observe.gpu_summary``): its sums averaged over
    the ``covered`` fine slots; utilisation is the mean over the GPUs that reported."""
    out: dict[str, float | None] = {f: total.get(f, 0) / covered for f in GPUS_FIELDS}
    out["utilization"] = total.get("utilization", 0) / total["gpus"] if total.get("gpus") else None
    held = 0.0
    for name, value in total.items():
        if name.startswith("vram:"):
            out[name] = value / covered
            held += value / covered
    out[OTHER] = max(0.0, (out["memory_used"] or 0.0) - held)
    return out


async def _gauge_points(redis: Redis, keys: Keys, res: Resolution, series: str, slots: range,
                        per: int) -> list[dict[str, float | None]]:
    """Points of ``gpu:{host}:{index}`` or ``host:{host}`` from the host's records (``timeline.RECORD``):
    averages weighted by samples; the totals are the host's current ones."""
    kind, rest = series.split(":", 1)
    host, _, index = rest.rpartition(":") if kind == "gpu" else (rest, "", "")
    gpu = int(index) if index.isdigit() else -1
    chunks = sorted({s // CHUNK for s in slots})
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(keys.history_gauges(host))
        for chunk in chunks:
            pipe.get(gauge_chunk(keys, res.step, host, chunk * CHUNK)[0])
        meta_raw, *data = await pipe.execute()
    meta = HostMeta.of(meta_raw)
    # the records as tuples (``RECORD.iter_unpack``: 30 days of a host in milliseconds), and the
    # places in them of the values wanted: (name, tuple index or None for a total from ``meta``)
    records: dict[int, list[tuple]] = {}
    for chunk, blob in zip(chunks, data):
        blob = blob or b""
        records[chunk] = list(RECORD.iter_unpack(blob[:len(blob) - len(blob) % RECORD.size]))
    names = meta.models
    if kind == "gpu":
        wanted = [("memory_used", gpu_at(gpu, 0)), ("memory_total", None), ("utilization", gpu_at(gpu, 1)),
                  ("power", gpu_at(gpu, 2)), ("temperature", gpu_at(gpu, 3))]
        total = float(meta.totals.get(gpu, 0))
        known = 0 <= gpu < min(meta.gpus, GPU_SLOTS)
    else:
        wanted = [("cpu_percent", 1), ("memory_used", 2), ("memory_total", None)]
        total = float(meta.memory_total)
        known = True
    points: list[dict[str, float | None]] = []
    for g in range(0, len(slots), per):
        group = slots[g:g + per]
        n, sums = 0, [0] * len(wanted)
        held: dict[int, int] = {}  # model number -> MiB × samples on this GPU
        for s in group:
            rows = records[s // CHUNK]
            row = rows[s % CHUNK] if s % CHUNK < len(rows) else None
            if row is None or not row[0] or not known:
                continue
            n += row[0]
            for i, (_, at) in enumerate(wanted):
                if at is not None:
                    sums[i] += row[at] * row[0]
            if kind == "gpu":
                for number, mib in vram_by_model(engines_of(row), gpu).items():
                    held[number] = held.get(number, 0) + mib * row[0]
        point: dict[str, float | None] = {"t": float(group[0] * res.step),
                                          **{name: (None if not n else total if at is None else round(sums[i] / n))
                                             for i, (name, at) in enumerate(wanted)}}
        if kind == "gpu" and n:
            mine = 0
            for number, mib in sorted(held.items()):
                if number in names:  # a number without a name (its meta lost) counts as other
                    point[f"vram:{names[number]}"] = round(mib / n)
                    mine += round(mib / n)
            point[OTHER] = max(0, (point["memory_used"] or 0) - mine)
        points.append(point)
    return points


def _model_point(total: dict[str, int], covered: int, fine: int) -> dict[str, float | None]:
    """``covered`` fine slots of ``fine`` seconds summed in ``total``; the load gauges are sums of
    one sample per router per fine slot, so their mean over the slots is the cluster's."""
    seconds = covered * fine
    out: dict[str, float | None] = {c: float(total.get(c, 0)) for c in COUNTERS}
    out["rate"] = total.get("requests", 0) / seconds
    out["tokens_per_s"] = total.get("tokens_out", 0) / seconds
    out["inflight"] = total.get("inflight", 0) / covered
    out["queued"] = total.get("queued", 0) / covered
    for h in HISTOGRAMS:
        counts = [total.get(f, 0) for f in bucket_fields(h)]
        for name, q in QUANTILES:
            out[f"{h}_{name}"] = percentile(counts, q)
    out["covered_s"] = seconds
    return out


async def read_events(redis: Redis, keys: Keys, start: float, end: float, limit: int, model: str | None = None,
                      host: str | None = None, kind: str | None = None) -> EventsResult:
    """Events in ``[start, end]``, oldest first, filtered; at most ``limit``."""
    low, high = f"{int(start * 1000)}-0", f"{int(end * 1000)}-18446744073709551615"
    found = []
    scanned = 0
    while scanned < EVENTS_SCAN:
        page = await redis.xrange(keys.timeline(), low, high, count=EVENTS_PAGE)
        scanned += len(page)
        for entry_id, fields in page:
            ev = event_of(fields)
            if (model and model != ev.model and model not in ev.models) or (host and host != ev.host) or (
                    kind and kind != ev.kind):
                continue
            if len(found) == limit:
                return EventsResult(events=found, more=True)
            found.append(ev)
        if len(page) < EVENTS_PAGE:
            break
        last = page[-1][0].decode() if isinstance(page[-1][0], bytes) else page[-1][0]
        low = "(" + last
    return EventsResult(events=found, more=scanned >= EVENTS_SCAN)



class TimelineReader:
    """What ``/api/history`` and ``/api/events`` call: the series named by the query, read back."""

    def __init__(self, redis: Redis, reader: Redis, keys: Keys, resolutions: Sequence[Resolution]) -> None:
        """``reader``: the client that may read the workers' own keys (a host's gauge records)."""
        self.redis = redis
        self.reader = reader
        self.keys = keys
        self.resolutions = resolutions
        self.sum_slots = redis.register_script(SUM_SCRIPT)

    async def history(self, kind: str | None, model: str | None, host: str | None, gpu: int, start: float,
                      end: float, step: int, now: float) -> HistoryResult:
        if end <= start:
            raise ApiError(400, f"'to' ({end:.0f}) must be after 'from' ({start:.0f})", "invalid_parameter")
        series = ""
        if kind == "model":
            if not model:
                raise ApiError(400, "series=model needs model=<id>", "invalid_parameter")
            series = model_series(model)
        elif kind == GPUS_SERIES:
            series = GPUS_SERIES
        elif kind in ("gpu", "host"):
            if not host:
                raise ApiError(400, f"series={kind} needs host=<worker id>", "invalid_parameter")
            series = gpu_series(host, gpu) if kind == "gpu" else host_series(host)
        return await read_history(self.redis, self.reader, self.keys, self.resolutions, series, start, end, step,
                                  now, self.sum_slots)

    async def events(self, start: float, end: float, limit: int, model: str | None, host: str | None,
                     kind: str | None) -> EventsResult:
        if end < start:
            raise ApiError(400, f"'to' ({end:.0f}) must not be before 'from' ({start:.0f})", "invalid_parameter")
        return await read_events(self.redis, self.keys, start, end, limit, model, host, kind)
