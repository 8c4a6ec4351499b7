"""The access log of forwarded requests: one JSON line per ``/v1/*`` request.

Fields: method, path, model, worker, status, latency, time to first byte and, when the engine
reported them, token counts; the key's name when the keys file gave it one. Never the prompt,
the body, the query or any header (keys).

Cheap on the hot path: the proxy fills a ``RequestRecord`` (a few attribute stores); the line
is built and written later, in batches — one ``write`` per ``FLUSH_INTERVAL`` or per
``FLUSH_LINES`` lines — instead of a ``logging`` record per request. Token counts come from
the last body bytes only (``usage_from_tail``): the non-streamed JSON's ``usage`` object, or a
stream's usage chunk (``stream_options.include_usage``), both at the end of the answer, so no
chunk of a stream is ever parsed.
"""

from __future__ import annotations

import asyncio
import re
import sys
import time
from typing import IO

import msgspec

FLUSH_INTERVAL = 0.25  # seconds a line may wait for its batch
FLUSH_LINES = 512
TAIL_BYTES = 4096  # how much of the answer's end is searched for usage
CLIENT_GONE = 499  # status recorded for a request whose client left before its answer ended (nginx's)


class RequestRecord:
    """What one forwarded request did; filled in by the handler and the proxy."""

    __slots__ = ("method", "path", "received_at", "model", "worker", "first_byte_at", "streamed", "tail",
                 "prev_tail", "retries", "error", "caller", "lease", "events", "route", "served", "conn", "prompt_estimate")

    def __init__(self, method: str, path: str, received_at: float) -> None:
        self.method = method
        self.path = path
        self.received_at = received_at  # time.monotonic()
        self.model = ""  # the resolved model id ("" until known)
        self.worker = ""
        self.first_byte_at = 0.0  # monotonic time the first body bytes went to the client
        self.streamed = False  # an event stream
        self.tail = b""  # the last two chunks relayed (usage is at the end)
        self.prev_tail = b""
        self.retries = 0  # instances tried in vain before this one
        self.error = ""  # upstream failure kind: connect, timeout, broken
        self.caller = None  # the key's ``KeyProfile`` (name, limits) when the keys file gave one
        self.lease = None  # its quota ``Lease`` (router/limits/quotas.py), settled when the request ends
        self.events = -1  # SSE events relayed, counted (from 0) only to estimate tokens for a quota
        self.route = ""  # how the instance was chosen: affinity, spill, least (router/forward/balancer.py)
        self.served = ""  # the fallback model that served, when ``model`` could not
        self.prompt_estimate = 0  # request body bytes / 4: the prompt's tokens when no usage comes back
        self.conn = None  # the client's connection (its address is read only when needed: ``client``)

    def chunk(self, data: bytes) -> None:
        if self.first_byte_at == 0.0:
            self.first_byte_at = time.monotonic()
        self.prev_tail, self.tail = self.tail, data
        if self.events >= 0:
            self.events += data.count(b"\ndata:") + data.startswith(b"data:")

    def client(self) -> str:
        """The client's address (for the audit trail of an on-demand start: not per request)."""
        return getattr(getattr(self.conn, "context", None), "remote_ip", "") or ""

    def recent(self, n: int = TAIL_BYTES) -> bytes:
        """The last ``n`` bytes relayed (as far as the last two chunks reach)."""
        tail = self.tail if len(self.tail) >= n else self.prev_tail + self.tail
        return tail[-n:]


class Usage(msgspec.Struct):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None


_FIELD = re.compile(rb'"(prompt_tokens|completion_tokens|total_tokens)"\s*:\s*(\d+)')


def usage_of(rec: RequestRecord, status: int) -> Usage | None:
    """The usage a finished request's answer reported, if it ended normally."""
    return usage_from_tail(rec.recent()) if rec.tail and status != CLIENT_GONE else None


