"""The usage ledger, the router's side: what each key used, per group, model and hour, and the
report (``GET /api/usage``, ``llm-router usage``). Layout and retention: ``llm_router.ledger``.

Writing: ``Ledger.add`` counts a finished request in memory (a dict update, no Redis on the
request's path); ``run`` writes what was counted at most once a second, one pipelined round
trip (``HINCRBY`` per counter that changed, ``EXPIRE`` per hour). What could not be written
(Redis down) is kept and added on the next write: the ledger catches up instead of losing it.
A router killed with ``kill -9`` loses at most its last second.

GPU time: workers add each model's resident GPU-seconds per hour (``worker.gpu_time``); the
report gives each key the share of a model's GPU time, in that hour, that its tokens are of
the model's tokens (its requests' share, when no tokens were counted). An hour a model was
resident and nobody used goes to the key that last started it (a request's on-demand start,
or an operator's ``/start``: ``Ledger.loaded``), else (``auto_start``, a start before the
report's period) to ``idle``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable, Iterable, Literal

import msgspec
from redis.exceptions import RedisError

from llm_lab_router.backoff import RedisLink
from llm_lab_router.clock import CLOCK
from llm_lab_router.ledger import GPU, HOUR, LOAD, METRICS, NONE, SEP, expire_at, hour_of, usage_field
from llm_lab_router.protocol import Keys
from llm_lab_router.router.core.responses import UsageRow
from llm_lab_router.router.observe.accesslog import CLIENT_GONE, RequestRecord, Usage, token_counts

log = logging.getLogger("router.ledger")

By = Literal["key", "group", "model"]
IDLE = "idle"  # who GPU time nobody used is charged to


class Ledger:
    def __init__(self, redis, keys: Keys, retention_days: int, interval: float = 1.0,
                 clock: Callable[[], float] = CLOCK.now) -> None:
        self.redis = redis
        self.keys = keys
        self.retention_days = retention_days
        self.interval = interval
        self.clock = clock
        self._pending: dict[tuple[int, str], int] = {}  # (hour, field) -> count not yet written
        self._link = RedisLink("usage ledger", log=log)

    def add(self, rec: RequestRecord, status: int, usage: Usage | None) -> None:
        """Count one finished request that named a model (one dict update per counter)."""
        model = rec.served or rec.model
        if not model:
            return  # refused before it named a model: nothing to charge
        caller = rec.caller
        key, group = (caller.name, caller.group or NONE) if caller is not None else (NONE, NONE)
        prompt, completion, estimated = token_counts(usage, rec.prompt_estimate, rec.streamed, rec.events)
        values = (1, 1 if status >= 400 or status == CLIENT_GONE else 0, prompt, completion,
                  prompt if estimated else 0, completion if estimated else 0)
        hour = hour_of(self.clock())
        pending = self._pending
        for metric, value in zip(METRICS, values):
            if value:
                field = (hour, usage_field(metric, key, group, model))
                pending[field] = pending.get(field, 0) + value

    def loaded(self, key: str, group: str, model: str) -> None:
        """``key`` (of ``group``) started ``model`` (on demand, or an operator's start): the
        model's GPU time nobody uses is charged to it (``gpu_shares``)."""
        field = (hour_of(self.clock()), usage_field(LOAD, key, group, model))
        self._pending[field] = self._pending.get(field, 0) + 1

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.flush()

    async def flush(self) -> None:
        """Write what was counted (one round trip); keep it for the next time if Redis fails."""
        if not self._pending:
            return
        taken, self._pending = self._pending, {}
        hours = {hour for hour, _ in taken}
        now = self.clock()
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for (hour, field), value in taken.items():
                    pipe.hincrby(self.keys.ledger(hour), field, value)
                for hour in hours:
                    pipe.expire(self.keys.ledger(hour), max(1, int(expire_at(hour, self.retention_days) - now)))
                await pipe.execute()
        except RedisError as exc:
            for item, value in taken.items():  # counted again on the next flush
                self._pending[item] = self._pending.get(item, 0) + value
            self._link.failed(exc)
            return
        self._link.ok()


class Counts(msgspec.Struct, kw_only=True):
    """One key's counters for one model and hour, as read back."""

    key: str
    group: str
    model: str
    values: dict[str, int] = {}

    @property
    def tokens(self) -> int:
        return self.values.get("in", 0) + self.values.get("out", 0)


async def read_hours(redis, keys: Keys, since: float, until: float) -> dict[int, dict[str, str]]:
    """The ledger hashes of the hours from ``since`` to ``until`` (one round trip)."""
    hours = list(range(hour_of(since), hour_of(until) + 1, HOUR))
    async with redis.pipeline(transaction=False) as pipe:
        for hour in hours:
            pipe.hgetall(keys.ledger(hour))
        rows = await pipe.execute()
    return {h: {_text(k): _text(v) for k, v in row.items()} for h, row in zip(hours, rows) if row}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def parse_hour(fields: dict[str, str]) -> tuple[list[Counts], dict[str, float], dict[str, tuple[str, str]]]:
    """One hour's hash: each key's counters per model, GPU-seconds per model (all hosts), and
    who started each model that hour (of several, the first by name: any is right)."""
    counts: dict[tuple[str, str, str], Counts] = {}
    gpu: dict[str, float] = {}
    loads: dict[str, tuple[str, str]] = {}
    for field, value in sorted(fields.items()):
        parts = field.split(SEP)
        if parts[0] == GPU and len(parts) >= 3:
            model = SEP.join(parts[1:-1])
            gpu[model] = gpu.get(model, 0.0) + float(value)
        elif parts[0] == LOAD and len(parts) >= 4:
            loads.setdefault(SEP.join(parts[3:]), (parts[1], parts[2]))
        elif parts[0] in METRICS and len(parts) >= 4:
            key, group, model = parts[1], parts[2], SEP.join(parts[3:])
            c = counts.setdefault((key, group, model), Counts(key=key, group=group, model=model))
            c.values[parts[0]] = c.values.get(parts[0], 0) + int(value)
    return list(counts.values()), gpu, loads


def gpu_shares(counts: list[Counts], gpu: dict[str, float],
               loaders: dict[str, tuple[str, str]] | None = None) -> dict[tuple[str, str, str], float]:
    """GPU-seconds per (key, group, model) of one hour: each model's time split by its keys'
    tokens (their requests, when none were counted); a model nobody used goes to the key that
    started it (``loaders``: model -> (key, group)), else (``auto_start``, or started before
    the report's period) to ``idle``."""
    shares: dict[tuple[str, str, str], float] = {}
    for model, seconds in gpu.items():
        users = [c for c in counts if c.model == model]
        weights = [c.tokens for c in users]
        if not sum(weights):
            weights = [c.values.get("req", 0) for c in users]
        total = sum(weights)
        if not total:
            key, group = (loaders or {}).get(model, (IDLE, IDLE))
            shares[(key, group, model)] = shares.get((key, group, model), 0.0) + seconds
            continue
        for c, w in zip(users, weights):
            shares[(c.key, c.group, model)] = shares.get((c.key, c.group, model), 0.0) + seconds * w / total
    return shares


def report(hours: dict[int, dict[str, str]], by: By, only_key: str | None = None) -> list[UsageRow]:
    """The rows of the report, by key, group or model, largest GPU time first (then requests);
    ``only_key``: a client's own rows only."""
    rows: dict[str, UsageRow] = {}
    pick = {"key": 0, "group": 1, "model": 2}[by]
    loaders: dict[str, tuple[str, str]] = {}  # model -> who last started it, hour by hour
    for _, fields in sorted(hours.items()):
        counts, gpu, loads = parse_hour(fields)
        loaders.update(loads)
        for (key, group, model), seconds in gpu_shares(counts, gpu, loaders).items():
            if only_key is None or key == only_key:
                row = rows.setdefault((key, group, model)[pick], UsageRow(name=(key, group, model)[pick]))
                row.gpu_hours += seconds / 3600
        for c in counts:
            if only_key is not None and c.key != only_key:
                continue
            row = rows.setdefault((c.key, c.group, c.model)[pick], UsageRow(name=(c.key, c.group, c.model)[pick]))
            v = c.values
            row.requests += v.get("req", 0)
            row.errors += v.get("err", 0)
            row.tokens_in += v.get("in", 0)
            row.tokens_out += v.get("out", 0)
            row.tokens_estimated += v.get("est_in", 0) + v.get("est_out", 0)
    for row in rows.values():
        row.gpu_hours = round(row.gpu_hours, 6)
    return sorted(rows.values(), key=lambda r: (-r.gpu_hours, -r.requests, r.name))


def totals(rows: Iterable[UsageRow]) -> UsageRow:
    total = UsageRow(name="total")
    for r in rows:
        total.requests += r.requests
        total.errors += r.errors
        total.tokens_in += r.tokens_in
        total.tokens_out += r.tokens_out
        total.tokens_estimated += r.tokens_estimated
        total.gpu_hours = round(total.gpu_hours + r.gpu_hours, 6)
    return total
