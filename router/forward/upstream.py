"""The engine hop: a lean, pooled, keep-alive HTTP/1.1 client on an asyncio ``Protocol``.

Why not aiohttp: on the hot path its request machinery (request/response objects, header
multidicts, a timer context per read) cost the router ~14 % of its CPU per proxied request.
This client does only what the relay needs: write one request (one ``send``), parse the
response (``ResponseParser``, llm_router/http1.py: Content-Length, chunked or until-close
framing, de-chunked, every parser state bounded), hand body bytes over as they arrive, and put
the connection back in the pool only after a complete response.

* Timeouts: connect (new connections only), first byte and idle, all on **one** timer per
  exchange (``loop.call_at``, re-armed only when the deadline moves past it).
* Cancellation: ``close()`` (the proxy calls it on any exit but a complete answer, including a
  cancelled task) closes the connection, so the engine sees the client leave and stops.
* A pooled connection the engine closed just as it was reused (EOF or reset before the response
  head) is retried once on a fresh one. One that failed otherwise (the kernel gave up on
  unacknowledged data: the host is off the network) is not: the proxy moves on to another
  instance at once instead of spending a second connect timeout on the same dead host.
* Back-pressure: reading from the engine pauses while unread body bytes pile up (slow client).
* A response that breaks framing or a parser limit fails the exchange (``UpstreamBroken``: a 502
  before the answer began) and closes the connection.

Header filtering lives here, in exactly two functions — ``forward_headers`` (client -> engine)
and ``keep_response_header`` (engine -> client). Add any outgoing/incoming header policy
(hop-by-hop stripping, an upstream API key...) there and nowhere else.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import ssl
from typing import Iterable
from urllib.parse import urlsplit

from llm_lab_router.http1 import DONE, HEAD, ProtocolError, ResponseParser
from llm_lab_router.router.core.options import RouterOptions

log = logging.getLogger("router")

# --------------------------------------------------------------------------- header policy

# Hop-by-hop headers (RFC 9110 7.6.1) and those this client computes itself (Host, framing).
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "host", "content-length", "expect",
})
# Engine response headers relayed to the client; every other one is dropped (the router frames
# the answer itself, and copying each header costs CPU on every request).
RESPONSE_HEADERS = frozenset({
    "content-type", "content-encoding", "content-disposition", "cache-control", "retry-after",
    "www-authenticate", "location", "x-request-id",
})
RESPONSE_HEADER_PREFIXES = ("openai-", "x-ratelimit-")


# Client credentials for the router itself: never passed on to an engine.
CLIENT_CREDENTIALS = frozenset({"authorization", "cookie", "x-api-key"})


# What may go on the wire (RFC 9110 5.1, 5.5): a field name is a token; a field value is
# visible ASCII, space, tab or obs-text (latin-1 bytes 0x80-0xFF): no CR, LF, NUL or other
# control character, which could end the line and smuggle a header or a request to the engine.
_FIELD_NAMES = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE = re.compile(r"[^\t\x20-\x7e\x80-\xff]")


class InvalidHeader(ValueError):
    """A header that cannot be forwarded as it is (no request is sent)."""


def forward_headers(headers: Iterable[tuple[str, str]], api_key: str = "") -> list[tuple[str, str]]:
    """Client -> engine: end-to-end request headers as the client sent them, minus hop-by-hop
    ones (those RFC 9110 lists and those the client's ``Connection`` header names) and minus
    the client's credentials (its key is for the router: an engine, or whoever runs one, must
    never see it). With the model's ``api_key`` the engine gets ``Authorization: Bearer
    <api_key>``. The one place for outgoing header policy.

    The bytes are checked here as well, whatever the HTTP server in front already checked
    (Tornado before 6.5 let a bare CR or a NUL through): a name that is no token or a value
    with a control character raises ``InvalidHeader`` instead of reaching the engine. Two
    regex passes over the joined names and values, not two per header (hot path)."""
    headers = list(headers)
    drop = HOP_BY_HOP | CLIENT_CREDENTIALS
    for k, v in headers:
        if k.lower() == "connection":
            drop = drop | {t.strip().lower() for t in v.split(",")}
    out = [(k, v) for k, v in headers if k.lower() not in drop]
    if api_key:
        out.append(("Authorization", f"Bearer {api_key}"))
    if out and (not _FIELD_NAMES.fullmatch("".join(k for k, _ in out)) or not all(k for k, _ in out)
                or _BAD_VALUE.search("".join(v for _, v in out))):
        bad = next(k for k, v in out if not _FIELD_NAMES.fullmatch(k) or _BAD_VALUE.search(v))
        raise InvalidHeader(f"header {bad[:64]!r} has characters that cannot be forwarded "
                            "(a field name must be a token; a value must have no control characters)")
    return out


def keep_response_header(name: str) -> bool:
    """Engine -> client: whether a response header (``name`` lower-case) is relayed. The one
    place for incoming header policy."""
    return name in RESPONSE_HEADERS or name.startswith(RESPONSE_HEADER_PREFIXES)


# --------------------------------------------------------------------------- errors


class UpstreamError(Exception):
    pass


class ConnectFailed(UpstreamError):
    """The engine could not be reached or dropped the request before answering: retryable."""


class UpstreamTimeout(UpstreamError):
    pass


class UpstreamBroken(UpstreamError):
    """The engine's answer stopped before its end (crash, reset)."""


