"""OpenAI forwarding: ``/v1/*`` requests to a running instance of the model they name.

Per request: decode only ``model`` and ``stream`` (msgspec, or the form part of a multipart
upload), resolve alias -> model, check the route fits the model's mode, make sure an instance
runs (start on demand, shared), pick one (least outstanding requests) and relay the exchange
chunk by chunk, body bytes untouched both ways. All of it reads the in-memory cluster view: a
request for a running model costs no Redis round trip.

Failure policy, from what users of other routers hit:

- connection refused / dropped before answering: try another instance, else 502 at once;
- no first byte within the first-byte timeout: 504;
- the engine dies or stalls mid-stream: the client keeps the bytes so far and the stream ends
  cleanly, with an SSE ``error`` event when it ended without ``[DONE]`` (never a hang);
- the client goes away: the upstream request is closed at once (the engine stops generating).
"""

from __future__ import annotations

import asyncio
import re
import time
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager, nullcontext
from typing import Any, AsyncIterator, Callable, Iterable

import msgspec
from llm_lab_router.protocol import CatalogEntry, Instance, Mode
from llm_lab_router.router.control.client import ControlClient, ControlError, Origin, describe_failure, start_failed
from llm_lab_router.router.control.explain import slot_reason
from llm_lab_router.router.control.in_use import UsageReporter
from llm_lab_router.router.core.errors import ApiError
from llm_lab_router.router.core.options import RouterOptions
from llm_lab_router.router.core.view import ClusterView
from llm_lab_router.router.forward.affinity import routing_key
from llm_lab_router.router.forward.balancer import Balancer
from llm_lab_router.router.forward.fallbacks import fallback_chain, with_model
from llm_lab_router.router.forward.json_depth import check_json_depth
from llm_lab_router.router.forward.loading_stream import LoadingStream, Sink, error_event
from llm_lab_router.router.forward.upstream import (
    ConnectFailed,
    InvalidHeader,
    Response,
    Upstream,
    UpstreamBroken,
    UpstreamError,
    UpstreamTimeout,
    forward_headers,
)
from llm_lab_router.router.limits.access import names_of
from llm_lab_router.router.limits.budgets import Budgets
from llm_lab_router.router.limits.concurrency import Limits, process_share
from llm_lab_router.router.limits.quotas import Lease, Quotas
from llm_lab_router.router.observe.accesslog import RequestRecord
from llm_lab_router.router.observe.metrics import RouterMetrics
from tornado.httputil import HTTPHeaders, HTTPInputError, parse_body_arguments

GENERATION_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions"})
EMBEDDING_ROUTES = frozenset({"/v1/embeddings"})
# Uploads (audio transcription...) name their model in a form part. Only multipart/form-data
# counts: JSON posted as ``application/x-www-form-urlencoded`` (``curl -d``) is still JSON.
FORM_TYPE = "multipart/form-data"
_NOOP = nullcontext()  # reusable, as a sync and an async context manager


class Sniff(msgspec.Struct):
    """The only fields of a request body the router reads; everything else passes untouched."""

    model: str | None = None
    stream: bool | None = None
    # The answer's token bound, reserved against a key's tpm at admission (router/limits/quotas.py);
    # any JSON value: what it means is the engine's to judge.
    max_tokens: Any = None
    max_completion_tokens: Any = None

    def token_bound(self) -> int:
        """``max_completion_tokens`` (else ``max_tokens``) when it is a whole number, else 0."""
        for value in (self.max_completion_tokens, self.max_tokens):
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        return 0


_sniff_decoder = msgspec.json.Decoder(Sniff)


def is_form(content_type: str) -> bool:
    """The body kind, decided once per request from the media type: a form
    (``multipart/form-data``, uploads such as audio) or JSON — everything else, whatever its
    ``Content-Type`` says (``multipart/mixed``, ``text/plain``, none), since the router reads
    it as JSON and OpenAI-compatible engines parse it as JSON. So no label can carry a body past
    the JSON checks."""
    return content_type.split(";", 1)[0].strip().lower() == FORM_TYPE


