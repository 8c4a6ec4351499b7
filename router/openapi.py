"""The OpenAPI 3 document of the router's own API, served at ``/openapi.json``.

Hand-written data (the API is small and its contract comes from the manual, not from code);
``tests/test_security_api.py`` keeps it in step with ``router.app.ROUTES`` and with each
handler's ``QUERY`` (every route documented and vice versa, query parameters identical), and
``tests/test_fuzz.py`` fuzzes a live router from it with schemathesis.

``/v1/*`` is documented by its three main OpenAI operations; the router forwards any other
``/v1/...`` path as well (see ``router.proxy``), its body untouched.
"""

from __future__ import annotations

import functools
from typing import Any

import msgspec

from llm_router import __version__

Json = dict[str, Any]


def _obj(required: tuple[str, ...] = (), **props: Json) -> Json:
    schema: Json = {"type": "object", "properties": props}
    if required:
        schema["required"] = list(required)
    return schema


STR, INT, NUM, BOOL = ({"type": t} for t in ("string", "integer", "number", "boolean"))
FAILURE = _obj(("success", "message"), success=BOOL, message=STR)
OPENAI_ERROR = _obj(("error",), error=_obj(("message", "type"), message=STR, type=STR, code={"type": "string",
                                                                                            "nullable": True}))
DONE = _obj(("success", "message"), success=BOOL, message=STR)


def _json(schema: Json, description: str) -> Json:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int, openai: bool = False) -> Json:
    shape = OPENAI_ERROR if openai else FAILURE
    words = {400: "bad request or parameter", 401: "missing or invalid API key", 403: "admin key needed",
             404: "unknown model or route", 405: "method not allowed", 413: "body too large",
             502: "engine unreachable", 503: "model not running / Redis unreachable", 504: "engine timeout"}
    return {str(c): _json(shape, words[c]) for c in codes}


def _alias() -> Json:
    return {"name": "alias", "in": "path", "required": True, "schema": {"type": "string", "minLength": 1},
            "description": "a model id or alias"}


def _query(name: str, schema: Json, description: str) -> Json:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


def _op(summary: str, ok: Json, *errors: int, params: list[Json] | None = None, admin: bool = False,
        openai: bool = False, body: Json | None = None, ok_type: str = "application/json") -> Json:
    op: Json = {"summary": summary, "parameters": params or [],
                "responses": {"200": {"description": "ok", "content": {ok_type: {"schema": ok}}},
                              **_errors(401, *((403,) if admin else ()), *errors, openai=openai)}}
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    op["security"] = [{"bearer": []}, {"cookie": []}] if not admin else [{"bearer": []}]
    return op


MESSAGES = {"type": "array", "items": _obj(("role", "content"), role=STR, content=STR)}
CHAT = _obj(("model", "messages"), model=STR, messages=MESSAGES, stream=BOOL, max_tokens=INT)
COMPLETION = _obj(("model", "prompt"), model=STR, prompt=STR, stream=BOOL, max_tokens=INT)
EMBEDDING = _obj(("model", "input"), model=STR, input=STR)
MODEL_CARD = _obj(("id", "object", "created", "owned_by"), id=STR, object=STR, created=INT, owned_by=STR,
                  aliases={"type": "array", "items": STR}, status=STR, mode=STR)
START_PARAMS = [_query("wait", {"type": "string", "enum": ["true", "false", "1", "0", "yes", "no"]},
                       "wait until the model runs (default true)")]
LOG_STREAM_PARAMS = [
    _query("tail", {"type": "integer", "minimum": 0}, "history entries sent first"),
    _query("last_event_id", STR, "resume after this entry id (as the Last-Event-ID header)"),
]
CLEAR_PARAMS = [_query("keep_minutes", {"type": "integer", "minimum": 0}, "minutes of logs to keep (0: all)")]

