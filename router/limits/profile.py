"""A key's limits and priority, as the keys file states them (``[[keys]]`` and ``[groups.*]``).

Parsed by ``router.http.auth`` (which matches a presented key to its profile) and enforced by
``router.limits.quotas`` (rates, tokens, concurrency across routers) and
``router.limits.concurrency`` (queue priority and weight).
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from llm_lab_router.router.limits.access import Access
from llm_lab_router.router.limits.budgets import Budget

Count = Annotated[int, msgspec.Meta(ge=0)]
Pattern = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]  # a model id, alias or glob
Patterns = Annotated[list[Pattern], msgspec.Meta(min_length=1)]
Name = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9._-]{1,64}\Z")]  # a Redis key part and a metric label; \Z, not $ (a trailing newline)


class LimitSpec(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Limits of a group of keys (shared by all its keys, across all routers); 0 = none."""

    rpm: Count = 0  # requests started per minute (sliding, per second)
    tpm: Count = 0  # tokens (prompt + completion, from the responses' usage) per minute
    max_concurrent: Count = 0  # requests in flight at once


class GroupSpec(LimitSpec, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """A ``[groups.*]`` entry: its limits (shared by its keys) and the permissions its keys get
    unless they set their own (router/limits/access.py). ``None``: not set here."""

    models: Patterns | None = None  # what its keys may use (absent: everything)
    start: Literal["any", "listed", "none"] | None = None  # which models their requests may start
    admin: Patterns | None = None  # an admin scope: the models its keys may start, stop, clear
    # a GPU-time budget (groups only): over it, the group's requests may not start models
    gpu_hours: Annotated[float, msgspec.Meta(gt=0)] | None = None
    budget_period: Literal["day", "week", "month"] = "month"


class KeySpec(GroupSpec, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """One ``[[keys]]`` entry of a TOML/JSON keys file."""

    name: Name
    key: str  # the plain key or ``sha256:<hex>``
    group: Name | None = None
    priority: int = 0  # higher first in a contended model queue (strict: see router/limits/concurrency.py)
    weight: Annotated[float, msgspec.Meta(gt=0, le=1000)] = 1.0  # share among equal priorities


class KeyProfile(msgspec.Struct, frozen=True, kw_only=True):
    """What the router knows of a key once it matched: never the key itself."""

    name: str
    group: str | None = None
    key_limits: LimitSpec = LimitSpec()
    group_limits: LimitSpec = LimitSpec()
    priority: int = 0
    weight: float = 1.0
    access: Access | None = None  # its permissions; None: everything its role allows (no cost)
    budget: Budget | None = None  # its group's GPU-time budget (router/limits/budgets.py)
