"""Requests a web page made: the router obeys its operator's browser, not the pages in it.

A router without keys (the default of ``up`` and of ``serve`` on 127.0.0.1) trusts whoever
reaches its port, and any web page the operator opens can reach it: a ``no-cors`` POST stopped
every model, a ``text/plain`` form whose body was JSON started one and ran an inference, and a
page whose name was rebound to 127.0.0.1 (DNS rebinding) read logs and answers. So, for every
request, before routing (``SitePolicy.refusal``, called by router/http/exchange.py's dispatcher):

- **Host**: a router bound to loopback answers only loopback host names (``localhost``, a
  loopback address, with any port): a rebound name is refused (403 ``host_not_allowed``).
- **Cross-site writes**: a state-changing request (any method but GET, HEAD, OPTIONS) that the
  browser marks ``Sec-Fetch-Site: cross-site`` or ``same-site``, or whose ``Origin`` is not the
  router's own (the scheme and ``Host`` it was reached at), is refused (403
  ``cross_site_refused``) unless that origin is allowed (``LLM_ROUTER_ALLOW_ORIGINS``).
- **JSON only**: a forwarded ``/v1`` body must be labelled JSON (``application/json`` or
  ``*+json``); ``multipart/form-data`` too where OpenAI's API takes uploads (audio, files,
  uploads' parts, image edits). Anything else is a 415: no label a form can send
  (``text/plain``, ``application/x-www-form-urlencoded``) carries JSON past the checks.
- **CORS**: off unless origins are allowed; an allowed origin gets ``Access-Control-Allow-*``
  on its answers and on its preflight (``OPTIONS``), answered here.

The cost on the common path (no ``Origin``, loopback ``Host``, JSON) is a few header lookups.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Awaitable, Iterable
from urllib.parse import urlsplit

from tornado import httputil

from llm_lab_router.router.core.errors import ApiError, encode, error_body
from llm_lab_router.router.http.auth import is_loopback

log = logging.getLogger("router.origin")

READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})  # never change state (OPTIONS: a preflight)
CROSS = frozenset({"cross-site", "same-site"})  # Sec-Fetch-Site values of another site's page
# Where OpenAI's API takes multipart/form-data bodies (uploads); JSON is taken there too.
MULTIPART_PREFIXES = ("/v1/audio/", "/v1/files", "/v1/uploads", "/v1/images/edits", "/v1/images/variations")
CORS_METHODS = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
CORS_HEADERS = "Authorization, Content-Type, OpenAI-Organization, OpenAI-Project, X-Stainless-Lang"


def parse_origins(text: str) -> frozenset[str]:
    """The allowed origins of ``LLM_ROUTER_ALLOW_ORIGINS`` (comma-separated
    ``scheme://host[:port]``), normalised as browsers send them; ``ValueError`` names a bad one."""
    found = set()
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        parts = urlsplit(item)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/") \
                or parts.query or parts.fragment or "@" in parts.netloc:
            raise ValueError(f"allowed origin {item!r}: expected scheme://host[:port] (e.g. https://app.lab.example)")
        found.add(f"{parts.scheme}://{parts.netloc}".lower())
    return frozenset(found)


def host_name(host: str) -> str:
    """The name part of a ``Host`` header: ``[::1]:8000`` -> ``::1``, ``localhost:8000`` -> ``localhost``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def loopback_name(name: str) -> bool:
    if name == "localhost" or name.endswith(".localhost"):  # RFC 6761: always loopback
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


class SitePolicy:
    """Which requests a browser page may make of this router (see the module docstring)."""

    def __init__(self, bound_host: str, allowed_origins: Iterable[str] = ()) -> None:
        self.loopback_only = is_loopback(bound_host)
        self.allowed = frozenset(allowed_origins)

    def refusal(self, method: str, path: str, headers: httputil.HTTPHeaders) -> ApiError | None:
        """Why this request is refused before routing, or ``None``."""
        host = headers.get("Host", "")
        if self.loopback_only and host and not loopback_name(host_name(host)):
            return ApiError(403, f"this router listens on loopback and answers only loopback host names "
                                 f"(localhost, 127.0.0.1, [::1]), not {host!r}", "host_not_allowed")
        if method in READ_METHODS:
            return None
        origin = headers.get("Origin")
        if origin is None or origin.lower() not in self.allowed:
            site = headers.get("Sec-Fetch-Site", "").lower()
            if site in CROSS or (origin is not None and not self._own(origin, host)):
                return ApiError(403, f"a {site or 'cross-origin'} request from origin {origin or '(none)'!r} may not "
                                     f"{method} here; allow it with LLM_ROUTER_ALLOW_ORIGINS", "cross_site_refused")
        if path.startswith("/v1/") and _has_body(headers):
            content_type = headers.get("Content-Type", "")
            if not is_json(content_type) and not (path.startswith(MULTIPART_PREFIXES)
                                                  and content_type.lower().startswith("multipart/form-data")):
                return ApiError(415, f"the body of {path} must be JSON (Content-Type: application/json), "
                                     f"not {content_type or 'unlabelled'!r}", "unsupported_media_type")
        return None

    @staticmethod
    def _own(origin: str, host: str) -> bool:
        """``origin`` is the router's own: its host and port are the ``Host`` it was reached at."""
        parts = urlsplit(origin)
        return parts.scheme in ("http", "https") and bool(host) and parts.netloc.lower() == host.strip().lower()

    def cors_origin(self, headers: httputil.HTTPHeaders) -> str | None:
        """The request's ``Origin`` when it is allowed (its answer gets CORS headers)."""
        if not self.allowed:
            return None
        origin = headers.get("Origin")
        return origin if origin is not None and origin.lower() in self.allowed else None


def cors_headers(origin: str) -> dict[str, str]:
    return {"Access-Control-Allow-Origin": origin, "Vary": "Origin",
            "Access-Control-Expose-Headers": "Retry-After, X-Router-Model, X-Router-Worker"}


def _has_body(headers: httputil.HTTPHeaders) -> bool:
    length = headers.get("Content-Length", "")
    return (length not in ("", "0") and length.strip("0") != "") or "Transfer-Encoding" in headers


class Answer(httputil.HTTPMessageDelegate):
    """A request answered from its head alone (a refusal, a CORS preflight): the body, if any,
    is not read (``HTTP1Connection`` drops it and closes the connection)."""

    def __init__(self, conn: httputil.HTTPConnection, status: int, headers: dict[str, str], body: bytes = b"") -> None:
        self.conn = conn
        self.status = status
        self.headers = headers
        self.body = body

    @classmethod
    def refusal(cls, conn: httputil.HTTPConnection, err: ApiError, method: str, path: str) -> "Answer":
        log.warning("refused %s %s: %s", method, path, err.message)
        return cls(conn, err.status, {"Content-Type": "application/json", **err.headers},
                   encode(error_body(err, path.startswith("/v1/"))))

    @classmethod
    def preflight(cls, conn: httputil.HTTPConnection, origin: str) -> "Answer":
        return cls(conn, 204, {**cors_headers(origin), "Access-Control-Allow-Methods": CORS_METHODS,
                               "Access-Control-Allow-Headers": CORS_HEADERS, "Access-Control-Max-Age": "600"})

    def headers_received(self, start_line: httputil.RequestStartLine | httputil.ResponseStartLine,
                         headers: httputil.HTTPHeaders) -> Awaitable[None] | None:
        out = httputil.HTTPHeaders(self.headers)
        if self.status != 204:
            out["Content-Length"] = str(len(self.body))
        line = httputil.ResponseStartLine("", self.status, httputil.responses.get(self.status, "Unknown"))
        self.conn.write_headers(line, out, self.body)
        self.conn.finish()
        return None

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        return None

    def finish(self) -> None:
        pass

    def on_connection_close(self) -> None:
        pass


class CorsConnection:
    """The request's connection, adding CORS headers to its answer's head (allowed origins only)."""

    def __init__(self, conn: httputil.HTTPConnection, origin: str) -> None:
        self._conn = conn
        self._cors = cors_headers(origin)

    def write_headers(self, start_line, headers: httputil.HTTPHeaders, chunk: bytes | None = None):  # type: ignore[no-untyped-def]
        for name, value in self._cors.items():
            headers[name] = value
        return self._conn.write_headers(start_line, headers, chunk)

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self._conn, name)
