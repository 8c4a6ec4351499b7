"""The audit trail: every action that changes what runs, who took it, and how it ended.

One bounded Redis stream, ``llm:audit`` (``Keys.audit``), written by routers (the admin API's
actions with the caller's key name and address; on-demand starts for a request's key;
evictions, with what was stopped, for which model and key) and by workers (a config reload,
engines adopted on start, with the host as ``who``). Each entry is one field ``entry``: a JSON
``AuditEntry``, so ``redis-cli XRANGE llm:audit - +`` reads it as it is. ``XADD ... MAXLEN ~``
keeps about ``LLM_ROUTER_AUDIT_MAXLEN`` entries (default 100000: ~350 bytes each with the
stream's own overhead, ~35 MB).

Writing never fails an action: the action has happened (or failed) whatever the trail says, so
a Redis error is one warning line per outage (``RedisLink``) and the entry is lost. Readers:
``GET /api/audit`` (admin) and ``llm-router audit``.
"""

from __future__ import annotations

import logging
import os
from typing import Literal, Mapping

import msgspec
from redis.exceptions import RedisError

from llm_lab_router.backoff import RedisLink
from llm_lab_router.clock import CLOCK
from llm_lab_router.config import env_int
from llm_lab_router.protocol import Keys

log = logging.getLogger("audit")

MAXLEN_ENV = "LLM_ROUTER_AUDIT_MAXLEN"
DEFAULT_MAXLEN = 100_000
FIELD = "entry"
NO_NAME = "-"  # ``who`` of a request or action whose key has no name (a plain key file, or keys off)

Action = Literal["start", "stop", "stop_all", "restart_autostart", "clear_logs", "on_demand_start", "evict",
                 "reload", "adopt"]


class AuditEntry(msgspec.Struct, kw_only=True):
    """One action, as ``GET /api/audit`` returns it (``id``: its stream id, set when read)."""

    at: float  # unix time (Redis's clock: llm_router/clock.py) when the action ended
    who: str  # the key's name (``-``: no name), or ``worker:{id}`` for a worker's own action
    action: Action
    model: str = ""  # the model acted on ("" for stop_all, restart_autostart, reload)
    models: list[str] = []  # stop_all, restart_autostart: the models it stopped or started; evict: the victims
    host: str = ""  # the worker it ran on, when one
    client: str = ""  # the caller's address (router actions)
    result: str = "ok"  # "ok", else what went wrong (an HTTP status and message, a worker's reason)
    detail: str = ""  # evict: for which model and key; reload: the plan; adopt: what was stopped instead
    by: str = ""  # the process that wrote it: ``router:{id}`` or ``worker:{id}``
    id: str = ""


def maxlen_from(env: Mapping[str, str] = os.environ) -> int:
    """``LLM_ROUTER_AUDIT_MAXLEN``, else the default (a worker's setting; routers: RouterOptions)."""
    return env_int(MAXLEN_ENV, DEFAULT_MAXLEN, 100, env)


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(AuditEntry)


class AuditTrail:
    """Writes and reads ``llm:audit``; ``by`` names the writing process."""

    def __init__(self, redis, keys: Keys, by: str, maxlen: int = DEFAULT_MAXLEN) -> None:
        self.redis = redis
        self.keys = keys
        self.by = by
        self.maxlen = maxlen
        self._link = RedisLink("audit trail", log=log)

    async def record(self, who: str, action: Action, **fields) -> AuditEntry:
        """Append one entry (now); never raises for Redis: the action stands either way."""
        entry = AuditEntry(at=CLOCK.now(), who=who, action=action, by=self.by, **fields)
        try:
            await self.redis.xadd(self.keys.audit(), {FIELD: _encoder.encode(entry)}, maxlen=self.maxlen,
                                  approximate=True)
        except RedisError as exc:
            self._link.failed(exc)
        else:
            self._link.ok()
        return entry

    async def read(self, since: float, limit: int) -> list[AuditEntry]:
        """The latest ``limit`` entries at or after unix time ``since``, oldest first."""
        rows = await self.redis.xrevrange(self.keys.audit(), "+", f"{int(since * 1000)}", count=limit)
        found = []
        for sid, fields in reversed(rows):
            raw = fields.get(FIELD.encode(), fields.get(FIELD))  # bytes or str, as the client decodes
            try:
                entry = _decoder.decode(raw)
            except (msgspec.DecodeError, msgspec.ValidationError, TypeError):
                continue  # not ours (a hand-written entry): skip it
            entry.id = sid.decode() if isinstance(sid, bytes) else sid
            found.append(entry)
        return found
