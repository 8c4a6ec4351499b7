"""Every route of the router, declared once: its path, methods, who may call it, its handler,
its query parameters and what each operation answers.

Three things are derived from ``ROUTES`` and from nothing else, so they cannot drift apart:

- the Tornado application (``router/http/app.py``: ``make_app`` maps each route with a handler);
- who may call what (``router/http/auth.py``: each handler is given its route's ``access``);
- the OpenAPI document (``router/http/openapi.py``: one path per documented route, one
  operation per method, response schemas from the structs named here).

A route without a handler (``handler=None``) is forwarded to an engine: every ``/v1/...`` path
that is not one of the router's own goes to ``router/http/exchange.py``, whatever its path; the
rows here document the three main OpenAI operations (the engine parses their bodies, the
router reads only ``model``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import msgspec
import tornado.web
from llm_lab_router.router.core.responses import (
    AllStopped,
    AuditList,
    Cleared,
    DevicesResult,
    EventsResult,
    Health,
    HistoryResult,
    LogStatsResult,
    ModelCard,
    ModelInfo,
    ModelList,
    PlanResult,
    Restarted,
    ServerInfo,
    Started,
    Stopped,
    UsageReport,
)
from llm_lab_router.router.http import handlers as h
from llm_lab_router.router.http.auth import Access
from llm_lab_router.router.http.dashboard import (
    STATIC_DIR,
    DashboardIndexHandler,
    DashboardStaticHandler,
)
from llm_lab_router.router.http.debug import DebugStats
from llm_lab_router.router.logs.stream import LogEvent

Json = dict[str, Any]
PARAM = re.compile(r"\{([^}]+)\}")
FORWARDED_ERRORS = (400, 404, 413, 415, 429, 502, 503, 504)  # 415: router/http/origin.py
FORWARDED_ACCESS: Access = "client"  # every forwarded /v1 path, documented here or not (router/http/exchange.py)


@dataclass(frozen=True, kw_only=True)
class Op:
    """One method of a route, as the OpenAPI document describes it. The error codes are those
    of the route itself; 400 (query checks), 401 and 403 (keys) follow from its access."""

    summary: str
    ok: type | Json  # the 200 body: a msgspec struct (its generated schema) or a literal schema
    errors: tuple[int, ...] = ()
    ok_type: str = "application/json"
    body: type | None = None  # the request body (forwarded operations: documentation only)
    streams: bool = False  # a forwarded operation that answers server-sent events with "stream": true
    accepted: str = ""  # when the route answers 202 (with the ``ok`` body) instead of 200


@dataclass(frozen=True, kw_only=True)
class Route:
    """One route. ``path`` is OpenAPI's template (``/api/models/{alias}/start``); Tornado's
    pattern is derived from it unless ``pattern`` is given (the dashboard's files)."""

    path: str
    access: Access
    handler: type[tornado.web.RequestHandler] | None  # None: forwarded to an engine
    ops: Mapping[str, Op]  # method (lower case) -> its operation: the methods the route takes
    query: tuple[str, ...] = ()  # its query parameters (names in router/http/query.py's RouteParams)
    pattern: str = ""
    args: Mapping[str, Any] = field(default_factory=dict)  # a non-API handler's initialize() arguments
    documented: bool = True  # in the OpenAPI document (the dashboard's page and files are not)

    @property
    def tornado_pattern(self) -> str:
        if self.pattern:
            return self.pattern
        parts = PARAM.split(self.path)  # literal, name, literal, ...
        return "".join(re.escape(p) if i % 2 == 0 else "([^/]+)" for i, p in enumerate(parts))

    @property
    def path_params(self) -> list[str]:
        return PARAM.findall(self.path)

    @property
    def forwarded(self) -> bool:
        return self.handler is None


# --- request bodies of the forwarded OpenAI operations (documentation only: the engine parses them) ---


class ChatMessage(msgspec.Struct):
    role: str
    content: str


class ChatRequest(msgspec.Struct, kw_only=True):
    model: str
    messages: list[ChatMessage]
    stream: bool = False
    max_tokens: int | None = None


class CompletionRequest(msgspec.Struct, kw_only=True):
    model: str
    prompt: str
    stream: bool = False
    max_tokens: int | None = None


class EmbeddingRequest(msgspec.Struct, kw_only=True):
    model: str
    input: str | list[str]


FORWARDED = {"type": "object", "description": "the engine's answer, as it sent it"}
PAGE = {"type": "string"}

ROUTES: tuple[Route, ...] = (
    Route(path="/", access="read", handler=h.RootHandler, ops={"get": Op(summary="server info", ok=ServerInfo)}),
    Route(path="/health", access="public", handler=h.HealthHandler,
          ops={"get": Op(summary="health: model counts, live workers, Redis (always public)", ok=Health)}),
    Route(path="/openapi.json", access="public", handler=h.OpenApiHandler,
          ops={"get": Op(summary="this document (always public)", ok={"type": "object"})}),
    Route(path="/debug/stats", access="admin", handler=h.DebugStatsHandler,
          ops={"get": Op(summary="tasks, descriptors and memory of the router (404 unless "
                                 "LLM_ROUTER_DEBUG_ENDPOINTS=1)", ok=DebugStats, errors=(404,))}),
    Route(path="/metrics", access="client", handler=h.MetricsHandler,
          ops={"get": Op(summary="Prometheus metrics (docs/metrics.md)", ok={"type": "string"},
                         ok_type="text/plain")}),
    Route(path="/v1/models", access="read", handler=h.ModelsHandler,
          ops={"get": Op(summary="OpenAI model list", ok=ModelList)}),
    Route(path="/v1/models/{alias}", access="read", handler=h.ModelHandler,
          ops={"get": Op(summary="one model (OpenAI retrieve)", ok=ModelCard, errors=(404,))}),
    Route(path="/v1/chat/completions", access=FORWARDED_ACCESS, handler=None,
          ops={"post": Op(summary="chat completion, forwarded to an engine", ok=FORWARDED, errors=FORWARDED_ERRORS,
                          body=ChatRequest, streams=True)}),
    Route(path="/v1/completions", access=FORWARDED_ACCESS, handler=None,
          ops={"post": Op(summary="completion, forwarded to an engine", ok=FORWARDED, errors=FORWARDED_ERRORS,
                          body=CompletionRequest, streams=True)}),
    Route(path="/v1/embeddings", access=FORWARDED_ACCESS, handler=None,
          ops={"post": Op(summary="embeddings, forwarded to an engine", ok=FORWARDED, errors=FORWARDED_ERRORS,
                          body=EmbeddingRequest)}),
    Route(path="/api/models/restart-autostart", access="admin", handler=h.RestartAutostartHandler,
          ops={"post": Op(summary="stop every model, then start every auto_start model", ok=Restarted,
                          errors=(503,))}),
    Route(path="/api/models/stop-all", access="admin", handler=h.StopAllHandler,
          ops={"post": Op(summary="stop every model on every host", ok=AllStopped, errors=(503,))}),
    Route(path="/api/models/{alias}/start", access="admin", handler=h.StartHandler, query=("wait", "worker"),
          ops={"post": Op(summary="start a model (on one host with worker) and wait until it serves", ok=Started,
                          errors=(404, 503),
                          accepted="wait=false: the start has begun, the model is not running yet")}),
    Route(path="/api/models/{alias}/stop", access="admin", handler=h.StopHandler, query=("worker",),
          ops={"post": Op(summary="stop a model on every host (on one host with worker)", ok=Stopped,
                          errors=(404, 503))}),
    Route(path="/api/models/{alias}/info", access="read", handler=h.ModelInfoHandler,
          ops={"get": Op(summary="one model in detail, with each instance", ok=ModelInfo, errors=(404,))}),
    Route(path="/api/models/{alias}/logs/stream", access="logs", handler=h.LogStreamHandler,
          query=("tail", "last_event_id"),
          ops={"get": Op(summary="the model's log as server-sent events: historical entries, historical_complete, "
                                 "then realtime entries; each data: is a LogEvent, each entry event carries its "
                                 "stream id as id:", ok=LogEvent, errors=(404, 503), ok_type="text/event-stream")}),
    Route(path="/api/logs/stats", access="read", handler=h.LogStatsHandler,
          ops={"get": Op(summary="log entries per model, summed", ok=LogStatsResult, errors=(503,))}),
    Route(path="/api/logs/{alias}/clear", access="admin", handler=h.LogClearHandler, query=("keep_minutes",),
          ops={"post": Op(summary="delete a model's log entries older than keep_minutes", ok=Cleared,
                          errors=(404, 503))}),
    Route(path="/api/devices/info", access="read", handler=h.DevicesHandler,
          ops={"get": Op(summary="devices of every host: the cluster total, then per host", ok=DevicesResult,
                         errors=(503,))}),
    # The lab's timeline (router/observe/history_query.py, docs/api.md#timeline).
    Route(path="/api/history", access="read", handler=h.HistoryHandler,
          query=("series", "model", "host", "gpu", "from", "to", "step"),
          ops={"get": Op(summary="one series of the timeline (requests, errors, tokens, in flight, TTFT/latency/wait "
                                 "percentiles of a model; memory and utilisation of a GPU; CPU and RAM of a host) in "
                                 "points of step seconds; null values: a gap", ok=HistoryResult, errors=(503,))}),
    Route(path="/api/events", access="read", handler=h.EventsHandler,
          query=("from", "to", "model", "host", "kind", "limit"),
          ops={"get": Op(summary="timeline events (starts requested and by which key, swap waits, ready with the "
                                 "cold start, stops and why, evictions, crashes, restarts, adoptions, reloads, Redis "
                                 "outages), oldest first", ok=EventsResult, errors=(503,))}),
    Route(path="/api/plan", access="read", handler=h.PlanHandler, query=("worker",),
          ops={"get": Op(summary="what fits where: per host and GPU, models that fit together, what a start now "
                                 "would evict, models that fit nowhere, estimates far from measurements",
                         ok=PlanResult, errors=(404,))}),
    # A lab's governance (issue 26): the usage ledger (an admin sees every key, a client key its
    # own: the handler asks which) and the audit trail.
    Route(path="/api/usage", access="client", handler=h.UsageHandler, query=("since", "by"),
          ops={"get": Op(summary="the usage ledger: requests, errors, tokens and GPU hours per key, group or model, "
                                 "with the groups' GPU-time budgets (an admin key: every key; a client key: its own)",
                         ok=UsageReport, errors=(503,))}),
    Route(path="/api/audit", access="admin", handler=h.AuditHandler, query=("since", "limit"),
          ops={"get": Op(summary="the audit trail: who started, stopped, evicted, cleared what, when, from where, "
                                 "with what result (oldest first)", ok=AuditList, errors=(503,))}),
    # The operator dashboard (router/http/dashboard.py): static files, no API of its own.
    Route(path="/ui", access="public", handler=tornado.web.RedirectHandler, args={"url": "/ui/"},
          ops={"get": Op(summary="to /ui/", ok=PAGE)}, documented=False),
    Route(path="/ui/", pattern=r"/ui/(?:index\.html)?", access="public", handler=DashboardIndexHandler,
          ops={"get": Op(summary="the dashboard", ok=PAGE, ok_type="text/html")}, documented=False),
    Route(path="/ui/{file}", pattern=r"/ui/(.+)", access="public", handler=DashboardStaticHandler,
          args={"path": str(STATIC_DIR)}, ops={"get": Op(summary="the dashboard's files", ok=PAGE)},
          documented=False),
)


def own_v1_patterns(routes: tuple[Route, ...] = ROUTES) -> list[re.Pattern[str]]:
    """The ``/v1`` routes the router answers itself (``/v1/models``...), anchored as Tornado
    anchors them: any other ``/v1/...`` path is forwarded."""
    return [re.compile(r.tornado_pattern + "$") for r in routes if not r.forwarded and r.path.startswith("/v1/")]
