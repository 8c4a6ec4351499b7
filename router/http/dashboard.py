"""The operator web dashboard, mounted at ``/ui/``: static files only, no server-side state.

The page (``router/http/static``) is plain HTML/CSS/JS that talks to the same HTTP API as the CLI
(``/health``, ``/v1/models``, ``/api/...``), so it needs nothing from the router beyond its
three routes (``/ui``, ``/ui/``, ``/ui/<file>``: public rows of router/http/routes.py).

Caching: ``index.html`` is served with ``no-cache`` and links ``app.js``/``style.css`` with a
``?v=<content hash>`` query, which Tornado's ``StaticFileHandler`` answers with a one-year
cache; an upgraded router therefore never serves a stale script to an open browser, and a
reload costs one small request.

Every answer under ``/ui/`` carries ``SECURITY_HEADERS``: the page runs only its own script
(no inline script, so an injected ``<script>`` does not run), may not be framed by another
site (``frame-ancestors 'none'``: no clickjacking of its stop buttons), and its files are
never sniffed into another type.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import tornado.web

STATIC_DIR = Path(__file__).resolve().parent / "static"
VERSIONED = ("app.js", "timeline.js", "style.css")
SECURITY_HEADERS = {
    # inline styles: the page sets bar widths with style attributes; scripts: its own file only
    "Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
                               "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",  # frame-ancestors for browsers without CSP level 2
    "Referrer-Policy": "no-referrer",
}


def secure(handler: tornado.web.RequestHandler) -> None:
    for name, value in SECURITY_HEADERS.items():
        handler.set_header(name, value)


def _version(name: str) -> str:
    return hashlib.sha256((STATIC_DIR / name).read_bytes()).hexdigest()[:12]


class DashboardIndexHandler(tornado.web.RequestHandler):
    """Serves ``index.html`` with the content hashes of its assets filled in."""

    def set_default_headers(self) -> None:
        secure(self)

    def get(self) -> None:
        html = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
        for name in VERSIONED:
            html = html.replace(f'"{name}"', f'"{name}?v={_version(name)}"')
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        self.write(html)


class DashboardStaticHandler(tornado.web.StaticFileHandler):
    """Assets under ``/ui/``: long-cached when versioned (``?v=``), revalidated otherwise."""

    def set_default_headers(self) -> None:
        secure(self)

    def set_extra_headers(self, path: str) -> None:
        if "v" not in self.request.arguments:
            self.set_header("Cache-Control", "no-cache")
