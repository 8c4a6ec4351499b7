"""The lean path for forwarded ``/v1`` requests: an ``HTTPMessageDelegate`` of the router's own.

Why: a forwarded request through ``tornado.web`` pays for routing (``find_handler``), a
``RequestHandler`` (``initialize``, ``clear``, ``_execute`` as a coroutine plus a body future,
``flush``/``finish`` and their bookkeeping) and an ``HTTPServerRequest``: about a sixth of the
router's CPU per request under load, for a handler that only relays bytes (issue 16). Here the
request is read by Tornado's ``HTTP1Connection`` as before (head parsing, body framing, size
limit, ``100-continue``, keep-alive, chunked or sized answers, HEAD) and handed straight to
``Proxy.forward``; only the web layer above the connection is skipped.

``Dispatcher.start_request`` cannot know the path yet (the head is not read), so each request
gets a ``_Dispatch`` that decides at ``headers_received``: a forwarded ``/v1`` path with a
method the proxy takes goes to ``Exchange``; anything else (``/v1/models``, ``/api``, the
dashboard, a method Tornado answers with 405) to the ``tornado.web.Application`` as before.

``Exchange`` keeps what ``handlers.BaseHandler`` guarantees the router's own routes: the key
check (a forwarded route's access is ``client``) and the caller's profile, the path and size
checks, errors in OpenAI's shape, ``Server``/``Date`` headers, the write timeout, cancellation
when the client leaves, the shutdown rules of ``run_cancellable``; then the access log and
metrics once the answer is over. It is the one pipeline of forwarded requests.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Awaitable, Iterable

import tornado.web
from redis.exceptions import RedisError
from tornado import httputil
from tornado.concurrent import Future
from tornado.httputil import HTTPHeaders, format_timestamp
from tornado.iostream import StreamClosedError

from llm_lab_router.router.observe.accesslog import CLIENT_GONE, RequestRecord
from llm_lab_router.router.http.auth import COOKIE, SAFE_METHODS, AccessPolicy
from llm_lab_router.router.http.handlers import JSON, await_write, cut_short, log
from llm_lab_router.router.http.origin import Answer, CorsConnection, SitePolicy
from llm_lab_router.router.http.routes import FORWARDED_ACCESS
from llm_lab_router.router.http.validate import check_forward_path
from llm_lab_router.router.forward.proxy import ProxyRequest
from llm_lab_router.router.core.errors import ApiError, as_api_error, encode, error_body
from llm_lab_router.router.services import Services

app_log = logging.getLogger("tornado.application")
gen_log = logging.getLogger("tornado.general")
# The methods forwarded: those Tornado's handlers take (``RequestHandler.SUPPORTED_METHODS``);
# any other (TRACE...) is left to the application, which answers 405 in OpenAI's shape.
METHODS = frozenset(tornado.web.RequestHandler.SUPPORTED_METHODS)
NO_CONTENT_HEADERS = ("Content-Encoding", "Content-Language", "Content-Type")  # Tornado drops them on 204/304
SERVER = f"TornadoServer/{tornado.version}"
UNSAFE_VALUE = re.compile(r"[^\t\x20-\x7e\x80-\xff]")  # what Tornado refuses in a header value
_date: tuple[int, str] = (0, "")


def http_date() -> str:
    """The ``Date`` header's value, formatted once a second."""
    global _date
    now = int(time.time())
    if _date[0] != now:
        _date = (now, format_timestamp(now))
    return _date[1]


def add_relayed(out: HTTPHeaders, headers: list[tuple[str, str]]) -> bool:
    """Add an answer's headers to ``out``; ``False`` (nothing added) if a value is unsafe. The
    engine's header names are tokens already (llm_router/http1.py) and the router's constants:
    one check of all the values at once, then plain sets."""
    if UNSAFE_VALUE.search("".join(v for _, v in headers)):
        return False
    for name, value in headers:
        if name in out:
            out.add(name, value)
        else:
            out[name] = value
    return True


class Dispatcher(httputil.HTTPServerConnectionDelegate):
    """Forwarded ``/v1`` requests to ``Exchange``, the rest to ``app``. ``own_v1``: the
    ``/v1`` routes the router answers itself (``/v1/models``...), as compiled patterns."""

    def __init__(self, app: tornado.web.Application, services: Services, access: AccessPolicy,
                 own_v1: list[re.Pattern[str]], site: SitePolicy | None = None) -> None:
        self.app = app
        self.services = services
        self.access = access
        self.own_v1 = own_v1
        self.site = site  # what a browser page may ask (router/http/origin.py)

    def start_request(self, server_conn: object, request_conn: httputil.HTTPConnection) -> httputil.HTTPMessageDelegate:
        return _Dispatch(self, server_conn, request_conn)

    def on_close(self, server_conn: object) -> None:
        self.app.on_close(server_conn)

    def forwards(self, method: str, path: str) -> bool:
        return path.startswith("/v1/") and method in METHODS and not any(p.match(path) for p in self.own_v1)


