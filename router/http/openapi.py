"""The OpenAPI 3.1 document of the router's own API, served at ``/openapi.json``.

Generated, not hand-written, wherever the code has the truth: response bodies are the msgspec
structs the handlers encode (``router/core/responses.py``: ``msgspec.json.schema_components``), and
query parameters are the ``router/http/query.py`` declarations the handlers parse, with this
router's defaults and limits. What is left by hand is the route list, each route's summary and
status codes, and the request bodies of the forwarded OpenAI operations (the router does not
parse those beyond ``model``; the engine does).

``tests/test_security_api.py`` keeps it in step with ``router.http.app.ROUTES`` and each handler's
``QUERY``; ``tests/test_fuzz.py`` runs schemathesis against a live router from it and checks
every answer against the documented status codes and response schemas.

``/v1/*`` is documented by its three main OpenAI operations; the router forwards any other
``/v1/...`` path as well (see ``router.forward.proxy``), its body untouched.
"""

from __future__ import annotations

import functools
from typing import Any

import msgspec
from llm_lab_router import __version__
from llm_lab_router.router.core.errors import Failure, OpenAIError
from llm_lab_router.router.core.options import RouterOptions
from llm_lab_router.router.core.responses import (
    AllStopped,
    AuditList,
    UsageReport,
    Cleared,
    DevicesResult,
    Health,
    LogStatsResult,
    ModelCard,
    ModelInfo,
    ModelList,
    Restarted,
    ServerInfo,
    Started,
    Stopped,
)
from llm_lab_router.router.http.debug import DebugStats
from llm_lab_router.router.http.query import route_params
from llm_lab_router.router.logs.stream import LogEvent

Json = dict[str, Any]
REF = "#/components/schemas/{name}"
RESPONSES = (ServerInfo, Health, ModelList, ModelCard, ModelInfo, Started, Stopped, AllStopped, Cleared, Restarted,
             LogStatsResult, DevicesResult, DebugStats, LogEvent, Failure, OpenAIError, AuditList, UsageReport)


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


REQUESTS = (ChatRequest, CompletionRequest, EmbeddingRequest)


def _always_present(components: Json) -> Json:
    """msgspec lists a field with a default as optional, which is right for a request body; in
    a response every field is encoded unless its struct omits defaults, so say it is there."""
    for cls in _structs(RESPONSES):
        if not cls.__struct_config__.omit_defaults:
            schema = components[cls.__name__]
            unset = {f.encode_name for f in msgspec.structs.fields(cls) if f.default is msgspec.UNSET}
            schema["required"] = [p for p in schema.get("properties", {}) if p not in unset]  # UNSET: omitted
    return components


def _structs(types: tuple[type, ...]) -> set[type]:
    """Every struct reachable from ``types`` (their fields, recursively)."""
    found: set[type] = set()

    def walk(info: msgspec.inspect.Type) -> None:
        if isinstance(info, msgspec.inspect.StructType):
            if info.cls in found:
                return
            found.add(info.cls)
            for field in info.fields:
                walk(field.type)
        for attr in ("item_type", "key_type", "value_type"):
            if (inner := getattr(info, attr, None)) is not None:
                walk(inner)
        for inner in getattr(info, "types", ()):
            walk(inner)

    for info in msgspec.inspect.multi_type_info(types):
        walk(info)
    return found


def _ref(cls: type) -> Json:
    return {"$ref": REF.format(name=cls.__name__)}


CAUSES = {400: "bad request or parameter (unknown, repeated, empty or invalid query parameter, ...)",
          401: "missing or invalid API key (keys on)", 403: "admin key needed (keys on)",
          404: "unknown model, route or worker", 413: "body too large", 429: "model at its concurrency limit (Retry-After)",
          502: "engine unreachable", 503: "model not running / start failed / Redis unreachable", 504: "engine timeout"}


def _json(schema: Json, description: str) -> Json:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _op(summary: str, ok: Json, *errors: int, params: list[Json] | None = None, admin: bool = False,
        public: bool = False, openai: bool = False, body: type | None = None, ok_type: str = "application/json",
        also: Json | None = None) -> Json:
    """One operation: 200 with ``ok`` (a schema), then errors in the route's shape. Every route
    may answer 400 (query parameters are checked on all of them) and, unless public, 401."""
    failure = _ref(OpenAIError if openai else Failure)
    codes = sorted({400, *(() if public else (401,)), *((403,) if admin else ()), *errors})
    responses: Json = {"200": {"description": "ok", "content": {ok_type: {"schema": ok}}}, **(also or {})}
    responses.update({str(c): _json(failure, CAUSES[c]) for c in codes})
    op: Json = {"summary": summary, "parameters": params or [], "responses": responses}
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": _ref(body)}}}
    # ``{}``: no key at all is also accepted, by a router with keys off (the loopback default)
    op["security"] = [] if public else [{"bearer": []}, {}] if admin else [{"bearer": []}, {"cookie": []}, {}]
    return op


def _alias() -> Json:
    return {"name": "alias", "in": "path", "required": True, "schema": {"type": "string", "minLength": 1},
            "description": "a model id or alias"}


FORWARDED = {"type": "object", "description": "the engine's answer, as it sent it"}


def _sse_event(data: Json) -> Json:
    """One server-sent event (OpenAPI 3.1 reads the schema of ``text/event-stream`` as that of
    each event): its ``data`` text, optional ``event`` and ``id``."""
    return {"type": "object", "required": ["data"],
            "properties": {"data": data, "event": {"type": "string"}, "id": {"type": "string"},
                           "retry": {"type": "integer"}}}
