"""One route table (router/http/routes.py): the application, the auth decision and the OpenAPI
document are all derived from it, and a route added to it appears in all three."""

from __future__ import annotations

import re
from types import SimpleNamespace

import tornado.web
from helpers import get_json, start_router
from llm_lab_router.router.core.options import RouterOptions
from llm_lab_router.router.core.responses import ModelInfo
from llm_lab_router.router.http import handlers as h
from llm_lab_router.router.http.app import make_app
from llm_lab_router.router.http.openapi import document
from llm_lab_router.router.http.routes import ROUTES, Op, Route, own_v1_patterns
from tornado.httputil import HTTPServerRequest

DOCUMENT = document(RouterOptions())
METHODS = ("get", "post", "put", "patch", "delete", "head", "options")
SECURITY = {"public": [], "read": [{"bearer": []}, {"cookie": []}, {}], "client": [{"bearer": []}, {"cookie": []}, {}],
            "logs": [{"bearer": []}, {"cookie": []}, {}], "admin": [{"bearer": []}, {}]}


def concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "some-alias", path)


def implemented(handler: type) -> set[str]:
    return {m for m in METHODS if getattr(handler, m) is not getattr(tornado.web.RequestHandler, m)}


def app_for(routes: tuple[Route, ...]) -> tornado.web.Application:
    """The router's application over ``routes``; no request is served, so the services are a
    stand-in with the options only."""
    return make_app(SimpleNamespace(options=RouterOptions()), routes=routes)  # type: ignore[arg-type]


def served_by(app: tornado.web.Application, method: str, path: str) -> tuple[type, dict]:
    """The handler class and its arguments the application picks for ``method path``."""
    delegate = app.find_handler(HTTPServerRequest(method=method, uri=path))
    return delegate.handler_class, delegate.handler_kwargs  # type: ignore[attr-defined]


def test_the_app_and_the_document_are_the_table() -> None:
    app, paths = app_for(ROUTES), DOCUMENT["paths"]
    assert list(paths) == [r.path for r in ROUTES if r.documented]
    for route in ROUTES:
        if route.handler is not None:
            handler, kwargs = served_by(app, "GET", concrete(route.path))
            assert handler is route.handler, route.path
            if issubclass(handler, h.BaseHandler):  # the API's: the route's access and query go with it
                assert (kwargs["access"], kwargs["query"]) == (route.access, route.query), route.path
                assert set(route.ops) == implemented(handler), route.path
        else:
            assert served_by(app, "POST", route.path)[0] is h.NotFoundHandler  # forwarded: Exchange's
        if not route.documented:
            continue
        assert set(paths[route.path]) == set(route.ops), route.path
        for method, op in paths[route.path].items():
            assert {p["name"] for p in op["parameters"] if p["in"] == "query"} == set(route.query), route.path
            assert op["security"] == SECURITY[route.access], route.path
            assert ("403" in op["responses"]) is (route.access in ("admin", "logs")), route.path  # logs: --logs-read
    assert [p.pattern for p in own_v1_patterns()] == [r"/v1/models$", r"/v1/models/([^/]+)$"]


def test_a_route_added_to_the_table_is_served_guarded_and_documented() -> None:
    extra = Route(path="/api/things/{alias}", access="admin", handler=h.ModelInfoHandler, query=("tail",),
                  ops={"get": Op(summary="a thing", ok=ModelInfo, errors=(404,))})
    table = (*ROUTES, extra)
    assert served_by(app_for(ROUTES), "GET", "/api/things/x")[0] is h.NotFoundHandler
    handler, kwargs = served_by(app_for(table), "GET", "/api/things/x")
    assert handler is h.ModelInfoHandler and kwargs["access"] == "admin" and kwargs["query"] == ("tail",)
    op = document(RouterOptions(), table)["paths"]["/api/things/{alias}"]["get"]
    assert op["summary"] == "a thing" and op["security"] == SECURITY["admin"]
    assert [p["name"] for p in op["parameters"]] == ["alias", "tail"] and {"403", "404"} <= set(op["responses"])
    assert op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/ModelInfo")


def test_the_document_is_served(procs, redis_url) -> None:
    router = start_router(procs, redis_url)
    doc = get_json(f"{router.url}/openapi.json")
    assert doc["openapi"].startswith("3.") and doc["paths"].keys() == DOCUMENT["paths"].keys()


def test_json_answers_are_described_by_the_structs_the_handlers_encode() -> None:
    """No placeholder such as ``{"type": "object"}``: every JSON body of the router's own routes
    (all but /openapi.json and the forwarded /v1 operations) is a generated component."""
    schemas = DOCUMENT["components"]["schemas"]
    for route in ROUTES:
        if route.path == "/openapi.json" or route.handler is None or not route.documented:
            continue
        for method, op in DOCUMENT["paths"][route.path].items():
            for status, response in op["responses"].items():
                schema = response["content"].get("application/json", {}).get("schema")
                if schema is not None:
                    name = schema["$ref"].rsplit("/", 1)[1]
                    assert schemas[name]["type"] == "object" and schemas[name]["properties"], (method, route.path, status)
    devices = schemas["DeviceSummary"]["properties"]
    assert devices["cuda"]["$ref"].endswith("/CudaSummary") and schemas["GpuTotals"]["required"] == [
        "device_count", "device_name", "memory_total", "memory_used", "memory_free"]