def token_counts(usage: Usage | None, prompt_estimate: int, streamed: bool, events: int) -> tuple[int, int, bool]:
    """(prompt, completion, estimated) tokens of a finished request: as its answer reported them,
    else an estimate: ``prompt_estimate`` (body bytes / 4) and, for a stream, one token per SSE
    event relayed (less the ``[DONE]`` event). A usage with only ``total_tokens`` counts as prompt."""
    if usage is not None and (usage.prompt_tokens or usage.completion_tokens or usage.total_tokens):
        if usage.prompt_tokens or usage.completion_tokens:
            return usage.prompt_tokens or 0, usage.completion_tokens or 0, False
        return usage.total_tokens or 0, 0, False
    return prompt_estimate, max(0, events - 1) if streamed else 0, True


def usage_from_tail(tail: bytes) -> Usage | None:
    """The token counts of the last ``usage`` object in ``tail`` (``None`` if there is none).

    Reads only what follows the last ``"usage"`` key; a key inside a JSON string would have
    escaped quotes, so generated text cannot fake one."""
    start = tail.rfind(b'"usage"')
    if start < 0:
        return None
    fields: dict[str, int] = {}
    for key, value in _FIELD.findall(tail, start):
        fields.setdefault(key.decode(), int(value))
    return Usage(**fields) if fields else None


class AccessLine(msgspec.Struct, omit_defaults=True):
    """One access-log line (JSON)."""

    time: str
    method: str
    path: str
    status: int
    ms: float
    model: str = ""
    worker: str = ""
    ttfb_ms: float | None = None
    stream: bool = False
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    retries: int = 0
    error: str = ""
    key: str = ""  # the key's name from a structured keys file (never the key itself)
    route: str = ""
    served: str = ""


_encoder = msgspec.json.Encoder()


_second: tuple[int, str] = (-1, "")


def timestamp(wall: float) -> str:
    """Local time with milliseconds; ``strftime`` once per second, not once per line."""
    global _second
    sec = int(wall)
    if sec != _second[0]:
        _second = (sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(sec)))
    return f"{_second[1]}.{int(wall % 1 * 1000):03d}"


def access_line(rec: RequestRecord, status: int, ended_at: float, wall: float, usage: Usage | None) -> AccessLine:
    return AccessLine(
        time=timestamp(wall),
        method=rec.method, path=rec.path, status=status, ms=round((ended_at - rec.received_at) * 1000, 3),
        model=rec.model, worker=rec.worker,
        ttfb_ms=round((rec.first_byte_at - rec.received_at) * 1000, 3) if rec.first_byte_at else None,
        stream=rec.streamed, retries=rec.retries, error=rec.error, route=rec.route, served=rec.served,
        prompt_tokens=usage.prompt_tokens if usage else None,
        completion_tokens=usage.completion_tokens if usage else None,
        total_tokens=usage.total_tokens if usage else None,
        key=rec.caller.name if rec.caller is not None else "")


class AccessLog:
    """Batched writer of access lines to ``stream`` (stderr, beside the router's own log)."""

    def __init__(self, enabled: bool = True, stream: IO[str] | None = None) -> None:
        self.enabled = enabled
        self.stream = stream
        self.pending: list[tuple[RequestRecord, int, float, float, Usage | None]] = []
        self.timer: asyncio.TimerHandle | None = None

    def add(self, rec: RequestRecord, status: int, ended_at: float, usage: Usage | None) -> None:
        if not self.enabled:
            return
        self.pending.append((rec, status, ended_at, time.time(), usage))
        if len(self.pending) >= FLUSH_LINES:
            self.flush()
        elif self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(FLUSH_INTERVAL, self.flush)

    def flush(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        pending, self.pending = self.pending, []
        if not pending:
            return
        text = b"".join(b"router.access " + _encoder.encode(access_line(*p)) + b"\n" for p in pending)
        stream = self.stream or sys.stderr
        try:
            stream.write(text.decode())
            stream.flush()
        except (OSError, ValueError):
            pass  # a closed stderr must not fail requests