FORWARDED_DESCRIPTION = (" (the engine's status and body; with \"stream\": true, server-sent events. While an "
                         "on-demand start loads the model, a streamed request gets SSE comments, and a failure is "
                         "a data: {\"error\": ...} event ending the stream)")


def paths(options: RouterOptions) -> Json:
    q = route_params(options)
    forwarded = (400, 404, 413, 429, 502, 503, 504)
    stream_ok = {"200": {"description": "ok" + FORWARDED_DESCRIPTION,
                         "content": {"application/json": {"schema": FORWARDED},
                                     "text/event-stream": {"schema": _sse_event({"type": "string"})}}}}
    return {
        "/": {"get": _op("server info", _ref(ServerInfo))},
        "/health": {"get": _op("health: model counts, live workers, Redis (always public)", _ref(Health),
                               public=True)},
        "/openapi.json": {"get": _op("this document (always public)", {"type": "object"}, public=True)},
        "/debug/stats": {"get": _op("tasks, descriptors and memory of the router (404 unless "
                                    "LLM_ROUTER_DEBUG_ENDPOINTS=1)", _ref(DebugStats), 404, admin=True)},
        "/metrics": {"get": _op("Prometheus metrics (docs/metrics.md)", {"type": "string"}, ok_type="text/plain")},
        "/v1/models": {"get": _op("OpenAI model list", _ref(ModelList), openai=True)},
        "/v1/models/{alias}": {"get": _op("one model (OpenAI retrieve)", _ref(ModelCard), 404, params=[_alias()],
                                          openai=True)},
        "/v1/chat/completions": {"post": _op("chat completion, forwarded to an engine", FORWARDED, *forwarded,
                                             openai=True, body=ChatRequest, also=stream_ok)},
        "/v1/completions": {"post": _op("completion, forwarded to an engine", FORWARDED, *forwarded, openai=True,
                                        body=CompletionRequest, also=stream_ok)},
        "/v1/embeddings": {"post": _op("embeddings, forwarded to an engine", FORWARDED, *forwarded,
                                       openai=True, body=EmbeddingRequest)},
        "/api/models/restart-autostart": {"post": _op("stop every model, then start every auto_start model",
                                                      _ref(Restarted), 503, admin=True)},
        "/api/models/stop-all": {"post": _op("stop every model on every host", _ref(AllStopped), 503, admin=True)},
        "/api/models/{alias}/start": {"post": _op(
            "start a model (on one host with worker) and wait until it serves", _ref(Started), 404, 503, admin=True,
            params=[_alias(), q.wait.openapi(), q.worker.openapi()],
            also={"202": _json(_ref(Started), "wait=false: the start has begun, the model is not running yet")})},
        "/api/models/{alias}/stop": {"post": _op("stop a model on every host (on one host with worker)",
                                                 _ref(Stopped), 404, 503, params=[_alias(), q.worker.openapi()],
                                                 admin=True)},
        "/api/models/{alias}/info": {"get": _op("one model in detail, with each instance", _ref(ModelInfo), 404,
                                                params=[_alias()])},
        "/api/models/{alias}/logs/stream": {"get": _op(
            "the model's log as server-sent events: historical entries, historical_complete, then realtime "
            "entries; each data: is a LogEvent, each entry event carries its stream id as id:",
            _sse_event({"type": "string", "contentMediaType": "application/json", "contentSchema": _ref(LogEvent)}),
            404, 503, params=[_alias(), q.tail.openapi(), q.last_event_id.openapi()],
            ok_type="text/event-stream")},
        "/api/logs/stats": {"get": _op("log entries per model, summed", _ref(LogStatsResult), 503)},
        "/api/logs/{alias}/clear": {"post": _op("delete a model's log entries older than keep_minutes",
                                                _ref(Cleared), 404, 503, params=[_alias(), q.keep_minutes.openapi()],
                                                admin=True)},
        "/api/devices/info": {"get": _op("devices of every host: the cluster total, then per host",
                                         _ref(DevicesResult), 503)},
        "/api/audit": {"get": _op("the audit trail: who started, stopped, evicted, cleared what, when, from "
                                  "where, with what result (oldest first)", _ref(AuditList), 503,
                                  params=[q.since.openapi(), q.limit.openapi()], admin=True)},
        "/api/usage": {"get": _op("the usage ledger: requests, errors, tokens and GPU hours per key, group or "
                                  "model (an admin key: every key; a client key: its own)", _ref(UsageReport), 503,
                                  params=[q.since.openapi(), q.by.openapi()])},
    }


def document(options: RouterOptions) -> Json:
    _, responses = msgspec.json.schema_components(RESPONSES, ref_template=REF)
    _, requests = msgspec.json.schema_components(REQUESTS, ref_template=REF)
    return {
        "openapi": "3.1.0",
        "info": {"title": "llm-router", "version": __version__,
                 "description": "One OpenAI-compatible endpoint and one control plane for a lab's model servers. "
                                "Errors: OpenAI's shape on /v1, {success: false, message} on /api. Query "
                                "parameters are optional: absent, a parameter takes its default; present, it "
                                "must be valid (empty or blank is a 400). Keys: docs/security.md (off on a "
                                "loopback-only router). Reference: docs/api.md."},
        "paths": paths(options),
        "components": {
            "schemas": {**_always_present(responses), **requests},
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "a client or admin API key"},
                "cookie": {"type": "apiKey", "in": "cookie", "name": "llm_router_key",
                           "description": "the same key as a cookie, GET/HEAD only (the dashboard's EventSource)"},
            },
        },
    }


@functools.cache
def document_bytes(options: RouterOptions) -> bytes:
    return msgspec.json.encode(document(options))
