"""A model's pending line as every router shows it: the live entries of ``llm:waiting``, merged.

A router knows why its own requests wait for a model (``ControlClient.pending``), but behind a
load balancer ``/api/models/{alias}/info`` (and ``/v1/models``, the dashboard, ``llm-router
status``) may be answered by a router with no request waiting for it. So each waiting router
publishes its scheduler's last decision (``WaitEntry.blocked`` and ``eta``) in the entry it
rewrites every few seconds anyway, and any router rebuilds the same reason from the hash: the
requests waiting on all routers, since when, the position in the line (``scheduler.line_of``,
the order every router decides by), what blocks it and the ETA. Pure: the caller passes the
entries (``ControlClient`` keeps the copy its claim watcher reads every 0.5 s, so answering costs
no Redis read).
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

from llm_lab_router.protocol import Blocked, Instance, WaitEntry
from llm_lab_router.router.core.errors import WaitReason
from llm_lab_router.router.control.explain import queued_reason
from llm_lab_router.router.control.scheduler import line_of, merge_waiters


def line_reason(model: str, entries: Iterable[WaitEntry], instances: Sequence[Instance],
                max_wait: Mapping[str, float], now: float, stale: float) -> WaitReason | None:
    """Why ``model`` waits for a swap on some live router (entries written within ``stale`` s),
    or None. Position 1: what the freshest of its entries says blocks it (that router's
    decision); further back: the model at the head of the line (``turn``, as ``decide_swap``
    says), with no ETA."""
    live = [e for e in entries if now - e.at <= stale and e.count > 0]
    own = [e for e in live if e.model == model]
    if not own:
        return None
    line, me = line_of(model, merge_waiters(live, now, stale, max_wait), instances, now)
    position = line.index(me) + 1
    if position > 1:
        blocked, eta = [Blocked(kind="turn", model=line[0].model)], 0.0
    else:
        latest = max(own, key=lambda e: e.at)
        blocked, eta = latest.blocked, latest.eta
    return queued_reason(model, position, blocked, eta, now, me.count, me.since)