class _Dropped(ConnectFailed):
    """The engine closed the connection (EOF, reset) before a response head: on a reused
    connection, retried once on a fresh one."""


def closed_by_peer(exc: Exception | None) -> bool:
    """A connection loss that shows the engine end closed it (EOF, reset, broken pipe), as
    an engine does with a keep-alive connection it has timed out; not a timeout (``ETIMEDOUT``
    from ``TCP_USER_TIMEOUT``: nothing answers at all) or an unreachable host."""
    return exc is None or isinstance(exc, (ConnectionResetError, ConnectionAbortedError, BrokenPipeError))


# --------------------------------------------------------------------------- the response

PAUSE_AT = 256 * 1024  # unread body bytes at which reading from the engine pauses


class Response:
    """One engine response: the head, then body bytes as they arrive (``read``). Framing and
    its limits are ``ResponseParser``'s (llm_router/http1.py); this adds the waiting, the
    timeouts and back-pressure."""

    __slots__ = ("conn", "loop", "parser", "status", "headers", "content_type", "error", "waiter", "expiry",
                 "timer", "timer_when", "timeout_what", "paused", "finished")

    def __init__(self, conn: "Connection", head_only: bool) -> None:
        self.conn = conn
        self.loop = conn.loop
        self.parser = ResponseParser(head_only)
        self.status = 0
        self.headers: list[tuple[str, str]] = []  # the relayed ones (``keep_response_header``)
        self.content_type = ""
        self.error: UpstreamError | None = None
        self.waiter: asyncio.Future | None = None
        self.expiry = 0.0  # loop time by which the awaited bytes must come
        self.timer: asyncio.TimerHandle | None = None
        self.timer_when = 0.0
        self.timeout_what = "first-byte"
        self.paused = False
        self.finished = False  # released or closed

    # --- the proxy's side ---

    @property
    def state(self) -> int:
        return self.parser.state

    @property
    def at_eof(self) -> bool:
        """Everything the engine sent has been read and the body is complete."""
        return self.parser.state == DONE and not self.parser.body

    async def read(self, *, deadline: float | None = None, timeout: float | None = None) -> bytes:
        """The next body bytes as they arrive (``b""`` at the end), bounded by a loop-time
        ``deadline`` (first byte) or an idle ``timeout``."""
        parser = self.parser
        if not parser.body and parser.state != DONE and self.error is None:
            if deadline is not None:
                self.expiry, self.timeout_what = deadline, "first-byte"
            else:
                self.expiry, self.timeout_what = self.loop.time() + (timeout or 0.0), "idle"
            await self._wait()
        if parser.body:
            data = parser.take()
            if self.paused:
                self.paused = False
                self.conn.resume()
            return data
        if self.error is not None:
            raise self.error
        return b""

    def release(self) -> None:
        """The exchange is over: a connection whose response is complete goes back to the
        pool, any other is closed."""
        if self.finished:
            return
        if self.parser.state == DONE and not self.parser.close_after:
            self._end()
            self.conn.reusable()
        else:
            self.close()

    def close(self) -> None:
        """Close the connection (the engine sees the request abandoned)."""
        if not self.finished:
            self._end()
            self.conn.close()

    # --- the connection's side ---

    def _end(self) -> None:
        self.finished = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.conn.resp = None

    async def _wait(self) -> None:
        fut = self.waiter = self.loop.create_future()
        if self.timer is None or self.expiry < self.timer_when:
            if self.timer is not None:
                self.timer.cancel()
            self.timer_when = self.expiry
            self.timer = self.loop.call_at(self.expiry, self._on_timer)
        try:
            await fut
        finally:
            self.waiter = None

    def _on_timer(self) -> None:
        self.timer = None
        if self.waiter is None or self.waiter.done():
            return  # nobody waits: the next wait arms the timer again
        if self.expiry > self.timer_when:  # the deadline moved on since this timer was armed
            self.timer_when = self.expiry
            self.timer = self.loop.call_at(self.expiry, self._on_timer)
            return
        what = self.timeout_what
        self.waiter.set_exception(UpstreamTimeout(
            f"no answer from the engine within the first-byte timeout" if self.parser.state == HEAD
            else f"the engine sent nothing within the {what} timeout"))

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def fail(self, error: UpstreamError) -> None:
        if self.parser.state != DONE and self.error is None:
            self.error = error
            self._wake()

    def lost(self, exc: Exception | None) -> None:
        state = self.parser.state
        if self.parser.closed():
            self._wake()
        elif state == HEAD:
            if closed_by_peer(exc):
                self.fail(_Dropped(f"the engine closed the connection before answering ({exc or 'eof'})"))
            else:
                self.fail(ConnectFailed(f"the engine's host stopped answering ({exc})"))
        else:
            self.fail(UpstreamBroken(f"the engine's answer broke off ({exc or 'connection closed'})"))

    def feed(self, data: bytes) -> None:
        parser = self.parser
        head = parser.state == HEAD
        try:
            news = parser.feed(data)
        except ProtocolError as exc:  # what was parsed before the fault is still read first
            _, host, port = self.conn.key
            log.warning("malformed response from the engine at %s:%d, connection closed: %s", host, port, exc)
            if head and parser.state != HEAD:
                self._head()
            self.fail(UpstreamBroken(f"malformed response from the engine: {exc}"))
            self.conn.close()
            return
        if head and parser.state != HEAD:
            self._head()
        if news:
            self._wake()
        if parser.buffered > PAUSE_AT and not self.paused:
            self.paused = True
            self.conn.pause()

    def _head(self) -> None:
        """The final head is in: keep what is relayed."""
        parser = self.parser
        self.status = parser.status
        keep = self.headers
        for name, value in parser.headers:
            if keep_response_header(name):
                if name == "content-type":
                    self.content_type = value.split(";", 1)[0].strip().lower()
                keep.append((name.title(), value))


