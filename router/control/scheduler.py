"""Swap-aware scheduling: may a model that waits for VRAM evict a loaded one now, and which?

A swap costs a cold start (30–100+ s on real engines). Plain LRU eviction (``plan_eviction``
alone) thrashes when two models that do not fit together are wanted in turn: every request
for the other one evicts the one just loaded. This module decides, as pure functions over a
state every router reads alike from Redis (instances, ``llm:used:{model}``,
``llm:waiting``), so that two routers decide the same:

- **residency**: a model that became running less than its ``min_residency`` seconds ago is not
  evicted (``Instance.started_at`` is when it became running). Per instance: a copy of the
  model on host h keeps its own residency (its host's ``min_residency``, its own start), however
  long ago another copy started elsewhere;
- **drain**: an instance with requests queued for its model or being served by it on any
  live router (``ModelUsage.requests_on``) is not evicted until they are served; nothing is
  ever aborted. Per instance too: a copy that serves nothing may go while another copy of the
  model, on another host, serves a stream;
- **batching**: every request waiting for one model shares one swap (one start per router,
  and routers share the waiting entry per model, so all of them wait for the same start);
- **priority**: a model that a key of a higher ``priority`` than the waiting requests' is
  using, or used during its current residency (since it became running), is not evicted for
  them, starving or not
  (``ModelUsage.priorities``: each router reports the priorities its requests used a model at);
  equal priorities keep the rules here;
- **turn**: the waiting model that has waited longest (its earliest request across routers)
  wins the next swap; younger waiters wait behind it. No starvation: once a waiter has waited
  its ``max_wait`` it is *starving*, and residency no longer protects the models it would
  evict. Drain still does (never abort): a starving waiter waits at most ``max_wait`` plus the
  time the victims' requests already admitted take to finish: a starving waiter that only
  drain holds back *claims* its victims (``claims``), and every router holds new requests for
  a claimed model until it is stopped (they then wait for it like any other model). Free
  room follows the line too (``ahead_of``, ``free_room_for``): a model that fits now does not
  start where a model ahead of it waits for room.

``policy = "lru"`` is the plain behaviour (no residency, no turn; only drain): kept for
comparison (``LLM_ROUTER_SCHEDULER=lru``, the scheduling benchmark).
"""

from __future__ import annotations

from typing import Callable, Iterable, Literal, Mapping, Sequence

import msgspec

from llm_lab_router.protocol import Blocked, CatalogEntry, DeviceSnapshot, Instance, ModelUsage, WaitEntry
from llm_lab_router.router.control.host_rank import Eviction, plan_eviction

Policy = Literal["swap", "lru"]
POLICIES: tuple[str, ...] = ("swap", "lru")
Where = tuple[str, str]  # (model id, worker id): one instance, the unit every protection applies to


def where(instance: Instance) -> Where:
    return instance.model, instance.worker


class Waiter(msgspec.Struct, kw_only=True, frozen=True):
    """A model waiting for a swap, merged across routers."""

    model: str
    since: float  # unix time of its earliest waiting request on any live router
    count: int = 1  # requests waiting for it, all routers together
    max_wait: float = 0.0  # its config's max_wait (s); 0 = no bound


class Decision(msgspec.Struct, kw_only=True, frozen=True):
    """``evict``: stop ``plan.victims`` on ``plan.worker``, then start there. ``wait``: try
    again later (``blocked`` says why, ``eta`` when it may go, 0 = unknown). ``no_room``: no
    eviction of any loaded model could ever make it fit (a 503 now)."""

    action: Literal["evict", "wait", "no_room"]
    plan: Eviction | None = None
    blocked: list[Blocked] = []
    eta: float = 0.0
    position: int = 0  # 1 = next in line; 0 = not queued
    # wait, next in line: the host it will start on once what blocks it is gone (the eviction
    # it waits for); its worker reads its weights into the page cache meanwhile (worker.prefetch)
    worker: str = ""


def merge_waiters(entries: Iterable[WaitEntry], now: float, stale: float,
                  max_wait: Mapping[str, float] | None = None) -> list[Waiter]:
    """The ``llm:waiting`` entries of live routers (written within ``stale`` s) merged per
    model: earliest ``since``, summed ``count``. Oldest first (see ``in_line``)."""
    merged: dict[str, Waiter] = {}
    for e in entries:
        if now - e.at > stale or e.count <= 0:
            continue
        got = merged.get(e.model)
        merged[e.model] = Waiter(model=e.model, since=min(e.since, got.since) if got else e.since,
                                 count=e.count + (got.count if got else 0),
                                 max_wait=(max_wait or {}).get(e.model, 0.0))
    return in_line(merged.values(), now)


