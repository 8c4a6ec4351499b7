"""Per-key and per-group quotas, enforced across every router through Redis.

A key of a structured keys file (router/http/auth.py) may have, itself and through its group,
``rpm`` (requests started per minute), ``tpm`` (tokens per minute, from the responses' usage)
and ``max_concurrent`` (requests in flight). All routers share the counts, in Redis:

- ``llm:quota:{key|group}:{name}`` (hash): a sliding one-minute window in one-second buckets,
  field ``<unix second>`` = requests started, ``<unix second>t`` = tokens charged. A request
  is refused while the last 60 buckets hold ``rpm`` requests (or ``tpm`` tokens) already;
  ``Retry-After`` is the time until enough of the oldest buckets leave the window.
- ``llm:quota:{key|group}:{name}:inflight`` (sorted set): one lease per request in flight,
  member ``<router id>:<n>``, score its deadline (ms, Redis clock). The router renews its
  leases every ``quota_lease_ttl / 3`` seconds; a router that dies (``kill -9``) stops
  renewing and its leases are dropped by the next admission after ``quota_lease_ttl``: no
  count drifts, and no cleanup job is needed.

Each request costs one round trip before it is admitted (``ADMIT_SCRIPT``: every check of
the key and its group, then every increment, atomically: all or nothing) and one after its
answer, off the client's path (``SETTLE_SCRIPT``: charge the tokens). A request's concurrency
lease is dropped before that, just before the answer's last bytes (``release``, the same script
with no tokens: on the client's path, else its next request could find the finished one still
counted). A key
without limits costs nothing: the proxy does not call in here at all.

Tokens: the usage the answer reported (non-streamed JSON; a stream's usage chunk when the
client asked ``stream_options.include_usage``). A stream without a usage chunk (or an
answer the client left) is charged an estimate: request body bytes / 4 for the prompt plus
one token per SSE event relayed. A request of a key (or group) with a ``tpm`` reserves an
estimate at admission, in the same script: body bytes / 4 + its ``max_tokens`` (or
``max_completion_tokens``), charged to the window's current second at once, so a burst of
concurrent requests sees each other's tokens (20 requests on a ``tpm = 100`` key were all
admitted when tokens were charged only at the end). When the answer is over, ``SETTLE_SCRIPT``
replaces the reservation by the tokens used, in the second it was made (or, if that second
has left the window, charges the tokens used to the current one). A request is admitted
while the window holds fewer than ``tpm`` tokens, so a burst passes the limit by at most one
request's reservation; the next request is then refused.

Redis unreachable: ``quota_redis_down = "open"`` (default) admits the request unchecked,
with one log line per outage and ``llm_router_quota_redis_errors_total``; ``"closed"``
refuses it (503 ``quota_unavailable``).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
from typing import Literal

from redis.asyncio import Redis
from redis.exceptions import RedisError

from llm_lab_router.backoff import RedisLink
from llm_lab_router.protocol import Keys
from llm_lab_router.router.observe.accesslog import Usage, token_counts
from llm_lab_router.router.limits.profile import KeyProfile, LimitSpec
from llm_lab_router.router.observe.metrics import RouterMetrics
from llm_lab_router.router.core.errors import ApiError

log = logging.getLogger("router.quotas")

Scope = Literal["key", "group"]
WINDOW = 60  # seconds

# KEYS: per subject, its window hash and its lease set. ARGV: lease member, lease ttl (ms),
# tokens to reserve, then per subject rpm, tpm, max_concurrent (0 = none). Returns {1, unix
# second of the reservation} when admitted, else {0, reason, subject index (1-based), retry
# after (ms), count}.
ADMIT_SCRIPT = """
redis.replicate_commands()
local t = redis.call('TIME')
local sec = tonumber(t[1])
local now = sec * 1000 + math.floor(tonumber(t[2]) / 1000)
local member, ttl, reserve = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local n = #KEYS / 2
local function window(key)
  local h = redis.call('HGETALL', key)
  local reqs, toks, stale, b = 0, 0, {}, {}
  for i = 1, #h, 2 do
    local s, kind = string.match(h[i], '^(%d+)(t?)$')
    s = tonumber(s)
    local v = tonumber(h[i + 1])
    if s <= sec - 60 then
      stale[#stale + 1] = h[i]
    else
      local e = b[s] or {0, 0}
      b[s] = e
      if kind == 't' then toks = toks + v; e[2] = e[2] + v else reqs = reqs + v; e[1] = e[1] + v end
    end
  end
  if #stale > 0 then redis.call('HDEL', key, unpack(stale)) end
  return reqs, toks, b
end
local function wait(b, col, over)
  local secs = {}
  for s in pairs(b) do secs[#secs + 1] = s end
  table.sort(secs)
  local freed = 0
  for _, s in ipairs(secs) do
    freed = freed + b[s][col]
    if freed >= over then return (s + 60) * 1000 - now end
  end
  return 60000
end
for i = 1, n do
  local rpm, tpm, maxc = tonumber(ARGV[3 * i + 1]), tonumber(ARGV[3 * i + 2]), tonumber(ARGV[3 * i + 3])
  if rpm > 0 or tpm > 0 then
    local reqs, toks, b = window(KEYS[2 * i - 1])
    if rpm > 0 and reqs >= rpm then return {0, 'rpm', i, wait(b, 1, reqs - rpm + 1), reqs} end
    if tpm > 0 and toks >= tpm then return {0, 'tpm', i, wait(b, 2, toks - tpm + 1), toks} end
  end
  if maxc > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[2 * i], '-inf', now)
    local held = redis.call('ZCARD', KEYS[2 * i])
    if held >= maxc then return {0, 'concurrency', i, 1000, held} end
  end
end
for i = 1, n do
  local rpm, tpm, maxc = tonumber(ARGV[3 * i + 1]), tonumber(ARGV[3 * i + 2]), tonumber(ARGV[3 * i + 3])
  if rpm > 0 or tpm > 0 then
    redis.call('HINCRBY', KEYS[2 * i - 1], sec, 1)
    if tpm > 0 and reserve > 0 then redis.call('HINCRBY', KEYS[2 * i - 1], sec .. 't', reserve) end
    redis.call('EXPIRE', KEYS[2 * i - 1], 120)
  end
  if maxc > 0 then
    redis.call('ZADD', KEYS[2 * i], now + ttl, member)
    redis.call('EXPIRE', KEYS[2 * i], math.ceil(2 * ttl / 1000))
  end
end
return {1, sec}
"""

# KEYS: as ADMIT_SCRIPT's. ARGV: lease member ('' = none), tokens used, tokens reserved, the
# unix second of the reservation, then per subject '1' when its tokens are counted (it has a
# tpm). The reservation's bucket, still in the window, is corrected to the tokens used; one
# that left it was counted its minute, and the tokens used go to the current second.
SETTLE_SCRIPT = """
redis.replicate_commands()
local sec = tonumber(redis.call('TIME')[1])
local member, tokens = ARGV[1], tonumber(ARGV[2])
local reserved, at = tonumber(ARGV[3]), tonumber(ARGV[4])
local field, delta = sec .. 't', tokens
if reserved > 0 and at > sec - 60 then field, delta = at .. 't', tokens - reserved end
for i = 1, #KEYS / 2 do
  if delta ~= 0 and ARGV[4 + i] == '1' then
    redis.call('HINCRBY', KEYS[2 * i - 1], field, delta)
    redis.call('EXPIRE', KEYS[2 * i - 1], 120)
  end
  if member ~= '' then redis.call('ZREM', KEYS[2 * i], member) end
end
return 1
"""

# KEYS: lease sets; ARGV: ttl (ms), then one member per key. Pushes the deadlines of leases
# still held (XX: one already dropped as expired stays dropped).
RENEW_SCRIPT = """
redis.replicate_commands()
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], 'XX', now + ttl, ARGV[i + 1])
  redis.call('EXPIRE', KEYS[i], math.ceil(2 * ttl / 1000))
