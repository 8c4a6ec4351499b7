"""HTTP handlers: parse, call a service, write. Everything shared lives in ``BaseHandler``:
JSON replies, error bodies in the caller's shape, and cancellation when the client leaves."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable

import msgspec
import tornado.web
from redis.exceptions import RedisError
from tornado.iostream import StreamClosedError

from llm_lab_router.audit import NO_NAME, Action
from llm_lab_router.clock import CLOCK
from llm_lab_router.ledger import hour_of
from llm_lab_router.router.control.admin import InScope
from llm_lab_router.router.control.client import Origin
from llm_lab_router.router.core.responses import AuditList, Outcome, UsageReport, audit_fields
from llm_lab_router.router.http.auth import COOKIE, SAFE_METHODS, Access, AccessPolicy, Role
from llm_lab_router.router.limits.access import Access as Permissions
from llm_lab_router.router.observe.ledger import read_hours, report, totals
from llm_lab_router.router.limits.profile import KeyProfile
from llm_lab_router.router.http.debug import debug_stats
from llm_lab_router.router.http.validate import check_query
from llm_lab_router.router.observe.metrics import CONTENT_TYPE
from llm_lab_router.router.http.query import TIMELINE, RouteParams, route_params
from llm_lab_router.router.core.errors import ApiError, as_api_error, encode, error_body
from llm_lab_router.router.services import Services

JSON = "application/json"
log = logging.getLogger("router")


async def await_write(written: Awaitable[None], timeout: float, timed_out: Callable[[float], None]) -> None:
    """Wait for a write to the client; one not taken within ``timeout`` calls ``timed_out`` (which
    cuts the client off) and raises ``StreamClosedError``. The timer is armed only for a write
    that did not complete at once: a client that keeps up costs nothing."""
    if not written.done():  # type: ignore[attr-defined]
        if not (await asyncio.wait((written,), timeout=timeout))[0]:  # type: ignore[arg-type]
            timed_out(timeout)
            raise StreamClosedError()
    await written


def cut_short(task: asyncio.Task, gone: bool, shutdown: asyncio.Event, headers_written: bool,
              abort: Callable[[], None]) -> bool:
    """A request's work was cancelled or its client stream closed: ``True`` when that is its
    normal end (the client is ``gone``: nobody to answer; or a shutdown outlasted its grace
    period and the answer, already begun, is cut off), ``False`` when the caller must re-raise.
    A shutdown before the answer began is a 503."""
    if not gone and not shutdown.is_set():
        return False
    task.uncancel()
    if gone:
        return True
    if headers_written:
        abort()
        return True
    raise ApiError(503, "the router is shutting down", "shutting_down") from None


@tornado.web.stream_request_body
class BaseHandler(tornado.web.RequestHandler):
    """Bodies are streamed in (``stream_request_body``) so that ``prepare`` (the key, the query,
    the announced size) runs before a byte of the body is read: an anonymous or oversized
    request costs the router no memory. ``/api`` routes read no body: it is dropped as it comes."""

    services: Services

    def initialize(self, services: Services, access: Access = "read", query: tuple[str, ...] = ()) -> None:
        """``access`` and ``query``: the route's (router/http/routes.py); a path no route
        matches (``NotFoundHandler``) is a ``read`` one with no parameters."""
        self.services = services
        self.access = access
        self.query = query  # the query parameters this route takes (names of router/http/query.py's RouteParams)
        self._work: asyncio.Task | None = None
        self._client_gone = False
        self.caller: KeyProfile | None = None  # the key's name and limits (structured keys files)

    # --- checks before the body ---

    def prepare(self) -> None:
        policy: AccessPolicy | None = self.settings.get("access")
        if policy is not None and policy.enabled:  # no keys: no work at all
            req = self.request
            method = req.method or "GET"
            authorization = req.headers.get("Authorization")
            # the cookie counts only without a header and on a safe method: parse it only then
            cookie = self.get_cookie(COOKIE) if not authorization and method in SAFE_METHODS else None
            self.caller = policy.check(method, self.access, authorization, cookie)
        self.check_request()

    @property
    def permissions(self) -> Permissions | None:
        """The caller's permissions (``None``: none set, everything its role allows)."""
        return self.caller.access if self.caller is not None else None

    def visible(self) -> InScope | None:
        """The models the caller may use, as a test (``None``: all)."""
        perms = self.permissions
        return perms.may_use if perms is not None and perms.models is not None else None

    def admin_scope(self) -> InScope | None:
        """The caller's admin scope, as a test (``None``: the whole lab)."""
        perms = self.permissions
        return perms.may_administer if perms is not None and perms.admin is not None else None

    def check_scope(self, alias: str) -> None:
        """403 unless the model ``alias`` is within the caller's admin scope."""
        if (perms := self.permissions) is not None and perms.admin is not None:
            perms.check_admin(alias, self.services.manager.names(alias))

    def role(self) -> tuple[Role, KeyProfile | None]:
        """The caller's role and profile (a route that answers each role differently); 401
        without a key."""
        access: AccessPolicy | None = self.settings.get("access")
        if access is None:
            return Role.ADMIN, None
        req = self.request
        authorization = req.headers.get("Authorization")
        cookie = self.get_cookie(COOKIE) if not authorization and req.method in SAFE_METHODS else None
        role, profile = access.role(req.method or "GET", authorization, cookie)
        if role is Role.PUBLIC:
            raise ApiError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'", "missing_api_key")
        return role, profile

    @property
    def origin(self) -> Origin:
        """The caller as the audit trail names it: its key's name and its address."""
        return Origin.of(self.caller, self.request.remote_ip or "", on_demand=False)

    @asynccontextmanager
    async def audited(self, action: Action, model: str = "") -> AsyncIterator[Outcome]:
        """Record the admin action run in the block in the audit trail, however it ends: the
        caller, the model(s) and hosts its answer (``Outcome.body``) names, or the error."""
        out = Outcome()
        origin = self.origin
        try:
            yield out
        except Exception as exc:
            err = as_api_error(500, exc)
            await self.services.audit.record(origin.who, action, model=model, client=origin.client,
                                             result=f"{err.status} {err.message}")
            raise
        await self.services.audit.record(origin.who, action, client=origin.client,
                                         **audit_fields(out.body, model))

    def check_request(self) -> None:
        check_query(self.request.query_arguments, self.query)
        self.check_length(self.services.options.max_api_body_size)

    @property
    def params(self) -> RouteParams:
        return route_params(self.services.options)

    @property
    def query_args(self) -> dict[str, list[bytes]]:
        """The query as sent: ``get_query_argument`` strips whitespace (see router/http/query.py)."""
        return self.request.query_arguments

    def check_length(self, limit: int) -> None:
        length = self.request.headers.get("Content-Length", "0")
        if length.isdigit() and int(length) > limit:
            raise ApiError(413, f"request body of {length} bytes is over the limit of {limit} bytes",
                           "body_too_large")

    def data_received(self, chunk: bytes) -> None:
        pass  # an /api route takes no body

    # --- replies ---

    def compute_etag(self) -> None:
        return None  # live state: nothing here may be served from a cache

    def reply(self, body: msgspec.Struct, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", JSON)
        self.finish(encode(body))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """Errors in the caller's shape: OpenAI's on ``/v1/*`` (SDKs raise the matching
        exception), ``{"success": false, "message"}`` elsewhere."""
        exc = kwargs.get("exc_info", (None, None, None))[1]
        err = as_api_error(status_code, exc)
        self.set_status(err.status)
        for name, value in err.headers.items():
            self.set_header(name, value)
        self.set_header("Content-Type", JSON)
        self.finish(encode(error_body(err, self.request.path.startswith("/v1/"))))

    def log_exception(self, typ, value, tb) -> None:  # type: ignore[override]
        if isinstance(value, (ApiError, tornado.web.HTTPError, RedisError)):
            return  # expected outcomes: the request log line (status) says enough
        super().log_exception(typ, value, tb)

    # --- streaming and cancellation ---

    async def send(self, data: bytes, last: bool = False) -> None:
        """Write and flush at once: streamed bytes must not wait in a buffer. ``last`` bytes
        finish the response (sent with a Content-Length when nothing was sent before).

        A write the client does not take within ``write_timeout`` (it stopped reading and the
        socket buffers are full) ends the request: the connection is closed and
        ``StreamClosedError`` raised, as when the client leaves, so the caller's engine request
        and concurrency slot go at once. The timer is armed only for a write that did not
        complete at once: a client that keeps up costs nothing."""
        if last:
            written = self.finish(data)
        else:
            self.write(data)
            written = self.flush()
        await await_write(written, self.services.options.write_timeout, self.write_timed_out)

    def write_timed_out(self, timeout: float) -> None:
        """The client did not take a write within ``timeout`` seconds: cut it off, log, count."""
        model = self.metrics_model()
        log.warning("client %s stopped reading %s %s (model %r): a write not taken within %gs, request ended",
                    self.request.remote_ip, self.request.method, self.request.path, model, timeout)
        self.services.metrics.abort(model, "write_timeout")
        self._client_gone = True
        self.abort()

    def metrics_model(self) -> str:
        """The ``model`` label of this request's metrics (``""``: not a model request)."""
        return ""

    async def run_cancellable(self, work: Awaitable[None]) -> None:
        """Run ``work`` in this request's own task, which is cancelled the moment the client
        disconnects (``on_connection_close``), so an upstream request or a log follow never
        outlives its client. No second task per request: the handler's task is the one cancelled."""
        task = asyncio.current_task()
        assert task is not None
        self._work = task
        self.services.requests.add(task)
        try:
            await work
        except (asyncio.CancelledError, StreamClosedError):
            gone = self._client_gone or self.request.connection.stream.closed()  # type: ignore[attr-defined]
            if not cut_short(task, gone, self.services.shutdown, self._headers_written, self.abort):
                raise
        finally:
            self.services.requests.discard(task)
            self._work = None

    def abort(self) -> None:
        """Drop the connection: the client must see that the answer it got is incomplete."""
        self.request.connection.close()  # type: ignore[attr-defined]

    def on_connection_close(self) -> None:
        self._client_gone = True
        if self._work is not None:
            self._work.cancel()


class RootHandler(BaseHandler):
    def get(self) -> None:
        self.reply(self.services.manager.server_info())


class HealthHandler(BaseHandler):
    def get(self) -> None:
        self.reply(self.services.manager.health())


class ModelsHandler(BaseHandler):
    def get(self) -> None:
        self.reply(self.services.manager.model_list(self.visible()))


class ModelHandler(BaseHandler):
    """``GET /v1/models/{id}`` (OpenAI's retrieve)."""

    def get(self, name: str) -> None:
        if (perms := self.permissions) is not None:
            perms.check_use(name, self.services.manager.names(name))
        self.reply(self.services.manager.model(name))


class StartHandler(BaseHandler):
    async def post(self, alias: str) -> None:
        wait = self.params.wait.parse(self.query_args)
        worker = self.params.worker.parse(self.query_args)
        async with self.audited("start", alias) as out:
            self.check_scope(alias)
            status, out.body = await self.services.manager.start(alias, wait, worker, self.origin)
        self.reply(out.body, status)


class StopHandler(BaseHandler):
    async def post(self, alias: str) -> None:
        worker = self.params.worker.parse(self.query_args)
        async with self.audited("stop", alias) as out:
            self.check_scope(alias)
            out.body = await self.services.manager.stop(alias, worker)
        self.reply(out.body)


class StopAllHandler(BaseHandler):
    async def post(self) -> None:
        async with self.audited("stop_all") as out:
            out.body = await self.services.manager.stop_all(self.admin_scope())
        self.reply(out.body)


class RestartAutostartHandler(BaseHandler):
    async def post(self) -> None:
        async with self.audited("restart_autostart") as out:
            out.body = await self.services.manager.restart_autostart(self.admin_scope())
        self.reply(out.body)


class ModelInfoHandler(BaseHandler):
    async def get(self, alias: str) -> None:
        self.reply(await self.services.manager.model_info_now(alias))


class LogStatsHandler(BaseHandler):
    async def get(self) -> None:
        self.reply(await self.services.manager.log_stats())


class LogClearHandler(BaseHandler):
    async def post(self, alias: str) -> None:
        keep_minutes = self.params.keep_minutes.parse(self.query_args)
        async with self.audited("clear_logs", alias) as out:
            self.check_scope(alias)
            out.body = await self.services.manager.clear_logs(alias, keep_minutes)
        self.reply(out.body)


class UsageHandler(BaseHandler):
    """``GET /api/usage``: the usage ledger (router/observe/ledger.py); an admin key sees every
    key, a client key its own rows only."""

    async def get(self) -> None:
        since = self.params.since.parse(self.query_args)
        by = self.params.by.parse(self.query_args)
        role, caller = self.role()
        only = None if role is Role.ADMIN else caller.name if caller is not None else NO_NAME
        until = CLOCK.now()  # the ledger's hours are on Redis's clock
        rows = report(await read_hours(self.services.redis, self.services.keys, until - since, until), by, only)
        access: AccessPolicy | None = self.settings.get("access")
        if role is Role.ADMIN:  # every group's budget; a client: its own group's
            budgets = access.ring.budgets() if access is not None else []
        else:
            budgets = [caller.budget] if caller is not None and caller.budget is not None else []
        self.reply(UsageReport(since=hour_of(until - since), until=until, by=by, rows=rows, total=totals(rows),
                               budgets=await self.services.budgets.states(budgets)))


class AuditHandler(BaseHandler):
    """``GET /api/audit``: the audit trail (admin), oldest first (llm_router/audit.py)."""

    async def get(self) -> None:
        since = self.params.since.parse(self.query_args)
        limit = self.params.limit.parse(self.query_args)
        self.reply(AuditList(entries=await self.services.audit.read(CLOCK.now() - since, limit)))


class DevicesHandler(BaseHandler):
    async def get(self) -> None:
        await self.services.view.refresh_details()
        self.reply(self.services.manager.devices())


class HistoryHandler(BaseHandler):
    """``GET /api/history``: one series of the timeline (router/observe/history_query.py)."""

    async def get(self) -> None:
        q, args, now = TIMELINE, self.query_args, CLOCK.now()
        self.reply(await self.services.timeline.history(
            q.series.parse(args), q.model.parse(args), q.host.parse(args), q.gpu.parse(args),
            q.start.parse(args, now, now - 3600), q.end.parse(args, now, now), q.step.parse(args), now))


class EventsHandler(BaseHandler):
    """``GET /api/events``: what happened, oldest first (router/observe/history_query.py)."""

    async def get(self) -> None:
        q, args, now = TIMELINE, self.query_args, CLOCK.now()
        self.reply(await self.services.timeline.events(
            q.start.parse(args, now, now - 3600), q.end.parse(args, now, now), q.limit.parse(args),
            q.model.parse(args), q.host.parse(args), q.kind.parse(args)))


class PlanHandler(BaseHandler):
    async def get(self) -> None:
        await self.services.view.refresh_details()
        self.reply(await self.services.manager.plan(self.params.worker.parse(self.query_args)))


class LogStreamHandler(BaseHandler):
    async def get(self, alias: str) -> None:
        params = self.params
        tail = params.tail.parse(self.query_args)
        last_id = params.last_event_id.parse(self.query_args, self.request.headers.get("Last-Event-ID"))
        model = await self.services.manager.log_model(alias)
        self.set_header("Content-Type", "text/event-stream")
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Accel-Buffering", "no")
        # Events go out as written: without this, Nagle holds each page of history after the
        # first until the client's delayed ACK (~40 ms a page).
        self.request.connection.stream.set_nodelay(True)  # type: ignore[attr-defined]
        await self.run_cancellable(self.services.logs.stream(model, self.send, tail=tail, last_id=last_id))


class MetricsHandler(BaseHandler):
    """``GET /metrics``: Prometheus text format (router/observe/metrics.py, docs/metrics.md)."""

    async def get(self) -> None:
        await self.services.view.refresh_details()
        self.set_header("Content-Type", CONTENT_TYPE)
        self.finish(self.services.metrics.render())


class OpenApiHandler(BaseHandler):
    """``GET /openapi.json``: the document ``make_app`` rendered from the route table."""

    def get(self) -> None:
        self.set_header("Content-Type", JSON)
        self.finish(self.settings["openapi"])


class DebugStatsHandler(BaseHandler):
    """``GET /debug/stats``: the router's tasks, descriptors and memory (leak checks). Off
    unless ``LLM_ROUTER_DEBUG_ENDPOINTS=1``; an admin route when keys are on."""

    def get(self) -> None:
        if not self.services.options.debug_endpoints:
            raise ApiError(404, "no route GET /debug/stats (off: set LLM_ROUTER_DEBUG_ENDPOINTS=1)",
                           "route_not_found")
        self.reply(debug_stats())


class NotFoundHandler(BaseHandler):
    """Any route not in the table, any method: 404 in the caller's shape."""

    def prepare(self) -> None:
        raise ApiError(404, f"no route {self.request.method} {self.request.path}", "route_not_found")
