"""Who may call what: client and admin API keys, checked before a request body is read.

Three levels: ``PUBLIC`` (``/health``, the dashboard's static files, ``/openapi.json``),
``CLIENT`` (``/v1/*`` and, unless ``read_access = "public"``, the read-only ``/api`` routes) and
``ADMIN`` (everything that changes state: start/stop, stop-all, restart-autostart, log clear).
An admin key is also a client key. Each route declares which (``access`` in
``router/http/routes.py``); a path no route matches is a ``read`` one (its answer is a 404).

Keys are kept only as SHA-256 digests and compared with ``hmac.compare_digest`` against every
stored digest (no early exit), so neither a log line nor a timing difference gives one away.
Key files may hold the plain key or ``sha256:<hex>`` of it, so a router host need not store
plain keys at all. A file named ``*.toml`` or ``*.json`` is the structured form: each key with
a name, an optional group and its limits (``KeyProfile``: requests and tokens per minute,
concurrent requests, queue priority and weight), enforced by ``router.limits.quotas`` and
``router.limits.concurrency``; any other file is one key per line, without limits.

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
import json
import os
import re
import tomllib
from enum import IntEnum
from pathlib import Path
from typing import Iterable, Literal, Mapping, TypeVar

import msgspec
from llm_lab_router.router.core.errors import ApiError
from llm_lab_router.router.limits.access import access_of
from llm_lab_router.router.limits.budgets import Budget
from llm_lab_router.router.limits.profile import GroupSpec, KeyProfile, KeySpec, LimitSpec, Name

COOKIE = "llm_router_key"
SAFE_METHODS = frozenset({"GET", "HEAD"})
ENV_CLIENT_KEYS = "LLM_ROUTER_API_KEYS"
ENV_ADMIN_KEYS = "LLM_ROUTER_ADMIN_KEYS"
DIGEST = re.compile(r"sha256:([0-9a-fA-F]{64})")
# Token characters only (base64, URL-safe base64, hex): a key must fit in a header, a cookie
# and a comma-separated environment variable unchanged.
KEY = re.compile(r"[A-Za-z0-9._~+/=-]{16,512}")
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})

ReadAccess = Literal["public", "client"]
T = TypeVar("T")
LogsRead = Literal["client", "admin"]
# Who may call a route (each route declares one: router/http/routes.py). ``read``: the
# read-only routes, which ``read_access = "public"`` opens to callers without a key. ``logs``:
# a model's log stream, a read route unless ``logs_read = "admin"`` (engine logs may hold other
# users' prompts: ``--logs-read``).
Access = Literal["public", "read", "logs", "client", "admin"]


class Role(IntEnum):
    PUBLIC = 0
    CLIENT = 1
    ADMIN = 2


ROLES = {"public": Role.PUBLIC, "client": Role.CLIENT, "admin": Role.ADMIN}


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
        if m := DIGEST.fullmatch(item):
            found.append(bytes.fromhex(m.group(1)))
        elif not KEY.fullmatch(item):
            raise KeyFileError(f"{source}: a key must be 16 to 512 of the characters A-Z a-z 0-9 - . _ ~ + / = "
                               "(e.g. `openssl rand -hex 32`)")
        else:
            found.append(digest(item))
    return found


def _structured(text: str, source: str, json_form: bool) -> dict:
    try:
        data = json.loads(text) if json_form else tomllib.loads(text)
    except ValueError as exc:  # json.JSONDecodeError and tomllib.TOMLDecodeError both are
        raise KeyFileError(f"{source}: not valid {'JSON' if json_form else 'TOML'}: {exc}") from None
    if not isinstance(data, dict):
        raise KeyFileError(f"{source}: the top level must be an object with 'keys' (and 'groups')")
    unknown = set(data) - {"keys", "groups"}
    if unknown:
        raise KeyFileError(f"{source}: unknown top-level field {sorted(unknown)[0]!r} (expected 'keys', 'groups')")
    return data


_AT_FIELD = re.compile(r"^(.*) - at `\$\.([^`]+)`$")


def _entry(value: object, typ: type, where: str) -> msgspec.Struct:
    try:
        return msgspec.convert(value, typ)
    except msgspec.ValidationError as exc:
        text = str(exc)
        if m := _AT_FIELD.match(text):
            text = f"field {m.group(2)!r}: {m.group(1)}"
        raise KeyFileError(f"{where}: {text}") from None


def parse_structured_keys(text: str, source: str, json_form: bool) -> dict[bytes, KeyProfile]:
    """Digest -> profile of each key of a TOML/JSON keys file. A bad entry is one
    ``KeyFileError`` naming the file, the entry (index and name) and the field."""
    data = _structured(text, source, json_form)
    groups_raw = data.get("groups", {})
    if not isinstance(groups_raw, dict):
        raise KeyFileError(f"{source}: 'groups' must be a table of group name -> limits")
    groups: dict[str, GroupSpec] = {}
    for gname, raw in groups_raw.items():
        _entry(gname, Name, f"{source}: group {gname!r}: bad name")
        groups[gname] = _entry(raw, GroupSpec, f"{source}: group {gname!r}")  # type: ignore[assignment]
    entries = data.get("keys", [])
    if not isinstance(entries, list):
        raise KeyFileError(f"{source}: 'keys' must be a list of key entries ([[keys]] in TOML)")
    found: dict[bytes, KeyProfile] = {}
    names: set[str] = set()
    for i, raw in enumerate(entries):
        label = raw.get("name") if isinstance(raw, dict) else None
        where = f"{source}: keys[{i}]" + (f" ({label!r})" if isinstance(label, str) else "")
        spec: KeySpec = _entry(raw, KeySpec, where)  # type: ignore[assignment]
        if spec.name in names:
            raise KeyFileError(f"{where}: the name {spec.name!r} is given twice (names label metrics and quotas)")
        if spec.group is not None and spec.group not in groups:
            raise KeyFileError(f"{where}: field 'group': no group {spec.group!r} in 'groups'")
        if spec.gpu_hours is not None:
            raise KeyFileError(f"{where}: field 'gpu_hours': a GPU-time budget belongs to a group ([groups.*])")
        digests = parse_keys(spec.key, f"{where}: field 'key'")
        if len(digests) != 1:
            raise KeyFileError(f"{where}: field 'key': exactly one key (plain or sha256:<hex>)")
        if digests[0] in found:
            raise KeyFileError(f"{where}: field 'key': the same key as another entry")
        names.add(spec.name)
        group = groups[spec.group] if spec.group else GroupSpec()
        found[digests[0]] = KeyProfile(
            name=spec.name, group=spec.group, priority=spec.priority, weight=spec.weight,
            key_limits=limits_of(spec), group_limits=limits_of(group), access=access_of(
                spec.name, own_or_group(spec.models, group.models), own_or_group(spec.start, group.start),
                own_or_group(spec.admin, group.admin)),
            budget=Budget(group=spec.group, gpu_hours=group.gpu_hours, period=group.budget_period)
            if spec.group and group.gpu_hours is not None else None)
    return found


def limits_of(spec: LimitSpec) -> LimitSpec:
    """Only the limits of an entry (what ``router.limits.quotas`` counts)."""
    return LimitSpec(rpm=spec.rpm, tpm=spec.tpm, max_concurrent=spec.max_concurrent)


def own_or_group(own: T | None, group: T | None) -> T | None:
    """A key's own permission field wins over its group's."""
    return own if own is not None else group


def key_file_form(path: str | os.PathLike) -> Literal["plain", "toml", "json"]:
    """The form of a keys file, by its extension: ``.toml``, ``.json``, else one key a line."""
    suffix = Path(path).suffix.lower()
    return "toml" if suffix == ".toml" else "json" if suffix == ".json" else "plain"


def read_key_file(path: str | os.PathLike) -> dict[bytes, KeyProfile | None]:
    """Digest -> profile (``None`` for a plain key line: no name, no limits)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"{path}: cannot read key file: {getattr(exc, 'strerror', None) or exc}") from None
    form = key_file_form(path)
    keys: dict[bytes, KeyProfile | None]
    if form == "plain":
        keys = dict.fromkeys(parse_keys(text, str(path)))
    else:
        keys = dict(parse_structured_keys(text, str(path), form == "json"))
    if not keys:
        raise KeyFileError(f"{path}: no key in the file")
    return keys


