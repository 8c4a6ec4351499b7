"""The OpenAPI document stays in step with the route table and the handlers' query parameters."""

from __future__ import annotations

import re

import tornado.web
from helpers import get_json, start_router
from llm_lab_router.router.core.options import RouterOptions
from llm_lab_router.router.http.app import ROUTES
from llm_lab_router.router.http.handlers import ProxyHandler
from llm_lab_router.router.http.openapi import document

DOCUMENT = document(RouterOptions())
METHODS = ("get", "post", "put", "patch", "delete", "head", "options")


def concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "some-alias", path)


def implemented(handler: type) -> set[str]:
    return {m for m in METHODS if getattr(handler, m) is not getattr(tornado.web.RequestHandler, m)}


def handler_for(path: str) -> type:
    for pattern, handler in ROUTES:
        if re.fullmatch(pattern, concrete(path)):
            return handler
    raise AssertionError(f"documented path {path} has no route")


def test_every_route_is_documented_and_every_documented_path_is_routed() -> None:
    paths = DOCUMENT["paths"]
    for pattern, handler in ROUTES:
        assert any(re.fullmatch(pattern, concrete(p)) for p in paths), f"route {pattern} is not in router/http/openapi.py"
    for path, operations in paths.items():
        handler = handler_for(path)
        if handler is not ProxyHandler:  # the proxy takes any method; the document names the main ones
            assert set(operations) == implemented(handler), path
        for method, op in operations.items():
            query = {p["name"] for p in op["parameters"] if p["in"] == "query"}
            expected = set() if handler is ProxyHandler else set(handler.QUERY)
            assert query == expected, (method, path)


def test_the_document_is_served(procs, redis_url) -> None:
    router = start_router(procs, redis_url)
    doc = get_json(f"{router.url}/openapi.json")
    assert doc["openapi"].startswith("3.") and doc["paths"].keys() == DOCUMENT["paths"].keys()


def test_json_answers_are_described_by_the_structs_the_handlers_encode() -> None:
    """No placeholder such as ``{"type": "object"}``: every JSON body of the router's own routes
    (all but /openapi.json and the forwarded /v1 operations) is a generated component."""
    schemas = DOCUMENT["components"]["schemas"]
    for path, operations in DOCUMENT["paths"].items():
        if path == "/openapi.json" or handler_for(path) is ProxyHandler:
            continue
        for method, op in operations.items():
            for status, response in op["responses"].items():
                schema = response["content"].get("application/json", {}).get("schema")
                if schema is not None:
                    name = schema["$ref"].rsplit("/", 1)[1]
                    assert schemas[name]["type"] == "object" and schemas[name]["properties"], (method, path, status)
    devices = schemas["DeviceSummary"]["properties"]
    assert devices["cuda"]["$ref"].endswith("/CudaSummary") and schemas["GpuTotals"]["required"] == [
        "device_count", "device_name", "memory_total", "memory_used", "memory_free"]