end
return 1
"""


class Subject:
    """One set of limits a request counts against: its key's or its group's."""

    __slots__ = ("scope", "name", "limits", "window", "leases")

    def __init__(self, scope: Scope, name: str, limits: LimitSpec, keys: Keys) -> None:
        self.scope = scope
        self.name = name
        self.limits = limits
        self.window = keys.quota_window(scope, name)
        self.leases = keys.quota_leases(scope, name)


class Lease:
    """An admitted request's hold on its subjects: its concurrency lease dropped before its
    answer's last bytes (``Quotas.release``), its tokens charged once the answer is over."""

    __slots__ = ("member", "subjects", "prompt_estimate", "reserved", "reserved_at")

    def __init__(self, member: str, subjects: list[Subject], prompt_estimate: int, reserved: int = 0,
                 reserved_at: int = 0) -> None:
        self.member = member  # '' when no subject limits concurrency
        self.subjects = subjects
        self.prompt_estimate = prompt_estimate
        self.reserved = reserved  # tokens charged at admission (tpm), replaced by the use at settlement
        self.reserved_at = reserved_at  # the unix second (Redis clock) they were charged to

    @property
    def counts_tokens(self) -> bool:
        return any(s.limits.tpm for s in self.subjects)


def subjects_of(profile: KeyProfile, keys: Keys) -> list[Subject]:
    found = []
    if _any(profile.key_limits):
        found.append(Subject("key", profile.name, profile.key_limits, keys))
    if profile.group and _any(profile.group_limits):
        found.append(Subject("group", profile.group, profile.group_limits, keys))
    return found


