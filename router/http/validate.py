"""Checks on hostile input that need no state: forwarded paths and query parameters.

Pure functions raising ``ApiError`` (400), called by the handlers before any work is done.

- ``check_forward_path``: only ``/v1/...`` is forwarded, and only a path that every HTTP
  stack reads the same way. The engine URL is ``instance.url + path``; a ``..`` segment (plain
  or percent-encoded), an empty segment, a backslash or an encoded slash could be normalised
  by the HTTP client or the engine into a path outside ``/v1`` (``/v1/../admin``), and an
  ``@`` or a scheme right after the host would name another host. The request target itself
  is always origin-form here: Tornado routes by path, so an absolute URL target
  (``GET http://evil/v1/x``) never reaches the proxy route.
- ``check_query``: every query parameter of an ``/api`` route is known to the route, given
  once, and printable; anything else is a 400 naming the parameter (a typo such as
  ``?keep_minute=5`` would otherwise silently clear all logs).
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping

from llm_lab_router.router.core.errors import ApiError

SEGMENT = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,;=:@]|%[0-9A-Fa-f]{2})+")
FORBIDDEN_ESCAPES = re.compile(r"%(?:2[eEfF]|5[cC]|00)")  # '.', '/', '\', NUL
# The common case of ``check_forward_path`` in one match: ``/v1/`` then SEGMENTs that are not
# '.' or '..', one trailing slash at most. A path it does not match gets the full check.
_PLAIN_SEGMENT = r"(?!\.\.?(?:/|\Z))(?:[A-Za-z0-9\-._~!$&'()*+,;=:@]|%[0-9A-Fa-f]{2})+"
PLAIN_PATH = re.compile(rf"/v1/(?:{_PLAIN_SEGMENT}(?:/{_PLAIN_SEGMENT})*/?)?")


def check_forward_path(path: str) -> None:
    """Raise 400 unless ``path`` is a plain ``/v1/...`` path (see the module docstring)."""
    if PLAIN_PATH.fullmatch(path) and not FORBIDDEN_ESCAPES.search(path):
        return  # one regex pass instead of a split and a match per segment (hot path)
    if not path.startswith("/v1/"):
        raise ApiError(400, "only /v1/ paths are forwarded", "invalid_path")
    segments = path[1:].split("/")
    if path.endswith("/"):
        segments.pop()  # one trailing slash is harmless (and some clients add it)
    for seg in segments:
        if seg in ("", ".", "..") or not SEGMENT.fullmatch(seg) or FORBIDDEN_ESCAPES.search(seg):
            raise ApiError(400, f"invalid path segment {seg!r}: no empty, '.' or '..' segments, "
                                "no encoded '.', '/' or '\\', printable ASCII only", "invalid_path")


def check_query(arguments: Mapping[str, list[bytes]], allowed: Iterable[str]) -> None:
    """Raise 400 naming the first unknown, repeated or unprintable query parameter."""
    allowed = set(allowed)
    for name, values in arguments.items():
        if name not in allowed:
            known = ", ".join(sorted(allowed)) or "none"
            raise ApiError(400, f"unknown query parameter {name!r} (this route takes: {known})",
                           "invalid_parameter")
        if len(values) > 1:
            raise ApiError(400, f"query parameter {name!r} given {len(values)} times", "invalid_parameter")
        try:
            text = values[0].decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(400, f"query parameter {name!r} is not UTF-8", "invalid_parameter") from None
        if not text.isprintable():
            raise ApiError(400, f"query parameter {name!r} holds control characters", "invalid_parameter")