class KeyRing:
    """Digests of the client and admin keys; answers "what role does this key have"."""

    def __init__(self, client: Iterable[bytes] = (), admin: Iterable[bytes] = (),
                 profiles: Mapping[bytes, KeyProfile] | None = None) -> None:
        self.admin = list(admin)
        self.client = list(client)
        self.profiles = dict(profiles or {})  # digest -> name and limits (structured key files)

    @classmethod
    def load(cls, client_file: str | None = None, admin_file: str | None = None,
             env: Mapping[str, str] = os.environ) -> "KeyRing":
        client = parse_keys(env.get(ENV_CLIENT_KEYS, ""), ENV_CLIENT_KEYS)
        admin = parse_keys(env.get(ENV_ADMIN_KEYS, ""), ENV_ADMIN_KEYS)
        profiles: dict[bytes, KeyProfile] = {}
        for path, into in ((client_file, client), (admin_file, admin)):
            if path:
                found = read_key_file(path)
                into += found
                profiles.update({d: p for d, p in found.items() if p is not None})
        # a key with an admin scope is an admin key, for the models of its scope only
        admin += [d for d, p in profiles.items() if p.access is not None and p.access.admin is not None
                  and d not in admin]
        return cls(client, admin, profiles)

    @property
    def enabled(self) -> bool:
        return bool(self.client or self.admin)

    def budgets(self) -> list[Budget]:
        """The groups' GPU-time budgets, once each, by group."""
        found = {p.budget.group: p.budget for p in self.profiles.values() if p.budget is not None}
        return [found[g] for g in sorted(found)]

    def identify(self, key: str) -> tuple[Role | None, KeyProfile | None]:
        """The role ``key`` grants (``None``: no key of ours; every digest is compared) and its
        profile (``None``: a plain key, no limits). The profile is looked up only once the key
        matched (constant-time) as one of ours."""
        d = digest(key)
        is_admin = _any_equal(d, self.admin)
        is_client = _any_equal(d, self.client)
        role = Role.ADMIN if is_admin else Role.CLIENT if is_client else None
        return role, self.profiles.get(d) if role is not None and self.profiles else None


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