# --------------------------------------------------------------------------- connections


class Connection(asyncio.Protocol):
    """One keep-alive connection to an engine; one exchange at a time."""

    def __init__(self, pool: "Upstream", key: tuple[str, str, int]) -> None:
        self.pool = pool
        self.key = key
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.resp: Response | None = None
        self.closed = False
        self.reused = False  # it served a complete exchange before
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.pool.open_conns.add(self)
        drop_unacked_after(transport, self.pool.options.connect_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.open_conns.discard(self)
        if self.resp is not None:
            self.resp.lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.resp is not None:
            self.resp.feed(data)
        else:
            self.close()  # bytes nobody asked for: the connection is out of step

    def eof_received(self) -> bool:
        return False  # close; ``connection_lost`` ends an until-close body

    def send(self, data: bytes, head_only: bool) -> Response:
        self.resp = resp = Response(self, head_only)
        self.transport.write(data)  # type: ignore[union-attr]
        return resp

    def pause(self) -> None:
        if not self.closed:
            self.transport.pause_reading()  # type: ignore[union-attr]

    def resume(self) -> None:
        if not self.closed:
            self.transport.resume_reading()  # type: ignore[union-attr]

    def reusable(self) -> None:
        self.reused = True
        self.pool.put(self)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.transport.close()  # type: ignore[union-attr]


def drop_unacked_after(transport: asyncio.BaseTransport, seconds: float) -> None:
    """Have the kernel abort the connection when data it sent stays unacknowledged for
    ``seconds`` (Linux ``TCP_USER_TIMEOUT``). Why: a request written to a pooled connection of a
    host that has dropped off the network (cable, switch, partition) is otherwise retransmitted
    for ~15 minutes and the exchange hangs until the first-byte timeout; with it the connection
    fails like a refused one and the request goes to another instance. An engine that is merely
    slow still acknowledges at once (its kernel does), so long prompts are not affected."""
    sock = transport.get_extra_info("socket")
    option = getattr(socket, "TCP_USER_TIMEOUT", None)
    if sock is not None and option is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, option, int(seconds * 1000))
        except OSError:
            pass


