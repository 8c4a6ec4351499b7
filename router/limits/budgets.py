"""GPU-time budgets per group (``gpu_hours`` per ``budget_period`` in the keys file).

A group over its budget is still served by the models that run, but its requests may not start
a model (nor, so, evict one): a 429 in OpenAI's shape that says when the budget resets. What a
group used is its share of the usage ledger's GPU time since the period began (UTC day, ISO week
from Monday, calendar month; router/observe/ledger.py), read from Redis at most every
``refresh`` seconds (``LLM_ROUTER_BUDGET_REFRESH``, 10) per group and only when one of its requests would start a model: a request
for a running model never reads it. A request that joins a start already under way for someone
else is not refused. With Redis unreachable the quota's policy holds
(``LLM_ROUTER_QUOTA_REDIS_DOWN``: ``open`` admits, ``closed`` refuses with 503).
"""

from __future__ import annotations

import calendar
import logging
import math
from datetime import datetime, timedelta, timezone
from typing import Callable, Literal

import msgspec
from redis.exceptions import RedisError

from llm_lab_router.backoff import RedisLink
from llm_lab_router.clock import CLOCK
from llm_lab_router.protocol import Keys
from llm_lab_router.router.core.errors import ApiError
from llm_lab_router.router.core.responses import BudgetState
from llm_lab_router.router.observe.ledger import read_hours, report

log = logging.getLogger("router.budgets")

Period = Literal["day", "week", "month"]


class Budget(msgspec.Struct, frozen=True, kw_only=True):
    """A group's GPU-time budget, from the keys file."""

    group: str
    gpu_hours: float
    period: Period = "month"


def period_bounds(period: Period, now: float) -> tuple[float, float]:
    """The UTC period around ``now``: its start and its end (when the budget resets)."""
    t = datetime.fromtimestamp(now, timezone.utc)
    day = t.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        start, end = day, day + timedelta(days=1)
    elif period == "week":
        start = day - timedelta(days=day.weekday())
        end = start + timedelta(days=7)
    else:
        start = day.replace(day=1)
        end = start + timedelta(days=calendar.monthrange(start.year, start.month)[1])
    return start.timestamp(), end.timestamp()


class Budgets:
    def __init__(self, redis, keys: Keys, redis_down: Literal["open", "closed"] = "open", refresh: float = 10.0,
                 clock: Callable[[], float] = CLOCK.now) -> None:
        self.redis = redis
        self.refresh = refresh  # how stale a group's GPU time may be when a start is decided
        self.keys = keys
        self.redis_down = redis_down
        self.clock = clock
        self._used: dict[Budget, tuple[float, float]] = {}  # budget -> (GPU hours used, when read)
        self._link = RedisLink("GPU-time budgets", log=log)

    async def used(self, budget: Budget) -> float:
        """The group's GPU hours in the current period (cached ``refresh`` s)."""
        now = self.clock()
        got = self._used.get(budget)
        start, _ = period_bounds(budget.period, now)
        if got is not None and now - got[1] < self.refresh and got[1] >= start:
            return got[0]
        rows = report(await read_hours(self.redis, self.keys, start, now), "group")
        used = next((r.gpu_hours for r in rows if r.name == budget.group), 0.0)
        self._used[budget] = (used, now)
        return used

    async def check(self, budget: Budget) -> None:
        """429 when the group has used its budget (a start would spend more of it)."""
        try:
            used = await self.used(budget)
        except RedisError as exc:
            self._link.failed(exc)
            if self.redis_down == "closed":
                raise ApiError(503, "GPU-time budgets cannot be checked (Redis unreachable); retry later",
                               "quota_unavailable", {"Retry-After": "1"}) from None
            return
        self._link.ok()
        if used < budget.gpu_hours:
            return
        _, resets = period_bounds(budget.period, self.clock())
        retry = max(1, math.ceil(resets - self.clock()))
        when = datetime.fromtimestamp(resets, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        raise ApiError(429, f"GPU-time budget of group '{budget.group}' used: {used:.2f} of {budget.gpu_hours:g} "
                            f"GPU hours this {budget.period}; it may use running models, but not start one, "
                            f"until the budget resets at {when}", "gpu_budget_exceeded", {"Retry-After": str(retry)})

    async def states(self, budgets: list[Budget]) -> list[BudgetState]:
        """Each budget with what its group used, for the usage report."""
        now = self.clock()
        return [BudgetState(group=b.group, gpu_hours=b.gpu_hours, period=b.period,
                            used_gpu_hours=await self.used(b), resets_at=period_bounds(b.period, now)[1])
                for b in budgets]