def _any(limits: LimitSpec) -> bool:
    return bool(limits.rpm or limits.tpm or limits.max_concurrent)


def tokens_used(lease: Lease, usage: Usage | None, streamed: bool, events: int) -> int:
    """The tokens to charge: as reported, else the estimate (see the module docstring)."""
    if usage is not None and usage.total_tokens:
        return usage.total_tokens
    prompt, completion, _ = token_counts(usage, lease.prompt_estimate, streamed, events)
    return prompt + completion


REASONS = {"rpm": "requests per minute", "tpm": "tokens per minute", "concurrency": "concurrent requests"}


def refusal(subject: Subject, reason: str, retry_ms: int, count: int) -> ApiError:
    """The 429 of a refused request, in OpenAI's shape, with ``Retry-After`` in whole seconds."""
    limit = {"rpm": subject.limits.rpm, "tpm": subject.limits.tpm,
             "concurrency": subject.limits.max_concurrent}[reason]
    retry = max(1, math.ceil(retry_ms / 1000))
    return ApiError(429, f"rate limit of {subject.scope} '{subject.name}' reached: {count} of {limit} "
                         f"{REASONS[reason]}; retry in {retry} s", "rate_limit_exceeded",
                    {"Retry-After": str(retry)})


class Quotas:
    """Admission against the cluster-wide counts, and the leases this router holds."""

    def __init__(self, redis: Redis, keys: Keys, router_id: str, lease_ttl: float,
                 redis_down: Literal["open", "closed"] = "open", metrics: RouterMetrics | None = None, *,
                 release_wait: float) -> None:
        """``release_wait``: s an answer's last bytes wait at most for its concurrency lease to
        be dropped (``release``; ``RouterOptions.quota_release_wait``)."""
        self.redis = redis
        self.release_wait = release_wait
        self.keys = keys
        self.router_id = router_id
        self.ttl_ms = int(lease_ttl * 1000)
        self.redis_down = redis_down
        self.metrics = metrics or RouterMetrics()
        self._admit = redis.register_script(ADMIT_SCRIPT)
        self._settle = redis.register_script(SETTLE_SCRIPT)
        self._renew = redis.register_script(RENEW_SCRIPT)
        self._seq = itertools.count(1)
        self._subjects: dict[KeyProfile, list[Subject]] = {}
        self._held: dict[str, Lease] = {}  # member -> lease, renewed while held
        self._pending: set[asyncio.Task] = set()
        self._link = RedisLink("quotas", log=log)

    def _subjects_of(self, profile: KeyProfile) -> list[Subject]:
        subjects = self._subjects.get(profile)
        if subjects is None:
            subjects = self._subjects[profile] = subjects_of(profile, self.keys)
        return subjects

    async def admit(self, profile: KeyProfile, body_bytes: int, max_tokens: int = 0) -> Lease | None:
        """Count one request of ``profile`` in every subject, or raise the 429; with a ``tpm``,
        reserve its estimate (``body_bytes / 4 + max_tokens``). One round trip. ``None``:
        nothing to settle (no limits, or Redis down and failing open)."""
        subjects = self._subjects_of(profile)
        if not subjects:
            return None
        concurrent = any(s.limits.max_concurrent for s in subjects)
        member = f"{self.router_id}:{next(self._seq)}" if concurrent else ""
        reserve = body_bytes // 4 + max(0, max_tokens) if any(s.limits.tpm for s in subjects) else 0
        keys: list[str] = []
        args: list[str | int] = [member, self.ttl_ms, reserve]
        for s in subjects:
            keys += (s.window, s.leases)
            args += (s.limits.rpm, s.limits.tpm, s.limits.max_concurrent)
        try:
            result = await self._admit(keys, args)
        except RedisError as exc:
            return self._unavailable(exc)
        self._link.ok()
        if result[0] != 1:
            reason = result[1].decode() if isinstance(result[1], bytes) else str(result[1])
            subject = subjects[int(result[2]) - 1]
            self.metrics.quota_rejected(subject.name, subject.scope, reason)
            raise refusal(subject, reason, int(result[3]), int(result[4]))
        lease = Lease(member, subjects, body_bytes // 4, reserve, int(result[1]))
        if member:
            self._held[member] = lease
        return lease

    def _unavailable(self, exc: RedisError) -> None:
        self._link.failed(exc)
        self.metrics.quota_redis_error()
        if self.redis_down == "closed":
            raise ApiError(503, "quotas cannot be checked (Redis unreachable); retry later",
                           "quota_unavailable", {"Retry-After": "1"}) from None
        return None

    async def release(self, lease: Lease) -> None:
        """Drop ``lease``'s concurrency hold now, before the answer's last bytes go out: a client
        that has its answer has nothing in flight, and its next request (through any router)
        must not find the finished one still counted, as it would while ``settle`` is on its
        way. The tokens are charged later (``settle``, which then has no lease to drop)."""
        if not lease.member:
            return
        member, lease.member = lease.member, ""
        self._held.pop(member, None)
        keys = [k for s in lease.subjects for k in (s.window, s.leases)]
        task = self._background(self._settle_now(keys, [member, 0, 0, 0, *("0" for _ in lease.subjects)]))
        # Bounded: a stalled Redis (socket timeout and a retry: ~20 s) must not hold the answer's
        # last bytes. Past the bound the release goes on in the background, as settle does.
        await asyncio.wait([task], timeout=self.release_wait)

    def settle(self, lease: Lease, usage: Usage | None, streamed: bool, events: int) -> None:
        """The request is over: charge its tokens and drop its lease, in the background."""
        self._held.pop(lease.member, None)
        tokens = tokens_used(lease, usage, streamed, events) if lease.counts_tokens else 0
        if not lease.member and tokens == lease.reserved:
            return
        keys: list[str] = []
        args: list[str | int] = [lease.member, tokens, lease.reserved, lease.reserved_at]
        for s in lease.subjects:
            keys += (s.window, s.leases)
            args.append("1" if s.limits.tpm else "0")
        self._background(self._settle_now(keys, args))

    def _background(self, work) -> asyncio.Task:
        """``work`` as a task that ``close`` waits for."""
        task = asyncio.ensure_future(work)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return task

    async def _settle_now(self, keys: list[str], args: list[str | int]) -> None:
        try:
            await self._settle(keys, args)
        except RedisError as exc:  # the lease expires by itself; the tokens are lost
            self._link.failed(exc)
            self.metrics.quota_redis_error()

    async def run(self) -> None:
        """Renew the leases held, every third of their lifetime."""
        while True:
            await asyncio.sleep(self.ttl_ms / 3000)
            await self.renew()

    async def renew(self) -> None:
        held = list(self._held.values())
        if not held:
            return
        keys: list[str] = []
        args: list[str | int] = [self.ttl_ms]
        for lease in held:
            for s in lease.subjects:
                if s.limits.max_concurrent:
                    keys.append(s.leases)
                    args.append(lease.member)
        try:
            await self._renew(keys, args)
        except RedisError as exc:
            self._link.failed(exc)
            self.metrics.quota_redis_error()

    async def close(self) -> None:
        """Let the settlements on the wire finish (a drained router leaves no lease behind)."""
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=2)