class _Dispatch(httputil.HTTPMessageDelegate):
    """One request's delegate until its head says where it goes; then its calls go there."""

    __slots__ = ("dispatcher", "server_conn", "conn", "inner")

    def __init__(self, dispatcher: Dispatcher, server_conn: object, conn: httputil.HTTPConnection) -> None:
        self.dispatcher = dispatcher
        self.server_conn = server_conn
        self.conn = conn
        self.inner: httputil.HTTPMessageDelegate | None = None

    def headers_received(self, start_line: httputil.RequestStartLine | httputil.ResponseStartLine,
                         headers: httputil.HTTPHeaders) -> Awaitable[None] | None:
        assert isinstance(start_line, httputil.RequestStartLine)
        d = self.dispatcher
        path, _, query = start_line.path.partition("?")
        conn = self.conn
        if d.site is not None:
            if (err := d.site.refusal(start_line.method, path, headers)) is not None:
                self.inner = Answer.refusal(conn, err, start_line.method, path)
                return self.inner.headers_received(start_line, headers)
            if (origin := d.site.cors_origin(headers)) is not None:
                if start_line.method == "OPTIONS" and "Access-Control-Request-Method" in headers:
                    self.inner = Answer.preflight(conn, origin)
                    return self.inner.headers_received(start_line, headers)
                conn = CorsConnection(conn, origin)  # type: ignore[assignment]
        if d.forwards(start_line.method, path):
            self.inner = Exchange(d.services, d.access, conn, start_line.method, path, query)
        else:
            self.inner = d.app.start_request(self.server_conn, conn)
        return self.inner.headers_received(start_line, headers)

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        assert self.inner is not None
        return self.inner.data_received(chunk)

    def finish(self) -> None:
        assert self.inner is not None
        self.inner.finish()

    def on_connection_close(self) -> None:
        if self.inner is not None:
            self.inner.on_connection_close()


