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
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable

from tornado import httputil
from tornado.httpserver import HTTPServer

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
    """Tornado's delegate for one request, wrapped: in ``deadlines`` from head to body end."""

    __slots__ = ("inner", "conn", "deadlines")

    def __init__(self, inner: httputil.HTTPMessageDelegate, conn: httputil.HTTPConnection,
                 deadlines: BodyDeadlines) -> None:
        self.inner = inner
        self.conn = conn
        self.deadlines = deadlines

    def headers_received(self, start_line: httputil.RequestStartLine | httputil.ResponseStartLine,
                         headers: httputil.HTTPHeaders) -> Awaitable[None] | None:
        self.deadlines.start(self)
        return self.inner.headers_received(start_line, headers)

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        return self.inner.data_received(chunk)

    def finish(self) -> None:
        self.deadlines.done(self)
        self.inner.finish()

    def on_connection_close(self) -> None:
        self.deadlines.done(self)
        self.inner.on_connection_close()

    def expire(self) -> None:
        """The body did not come in time: close the connection, as Tornado's body_timeout does."""
        stream = getattr(self.conn, "stream", None)
        if stream is not None and not stream.closed():
            log.info("timeout reading a request body from %s", getattr(self.conn, "context", "a client"))
            stream.close()


class BodyTimeoutServer(HTTPServer):
    """``HTTPServer`` with ``body_timeout`` enforced by ``BodyDeadlines`` instead of per-request
    timers. Takes HTTPServer's arguments; ``body_timeout`` is taken over here."""

    def initialize(self, *args, body_timeout: float | None = None, **kwargs) -> None:  # type: ignore[override]
        super().initialize(*args, **kwargs)
        self.body_deadlines = BodyDeadlines(body_timeout) if body_timeout else None

    def start_request(self, server_conn: object, request_conn: httputil.HTTPConnection) -> httputil.HTTPMessageDelegate:
        delegate = super().start_request(server_conn, request_conn)
        if self.body_deadlines is None:
            return delegate
        return _Watched(delegate, request_conn, self.body_deadlines)

    async def close_all_connections(self) -> None:
        await super().close_all_connections()
        if self.body_deadlines is not None:
            self.body_deadlines.close()
