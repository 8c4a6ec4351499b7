"""How deep a forwarded JSON body nests: engines parse the body the router forwards, and a body
nested thousands deep costs them (and some parsers) dearly, so the proxy refuses it (400) before
it leaves the router."""

from __future__ import annotations

import re

from llm_lab_router.router.core.errors import ApiError

_ESCAPED = re.compile(rb"\\.", re.S)
_STRING = re.compile(rb'"[^"]*"')
OPENERS = frozenset(b"[{")
_NOT_BRACKET = bytes(c for c in range(256) if c not in b"[]{}")


def json_depth(body: bytes, limit: int) -> int:
    """The nesting depth of the JSON text ``body``, counting no further than ``limit + 1``.

    Strings are blanked out first (escapes, then quoted runs), so brackets inside them do not
    count; what is left is a short run of brackets, walked once."""
    brackets = _STRING.sub(b"", _ESCAPED.sub(b"", body)).translate(None, _NOT_BRACKET)
    depth = deepest = 0
    for c in brackets:
        if c in OPENERS:
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    return deepest
        else:
            depth -= 1
    return deepest


def check_json_depth(body: bytes, limit: int) -> None:
    if body.count(b"[") + body.count(b"{") > limit:  # else it cannot be deeper: no scan
        if (depth := json_depth(body, limit)) > limit:
            raise ApiError(400, f"request body is nested deeper than {limit} levels ({depth}+)", "json_too_deep")