class Exchange(httputil.HTTPMessageDelegate):
    """One forwarded request: checks at the head, the body gathered, ``Proxy.forward`` in a task
    of its own, and the proxy's ``Sink`` (``begin``/``send``/``abort``) writing to the connection."""

    def __init__(self, services: Services, access: AccessPolicy, conn: httputil.HTTPConnection,
                 method: str, path: str, query: str) -> None:
        self.services = services
        self.access = access
        self.conn = conn
        self.method = method
        self.path = path
        self.query = query
        self.received_at = time.monotonic()
        self.record = RequestRecord(method, path, self.received_at)
        self.record.conn = conn
        self.headers: httputil.HTTPHeaders | None = None
        self.chunks: list[bytes] = []
        self.status = 200
        self.out = self._fresh_headers()
        self.headers_written = False
        self.finished = False
        self.client_gone = False
        self.work: asyncio.Task | None = None

    @staticmethod
    def _fresh_headers() -> httputil.HTTPHeaders:
        out = httputil.HTTPHeaders()
        out["Server"] = SERVER
        out["Date"] = http_date()
        return out

    # --- the request, as Tornado reads it ---

    def headers_received(self, start_line: httputil.RequestStartLine | httputil.ResponseStartLine,
                         headers: httputil.HTTPHeaders) -> None:
        self.headers = headers
        try:
            self._check(headers)
        except Exception as exc:  # answered now; HTTP1Connection drops the body and closes
            self._fail(exc)

    def _check(self, headers: httputil.HTTPHeaders) -> None:
        """As ``BaseHandler.prepare``: the key, then the path and the announced size."""
        access = self.access
        if access.enabled:
            authorization = headers.get("Authorization")
            cookie = None
            if not authorization and self.method in SAFE_METHODS and "Cookie" in headers:
                cookie = httputil.parse_cookie(headers["Cookie"]).get(COOKIE)
            self.record.caller = access.check(self.method, FORWARDED_ACCESS, authorization, cookie)
        check_forward_path(self.path)
        length = headers.get("Content-Length", "0")
        limit = self.services.options.max_body_size
        if length.isdigit() and int(length) > limit:
            raise ApiError(413, f"request body of {length} bytes is over the limit of {limit} bytes",
                           "body_too_large")

    def data_received(self, chunk: bytes) -> None:
        self.chunks.append(chunk)

    def finish(self) -> None:
        """The body is in: forward it in a task of its own, cancelled if the client leaves."""
        self.conn.set_close_callback(self.on_connection_close)
        self.work = asyncio.get_running_loop().create_task(self._run())

    def on_connection_close(self) -> None:
        self.client_gone = True
        if self.work is not None:
            self.work.cancel()

    async def _run(self) -> None:
        assert self.headers is not None
        req = ProxyRequest(method=self.method, path=self.path, query=self.query,
                           headers=list(self.headers.get_all()), body=b"".join(self.chunks),
                           received_at=self.received_at)
        self.chunks = []
        task = asyncio.current_task()
        assert task is not None
        requests = self.services.requests
        requests.add(task)
        try:
            try:
                await self.services.proxy.forward(req, self, self.record)
            except (asyncio.CancelledError, StreamClosedError):
                gone = self.client_gone or self._closed()
                if not cut_short(task, gone, self.services.shutdown, self.headers_written, self.abort):
                    raise
            finally:
                requests.discard(task)
            if not self.finished:
                self._finish(b"")
        except Exception as exc:
            self._fail(exc)
        finally:
            self.work = None

    def _closed(self) -> bool:
        stream = getattr(self.conn, "stream", None)
        return stream is None or stream.closed()

    # --- the proxy's Sink ---

    def begin(self, status: int, headers: Iterable[tuple[str, str]]) -> None:
        """The answer's head: one check of all the values (``add_relayed``), then plain sets,
        instead of ``add_header``'s three regular expressions per header."""
        self.status = status
        if not add_relayed(self.out, headers if isinstance(headers, list) else list(headers)):
            raise ValueError("Unsafe header value")  # what Tornado's add_header raises

    async def send(self, data: bytes, last: bool = False) -> None:
        """Write and flush at once; ``last`` ends the answer (see ``BaseHandler.send``)."""
        written = self._finish(data) if last else self._flush(data)
        await await_write(written, self.services.options.write_timeout, self.write_timed_out)

    def write_timed_out(self, timeout: float) -> None:
        model = self.record.model
        remote = getattr(getattr(self.conn, "context", None), "remote_ip", "")
        log.warning("client %s stopped reading %s %s (model %r): a write not taken within %gs, request ended",
                    remote, self.method, self.path, model, timeout)
        self.services.metrics.abort(model, "write_timeout")
        self.client_gone = True
        self.abort()

    def abort(self) -> None:
        """Drop the connection: the client must see that the answer it got is incomplete."""
        self.conn.close()  # type: ignore[attr-defined]

    # --- writing (RequestHandler.flush and finish, less what a relay never uses) ---

    def _flush(self, chunk: bytes) -> "Future[None]":
        if not self.headers_written:
            self.headers_written = True
            if self.method == "HEAD":
                chunk = b""
            start_line = httputil.ResponseStartLine("", self.status, httputil.responses.get(self.status, "Unknown"))
            return self.conn.write_headers(start_line, self.out, chunk)
        if self.method != "HEAD":
            return self.conn.write(chunk)
        done: Future[None] = Future()
        done.set_result(None)
        return done

    def _finish(self, chunk: bytes) -> "Future[None]":
        if self.finished:
            raise RuntimeError("finish() called twice")
        if not self.headers_written:
            status = self.status
            if status in (204, 304) or 100 <= status < 200:
                if chunk:
                    raise RuntimeError(f"Cannot send body with status code HTTP{status}")
                for name in NO_CONTENT_HEADERS:
                    self.out.pop(name, None)
            elif "Content-Length" not in self.out:
                self.out["Content-Length"] = str(len(chunk))
        self.conn.set_close_callback(None)
        future = self._flush(chunk)
        self.conn.finish()
        self.finished = True
        self.services.finished(self.record, CLIENT_GONE if self.client_gone else self.status)
        return future

    def _fail(self, exc: Exception) -> None:
        """``RequestHandler._handle_request_exception`` with ``BaseHandler.write_error``: an
        error body in OpenAI's shape, or, once the head is out, the answer ended as it is."""
        if not isinstance(exc, (ApiError, tornado.web.HTTPError, RedisError)):
            app_log.error("Uncaught exception %s %s", self.method, self.path, exc_info=exc)
        if self.finished:
            return
        if self.headers_written:
            gen_log.error("Cannot send error response after headers written")
            try:
                self._finish(b"")
            except Exception:
                gen_log.error("Failed to flush partial response", exc_info=True)
            return
        err = as_api_error(500, exc)
        self.status = err.status
        self.out = self._fresh_headers()
        for name, value in err.headers.items():
            self.out[name] = value
        self.out["Content-Type"] = JSON
        self._finish(encode(error_body(err, True)))