def starving(waiter: Waiter, now: float) -> bool:
    """Whether ``waiter`` has waited its ``max_wait`` (residency no longer protects its victims)."""
    return waiter.max_wait > 0 and now - waiter.since >= waiter.max_wait


def in_line(waiters: Iterable[Waiter], now: float) -> list[Waiter]:
    """Waiters in the order they swap: starving ones first, then the oldest first (by model id
    on a tie, so that every router orders alike)."""
    return sorted(waiters, key=lambda w: (not starving(w, now), w.since, w.model))


def protection(victim: Instance, usage: ModelUsage, min_residency: float, now: float,
               waiter_starving: bool, idle_release: float = 0.0, priority: int = 0) -> Blocked | None:
    """What keeps ``victim`` loaded now, if anything: its requests (drain, always), a key of a
    higher priority than the waiter's (``priority``) that used it since it was loaded (always:
    see ``held_by_priority``), then its residency (unless the waiter is starving, or, with
    ``idle_release`` > 0, the victim has had no request for that long: see ``idle``)."""
    if (requests := usage.requests_on(victim.worker)) > 0:
        return Blocked(kind="draining", model=victim.model, requests=requests)
    if usage.priorities and (held := held_by_priority(victim, usage, priority)):
        return held
    if (not waiter_starving and min_residency > 0 and now < victim.started_at + min_residency
            and not idle(victim, usage, idle_release, now)):
        return Blocked(kind="residency", model=victim.model, until=victim.started_at + min_residency)
    return None


def held_by_priority(victim: Instance, usage: ModelUsage, priority: int) -> Blocked | None:
    """Whether a key of a priority above ``priority`` has used ``victim`` during its current
    residency (since it became running). A lab's high-priority user must not pay a cold start on
    its next request because a lower-priority job wanted the GPU (issue 26: every request of a
    priority -5 key evicted the priority 10 key's model). Nothing overrides this, starvation
    included; the model goes when its own users leave it (``idle_ttl``) or an equal or higher
    priority needs the room."""
    higher = [(at, prio) for prio, at in usage.priorities.items() if prio > priority and at >= victim.started_at]
    if not higher:
        return None
    return Blocked(kind="priority", model=victim.model, priority=max(higher)[1])


def idle(victim: Instance, usage: ModelUsage, idle_release: float, now: float) -> bool:
    """Whether ``victim``'s residency is over early: nothing queued or in flight, and no request
    began or ended for ``idle_release`` s since it became running (opt-in, 0 = never).

    Residency is there to amortise a cold start over the requests that follow it. A model whose
    users have gone quiet earns nothing by staying while other models' requests wait: on a
    shared GPU the tail is the waits behind such idle residencies (docs/BENCHMARKS.md, the
    scheduling section). Set ``idle_release`` above the gaps inside a user's session (tool time,
    reading), so that a session is not split by a swap."""
    return (idle_release > 0 and usage.requests_on(victim.worker) == 0
            and now - max(usage.last_used, victim.started_at) >= idle_release)


def claims(decision: Decision, waiter: Waiter | None, now: float) -> list[str]:
    """The loaded models a starving waiter, first in line, must evict but whose requests hold
    them (drain only): routers stop sending them new requests, so they drain and the waiter
    gets its swap within ``max_wait`` + the time the requests already admitted take."""
    if waiter is None or decision.action != "wait" or decision.position != 1 or not starving(waiter, now):
        return []
    if not decision.blocked or any(b.kind != "draining" for b in decision.blocked):
        return []
    return sorted({b.model for b in decision.blocked})


def closing(entries: Iterable[WaitEntry], now: float, stale: float) -> set[str]:
    """The models claimed by live routers' starving waiters (``claims``)."""
    return {m for e in entries if now - e.at <= stale for m in e.claims}


def line_of(model: str, waiters: Sequence[Waiter], instances: Sequence[Instance],
            now: float) -> tuple[list[Waiter], Waiter]:
    """The line ``model`` stands in, and its own place: models that run or start somewhere are
    not waiting (their entry may lag); ``model`` not among ``waiters`` waits since ``now``.

    A start its worker has not placed yet (``starting`` with no GPUs and no process) holds no
    room in anybody's view: until it does, it keeps its place in the line, or a model behind it
    would take the room in that moment (seen: a third model started 0.3 s before the one that
    had evicted for it)."""
    active = {i.model for i in instances if i.state == "running" or (i.state == "starting" and placed(i))}
    line = in_line([w for w in waiters if w.model not in active or w.model == model], now)
    me = next((w for w in line if w.model == model), None)
    if me is None:
        me = Waiter(model=model, since=now)
        line = in_line([*line, me], now)
    return line, me


def placed(instance: Instance) -> bool:
    """Whether a start holds its room yet: its worker has chosen its GPUs (or spawned it)."""
    return bool(instance.gpus or instance.pid)


