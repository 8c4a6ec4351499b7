"""Who may call what: client and admin API keys, checked before a request body is read.

Three levels: ``PUBLIC`` (``/health``, the dashboard's static files, ``/openapi.json``),
``CLIENT`` (``/v1/*`` and, unless ``read_access = "public"``, the read-only ``/api`` routes) and
``ADMIN`` (everything that changes state: start/stop, stop-all, restart-autostart, log clear).
An admin key is also a client key.

Keys are kept only as SHA-256 digests and compared with ``hmac.compare_digest`` against every
stored digest (no early exit), so neither a log line nor a timing difference gives one away.
Key files may hold the plain key or ``sha256:<hex>`` of it, so a router host need not store
plain keys at all.

Where a key may come from: ``Authorization: Bearer <key>`` (OpenAI SDKs, the CLI, the
dashboard's ``fetch``) on any request; the ``llm_router_key`` cookie on GET/HEAD only. The
cookie exists for the dashboard's ``EventSource`` (log streams), which cannot send headers.
It is preferred over ``?api_key=`` because a key in a URL ends up in access logs, proxy logs
and browser history; and it is honoured for safe methods only, so a cross-site form can never
use it to start or stop anything (CSRF), even where ``SameSite`` is not enforced.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import re
from enum import IntEnum
from pathlib import Path
from typing import Iterable, Literal, Mapping

from router.responses import ApiError

COOKIE = "llm_router_key"
SAFE_METHODS = frozenset({"GET", "HEAD"})
ENV_CLIENT_KEYS = "LLM_ROUTER_API_KEYS"
ENV_ADMIN_KEYS = "LLM_ROUTER_ADMIN_KEYS"
DIGEST = re.compile(r"^sha256:([0-9a-fA-F]{64})$")
# Token characters only (base64, URL-safe base64, hex): a key must fit in a header, a cookie
# and a comma-separated environment variable unchanged.
KEY = re.compile(r"^[A-Za-z0-9._~+/=-]{16,512}$")
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})

ReadAccess = Literal["public", "client"]


class Role(IntEnum):
    PUBLIC = 0
    CLIENT = 1
    ADMIN = 2


class KeyFileError(ValueError):
    """A key file that cannot be read or holds nothing usable (worded for the operator)."""


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def parse_keys(text: str, source: str) -> list[bytes]:
    """Digests of the keys in ``text``: one per line (or comma-separated), ``#`` comments,
    each a plain key or ``sha256:<hex>``."""
    found = []
    for raw in re.split(r"[\n,]", text):
        item = raw.split("#", 1)[0].strip()
        if not item:
            continue
        if m := DIGEST.match(item):
            found.append(bytes.fromhex(m.group(1)))
        elif not KEY.match(item):
            raise KeyFileError(f"{source}: a key must be 16 to 512 of the characters A-Z a-z 0-9 - . _ ~ + / = "
                               "(e.g. `openssl rand -hex 32`)")
        else:
            found.append(digest(item))
    return found


def read_key_file(path: str | os.PathLike) -> list[bytes]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"{path}: cannot read key file: {getattr(exc, 'strerror', None) or exc}") from None
    keys = parse_keys(text, str(path))
    if not keys:
        raise KeyFileError(f"{path}: no key in the file")
    return keys


class KeyRing:
    """Digests of the client and admin keys; answers "what role does this key have"."""

    def __init__(self, client: Iterable[bytes] = (), admin: Iterable[bytes] = ()) -> None:
        self.admin = list(admin)
        self.client = list(client)

    @classmethod
    def load(cls, client_file: str | None = None, admin_file: str | None = None,
             env: Mapping[str, str] = os.environ) -> "KeyRing":
        client = parse_keys(env.get(ENV_CLIENT_KEYS, ""), ENV_CLIENT_KEYS)
        admin = parse_keys(env.get(ENV_ADMIN_KEYS, ""), ENV_ADMIN_KEYS)
        if client_file:
            client += read_key_file(client_file)
        if admin_file:
            admin += read_key_file(admin_file)
        return cls(client, admin)

    @property
    def enabled(self) -> bool:
        return bool(self.client or self.admin)

    def role_of(self, key: str) -> Role | None:
        """The role ``key`` grants, ``None`` if it is no key of ours. Every digest is compared."""
        d = digest(key)
        is_admin = _any_equal(d, self.admin)
        is_client = _any_equal(d, self.client)
        if is_admin:
            return Role.ADMIN
        return Role.CLIENT if is_client else None


def _any_equal(d: bytes, digests: list[bytes]) -> bool:
    found = False
    for other in digests:
        found |= hmac.compare_digest(d, other)
    return found


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def startup_refusal(host: str, ring: KeyRing, insecure: bool) -> str | None:
    """Why a router must not start (one line, with the fix), or ``None``."""
    if ring.enabled or insecure or is_loopback(host):
        return None
    return (f"refusing to listen on {host} without API keys: set {ENV_CLIENT_KEYS}/{ENV_ADMIN_KEYS} or "
            "--api-keys-file/--admin-keys-file, bind to 127.0.0.1, or pass --insecure to run open on purpose")


# Routes, by path shape. Everything that changes state is an admin route.
ADMIN_ROUTES = re.compile(r"^/api/models/(?:[^/]+/(?:start|stop)|stop-all|restart-autostart)$"
                          r"|^/api/logs/[^/]+/clear$|^/debug/")
PUBLIC_ROUTES = re.compile(r"^/health$|^/openapi\.json$|^/ui(?:/|$)")
READ_ROUTES = re.compile(r"^/$|^/v1/models(?:/[^/]+)?$|^/api/")


def required_role(method: str, path: str, read_access: ReadAccess) -> Role:
    if ADMIN_ROUTES.match(path):
        return Role.ADMIN
    if PUBLIC_ROUTES.match(path):
        return Role.PUBLIC
    if method in SAFE_METHODS and READ_ROUTES.match(path):
        return Role.PUBLIC if read_access == "public" else Role.CLIENT
    return Role.CLIENT


def presented_key(method: str, authorization: str | None, cookie: str | None) -> str | None:
    if authorization:
        scheme, _, value = authorization.partition(" ")
        return value.strip() if scheme.lower() == "bearer" else ""
    if cookie and method in SAFE_METHODS:
        return cookie
    return None


class AccessPolicy:
    """The router's access rule: keys (possibly none) and how open the read-only routes are."""

    def __init__(self, ring: KeyRing | None = None, read_access: ReadAccess = "client") -> None:
        self.ring = ring or KeyRing()
        self.read_access = read_access

    @property
    def enabled(self) -> bool:
        """Keys are on. Without keys the handler skips the check, cookie parsing included."""
        return self.ring.enabled

    def check(self, method: str, path: str, authorization: str | None, cookie: str | None) -> None:
        """Raise 401 (no or unknown key) or 403 (a client key on an admin route)."""
        if not self.ring.enabled:
            return
        need = required_role(method, path, self.read_access)
        if need is Role.PUBLIC:
            return
        key = presented_key(method, authorization, cookie)
        if not key:
            raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", "missing_api_key")
        role = self.ring.role_of(key)
        if role is None:
            raise ApiError(401, "invalid API key", "invalid_api_key")
        if role < need:
            raise ApiError(403, "this route needs an admin key", "admin_key_required")