def sniff(body: bytes, content_type: str = "", max_depth: int = 0) -> Sniff:
    """``model``/``stream`` of a JSON body or of a form (multipart uploads such as audio). A
    JSON body nested deeper than ``max_depth`` (when set) is refused before it is decoded
    (400): engines parse what the router forwards, and deep nesting costs them dearly."""
    if is_form(content_type):
        args: dict[str, list[bytes]] = {}
        try:
            parse_body_arguments(content_type, body, args, {}, HTTPHeaders())
        except HTTPInputError as exc:  # no boundary, a broken part...
            raise ApiError(400, f"invalid multipart body: {exc}", "invalid_request") from None
        model = args.get("model", [b""])[0].decode("utf-8", "replace").strip()
        return Sniff(model=model or None)
    if max_depth:
        check_json_depth(body, max_depth)
    if not body.strip():
        return Sniff()
    try:
        return _sniff_decoder.decode(body)
    except RecursionError:  # deeper than msgspec goes (only with max_depth off or set very high)
        raise ApiError(400, "request body is nested too deeply", "json_too_deep") from None
    except msgspec.ValidationError as exc:
        raise ApiError(400, f"invalid request body: {exc}", "invalid_request") from None
    except msgspec.DecodeError as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}", "invalid_json") from None


def serving_order(chain: list[str], running: Callable[[str], bool]) -> list[str]:
    """A fallback chain in the order a request tries it: the members that run now, then the
    others, each part in chain order."""
    up = [m for m in chain if running(m)]
    return up + [m for m in chain if m not in up]


def started_nothing(exc: ApiError) -> bool:
    """A start refused at once: the model fits nowhere, or its last start failed a moment ago
    (back-off). Nothing was started."""
    return exc.reason is not None and exc.reason.kind in ("no_room", "backoff")


def mode_error(path: str, mode: Mode, name: str) -> str | None:
    """Why ``path`` cannot be served by a model of ``mode`` (``None`` if it can)."""
    path = path.rstrip("/")
    if mode == "embedding" and path in GENERATION_ROUTES:
        return f"model '{name}' is an embedding model; it cannot serve {path}"
    if mode != "embedding" and path in EMBEDDING_ROUTES:
        return f"model '{name}' is a {mode} model; it cannot serve {path}"
    return None


_BAD_QUERY = re.compile(r"[\x00-\x20\x7f]")


def upstream_target(path: str, query: str) -> str:
    """The request target sent to the engine (appended to the instance URL's path). The query
    passes as the client sent it, but never a space or a control character, which would end
    the request line sent to the engine (the path is plain already: ``check_forward_path``)."""
    if not query:
        return path
    if _BAD_QUERY.search(query):
        raise ApiError(400, "the query string has spaces or control characters", "invalid_request")
    return f"{path}?{query}"


def stream_error_event(message: str) -> bytes:
    """The SSE event an interrupted stream ends with, in OpenAI's error shape."""
    return error_event(ApiError(502, message, "stream_interrupted"))


class Unservable(ApiError):
    """The model cannot serve this request now (not running and not startable, failed start,
    every instance unreachable, its queue full or timed out) and nothing has reached the client:
    a fallback model may serve it instead. Without one, answered as any ``ApiError``."""

    @classmethod
    def of(cls, err: ApiError) -> "Unservable":
        return cls(err.status, err.message, err.code, err.headers, err.reason)


STREAM_END = b"data: [DONE]"  # an OpenAI event stream's last event


def ends_stream(data: bytes) -> bool:
    """Whether ``data`` ends with an event stream's ``[DONE]`` event: a client has its answer
    then, whether or not the HTTP body's end comes in the same read (a chunked body's
    terminator often comes alone, a moment later)."""
    return data[-len(STREAM_END) - 4:].rstrip().endswith(STREAM_END)


class Releasing:
    """A ``Sink`` that drops a request's concurrency lease (``Quotas.release``) just before the
    answer's last bytes, or its ``[DONE]`` event, whichever comes first, so that the client
    never holds its answer while its key still counts the request as in flight (an answer that
    ends otherwise, e.g. by an error reply, leaves the lease to ``Quotas.settle``)."""

    __slots__ = ("sink", "quotas", "lease")

    def __init__(self, sink: Sink, quotas: Quotas, lease: Lease) -> None:
        self.sink, self.quotas, self.lease = sink, quotas, lease

    def begin(self, status: int, headers: Iterable[tuple[str, str]]) -> None:
        self.sink.begin(status, headers)

    async def send(self, data: bytes, last: bool = False) -> None:
        if last or ends_stream(data):
            await self.quotas.release(self.lease)  # a no-op once released
        await self.sink.send(data, last)

    def abort(self) -> None:
        self.sink.abort()


