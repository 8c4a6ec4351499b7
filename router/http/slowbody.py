"""The request-body deadline (slow-body protection) at the price of a dict entry per request.

Why not Tornado's own ``HTTPServer(body_timeout=...)``: it wraps every body read in
``gen.with_timeout`` — a future, a chained future, an ``IOLoop.add_timeout`` timer and their
callbacks per request, ~4.6 % of the router's CPU under load — to guard against the rare client
that sends its headers and then trickles (or never sends) the body.

Here every request in the body phase sits in one insertion-ordered dict, keyed by its message
delegate, with its deadline. The body timeout is the same for every request and the loop clock
is monotonic, so insertion order *is* deadline order: one loop timer, armed for the oldest
entry, is enough for all connections. A request whose body is complete leaves the dict (a
delete); the timer closes the connection of any entry still there at its deadline, exactly as
Tornado would (the body read fails, the handler sees the connection close). The timer is not
cancelled when the dict empties: it fires at most about once per timeout, re-arming for the
oldest entry or stopping when there is none.

The deadline runs from the request head's arrival to the body's end (Tornado's starts after
``prepare``: a few microseconds later).

The head deadline (``header_timeout``: a slow head, slowloris, or an idle keep-alive
connection) works the same way, in a second dict: Tornado's own ``idle_connection_timeout``
wraps every head read in ``gen.with_timeout`` too, ~10 µs per request. A connection enters it
when it starts waiting for a request head and leaves it when the head is in (or the
connection closes); at the deadline its connection is closed quietly, as Tornado does.

And Nagle's algorithm is off for good on every connection: Tornado turns ``TCP_NODELAY`` on
when a response ends and off again when it is written (two ``setsockopt`` calls per request),
and a streamed answer's frames sit behind Nagle in between. The router relays every write at
once anyway, as nginx does with ``tcp_nodelay on``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable

from tornado import httputil
from tornado.httpserver import HTTPServer
from tornado.iostream import IOStream

log = logging.getLogger("router")


class BodyDeadlines:
    """Requests whose body is not in yet, oldest first, and the one timer that cuts them off."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.pending: dict[_Watched, float] = {}
        self.timer: asyncio.TimerHandle | None = None

    def start(self, watched: "_Watched") -> None:
        loop = asyncio.get_running_loop()
        when = loop.time() + self.timeout
        self.pending[watched] = when
        if self.timer is None:
            self.timer = loop.call_at(when, self._expire)

    def done(self, watched: "_Watched") -> None:
        self.pending.pop(watched, None)

    def _expire(self) -> None:
        self.timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        pending = self.pending
        while pending:
            watched, when = next(iter(pending.items()))
            if when > now:
                self.timer = loop.call_at(when, self._expire)
                return
            del pending[watched]
            watched.expire()

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.pending.clear()


class _Watched(httputil.HTTPMessageDelegate):
    """Tornado's delegate for one request, wrapped: in ``heads`` until its head is in, then in
    ``deadlines`` from head to body end (either may be ``None``: not watched)."""

    __slots__ = ("inner", "conn", "deadlines", "heads", "in_body")

    def __init__(self, inner: httputil.HTTPMessageDelegate, conn: httputil.HTTPConnection,
                 deadlines: BodyDeadlines | None, heads: BodyDeadlines | None = None) -> None:
        self.inner = inner
        self.conn = conn
        self.deadlines = deadlines
        self.heads = heads
        self.in_body = False
        if heads is not None:
            heads.start(self)

    def headers_received(self, start_line: httputil.RequestStartLine | httputil.ResponseStartLine,
                         headers: httputil.HTTPHeaders) -> Awaitable[None] | None:
        self.in_body = True
        if self.heads is not None:
            self.heads.done(self)
        if self.deadlines is not None:
            self.deadlines.start(self)
        return self.inner.headers_received(start_line, headers)

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        return self.inner.data_received(chunk)

    def finish(self) -> None:
        if self.deadlines is not None:
            self.deadlines.done(self)
        self.inner.finish()

    def on_connection_close(self) -> None:
        self.gone()
        self.inner.on_connection_close()

    def gone(self) -> None:
        """The connection closed: watched no more."""
        if self.heads is not None:
            self.heads.done(self)
        if self.deadlines is not None:
            self.deadlines.done(self)

    def expire(self) -> None:
        """The head or the body did not come in time: close the connection, as Tornado's
        ``idle_connection_timeout`` (quietly) and ``body_timeout`` (with a log line) do."""
        stream = getattr(self.conn, "stream", None)
        if stream is not None and not stream.closed():
            if self.in_body:
                log.info("timeout reading a request body from %s", getattr(self.conn, "context", "a client"))
            stream.close()


def _nodelay_stays_on(value: bool) -> None:
    """``IOStream.set_nodelay`` of the router's client connections: TCP_NODELAY is set once."""


class BodyTimeoutServer(HTTPServer):
    """``HTTPServer`` with ``body_timeout`` and ``head_timeout`` enforced by ``BodyDeadlines``
    instead of per-request timers, and TCP_NODELAY on for good. Takes HTTPServer's arguments;
    ``head_timeout`` replaces ``idle_connection_timeout``."""

    def initialize(self, *args, body_timeout: float | None = None, head_timeout: float | None = None,
                   **kwargs) -> None:  # type: ignore[override]
        super().initialize(*args, **kwargs)
        self.body_deadlines = BodyDeadlines(body_timeout) if body_timeout else None
        self.head_deadlines = BodyDeadlines(head_timeout) if head_timeout else None
        if self.head_deadlines is not None:
            self.conn_params.header_timeout = None  # ours, not Tornado's timer per head
        self._waiting: dict[object, _Watched] = {}  # connection -> its current request

    def handle_stream(self, stream: IOStream, address: tuple) -> None:
        stream.set_nodelay(True)
        stream.set_nodelay = _nodelay_stays_on  # type: ignore[method-assign]
        super().handle_stream(stream, address)

    def start_request(self, server_conn: object, request_conn: httputil.HTTPConnection) -> httputil.HTTPMessageDelegate:
        delegate = super().start_request(server_conn, request_conn)
        if self.body_deadlines is None and self.head_deadlines is None:
            return delegate
        watched = self._waiting[server_conn] = _Watched(delegate, request_conn, self.body_deadlines,
                                                        self.head_deadlines)
        return watched

    def on_close(self, server_conn: object) -> None:
        """A connection is gone, maybe while waiting for a head (Tornado tells no delegate then)."""
        if (watched := self._waiting.pop(server_conn, None)) is not None:
            watched.gone()
        super().on_close(server_conn)

    async def close_all_connections(self) -> None:
        await super().close_all_connections()
        for deadlines in (self.body_deadlines, self.head_deadlines):
            if deadlines is not None:
                deadlines.close()
