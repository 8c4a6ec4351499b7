"""One reader per model log stream, fanned out in memory to every SSE client of that model.

Why: a blocking ``XREAD`` per viewer holds one Redis connection per viewer, so a hundred
viewers used to exhaust the router's pool and take the control plane down with them. Here a
router runs at most one ``XREAD BLOCK`` loop per model being watched (a ``LogFeed``), whatever
the number of viewers; each batch it reads is encoded as SSE once and offered to every
subscriber. The feed stops when its last client leaves.

Exactness (``Last-Event-ID``): a client joins a feed only when it has sent everything up to the
feed's position (``LogFeed.join`` checks and subscribes in one synchronous step, so no entry
falls in between); a client that is behind reads the gap from Redis in bounded pages first
(``router/logs/stream.py``). Entries a subscriber already sent are filtered out by id.

Slow clients: each subscriber has a queue bounded in bytes (``log_viewer_buffer``, at least
one batch). A client whose queue would overflow is dropped from the fan-out and its queue
freed; it then resumes from Redis at the last entry it sent, and rejoins once caught up. It is
never cut off and never loses an entry, and it never slows the feed or the other clients.
Because queues hold shared batches and are dropped on overflow, all queues together hold at
most the newest ``log_viewer_buffer`` bytes of a model's log (plus one batch).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from bisect import bisect_right
from collections import deque
from typing import AsyncIterator, Literal, Sequence

import msgspec
from redis.asyncio import Redis
from redis.exceptions import RedisError

from llm_lab_router.protocol import Keys, LogEntry, log_entry
from llm_lab_router.router.core.options import RouterOptions

log = logging.getLogger("router.logs")

StreamId = tuple[int, int]  # (milliseconds, sequence): compares as Redis orders entries
Entries = Sequence[tuple[bytes | str, dict]]  # what XRANGE/XREAD return for one stream
EventType = Literal["historical", "historical_complete", "realtime", "stream_end", "error"]
KEEPALIVE = b": keep-alive\n\n"


class LogEvent(msgspec.Struct, omit_defaults=True):
    """The ``data:`` of one SSE event (the manual's shape; ``message`` for stream_end/error)."""

    type: EventType
    log: LogEntry | None = None
    message: str | None = None


_encoder = msgspec.json.Encoder()


def sse(event: LogEvent, event_id: str | None = None) -> bytes:
    head = f"id: {event_id}\n".encode() if event_id else b""
    return head + b"data: " + _encoder.encode(event) + b"\n\n"


def entry_events(kind: EventType, entries: Entries) -> bytes:
    """Stream entries as SSE events, each with its stream id as ``id:``."""
    return b"".join(sse(LogEvent(kind, log_entry(fields)), text_id(entry_id)) for entry_id, fields in entries)


def text_id(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def parse_id(value: bytes | str) -> StreamId:
    """``1700000000000-3`` -> (1700000000000, 3); a bare ``ms`` is ``ms-0`` (as Redis reads it)."""
    ms, _, seq = text_id(value).partition("-")
    return int(ms), int(seq or 0)


def format_id(sid: StreamId) -> str:
    return f"{sid[0]}-{sid[1]}"


PAGE_BYTES = 256 * 1024  # what one Redis read of log entries should bring, about
FIRST_PAGE = 10  # entries: the first read of a stream whose line length is not known yet


def entries_size(entries: Entries) -> int:
    return sum(len(v) for _, fields in entries for v in fields.values())


class Pager:
    """How many entries the next read of one log asks for: pages stay near ``PAGE_BYTES``
    whatever the line length (4 lines of 64 KiB, or up to ``log_page_size`` short ones). It
    starts small and grows 4x a page, so not even the first read of a log of huge lines
    holds more than a few hundred KiB."""

    __slots__ = ("count", "most")

    def __init__(self, most: int) -> None:
        self.most = most
        self.count = min(FIRST_PAGE, most)

    def update(self, page: Entries) -> None:
        if page:
            fit = len(page) * PAGE_BYTES // max(1, entries_size(page))
            self.count = max(1, min(self.most, self.count * 4, fit))


class Batch:
    """Entries read once, encoded once, shared by every subscriber's queue."""

    __slots__ = ("data", "ids", "offsets")

    def __init__(self, data: bytes, ids: list[StreamId], offsets: list[int]) -> None:
        self.data = data
        self.ids = ids  # ascending; empty for a keep-alive
        self.offsets = offsets  # where each entry's event starts in ``data``

    @classmethod
    def of(cls, entries: Entries) -> "Batch":
        parts, ids, offsets, size = [], [], [], 0
        for entry_id, fields in entries:
            event = sse(LogEvent("realtime", log_entry(fields)), text_id(entry_id))
            ids.append(parse_id(entry_id))
            offsets.append(size)
            parts.append(event)
            size += len(event)
        return cls(b"".join(parts), ids, offsets)

    @property
    def last(self) -> StreamId | None:
        return self.ids[-1] if self.ids else None

    def after(self, position: StreamId) -> bytes:
        """The events of entries newer than ``position`` (all of them, but for a client that
        joined with an id the feed had not reached yet)."""
        if not self.ids or self.ids[0] > position:
            return self.data
        i = bisect_right(self.ids, position)
        return self.data[self.offsets[i]:] if i < len(self.ids) else b""


KEEPALIVE_BATCH = Batch(KEEPALIVE, [], [])


class Subscriber:
    """One client's bounded queue of batches. ``lagged``: it overflowed, was dropped from the
    fan-out and must catch up from Redis; ``end``: the feed is over (the final event to send)."""

    __slots__ = ("limit", "batches", "size", "lagged", "end", "_ready")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.batches: deque[Batch] = deque()
        self.size = 0
        self.lagged = False
        self.end: bytes | None = None
        self._ready = asyncio.Event()

    def offer(self, batch: Batch) -> bool:
        """Queue ``batch``; False (and the queue emptied) when it would go over the limit."""
        if self.batches and self.size + len(batch.data) > self.limit:
            self.batches.clear()
            self.size = 0
            self.lagged = True
            self._ready.set()
            return False
        self.batches.append(batch)
        self.size += len(batch.data)
        self._ready.set()
        return True

    def finish(self, event: bytes) -> None:
        self.end = event
        self._ready.set()

    async def take(self) -> list[Batch]:
        """Every queued batch, waiting for one; [] once lagged or ended (and the queue is
        empty). All at once: a client that fell behind sends what piled up in one write, so a
        busy router spends less per line exactly when it has the least time."""
        while not self.batches:
            if self.lagged or self.end is not None:
                return []
            self._ready.clear()
            await self._ready.wait()
        batches = list(self.batches)
        self.batches.clear()
        self.size = 0
        return batches


class LogFeed:
    """One model's live log on this router: one ``XREAD BLOCK`` loop, many subscribers.

    ``position`` is the id of the newest entry offered to subscribers (at start, the stream's
    newest entry): every entry after it reaches every subscriber that joins now."""

    def __init__(self, redis: Redis, key: str, options: RouterOptions, shutdown: asyncio.Event) -> None:
        self.redis = redis
        self.key = key
        self.options = options
        self.shutdown = shutdown
        self.position: StreamId = (0, 0)
        self.ready = asyncio.Event()  # position known (or the feed is already over)
        self.end: bytes | None = None
        self.refs = 0  # clients using the feed, subscribed or catching up
        self.subscribers: set[Subscriber] = set()
        self.task = asyncio.create_task(self._run(), name=f"log feed {key}")

    def join(self, after: StreamId) -> Subscriber | None:
        """Subscribe a client that has sent everything up to ``after``, if the feed is not past
        it; None when the client must first read the gap from Redis. Synchronous on purpose:
        no entry can be offered between the check and the subscription."""
        if self.end is None and after < self.position:
            return None
        sub = Subscriber(self.options.log_viewer_buffer)
        if self.end is not None:
            sub.finish(self.end)
        else:
            self.subscribers.add(sub)
        return sub

    def leave(self, sub: Subscriber) -> None:
        self.subscribers.discard(sub)

    def _offer(self, batch: Batch) -> None:
        for sub in [s for s in self.subscribers if not s.offer(batch)]:
            self.subscribers.discard(sub)

    def _finish(self, event: bytes) -> None:
        self.end = event
        self.ready.set()
        for sub in self.subscribers:
            sub.finish(event)
        self.subscribers.clear()

    async def _run(self) -> None:
        """Read the stream from its newest entry on, until the router shuts down, Redis fails
        or the last client leaves (the hub cancels this task). The block is short
        (``log_block_ms``) so a shutdown is noticed promptly; when nothing arrived for
        ``keepalive_interval`` every subscriber gets a keep-alive comment (proxies close
        silent connections)."""
        loop = asyncio.get_running_loop()
        try:
            newest = await self.redis.xrevrange(self.key, count=1)
            if newest:
                self.position = parse_id(newest[0][0])
            self.ready.set()
            keepalive_at = loop.time() + self.options.keepalive_interval
            pager = Pager(self.options.log_page_size)
            while not self.shutdown.is_set():
                found = await self.redis.xread({self.key: format_id(self.position)}, count=pager.count,
                                               block=self.options.log_block_ms)
                if found and found[0][1]:
                    pager.update(found[0][1])
                    batch = Batch.of(found[0][1])
                    self.position = batch.ids[-1]
                    self._offer(batch)
                    keepalive_at = loop.time() + self.options.keepalive_interval
                elif loop.time() >= keepalive_at:
                    self._offer(KEEPALIVE_BATCH)
                    keepalive_at = loop.time() + self.options.keepalive_interval
            self._finish(sse(LogEvent("stream_end", message="the router is shutting down")))
        except RedisError as exc:
            log.warning("log feed %s: Redis: %s", self.key, exc)
            self._finish(sse(LogEvent("error", message=f"log stream interrupted: Redis: {exc}")))
        except Exception:  # a bug: the clients must still be told, not left waiting
            log.exception("log feed %s failed", self.key)
            self._finish(sse(LogEvent("error", message="log stream interrupted: internal error")))


class LogHub:
    """The feeds of this router, one per model being watched; a feed lives while it is used."""

    def __init__(self, redis: Redis, keys: Keys, options: RouterOptions, shutdown: asyncio.Event) -> None:
        self.redis = redis
        self.keys = keys
        self.options = options
        self.shutdown = shutdown
        self.feeds: dict[str, LogFeed] = {}
        self._stopping: set[asyncio.Task] = set()

    @contextlib.asynccontextmanager
    async def watch(self, model: str) -> AsyncIterator[LogFeed]:
        """The model's feed, started if it is not running, once its position is known."""
        key = self.keys.logs(model)
        feed = self.feeds.get(key)
        if feed is None or feed.task.done():  # none yet, or over (a Redis failure): a fresh one
            feed = self.feeds[key] = LogFeed(self.redis, key, self.options, self.shutdown)
        feed.refs += 1
        try:
            await feed.ready.wait()
            yield feed
        finally:
            feed.refs -= 1
            if not feed.refs:
                if self.feeds.get(key) is feed:
                    del self.feeds[key]
                if not feed.task.done():
                    feed.task.cancel()
                    self._stopping.add(feed.task)
                    feed.task.add_done_callback(self._stopping.discard)

    async def close(self) -> None:
        tasks = [f.task for f in self.feeds.values()] + list(self._stopping)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