class ProxyRequest(msgspec.Struct, kw_only=True):
    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    body: bytes
    received_at: float  # time.monotonic() when the request arrived

    @property
    def content_type(self) -> str:
        return next((v for k, v in self.headers if k.lower() == "content-type"), "")


class Proxy:
    def __init__(self, view: ClusterView, control: ControlClient, balancer: Balancer, upstream: Upstream,
                 options: RouterOptions, metrics: RouterMetrics | None = None,
                 usage: UsageReporter | None = None, quotas: Quotas | None = None,
                 budgets: Budgets | None = None) -> None:
        self.metrics = metrics or RouterMetrics()
        self.budgets = budgets  # GPU-time budgets of groups that have one (router/limits/budgets.py)
        self.quotas = quotas  # cluster-wide limits of keys that have some (router/limits/quotas.py)
        self.usage = usage  # reports use of each model (idle unload, eviction)
        self.limits = Limits(options.queue_limit, options.queue_timeout)
        self.view = view
        self.control = control
        self.balancer = balancer
        self.upstream = upstream
        self.options = options

    async def forward(self, req: ProxyRequest, sink: Sink, rec: RequestRecord | None = None) -> None:
        """Relay ``req``; ``rec`` collects what happened (access log, metrics)."""
        rec = rec or RequestRecord(req.method, req.path, req.received_at)
        sniffed = sniff(req.body, req.content_type, self.options.max_json_depth)
        name = sniffed.model
        if not name:
            raise ApiError(400, "you must provide a model parameter", "missing_model")
        model = self.view.resolve(name)
        entry = self.view.catalog_entry(model) if model else None
        if model is None or entry is None:
            raise ApiError(404, f"The model '{name}' does not exist", "model_not_found")
        rec.model = model
        # the tokens' estimate when no usage comes back (the ledger, a key's tpm): body bytes / 4
        # for the prompt, one token per SSE event relayed
        rec.prompt_estimate, rec.events = len(req.body) // 4, 0
        if reason := mode_error(req.path, entry.mode, name):
            raise ApiError(400, reason, "model_mode_mismatch")
        if rec.caller is not None and rec.caller.access is not None:  # keys with permissions only
            rec.caller.access.check_use(name, names_of(name, model, entry.aliases))
        if rec.caller is not None and self.quotas is not None:  # one Redis round trip, keys with limits only
            rec.lease = await self.quotas.admit(rec.caller, len(req.body), sniffed.token_bound())
            if rec.lease is not None and rec.lease.member:
                sink = Releasing(sink, self.quotas, rec.lease)
        if not entry.fallbacks:
            await self._serve_model(model, name, entry, req, sink, rec, bool(sniffed.stream))
            return
        await self._serve_with_fallbacks(model, name, req, sink, rec, bool(sniffed.stream))

    async def _serve_with_fallbacks(self, model: str, name: str, req: ProxyRequest, sink: Sink,
                                    rec: RequestRecord, stream: bool) -> None:
        """Serve with ``model``, else with the next model of its fallback chain that can
        (router/forward/fallbacks.py), as long as nothing reached the client. A fallback gets the body
        with its own id as ``model``; the answer says who served in ``X-Router-Model``.

        Members that run already go first (``serving_order``), so a request never cold-starts
        (or evicts for) a model while another of its chain serves; at most one member is
        started per request (a refusal for lack of room, or a member whose start failed recently and
        is skipped at once, router/control/start_backoff.py, starts nothing and does not count)."""
        chain = [m for n, m in enumerate(fallback_chain(model, self.view.catalog_entry, self.view.resolve))
                 if (e := self.view.catalog_entry(m)) is not None and not (n and mode_error(req.path, e.mode, m))]
        order = serving_order(chain, lambda m: bool(self.view.running_instances(m)))
        reasons: dict[str, Unservable] = {}
        started = False
        for n, served in enumerate(order):
            entry = self.view.catalog_entry(served)
            if entry is None or (n and not self._may_use(rec, entry)):
                continue
            starts = entry.on_demand and not self.view.running_instances(served)
            if starts and started:
                continue  # one start per request: the chain's others serve only once running
            fallback = served != model
            body = req
            if fallback and not is_form(req.content_type):
                body = msgspec.structs.replace(req, body=with_model(req.body, served))
            rec.served = served if fallback else ""
            try:
                await self._serve_model(served, served if fallback else name, entry, body, sink, rec, stream,
                                        fallback=n < len(order) - 1)
                return
            except Unservable as exc:
                reasons.setdefault(served, exc)
                started = started or (starts and not started_nothing(exc))
        rec.served = ""
        raise reasons.get(model) or next(iter(reasons.values()), None) or Unservable(
            503, f"model '{name}' is not running", "model_not_running")  # the requested model's own reason

    async def _serve_model(self, model: str, name: str, entry: CatalogEntry, req: ProxyRequest, sink: Sink,
                           rec: RequestRecord, stream: bool, fallback: bool = False) -> None:
        """Serve with ``model``, starting it first when needed (``fallback``: a model may
        still serve if this one cannot, see ``_load_streamed``)."""
        if model in self.control.closing:  # a starving model waits for it to drain (router/control/scheduler.py)
            await self.control.until_open(model, self.options.start_timeout)
        if not self.view.running_instances(model):
            if not entry.on_demand:
                raise Unservable(503, f"model '{name}' is not running", "model_not_running")
            self._check_start(model, name, entry, rec)
            await self._check_budget(model, rec)
            if stream:
                await self._load_streamed(model, name, entry.max_concurrency, req, LoadingStream(sink), rec,
                                          fallback)
                return
            await self._ensure_running(model, name, rec)
        await self._serve(model, name, entry.max_concurrency, req, sink, rec)

    @staticmethod
    def _may_use(rec: RequestRecord, entry: CatalogEntry) -> bool:
        """Whether the caller may use ``entry`` (a fallback it may not use is skipped)."""
        access = rec.caller.access if rec.caller is not None else None
        return access is None or access.may_use((entry.id, *entry.aliases))

    def _check_start(self, model: str, name: str, entry: CatalogEntry, rec: RequestRecord) -> None:
        """A 403 when this request would start ``model`` and its key may not (``start``); none
        when a start is already under way for someone else: the request waits for it."""
        access = rec.caller.access if rec.caller is not None else None
        if access is None or access.may_start(names_of(name, model, entry.aliases)):
            return
        if not self.control.start_underway(model):
            try:
                access.check_start(name, names_of(name, model, entry.aliases))
            except ApiError as exc:
                raise Unservable.of(exc) from None  # a fallback that runs may serve

    async def _check_budget(self, model: str, rec: RequestRecord) -> None:
        """A 429 when this request would start ``model`` and its group has used its GPU-time
        budget; none when a start is already under way for someone else."""
        budget = rec.caller.budget if rec.caller is not None else None
        if budget is None or self.budgets is None or self.control.start_underway(model):
            return
        try:
            await self.budgets.check(budget)
        except ApiError as exc:
            raise Unservable.of(exc) from None  # a fallback that runs may serve

    async def _ensure_running(self, model: str, name: str, rec: RequestRecord) -> None:
        """Start ``model`` on demand (shared with other requests) and wait until it runs; a
        swap it needs evicts with the key's priority (router/control/scheduler.py).
        The wait counts in the in-flight gauge (docs/metrics.md): the client is connected
        and waiting on this router, minutes long for a cold vLLM."""
        self.metrics.started(model)
        try:
            caller = rec.caller
            await self.control.ensure_running(
                model, self.options.start_timeout, priority=caller.priority if caller is not None else 0,
                origin=Origin.of(caller, rec.client()))
        except ControlError as exc:
            raise Unservable.of(start_failed(f"model '{name}' could not be started: {describe_failure(exc)}",
                                             exc)) from None
        finally:
            self.metrics.ended(model)

    async def _load_streamed(self, model: str, name: str, max_concurrency: int, req: ProxyRequest,
                             stream: LoadingStream, rec: RequestRecord, fallback: bool = False) -> None:
        """A streamed request for a model that must start first: the SSE head and a comment at
        once, a comment every ``loading_keepalive`` seconds while it loads (router/forward/loading_stream.py),
        then the engine's stream; any failure from then on is an error event ending the stream.
        A client that leaves cancels only its own wait: the start goes on for others.

        With a ``fallback`` to go to, the head waits for the first ``loading_keepalive``: a start
        refused at once (no room) or failed within it raises ``Unservable`` and the fallback
        serves; once the head is out, no fallback is taken (it would follow the first bytes)."""
        start = asyncio.ensure_future(self._ensure_running(model, name, rec))
        if fallback:
            try:
                await asyncio.wait({start}, timeout=self.options.loading_keepalive)
            except BaseException:
                start.cancel()
                raise
            if start.done() and start.exception() is not None:
                raise start.exception()  # type: ignore[misc]
        try:
            await stream.open(name, model)
            while not (await asyncio.wait({start}, timeout=self.options.loading_keepalive))[0]:
                await stream.keepalive(name, self.control.reason(model))
            start.result()
            await self._serve(model, name, max_concurrency, req, stream, rec)
            await stream.end()
        except ApiError as exc:
            await stream.fail(exc)
        finally:
            start.cancel()  # a no-op once done; else only this request's wait (the start is shielded)

    async def _serve(self, model: str, name: str, max_concurrency: int, req: ProxyRequest, sink: Sink,
                     rec: RequestRecord) -> None:
        """Relay to a running instance, within the model's concurrency limit."""
        self.metrics.started(model)
        admitted = False
        try:
            # Counted as use of the model (idle unload, eviction) while queued or served.
            with self.usage.track(model, rec.caller.priority if rec.caller is not None else 0) \
                    if self.usage else _NOOP:
                async with self._slot(model, max_concurrency, rec):
                    admitted = True
                    await self._relay(model, name, req, sink, rec)
        except ApiError as exc:
            if admitted or exc.status != 429 or isinstance(exc, Unservable):
                raise
            raise Unservable.of(exc) from None  # no slot (queue full or timed out): a fallback may serve
        finally:
            self.metrics.ended(model)

    def _capacity(self, model: str, max_concurrency: int) -> int:
        """This router process's share of ``max_concurrency`` × the running instances."""
        capacity = max_concurrency * len(self.view.running_instances(model))
        return process_share(capacity, self.options.process_index, self.options.processes)

    def _slot(self, model: str, max_concurrency: int, rec: RequestRecord) -> AbstractAsyncContextManager[None]:
        """A concurrency slot of ``model`` (queued in the key's lane, or 429); without
        ``max_concurrency``, a shared no-op: no limiter machinery on the hot path."""
        if max_concurrency <= 0:
            return _NOOP
        return self._queued_slot(model, self._capacity(model, max_concurrency), rec)

    async def follow_capacity(self) -> None:
        """Whenever the view changes, give models with queued requests their new capacity (a
        second instance came up): the waiters are admitted at once, not at the next release."""
        while True:
            await self.view.next_change()
            for model in self.limits.waiting_models():
                entry = self.view.catalog_entry(model)
                if entry is not None and entry.max_concurrency > 0:
                    self.limits.resize(model, self._capacity(model, entry.max_concurrency))

    @asynccontextmanager
    async def _queued_slot(self, model: str, capacity: int, rec: RequestRecord) -> AsyncIterator[None]:
        """``Limits.admit`` (in the caller's lane), with the wait timed (``queue_wait{cause="slot"}``)
        and a 429 explained (``error.reason``: ``queued`` with the queue position)."""
        queued_at = time.monotonic()
        caller = rec.caller
        admit = (self.limits.admit(model, capacity) if caller is None
                 else self.limits.admit(model, capacity, caller.name, caller.priority, caller.weight))
        async with AsyncExitStack() as held:  # the slot's release sees how the block ended
            try:
                await held.enter_async_context(admit)
            except ApiError as exc:
                if exc.status == 429 and exc.reason is None:
                    exc.reason = slot_reason(model, self.limits.queued(model) + 1, self.options.queue_limit)
                raise
            self.metrics.waited(model, "slot", time.monotonic() - queued_at)
            yield

    async def _relay(self, model: str, name: str, req: ProxyRequest, sink: Sink, rec: RequestRecord) -> None:
        """Send to the instance the balancer chooses (prefix affinity, else least busy); on a
        connection failure, to the least busy of the others."""
        refused: set[str] = set()
        failures: list[str] = []
        instances = self.view.running_instances(model)
        key = self._routing_key(model, req) if len(instances) > 1 else None
        while True:
            inst, rec.route = self.balancer.choose(model, instances, key, refused)
            if inst is None:
                break
            try:
                await self._exchange(inst, req, sink, rec)
                return
            except ConnectFailed as exc:
                refused.add(inst.url)
                failures.append(str(exc))
                rec.retries, rec.error = len(failures), "connect"
            instances = self.view.running_instances(model)
        if failures:
            raise Unservable(502, f"no instance of model '{name}' could be reached: " + "; ".join(failures),
                             "upstream_unreachable")
        raise Unservable(503, f"model '{name}' is not running", "model_not_running")

    def _routing_key(self, model: str, req: ProxyRequest) -> int | None:
        """The request's affinity key (router/forward/affinity.py), or ``None`` when the model routes by
        least outstanding requests or the body is a form."""
        entry = self.view.catalog_entry(model)
        if entry is None or entry.routing != "affinity" or is_form(req.content_type):
            return None
        return routing_key(model, req.body, req.headers)

    async def _exchange(self, inst: Instance, req: ProxyRequest, sink: Sink, rec: RequestRecord) -> None:
        """One upstream exchange. Raises ``ConnectFailed`` only while nothing was sent to the
        client (so the caller may retry elsewhere); a failure after that ends the answer here."""
        overhead_ms = (time.monotonic() - req.received_at) * 1000  # router time before going upstream
        with self.balancer.track(inst.url):
            resp, chunk = await self._first_chunk(inst, req, rec)
            rec.worker, rec.streamed, rec.error = inst.worker, resp.content_type == "text/event-stream", ""
            complete = False
            try:
                headers = resp.headers + [("X-Accel-Buffering", "no"), ("X-Router-Worker", inst.worker),
                            ("X-Router-Model", inst.model), ("X-Router-Overhead-Ms", f"{overhead_ms:.2f}")]
                sink.begin(resp.status, headers)
                try:
                    while chunk:
                        # All of a small answer is often in the first read: then send it as one
                        # sized body (one write) instead of chunked frames and a terminator.
                        last = resp.at_eof
                        rec.chunk(chunk)
                        await sink.send(chunk, last)
                        if last:
                            break
                        chunk = await resp.read(timeout=self.options.idle_timeout)
                    else:  # the end came in a read of its own (a chunked body's terminator): say so
                        await sink.send(b"", True)
                    complete = True
                except UpstreamError as exc:
                    rec.error = "timeout" if isinstance(exc, UpstreamTimeout) else "broken"
                    await self._end_interrupted(sink, resp.content_type, rec.recent(64), exc)
            finally:
                if complete:
                    resp.release()
                else:
                    resp.close()  # the engine sees the connection close and stops generating

    async def _first_chunk(self, inst: Instance, req: ProxyRequest, rec: RequestRecord) -> tuple[Response, bytes]:
        """Send the request and read the first body bytes, together within the first-byte timeout."""
        deadline = asyncio.get_running_loop().time() + self.options.first_byte_timeout
        try:
            headers = forward_headers(req.headers, inst.api_key)
        except InvalidHeader as exc:
            raise ApiError(400, str(exc), "invalid_header") from None
        try:
            resp = await self.upstream.open(req.method, inst.url, upstream_target(req.path, req.query),
                                            headers, req.body, deadline)
            try:
                return resp, await resp.read(deadline=deadline)
            except BaseException:
                resp.close()
                raise
        except UpstreamTimeout as exc:
            rec.worker, rec.error = inst.worker, "timeout"
            raise ApiError(504, str(exc), "upstream_timeout") from None
        except UpstreamBroken as exc:
            raise ConnectFailed(str(exc)) from None  # nothing reached the client yet: retryable

    @staticmethod
    async def _end_interrupted(sink: Sink, content_type: str, recent: bytes, exc: UpstreamError) -> None:
        """The engine broke off or stalled after the answer began: end an event stream cleanly
        with an error event (unless it already said ``[DONE]``); cut any other body short so
        the client sees it is incomplete instead of taking a truncated JSON for a whole one."""
        if content_type == "text/event-stream":
            if b"[DONE]" not in recent:
                await sink.send(stream_error_event(str(exc)))
        else:
            sink.abort()
