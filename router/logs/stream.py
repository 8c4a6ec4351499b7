"""The SSE log follow: a model's Redis stream, history then live, resumable.

``historical`` entries (the last ``tail``), one ``historical_complete``, then ``realtime``
entries, so any router serves any model's logs whichever host runs it, and a stopped model's
history stays readable. Every entry event carries its stream id as the SSE ``id:``: a client
that reconnects with ``Last-Event-ID`` resumes right after it, with no loss and no duplicate,
and gets no history again.

Live entries come from the model's one ``LogFeed`` on this router (``router/logs/fanout.py``),
never from a Redis read per viewer, so the number of viewers costs no Redis connections.
Everything read from Redis for one client (history, the gap before it joins the feed, what it
missed while too slow) is read in pages of ``log_page_size`` entries, and each page is flushed
to the client before the next is read: a viewer costs the router at most one page in flight
(plus ``log_viewer_buffer`` of history it may keep to avoid reading it twice), whatever ``tail``.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Awaitable, Callable

from redis.asyncio import Redis
from redis.exceptions import RedisError

from llm_lab_router.protocol import Keys
from llm_lab_router.router.logs.fanout import (  # noqa: F401  (LogEvent, sse, KEEPALIVE: this module's API too)
    KEEPALIVE, Entries, LogEvent, LogFeed, LogHub, Pager, StreamId, entries_size, entry_events, format_id, parse_id,
    sse, text_id,
)
from llm_lab_router.router.core.options import RouterOptions

Send = Callable[[bytes], Awaitable[None]]


class LogStreamer:
    def __init__(self, pages: Redis, readers: Redis, keys: Keys, options: RouterOptions,
                 shutdown: asyncio.Event) -> None:
        """``pages``: the pool for history and catch-up reads; ``readers``: for the feeds'
        blocking reads. Neither is the control plane's."""
        self.redis = pages
        self.options = options
        self.hub = LogHub(readers, keys, options, shutdown)

    async def stream(self, model: str, send: Send, *, tail: int, last_id: str | None) -> None:
        """Relay ``model``'s log to ``send`` until the client leaves (the caller cancels this)
        or the router shuts down. A Redis failure ends the stream with an ``error`` event; the
        client reconnects with ``Last-Event-ID`` and loses nothing."""
        try:
            async with self.hub.watch(model) as feed:
                position = parse_id(last_id) if last_id else await self._history(feed, send, tail)
                await self._follow(feed, send, position)
        except RedisError as exc:
            await send(sse(LogEvent("error", message=f"log stream interrupted: Redis: {exc}")))

    async def close(self) -> None:
        await self.hub.close()

    async def _history(self, feed: LogFeed, send: Send, tail: int) -> StreamId:
        """Send the last ``tail`` entries up to the feed's position, page by page, then
        ``historical_complete``; return that position (the follow starts right after it, so
        nothing between is missed)."""
        end = feed.position
        async for page in self._tail_pages(feed.key, end, tail):
            await send(entry_events("historical", page))
        await send(sse(LogEvent("historical_complete")))
        return end

    async def _follow(self, feed: LogFeed, send: Send, position: StreamId) -> None:
        """Live entries after ``position``: from Redis while the client is behind the feed
        (joining, or dropped for being too slow), then from the feed; until it ends."""
        while True:
            sub = feed.join(position)
            if sub is None:
                target = feed.position
                async for page in self._pages(feed.key, "(" + format_id(position), format_id(target)):
                    await send(entry_events("realtime", page))
                position = max(position, target)
                continue
            try:
                while batches := await sub.take():
                    data = b"".join(b.after(position) for b in batches)
                    position = max([position, *(b.last for b in batches if b.last)])
                    if data:
                        await send(data)
            finally:
                feed.leave(sub)
            if sub.end is not None:
                await send(sub.end)
                return

    async def _pages(self, key: str, low: str, high: str) -> AsyncIterator[Entries]:
        """Entries from ``low`` to ``high`` (XRANGE bounds), oldest first, a page at a time."""
        pager = Pager(self.options.log_page_size)
        while True:
            want = pager.count
            page = await self.redis.xrange(key, min=low, max=high, count=want)
            if page:
                yield page
            if len(page) < want:
                return
            pager.update(page)
            low = "(" + text_id(page[-1][0])

    async def _tail_pages(self, key: str, end: StreamId, tail: int) -> AsyncIterator[Entries]:
        """The last ``tail`` entries up to ``end``, oldest first, a page at a time.

        Walks back from ``end`` with XREVRANGE pages to find where the tail starts. The pages
        read on the way are kept and sent as they are while they fit in ``log_viewer_buffer``
        (one read: the usual case); past that they are dropped and the tail is read again
        forwards, so memory stays bounded however long the tail or its lines."""
        pager, budget = Pager(self.options.log_page_size), self.options.log_viewer_buffer
        kept: list[Entries] | None = []
        kept_bytes, remaining, high, first = 0, tail, format_id(end), None
        while remaining > 0:
            want = min(pager.count, remaining)
            page = await self.redis.xrevrange(key, max=high, min="-", count=want)
            if not page:
                break
            remaining -= len(page)
            first = text_id(page[-1][0])
            if kept is not None:
                kept.append(page)
                kept_bytes += entries_size(page)
                if kept_bytes > budget:
                    kept = None
            if len(page) < want:
                break
            pager.update(page)
            high = "(" + first
        if kept is not None:
            for page in reversed(kept):
                yield list(reversed(page))
        elif first is not None:
            async for page in self._pages(key, first, format_id(end)):
                yield page