def ahead_of(model: str, waiters: Sequence[Waiter], instances: Sequence[Instance], now: float) -> list[str]:
    """The waiting models that go before ``model``. Free room goes to them first: a start that
    took it (a new request for a model that fits now, while an older or starving model waits
    for the same host) would push the one whose turn it is back by a whole residency and cold
    start, unbounded by its ``max_wait`` (the race seen in the scheduling benchmark: the
    starving model evicts, and another model's fresh start takes the room before its own)."""
    line, me = line_of(model, waiters, instances, now)
    return [w.model for w in line[:line.index(me)]]


def free_room_for(order: Sequence[str], ahead: Iterable[str],
                  hosts_of: Callable[[str], Iterable[str]]) -> list[str]:
    """The hosts of ``order`` (where the model fits now) that no model ``ahead`` in the line
    could use (``hosts_of``: the workers whose catalog has a model): a model behind in the line
    may take free room only where nobody ahead of it waits for room."""
    taken = {h for m in ahead for h in hosts_of(m)}
    return [h for h in order if h not in taken]


def after_turn(ahead: Sequence[str]) -> Decision:
    """The decision of a model that fits now but only in room that the models ``ahead`` of it
    (``ahead_of``, ``free_room_for``) wait for: wait for its turn."""
    return Decision(action="wait", blocked=[Blocked(kind="turn", model=ahead[0])], position=len(ahead) + 1)


def decide_swap(model: str, entries: Mapping[str, CatalogEntry], snapshots: Mapping[str, DeviceSnapshot],
                instances: Sequence[Instance], usage: Mapping[str, ModelUsage], waiters: Sequence[Waiter],
                min_residency: Mapping[Where, float], now: float, policy: Policy = "swap",
                idle_release: Mapping[Where, float] | None = None, priority: int = 0) -> Decision:
    """Whether ``model`` (which fits nowhere now) may evict, which models, or why it waits.

    ``waiters``: the merged waiting models (``merge_waiters``), ``model`` among them or not (it
    is then treated as waiting since ``now``); ``min_residency`` and ``idle_release`` (``idle``):
    per loaded instance (``where``: each host's own config), and so is every protection: a model
    running on two hosts has two residencies (one copy's being over says nothing of the other's).
    ``priority``: the highest key priority among its waiting requests.
    Models that run or start somewhere are not waiting (their entry may lag) and are skipped."""
    unused = ModelUsage()
    if policy == "lru":
        plan = plan_eviction(model, entries, snapshots, instances, usage)
        return Decision(action="evict", plan=plan) if plan else Decision(action="no_room")
    line, me = line_of(model, waiters, instances, now)
    position = line.index(me) + 1
    # Could it ever fit, were every loaded model stopped when it may be? A model starting or
    # stopping counts as loaded: it will be running (then evictable) or gone.
    settled = [msgspec.structs.replace(i, state="running") if i.state in ("starting", "stopping") else i
               for i in instances]
    if plan_eviction(model, entries, snapshots, settled, usage, may_evict=lambda i: True) is None:
        if any(i.model == model and i.state == "stopping" for i in instances):
            # its own instance, evicted a moment ago, still holds the room it needs: not a
            # 503 (the client would retry and lose its place in the line), wait for the stop
            return Decision(action="wait", position=position)
        return Decision(action="no_room")
    if position > 1:
        return Decision(action="wait", blocked=[Blocked(kind="turn", model=line[0].model)], position=position)
    hungry = starving(me, now)
    guards = {where(i): protection(i, usage.get(i.model, unused), min_residency.get(where(i), 0.0), now, hungry,
                                   (idle_release or {}).get(where(i), 0.0), priority)
              for i in instances if i.state == "running" and i.model != model}
    plan = plan_eviction(model, entries, snapshots, instances, usage, may_evict=lambda i: guards.get(where(i)) is None)
    if plan is not None:
        return Decision(action="evict", plan=plan, position=position)
    # Which protections stand in the way: those of the plan that ignores only residency
    # (if drain alone blocks nothing, residency is the reason) else those of any plan.
    unprotected_but_residency = plan_eviction(
        model, entries, snapshots, instances, usage,
        may_evict=lambda i: guards.get(where(i)) is None or guards[where(i)].kind == "residency")
    plan = unprotected_but_residency or plan_eviction(model, entries, snapshots, instances, usage,
                                                      may_evict=lambda i: True)
    blocked = [g for m in (plan.victims if plan else []) if (g := guards.get((m, plan.worker))) is not None]
    eta = max((b.until for b in blocked), default=0.0) if all(b.kind == "residency" for b in blocked) else 0.0
    return Decision(action="wait", blocked=blocked, eta=eta, position=position, worker=plan.worker if plan else "")
