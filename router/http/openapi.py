"""The OpenAPI 3.1 document of the router's own API, served at ``/openapi.json``.

Rendered from the route table (``router/http/routes.py``), which holds each route's path,
methods, access, summary, error codes and response type. Generated, not hand-written, wherever
the code has the truth: response bodies are the msgspec structs the handlers encode
(``router/core/responses.py``: ``msgspec.json.schema_components``), query parameters are the
``router/http/query.py`` declarations the handlers parse, with this router's defaults and
limits, and the security of each operation follows from its route's access.

``tests/test_fuzz.py`` runs schemathesis against a live router from it and checks every answer
against the documented status codes and response schemas.

``/v1/*`` is documented by its three main OpenAI operations; the router forwards any other
``/v1/...`` path as well (see ``router.forward.proxy``), its body untouched.
"""

from __future__ import annotations

from typing import Any

import msgspec
from llm_lab_router import __version__
from llm_lab_router.router.core.errors import Failure, OpenAIError
from llm_lab_router.router.core.options import RouterOptions
from llm_lab_router.router.http.query import route_params
from llm_lab_router.router.http.routes import ROUTES, Op, Route

Json = dict[str, Any]
REF = "#/components/schemas/{name}"
ERRORS = (Failure, OpenAIError)


def response_types(routes: tuple[Route, ...]) -> tuple[type, ...]:
    """The structs the documented operations answer (in table order), then the error bodies."""
    found = {op.ok: None for r in routes if r.documented for op in r.ops.values() if isinstance(op.ok, type)}
    return (*found, *ERRORS)


def request_types(routes: tuple[Route, ...]) -> tuple[type, ...]:
    """The request bodies documented (the forwarded operations': the engine parses them)."""
    return tuple({op.body: None for r in routes if r.documented for op in r.ops.values() if op.body is not None})


def _always_present(components: Json, responses: tuple[type, ...]) -> Json:
    """msgspec lists a field with a default as optional, which is right for a request body; in
    a response every field is encoded unless its struct omits defaults, so say it is there."""
    for cls in _structs(responses):
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
          401: "missing or invalid API key (keys on)",
          403: "admin key needed (keys on; log streams too with --logs-read admin)",
          404: "unknown model, route or worker", 413: "body too large",
          415: "body not labelled JSON (router/http/origin.py)", 429: "model at its concurrency limit (Retry-After)",
          502: "engine unreachable", 503: "model not running / start failed / Redis unreachable", 504: "engine timeout"}


def _json(schema: Json, description: str) -> Json:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _schema(ok: type | Json) -> Json:
    return _ref(ok) if isinstance(ok, type) else ok


def _operation(route: Route, op: Op, options: RouterOptions) -> Json:
    """One operation: 200 with its ``ok`` body, then errors in the route's shape. Every route
    may answer 400 (query parameters are checked on all of them) and, unless public, 401; an
    admin route 403."""
    openai = route.path.startswith("/v1/")
    public, admin = route.access == "public", route.access == "admin"
    failure = _ref(OpenAIError if openai else Failure)
    forbidden = admin or route.access == "logs"  # logs: with --logs-read admin
    codes = sorted({400, *(() if public else (401,)), *((403,) if forbidden else ()), *op.errors})
    responses: Json = {"200": _ok(op)}
    if op.accepted:
        responses["202"] = _json(_schema(op.ok), op.accepted)
    responses.update({str(c): _json(failure, CAUSES[c]) for c in codes})
    params = route_params(options).by_name()
    parameters = [PATH_PARAMS[name] for name in route.path_params] + [params[q].openapi() for q in route.query]
    out: Json = {"summary": op.summary, "parameters": parameters, "responses": responses}
    if op.body is not None:
        out["requestBody"] = {"required": True, "content": {"application/json": {"schema": _ref(op.body)}}}
    # ``{}``: no key at all is also accepted, by a router with keys off (the loopback default)
    out["security"] = [] if public else [{"bearer": []}, {}] if admin else [{"bearer": []}, {"cookie": []}, {}]
    return out


def _ok(op: Op) -> Json:
    """The 200 answer: a forwarded stream (JSON or server-sent events), a stream of events
    whose ``data:`` is the ``ok`` struct, or one body of ``ok_type``."""
    if op.streams:
        return {"description": "ok" + FORWARDED_DESCRIPTION,
                "content": {"application/json": {"schema": _schema(op.ok)},
                            "text/event-stream": {"schema": _sse_event({"type": "string"})}}}
    if op.ok_type == "text/event-stream":
        data = {"type": "string", "contentMediaType": "application/json", "contentSchema": _schema(op.ok)}
        return {"description": "ok", "content": {op.ok_type: {"schema": _sse_event(data)}}}
    return {"description": "ok", "content": {op.ok_type: {"schema": _schema(op.ok)}}}


PATH_PARAMS = {"alias": {"name": "alias", "in": "path", "required": True, "schema": {"type": "string", "minLength": 1},
                         "description": "a model id or alias"}}


def _sse_event(data: Json) -> Json:
    """One server-sent event (OpenAPI 3.1 reads the schema of ``text/event-stream`` as that of
    each event): its ``data`` text, optional ``event`` and ``id``."""
    return {"type": "object", "required": ["data"],
            "properties": {"data": data, "event": {"type": "string"}, "id": {"type": "string"},
                           "retry": {"type": "integer"}}}


FORWARDED_DESCRIPTION = (" (the engine's status and body; with \"stream\": true, server-sent events. While an "
                         "on-demand start loads the model, a streamed request gets SSE comments, and a failure is "
                         "a data: {\"error\": ...} event ending the stream)")


def paths(options: RouterOptions, routes: tuple[Route, ...] = ROUTES) -> Json:
    return {r.path: {method: _operation(r, op, options) for method, op in r.ops.items()}
            for r in routes if r.documented}


def document(options: RouterOptions, routes: tuple[Route, ...] = ROUTES) -> Json:
    response_structs = response_types(routes)
    _, responses = msgspec.json.schema_components(response_structs, ref_template=REF)
    _, requests = msgspec.json.schema_components(request_types(routes), ref_template=REF)
    return {
        "openapi": "3.1.0",
        "info": {"title": "llm-router", "version": __version__,
                 "description": "One OpenAI-compatible endpoint and one control plane for a lab's model servers. "
                                "Errors: OpenAI's shape on /v1, {success: false, message} on /api. Query "
                                "parameters are optional: absent, a parameter takes its default; present, it "
                                "must be valid (empty or blank is a 400). Keys: docs/security.md (off on a "
                                "loopback-only router). Reference: docs/api.md."},
        "paths": paths(options, routes),
        "components": {
            "schemas": {**_always_present(responses, response_structs), **requests},
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "a client or admin API key"},
                "cookie": {"type": "apiKey", "in": "cookie", "name": "llm_router_key",
                           "description": "the same key as a cookie, GET/HEAD only (the dashboard's EventSource)"},
            },
        },
    }


def document_bytes(options: RouterOptions, routes: tuple[Route, ...] = ROUTES) -> bytes:
    return msgspec.json.encode(document(options, routes))