PATHS: Json = {
    "/": {"get": _op("server info", _obj(("message", "version"), message=STR, version=STR, models_url=STR))},
    "/health": {"get": {**_op("health (always public)", _obj(("status",), status=STR, models_count=INT,
                                                               running_models=INT)), "security": []}},
    "/openapi.json": {"get": {**_op("this document (always public)", {"type": "object"}), "security": []}},
    "/debug/stats": {"get": _op("tasks, descriptors and memory of the router (off unless "
                                "LLM_ROUTER_DEBUG_ENDPOINTS=1)", _obj(tasks=INT, fds=INT, rss_mb=NUM), 404,
                                admin=True)},
    "/metrics": {"get": _op("Prometheus metrics (docs/metrics.md)", STR, ok_type="text/plain")},
    "/v1/models": {"get": _op("OpenAI model list", _obj(("object", "data"), object=STR,
                                                        data={"type": "array", "items": MODEL_CARD}), openai=True)},
    "/v1/models/{alias}": {"get": _op("one model (OpenAI retrieve)", MODEL_CARD, 404, params=[_alias()],
                                      openai=True)},
    "/v1/chat/completions": {"post": _op("chat completion, forwarded to an engine (SSE when stream; while an "
                                         "on-demand start loads the model, a streamed request gets SSE "
                                         "comments, and a failure is a data: {error} event ending the stream)",
                                         {"type": "object"}, 400, 404, 413, 502, 503, 504, openai=True,
                                         body=CHAT)},
    "/v1/completions": {"post": _op("completion, forwarded to an engine", {"type": "object"}, 400, 404, 413, 502,
                                    503, 504, openai=True, body=COMPLETION)},
    "/v1/embeddings": {"post": _op("embeddings, forwarded to an engine", {"type": "object"}, 400, 404, 413, 502,
                                   503, 504, openai=True, body=EMBEDDING)},
    "/api/models/restart-autostart": {"post": _op("stop all, start every auto_start model", DONE, 503,
                                                  admin=True)},
    "/api/models/stop-all": {"post": _op("stop every running model", DONE, 503, admin=True)},
    "/api/models/{alias}/start": {"post": _op("start a model", DONE, 400, 404, 503, params=[_alias(), *START_PARAMS],
                                              admin=True)},
    "/api/models/{alias}/stop": {"post": _op("stop a model", DONE, 404, 503, params=[_alias()], admin=True)},
    "/api/models/{alias}/info": {"get": _op("one model in detail", _obj(("success", "model"), success=BOOL,
                                                                         model={"type": "object"}), 404,
                                            params=[_alias()])},
    "/api/models/{alias}/logs/stream": {"get": _op("the model's log as server-sent events", STR, 400, 404,
                                                   params=[_alias(), *LOG_STREAM_PARAMS],
                                                   ok_type="text/event-stream")},
    "/api/logs/stats": {"get": _op("log statistics", _obj(("success", "stats"), success=BOOL,
                                                         stats={"type": "object"}))},
    "/api/logs/{alias}/clear": {"post": _op("trim a model's log", DONE, 400, 404, params=[_alias(), *CLEAR_PARAMS],
                                            admin=True)},
    "/api/devices/info": {"get": _op("devices of every host", _obj(("success", "devices"), success=BOOL,
                                                                   devices={"type": "object"}))},
}

DOCUMENT: Json = {
    "openapi": "3.0.3",
    "info": {"title": "llm-router", "version": __version__,
             "description": "One OpenAI-compatible endpoint and one control plane for a lab's model servers. "
                            "Errors: OpenAI's shape on /v1, {success: false, message} on /api. Keys: see "
                            "docs/security.md (off on a loopback-only router)."},
    "paths": PATHS,
    "components": {"securitySchemes": {
        "bearer": {"type": "http", "scheme": "bearer", "description": "a client or admin API key"},
        "cookie": {"type": "apiKey", "in": "cookie", "name": "llm_router_key",
                   "description": "the same key as a cookie, GET/HEAD only (the dashboard's EventSource)"},
    }},
}


@functools.cache
def document_bytes() -> bytes:
    return msgspec.json.encode(DOCUMENT)