def required_role(access: Access, method: str, read_access: ReadAccess, logs_read: LogsRead = "client") -> Role:
    """The role a request needs, from its route's ``access`` (``router/http/routes.py``): a
    ``read`` route is public for GET/HEAD when ``read_access = "public"``, else a client route;
    a ``logs`` route is an admin route when ``logs_read = "admin"``, else a ``read`` route."""
    if access == "logs":
        access = "admin" if logs_read == "admin" else "read"
    if access == "read":
        return Role.PUBLIC if method in SAFE_METHODS and read_access == "public" else Role.CLIENT
    return ROLES[access]


def presented_key(method: str, authorization: str | None, cookie: str | None) -> str | None:
    if authorization:
        scheme, _, value = authorization.partition(" ")
        return value.strip() if scheme.lower() == "bearer" else ""
    if cookie and method in SAFE_METHODS:
        return cookie
    return None


class AccessPolicy:
    """The router's access rule: keys (possibly none) and how open the read-only routes are."""

    def __init__(self, ring: KeyRing | None = None, read_access: ReadAccess = "client",
                 logs_read: LogsRead = "client") -> None:
        self.ring = ring or KeyRing()
        self.read_access = read_access
        self.logs_read = logs_read  # "admin": log streams need an admin key (``--logs-read``)

    @property
    def enabled(self) -> bool:
        """Keys are on. Without keys the handler skips the check, cookie parsing included."""
        return self.ring.enabled

    def role(self, method: str, authorization: str | None, cookie: str | None) -> tuple[Role, KeyProfile | None]:
        """The role the presented key grants and its profile, for a route that answers each
        role differently (``/api/usage``): ``ADMIN`` with keys off (everyone may do
        everything), ``PUBLIC`` for no key or an unknown one."""
        if not self.ring.enabled:
            return Role.ADMIN, None
        key = presented_key(method, authorization, cookie)
        role, profile = self.ring.identify(key) if key else (None, None)
        return role or Role.PUBLIC, profile

    def check(self, method: str, access: Access, authorization: str | None,
              cookie: str | None) -> KeyProfile | None:
        """Raise 401 (no or unknown key) or 403 (a client key on an admin route) for a request
        to a route of ``access``; return the key's profile (name, limits) when the keys file
        gave it one."""
        if not self.ring.enabled:
            return None
        need = required_role(access, method, self.read_access, self.logs_read)
        if need is Role.PUBLIC:
            return None
        key = presented_key(method, authorization, cookie)
        if not key:
            raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", "missing_api_key")
        role, profile = self.ring.identify(key)
        if role is None:
            raise ApiError(401, "invalid API key", "invalid_api_key")
        if role < need:
            raise ApiError(403, "this route needs an admin key" + (" (--logs-read admin: engine logs may hold "
                                                                   "other users' prompts)" if access == "logs" else ""),
                           "admin_key_required")
        return profile
