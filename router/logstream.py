"""The SSE log follow: a model's Redis stream, history then live, resumable.

``historical`` entries (the last ``tail``), one ``historical_complete``, then ``realtime``
entries read with ``XREAD BLOCK`` from the last id seen, so any router serves any model's logs
whichever host runs it, and a stopped model's history stays readable. Every entry event
carries its stream id as the SSE ``id:``: a client that reconnects with ``Last-Event-ID``
resumes right after it, with no loss and no duplicate, and gets no history again.

The blocking read is short (``log_block_ms`` <= 1 s) so a client that leaves, or a router that
shuts down (``stream_end``), releases its connection promptly; a keep-alive comment goes out
when nothing else did for ``keepalive_interval`` (proxies close silent connections).
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable, Literal

import msgspec
from redis.asyncio import Redis
from redis.exceptions import RedisError

from llm_router.protocol import Keys, LogEntry, log_entry
from router.options import RouterOptions

KEEPALIVE = b": keep-alive\n\n"
EventType = Literal["historical", "historical_complete", "realtime", "stream_end", "error"]
Send = Callable[[bytes], Awaitable[None]]


class LogEvent(msgspec.Struct, omit_defaults=True):
    """The ``data:`` of one SSE event (the manual's shape; ``message`` for stream_end/error)."""

    type: EventType
    log: LogEntry | None = None
    message: str | None = None


_encoder = msgspec.json.Encoder()


def sse(event: LogEvent, event_id: str | None = None) -> bytes:
    head = f"id: {event_id}\n".encode() if event_id else b""
    return head + b"data: " + _encoder.encode(event) + b"\n\n"


def entry_events(kind: EventType, entries: list[tuple[bytes, dict]]) -> bytes:
    """Stream entries as SSE events, each with its stream id as ``id:``."""
    return b"".join(sse(LogEvent(kind, log_entry(fields)), _id(entry_id)) for entry_id, fields in entries)


class LogStreamer:
    def __init__(self, redis: Redis, keys: Keys, options: RouterOptions, shutdown: asyncio.Event) -> None:
        self.redis = redis
        self.keys = keys
        self.options = options
        self.shutdown = shutdown

    async def stream(self, model: str, send: Send, *, tail: int, last_id: str | None) -> None:
        """Relay ``model``'s log to ``send`` until the client leaves (the caller cancels this)
        or the router shuts down. A Redis failure ends the stream with an ``error`` event; the
        client reconnects with ``Last-Event-ID`` and loses nothing."""
        try:
            position = last_id or await self._history(model, send, tail)
            await self._follow(model, send, position)
            await send(sse(LogEvent("stream_end", message="the router is shutting down")))
        except RedisError as exc:
            await send(sse(LogEvent("error", message=f"log stream interrupted: Redis: {exc}")))

    async def _history(self, model: str, send: Send, tail: int) -> str:
        """Send the last ``tail`` entries and ``historical_complete``; return the id to follow
        from (the newest entry, even when ``tail`` is 0, so nothing between is missed)."""
        newest_first = await self.redis.xrevrange(self.keys.logs(model), count=max(tail, 1))
        entries = list(reversed(newest_first[:tail])) if tail else []
        await send(entry_events("historical", entries) + sse(LogEvent("historical_complete")))
        return _id(newest_first[0][0]) if newest_first else "0-0"

    async def _follow(self, model: str, send: Send, position: str) -> None:
        loop = asyncio.get_running_loop()
        key = self.keys.logs(model)
        keepalive_at = loop.time() + self.options.keepalive_interval
        while not self.shutdown.is_set():
            found = await self.redis.xread({key: position}, count=1000, block=self.options.log_block_ms)
            if found:
                entries = found[0][1]
                await send(entry_events("realtime", entries))
                position = _id(entries[-1][0])
                keepalive_at = loop.time() + self.options.keepalive_interval
            elif loop.time() >= keepalive_at:
                await send(KEEPALIVE)
                keepalive_at = loop.time() + self.options.keepalive_interval


def _id(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