class Endpoint:
    """An engine base URL, parsed once."""

    __slots__ = ("key", "host_header", "base_path")

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        scheme = parts.scheme or "http"
        if scheme not in ("http", "https") or not parts.hostname:
            raise ConnectFailed(f"unsupported engine URL {url!r}")
        port = parts.port or (443 if scheme == "https" else 80)
        self.key = (scheme, parts.hostname, port)
        self.host_header = parts.netloc.rsplit("@", 1)[-1]
        self.base_path = parts.path.rstrip("/")


def encode_request(method: str, target: str, host: str, headers: Iterable[tuple[str, str]], body: bytes) -> bytes:
    head = [f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n"]
    head += [f"{k}: {v}\r\n" for k, v in headers]
    if body or method in ("POST", "PUT", "PATCH"):
        head.append(f"Content-Length: {len(body)}\r\n")
    head.append("\r\n")
    return "".join(head).encode("latin-1") + body


class Upstream:
    """The router's one client to every engine: a pool of keep-alive connections per engine."""

    KEEPALIVE = 4.0  # shorter than uvicorn's 5 s: a pooled connection is not reused as the engine closes it

    def __init__(self, options: RouterOptions) -> None:
        self.options = options
        self.idle: dict[tuple[str, str, int], list[Connection]] = {}
        self.open_conns: set[Connection] = set()
        self.endpoints: dict[str, Endpoint] = {}
        self.max_idle = options.upstream_connections  # per engine

    def endpoint(self, url: str) -> Endpoint:
        ep = self.endpoints.get(url)
        if ep is None:
            if len(self.endpoints) > 4096:
                self.endpoints.clear()
            ep = self.endpoints[url] = Endpoint(url)
        return ep

    async def open(self, method: str, base_url: str, target: str, headers: list[tuple[str, str]], body: bytes,
                   deadline: float) -> Response:
        """Send the request to ``base_url`` + ``target``; return once the response head is in
        (by ``deadline``, a loop time). Raises ``ConnectFailed``, ``UpstreamTimeout``."""
        ep = self.endpoint(base_url)
        data = encode_request(method, ep.base_path + target, ep.host_header, headers, body)
        conn = self.take(ep.key)
        if conn is None:
            conn = await self.connect(ep.key, deadline)
        resp = conn.send(data, method == "HEAD")
        try:
            try:
                await self.head(resp, deadline)
            except _Dropped:
                if not conn.reused:
                    raise
                resp.close()  # a stale pooled connection: once more on a fresh one
                resp = (await self.connect(ep.key, deadline)).send(data, method == "HEAD")
                await self.head(resp, deadline)
        except BaseException:
            resp.close()
            raise
        return resp

    @staticmethod
    async def head(resp: Response, deadline: float) -> None:
        if resp.state == HEAD and resp.error is None:
            resp.expiry = deadline
            await resp._wait()
        if resp.state == HEAD and resp.error is not None:
            raise resp.error

    async def connect(self, key: tuple[str, str, int], deadline: float) -> Connection:
        scheme, host, port = key
        loop = asyncio.get_running_loop()
        limit = min(self.options.connect_timeout, max(deadline - loop.time(), 0.0))
        try:
            async with asyncio.timeout(limit):
                _, conn = await loop.create_connection(
                    lambda: Connection(self, key), host, port,
                    ssl=ssl.create_default_context() if scheme == "https" else None)
        except TimeoutError:
            raise ConnectFailed(f"cannot reach {host}:{port}: connect timeout") from None
        except OSError as exc:
            raise ConnectFailed(f"cannot reach {host}:{port}: {exc.strerror or exc}") from None
        return conn

    def take(self, key: tuple[str, str, int]) -> Connection | None:
        conns = self.idle.get(key)
        if not conns:
            return None
        stale = asyncio.get_running_loop().time() - self.KEEPALIVE
        while conns:
            conn = conns.pop()  # the most recently used: the least likely to be closed
            if not conn.closed and conn.idle_since > stale:
                return conn
            conn.close()
        return None

    def put(self, conn: Connection) -> None:
        conns = self.idle.setdefault(conn.key, [])
        now = conn.loop.time()
        # the oldest are at the front: drop those past keep-alive (take() only sees the newest)
        while conns and (conns[0].closed or conns[0].idle_since < now - self.KEEPALIVE):
            conns.pop(0).close()
        if len(conns) >= self.max_idle:
            conn.close()
            return
        conn.idle_since = now
        conns.append(conn)

    async def close(self) -> None:
        for conn in list(self.open_conns):
            conn.close()
        self.idle.clear()
        await asyncio.sleep(0)  # let the transports close
