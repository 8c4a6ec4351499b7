"""``ControlClient``: the router's side of worker commands.

A command is one ``XADD`` to ``llm:cmd:{wid}`` (the worker reads it through a consumer
group, so it is not lost if the worker restarts); its outcome is one ``Reply`` the worker
pushes to ``llm:reply:{wid}:{id}``, which the sender ``BLPOP``s with a timeout. BLPOP holds a
connection for its duration, so it runs on the blocking client (redis.asyncio pools give each
caller its own connection and nothing else waits behind it).

Starts are single-flight per model in this process: concurrent on-demand requests and
``/start`` calls for the same model share one command and one wait. Across routers, the
worker serialises commands per model and makes them idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Callable, Iterable, Mapping, Protocol, Sequence

from redis.asyncio import Redis

from redis.exceptions import RedisError

import msgspec
from llm_lab_router.audit import NO_NAME, AuditTrail
from llm_lab_router.clock import CLOCK
from llm_lab_router.protocol import (
    USAGE_STALE, CatalogEntry, Command, DeviceSnapshot, Instance, Keys, ModelUsage, Reply, WaitEntry, command_fields,
    from_json, read_usage,
)
from llm_lab_router.router.core.errors import WaitReason
from llm_lab_router.router.control.explain import (
    no_room_reason,
    retry_after,
    starting_reason,
    swap_reason,
    with_prefetch,
)
from llm_lab_router.router.observe.history import History
from llm_lab_router.router.observe.ledger import Ledger
from llm_lab_router.router.observe.metrics import RouterMetrics
from llm_lab_router.router.control.pending import line_reason
from llm_lab_router.router.control.host_rank import Eviction, no_room_message, rank_hosts
from llm_lab_router.router.core.errors import ApiError
from llm_lab_router.router.control.scheduler import (Decision, Policy, Waiter, after_turn, ahead_of, claims, closing, decide_swap, free_room_for,
                              merge_waiters, where)
from llm_lab_router.router.control.in_use import UsageReporter
from llm_lab_router.router.control.start_backoff import StartBackoff
from llm_lab_router.router.core.view import ClusterView
from llm_lab_router.router.control.waitboard import WaitBoard

log = logging.getLogger("router.control")

COMMANDS_MAXLEN = 10000  # bound on each worker's command stream (approximate trim)
ACTIVE_STATES = ("starting", "running")
START_MARGIN = 30.0  # s beyond a model's own startup_timeout: placement, eviction, Redis round trips
SWAP_POLL = 0.5  # s between re-decisions of a start that waits for a swap (usage changes send no event)
CLAIM_POLL = 0.5  # s between reads of llm:waiting for models claimed by starving waiters
PRIORITY_ANY = 2 ** 31  # an operator's start (admin API): above every key priority, so no priority holds it back


class Caller(Protocol):
    """What a start needs of a key (``router.limits.profile.KeyProfile`` has it)."""

    name: str
    group: str | None


class Origin(msgspec.Struct, frozen=True, kw_only=True):
    """Who a start is for (the audit trail): the key's name and the client's address;
    ``on_demand``: a request's start (recorded here), else an admin's (its handler records it)."""

    who: str = NO_NAME
    group: str = NO_NAME  # the key's group: the usage ledger charges it the load's idle GPU time
    client: str = ""
    on_demand: bool = True

    @classmethod
    def of(cls, caller: Caller | None, client: str, on_demand: bool = True) -> "Origin":
        """The origin of a request or action of ``caller`` (``None``: a key without a name)."""
        if caller is None:
            return cls(client=client, on_demand=on_demand)
        return cls(who=caller.name, group=caller.group or NO_NAME, client=client, on_demand=on_demand)


class ControlError(Exception):
    """A command that failed or got no answer; ``log_tail`` quotes the model's last log lines."""

    def __init__(self, message: str, log_tail: Sequence[str] = (), reason: WaitReason | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.log_tail = list(log_tail)
        self.reason = reason  # why it could not be served (no_room, a swap wait that timed out)


def describe_failure(exc: ControlError, lines: int = 20) -> str:
    """The failure's reason, with the model's last log lines quoted when the worker sent them."""
    if not exc.log_tail:
        return exc.message
    return exc.message + "\nlast log lines:\n" + "\n".join(exc.log_tail[-lines:])


def start_failed(message: str, exc: ControlError) -> ApiError:
    """The 503 of a start that failed or gave up (code ``model_start_failed``), with the reason
    (``error.reason``) and a ``Retry-After`` from its ETA when the scheduler knows them."""
    headers = {"Retry-After": retry_after(exc.reason, CLOCK.now())} if exc.reason else None
    return ApiError(503, message, "model_start_failed", headers, exc.reason)


def start_order(model: str, entries: Mapping[str, CatalogEntry], snapshots: Mapping[str, DeviceSnapshot],
                instances: Iterable[Instance]) -> tuple[list[str], dict[str, str]]:
    """Where to try starting ``model``, best first, and why the other hosts have no room.

    ``entries``: the model's catalog entry per live candidate worker; ``instances``: all
    instances on live workers. A worker where the model is already starting or running comes
    alone (the start is then a no-op that waits for it); else the hosts where its VRAM fits,
    ranked by ``router.control.host_rank.rank_hosts``."""
    instances = list(instances)
    for inst in instances:
        if inst.model == model and inst.worker in entries and inst.state in ACTIVE_STATES:
            return [inst.worker], {}
    return rank_hosts(model, entries, snapshots, instances)


def start_wait(timeout: float, entries: Iterable[CatalogEntry]) -> float:
    """How long a start may take: the router's ``timeout``, or longer when a host allows the
    model more (its ``startup_timeout`` + ``START_MARGIN``): a vLLM model loading for 10 minutes
    must not get a 503 from the router at 5 while its worker still waits for it."""
    return max([timeout, *(e.startup_timeout + START_MARGIN for e in entries if e.startup_timeout > 0)])


class NoRoom(ControlError):
    """The worker re-checked its GPUs and the model does not fit there (now)."""


class StartFailed(ControlError):
    """The model itself failed to start (its instance is ``failed``: it exited or failed its
    health check), as opposed to a start that was cancelled, timed out or found no room: the
    one failure that puts the model in back-off (router/control/start_backoff.py)."""


def start_outcome(instances: Iterable[Instance], wid: str, live: Iterable[str], since: float,
                  anywhere: bool = True) -> str:
    """How a start on ``wid`` stands: ``running`` (some instance serves the model; with
    ``anywhere`` false, a start on that host only, the instance on ``wid``),
    ``failed`` (the instance on ``wid`` failed, updated after ``since``: the ``updated_at`` it
    had when the command was sent, so only the worker's clock is compared), ``lost`` (it became
    running after ``since`` but is stopping or stopped already), ``gone`` (the worker left) or
    ``""`` (still waiting)."""
    instances = list(instances)
    if any(i.state == "running" and i.url and (anywhere or i.worker == wid) for i in instances):
        return "running"
    if wid not in set(live):
        return "gone"
    for inst in instances:
        if inst.worker == wid and inst.state == "failed" and inst.updated_at > since:
            return "failed"
        if inst.worker == wid and inst.state in ("stopping", "stopped") and inst.started_at > since:
            return "lost"  # it ran, and was stopped (evicted) before this router looked
    return ""


def merged_models(replies: Iterable[Reply]) -> list[str]:
    """The union of the models named by several workers' replies, first seen first."""
    seen: dict[str, None] = {}
    for reply in replies:
        seen.update(dict.fromkeys(reply.models))
    return list(seen)


class ControlClient:
    def __init__(self, redis: Redis, blocking: Redis, keys: Keys, view: ClusterView,
                 usage: UsageReporter | None = None, scheduler: Policy = "swap",
                 metrics: RouterMetrics | None = None, start_backoff: float = 0.0,
                 history: History | None = None, audit: AuditTrail | None = None, ledger: Ledger | None = None) -> None:
        self.redis = redis
        self.blocking = blocking
        self.keys = keys
        self.view = view
        self.usage = usage  # this router's own requests in flight (for eviction)
        self.scheduler = scheduler
        self.metrics = metrics
        self.history = history  # the timeline: starts requested, evictions (router.observe.history)
        self.audit = audit  # on-demand starts and evictions, with the key they were for
        self.ledger = ledger  # who started each model: its unused GPU time is theirs
        self.board = WaitBoard(redis, keys, usage.router_id if usage else uuid.uuid4().hex[:12])
        self.backoff = StartBackoff(start_backoff)  # models whose start failed: no on-demand start for a while
        self._starts: dict[tuple[str, str | None], asyncio.Task[Reply]] = {}  # (model, host or None: any)
        self._waiting: dict[str, int] = {}  # requests (callers of ``start``) waiting per model
        self._priorities: dict[str, list[int]] = {}  # their key priorities, per model (a swap's priority)
        self.pending: dict[str, WaitReason] = {}  # why each model this router waits for is not served yet
        self.closing: set[str] = set()  # models claimed by a starving waiter: no new requests (scheduler.claims)
        self.line: list[WaitEntry] = []  # llm:waiting as last read (watch_claims): every router's waiters

    async def watch_claims(self) -> None:
        """Keep ``closing`` and ``line`` current (every ``CLAIM_POLL`` s: one ``HGETALL`` of a
        small hash)."""
        while True:
            try:
                self.line = await self.board.read()
                self.closing = closing(self.line, CLOCK.now(), USAGE_STALE)
            except RedisError:
                self.closing = set()  # nobody can claim without Redis either
            await asyncio.sleep(CLAIM_POLL)

    async def until_open(self, model: str, timeout: float) -> None:
        """Hold a new request for a claimed model until the claim ends (it was stopped, or the
        waiter was served), at most ``timeout`` s."""
        deadline = asyncio.get_running_loop().time() + timeout
        while model in self.closing and self.view.running_instances(model) and \
                asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(CLAIM_POLL / 2)

    def reason(self, model: str) -> WaitReason | None:
        """Why ``model`` is not served yet, the same on every router: starting (with the ETA its
        worker's last cold start gives), else waiting for a swap: this router's own decision
        when its requests wait for it, else the line all routers share (``router.control.pending``: the
        decision another router published in ``llm:waiting``). No Redis read."""
        view = self.view
        if view.running_instances(model):
            return None
        if any(i.state == "starting" for i in view.instances(model)):
            return starting_reason(model, view.instances(model), view.catalog_entries(model), CLOCK.now())
        got = self.pending.get(model) or self.backoff.reason(model)
        if got is None:
            got = line_reason(model, self.line, view.all_instances(), self._max_waits(self.line), CLOCK.now(),
                              USAGE_STALE)
        return with_prefetch(got, view.instances(model)) if got is not None else None

    async def send(self, wid: str, cmd: Command, timeout: float) -> Reply:
        """Send one command and wait at most ``timeout`` seconds for its reply."""
        cmd.timeout = timeout
        await self.redis.xadd(self.keys.commands(wid), command_fields(cmd),
                              maxlen=COMMANDS_MAXLEN, approximate=True)
        try:
            # The asyncio bound is a backstop should Redis stall without closing the socket.
            async with asyncio.timeout(timeout + 5):
                got = await self.blocking.blpop([self.keys.reply(wid, cmd.id)], timeout=max(timeout, 0.01))
        except TimeoutError:
            got = None
        if got is None:
            raise ControlError(f"worker '{wid}' did not answer '{cmd.op}' within {timeout:g}s")
        return from_json(got[1], Reply)

    async def fan_out(self, wids: Sequence[str], make: Callable[[], Command], timeout: float) -> list[Reply]:
        """Send a command to several workers at once; a worker that fails or does not answer
        gives a failed ``Reply`` rather than hiding the others' answers."""

        async def one(wid: str) -> Reply:
            try:
                return await self.send(wid, make(), timeout)
            except ControlError as exc:
                return Reply(id="", worker=wid, ok=False, message=exc.message)

        return list(await asyncio.gather(*(one(w) for w in wids)))

    # --- model lifecycle ---

    def running_on(self, model: str, host: str | None = None) -> list[Instance]:
        """The running instances of ``model`` (on ``host`` only, when given)."""
        return [i for i in self.view.running_instances(model) if host is None or i.worker == host]

    def start_underway(self, model: str) -> bool:
        """Whether ``model`` is being started for someone already: an instance is starting, a
        start of this router is in flight, or some router's requests wait for its swap."""
        return (any(i.state == "starting" for i in self.view.instances(model))
                or any(m == model for m, _ in self._starts)
                or any(e.model == model for e in self.line))

    async def ensure_running(self, model: str, timeout: float, host: str | None = None,
                             priority: int | None = None, origin: Origin | None = None) -> None:
        """Return once some instance of ``model`` runs (on ``host``, when given), starting it if
        needed (shared start).

        ``origin``: who the start is for. An operator's (``origin.on_demand`` false, or no
        ``origin``: the API's start) gives a failed model a fresh restart budget on its worker; a
        start for a request is a restart of a failed model, counted, backed off and bounded there
        (``Command.on_demand``), and this router does not start on demand a model whose start
        failed a moment ago (``StartBackoff``): it raises."""
        if not self.running_on(model, host):
            by_operator = origin is None or not origin.on_demand
            if not by_operator and (model, host) not in self._starts and (why := self.backoff.reason(model)):
                raise ControlError(why.message, reason=why)  # its last start failed a moment ago
            await self.start(model, timeout, host, priority, origin)

    async def start(self, model: str, timeout: float, host: str | None = None, priority: int | None = None,
                    origin: Origin | None = None) -> Reply:
        """Start ``model`` and wait until it serves; concurrent callers share one start.
        ``host``: on that worker only (the operator's choice), else wherever it fits best.
        ``priority``: the key priority of a request's start (``None``: an admin's start, which
        no priority holds back); the start evicts with the highest priority of its callers.
        ``origin``: who it is for, in the audit trail (the caller that began it).

        A caller that goes away (its request was cancelled) does not cancel the shared start."""
        self._waiting[model] = self._waiting.get(model, 0) + 1
        prios = self._priorities.setdefault(model, [])
        prios.append(PRIORITY_ANY if priority is None else priority)
        try:
            # Counted as in flight (llm:used): once loaded, the model drains its waiting
            # requests before anything may evict it.
            track = self.usage is not None and self.scheduler == "swap"  # "lru": as before the scheduler
            with self.usage.track(model, priority or 0) if track else contextlib.nullcontext():
                return await asyncio.shield(self.start_in_background(model, timeout, host, origin))
        finally:
            self._waiting[model] -= 1
            prios.remove(PRIORITY_ANY if priority is None else priority)
            if not self._waiting[model]:
                del self._waiting[model]
            if not prios:
                self._priorities.pop(model, None)

    def priority(self, model: str) -> int:
        """The priority a swap for ``model`` evicts with: the highest of its waiting callers'
        (a start with no caller waiting, ``?wait=false``, is an admin's: no priority holds it)."""
        return max(self._priorities.get(model, ()), default=PRIORITY_ANY)

    def start_in_background(self, model: str, timeout: float, host: str | None = None,
                            origin: Origin | None = None) -> asyncio.Task[Reply]:
        """Begin a start, or join the one in flight, without waiting for it (``?wait=false``);
        the first caller's ``origin`` is the one the timeline names."""
        key = (model, host)
        task = self._starts.get(key)
        if task is None:
            if self.history is not None:
                self.history.event("start_requested", model=model, host=host or "",
                                   key=origin.who if origin is not None else "")
            task = asyncio.create_task(self._start_for(model, timeout, host, origin or Origin(on_demand=False)),
                                       name=f"start-{model}")
            self._starts[key] = task
            task.add_done_callback(lambda t: self._start_done(key, t))
        return task

    def _candidates(self, model: str, host: str | None) -> dict[str, CatalogEntry]:
        """The hosts a start may use: every live one whose catalog has ``model``, or ``host`` alone."""
        entries = self.view.catalog_entries(model)
        return entries if host is None else {w: e for w, e in entries.items() if w == host}

    def _start_done(self, key: tuple[str, str | None], task: asyncio.Task) -> None:
        model = key[0]
        if self._starts.get(key) is task:
            del self._starts[key]
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            self.backoff.succeeded(model)
        elif isinstance(exc, ControlError):
            log.warning("start of %s failed: %s", model, exc)
            if isinstance(exc, StartFailed):  # not cancelled, timed out, waited or without room
                self.backoff.failed(model, exc.message)
        elif exc is not None:  # not an expected failure: no caller may be waiting to report it
            log.error("start of %s failed", model, exc_info=exc)

    async def _start_for(self, model: str, timeout: float, host: str | None, origin: Origin) -> Reply:
        """``_start``, recorded in the audit trail when it is a request's (on demand) and, once
        it runs, in the usage ledger as loaded by ``origin``. An operator's start (``origin``
        not on demand) gives a failed model a fresh restart budget on its worker; a start for
        a request is a restart of a failed model, counted, backed off and bounded there
        (``Command.on_demand``)."""
        audit = self.audit if origin.on_demand else None
        try:
            reply = await self._start(model, timeout, host, origin)
        except ControlError as exc:
            if audit is not None:
                await audit.record(origin.who, "on_demand_start", model=model, client=origin.client,
                                   result=exc.message)
            raise
        if self.ledger is not None:
            self.ledger.loaded(origin.who, origin.group, model)
        if audit is not None:
            await audit.record(origin.who, "on_demand_start", model=model, client=origin.client, host=reply.worker)
        return reply

    async def _start(self, model: str, timeout: float, host: str | None = None,
                     origin: Origin = Origin(on_demand=False)) -> Reply:
        """Try the hosts where the model fits in order (a host whose worker finds no room after
        all, because another router placed something there first, passes to the next); when it
        fits nowhere, stop loaded models on one host to make room once the scheduler allows it
        (``router.control.scheduler``: residency, drain, turn), waiting in ``llm:waiting`` meanwhile.
        With ``host``, the same with that one host as the only candidate."""
        view = self.view
        entries = self._candidates(model, host)
        if not entries:
            raise ControlError(f"no live worker can run model '{model}'" + (f" on '{host}'" if host else ""))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + start_wait(timeout, entries.values())
        began = CLOCK.now()
        try:
            while True:
                await view.refresh_details()  # devices and leases, read on demand (at most once a second)
                fits, reasons = start_order(model, entries, view.devices(), view.all_instances())
                order, ahead = fits, []
                if self.scheduler == "swap" and fits:  # free room goes to the models ahead in the line first
                    waiters = await self._waiters(model, began)
                    ahead = ahead_of(model, waiters, view.all_instances(), CLOCK.now())
                    order = free_room_for(fits, ahead, lambda m: view.catalog_entries(m).keys())
                for wid in order:
                    try:
                        return await self._start_on(wid, model, deadline, anywhere=host is None,
                                                    by_operator=not origin.on_demand)
                    except NoRoom as exc:
                        reasons[wid] = exc.message
                if fits and not order:  # it fits, but only in the room a model ahead waits for
                    decision = after_turn(ahead)
                else:
                    decision, waiters = await self._decide(model, entries, began)
                # no_room, unless a worker refused what the view allowed: that view is a moment
                # old (a start it has not seen yet), so wait for it to catch up instead
                if decision.action == "no_room" and not fits:
                    message = no_room_message(model, reasons)
                    raise ControlError(message, reason=no_room_reason(
                        model, entries, view.devices(), view.all_instances(), reasons, message))
                if decision.action == "evict" and decision.plan is not None:
                    await self._evict(decision.plan, model, deadline, origin)
                    try:
                        return await self._start_on(decision.plan.worker, model, deadline, anywhere=host is None)
                    except NoRoom:
                        continue  # the room went to another start (a router not yet aware of us)
                    finally:
                        self._waited(model, began)
                cold = max((e.cold_start_s for e in entries.values()), default=0.0)
                first_wait = model not in self.pending
                reason = self.pending[model] = swap_reason(model, decision, waiters, CLOCK.now(), cold)
                if first_wait and self.history is not None:
                    self.history.event("swap_wait", model=model, key=origin.who, detail=reason.message)
                left = deadline - loop.time()
                if left <= 0:
                    self._waited(model, began)
                    raise ControlError(f"model '{model}' waited {CLOCK.now() - began:.0f}s for a swap: "
                                       f"{reason.message}", reason=reason)
                me = next((w for w in waiters if w.model == model), None)
                await self._publish_wait(model, began, claims(decision, me, CLOCK.now()), reason, decision.worker)
                seen = self._states()
                await view.wait_until(lambda: self._states() != seen, min(SWAP_POLL, left))
                entries = self._candidates(model, host) or entries
        finally:
            self.pending.pop(model, None)
            try:
                await self.board.remove(model)
            except RedisError as exc:  # the entry goes stale by itself
                log.warning("could not remove the waiting entry of %s: %s", model, exc)

    def _states(self) -> set[tuple[str, str, str]]:
        return {(i.model, i.worker, i.state) for i in self.view.all_instances()}

    def _waited(self, model: str, began: float) -> None:
        if self.metrics is not None:
            self.metrics.waited(model, "swap", CLOCK.now() - began)

    async def _publish_wait(self, model: str, began: float, claimed: list[str], reason: WaitReason,
                            worker: str = "") -> None:
        try:
            await self.board.put(model, began, self._waiting.get(model, 1), claimed, reason.blocked, reason.eta,
                                 worker)
        except RedisError as exc:
            log.warning("could not publish the waiting entry of %s: %s", model, exc)

    async def _decide(self, model: str, entries: Mapping[str, CatalogEntry],
                      began: float) -> tuple[Decision, list[Waiter]]:
        """The scheduler's decision from the state every router reads alike: instances,
        devices, ``llm:used`` of the loaded models, ``llm:waiting`` (this router's own entry
        as it is now, not as last written)."""
        view = self.view
        instances = view.all_instances()
        loaded = [i for i in instances if i.worker in entries and i.state == "running"]
        usage = await self.usage_of({i.model for i in loaded})
        waiters = await self._waiters(model, began)
        now = CLOCK.now()
        # each instance by its own host's config: two hosts may give a model different residencies
        specs = {where(i): view.catalog_entries(i.model).get(i.worker, CatalogEntry(id=i.model)) for i in loaded}
        decision = decide_swap(model, entries, view.devices(), instances, usage, waiters,
                               {w: s.min_residency for w, s in specs.items()}, now, self.scheduler,
                               {w: s.idle_release for w, s in specs.items()}, self.priority(model))
        return decision, waiters

    async def _waiters(self, model: str, began: float) -> list[Waiter]:
        """The line (``merge_waiters``) from ``llm:waiting``, with this router's own entry for
        ``model`` as it is now, not as last written."""
        now = CLOCK.now()
        mine = WaitEntry(model=model, router=self.board.router_id, since=began,
                         count=self._waiting.get(model, 1), at=now)
        board = [e for e in await self.board.read() if (e.model, e.router) != (model, mine.router)] + [mine]
        return merge_waiters(board, now, USAGE_STALE, self._max_waits(board))

    def _max_waits(self, board: Iterable[WaitEntry]) -> dict[str, float]:
        """The ``max_wait`` of each waiting model, from its catalog entry."""
        return {e.model: c.max_wait for e in board if (c := self.view.catalog_entry(e.model)) is not None}

    async def _evict(self, plan: Eviction, model: str, deadline: float, origin: Origin) -> None:
        log.info("evicting %s on %s to make room for %s (key %s)", plan.victims, plan.worker, model, origin.who)
        if self.history is not None:
            self.history.event("evicted", model=model, models=list(plan.victims), host=plan.worker, key=origin.who,
                               detail=f"stopped {', '.join(plan.victims)} to make room for {model}")
        replies = await asyncio.gather(*(self.send(plan.worker, Command(op="stop", model=m), self._left(deadline))
                                         for m in plan.victims))
        failed = "; ".join(r.message for r in replies if not r.ok)
        if self.audit is not None:
            await self.audit.record(origin.who, "evict", model=model, models=list(plan.victims), host=plan.worker,
                                    client=origin.client, result=failed or "ok",
                                    detail=f"to make room for '{model}' (key '{origin.who}')")
        if failed:
            raise ControlError(f"could not stop idle models on '{plan.worker}' to make room for '{model}': {failed}")
        if self.metrics is not None:
            self.metrics.swapped(model)

    def waiting_now(self) -> dict[str, int]:
        """Requests of this router waiting for a start or a swap, per model."""
        return dict(self._waiting)

    async def load(self, model: str) -> tuple[int, int]:
        """``model``'s requests in flight on every live router, and of those the ones waiting for
        a swap (the line as last read: ``watch_claims``); this router's own counts alone when
        Redis cannot be read."""
        now = CLOCK.now()
        queued = sum(e.count for e in self.line if e.model == model and now - e.at <= USAGE_STALE)
        try:
            inflight = (await self.usage_of([model]))[model].inflight
        except RedisError:
            inflight = self.usage.inflight(model) if self.usage is not None else 0
        return inflight, max(queued, self._waiting.get(model, 0))

    async def usage_of(self, models: Iterable[str]) -> dict[str, ModelUsage]:
        """Use of ``models`` across routers, with this router's own requests counted exactly."""
        if self.usage is None:
            return await read_usage(self.redis, self.keys, models, CLOCK.now())
        usage = await read_usage(self.redis, self.keys, models, CLOCK.now(), exclude=self.usage.router_id)
        for m, u in usage.items():
            u.inflight += self.usage.inflight(m)
            for wid, n in self.usage.serving_on(m).items():
                u.serving[wid] = u.serving.get(wid, 0) + n
        return usage

    @staticmethod
    def _left(deadline: float) -> float:
        return max(0.01, deadline - asyncio.get_running_loop().time())

    async def _start_on(self, wid: str, model: str, deadline: float, anywhere: bool = True,
                        by_operator: bool = False) -> Reply:
        """Start ``model`` on ``wid`` and wait until it serves (``anywhere``: or another host serves it)."""
        view = self.view
        timeout = self._left(deadline)
        was = next((i for i in view.instances(model) if i.worker == wid), None)
        before = was.updated_at if was else -1.0
        sent = time.monotonic()
        reply = await self.send(wid, Command(op="start", model=model, on_demand=not by_operator), timeout)
        if not reply.ok:
            error = NoRoom if reply.no_room else StartFailed if reply.state == "failed" else ControlError
            raise error(reply.message or f"worker '{wid}' could not start '{model}'", reply.log_tail)
        # The reply and this router's view of the instance travel separately; wait for both.
        outcome = await view.wait_until(
            lambda: start_outcome(view.instances(model), wid, view.workers(), before, anywhere), self._left(deadline))
        if outcome == "running":
            if self.metrics is not None and (was is None or was.state not in ACTIVE_STATES):
                self.metrics.cold_started(model, time.monotonic() - sent)
                self.metrics.waited(model, "start", time.monotonic() - sent)
            return reply
        if outcome == "failed":
            inst = next((i for i in view.instances(model) if i.worker == wid), None)
            raise StartFailed(f"model '{model}' failed on worker '{wid}': {inst.last_error if inst else ''}",
                              reply.log_tail)
        if outcome == "gone":
            raise ControlError(f"worker '{wid}' left while starting '{model}'")
        if outcome == "lost":  # the scheduler's callers start it again
            raise NoRoom(f"model '{model}' was stopped on '{wid}' right after it started")
        raise ControlError(f"model '{model}' did not become ready within {timeout:g}s")

    async def stop(self, model: str, timeout: float, host: str | None = None) -> list[Reply]:
        """Stop ``model`` everywhere: every live worker that can run it is asked (idempotent
        on the worker), so a start this router has not seen yet is stopped too. ``host``: that
        worker only."""
        wids = [host] if host is not None else sorted(
            set(self.view.catalog_workers(model)) | {i.worker for i in self.view.instances(model) if i.state != "stopped"})
        if self.history is not None:
            self.history.event("stop_requested", model=model, host=host or "", detail="stop asked through the API")
        return await self.fan_out(wids, lambda: Command(op="stop", model=model), timeout)

    async def stop_all(self, timeout: float) -> list[Reply]:
        return await self.fan_out(sorted(self.view.workers()), lambda: Command(op="stop_all"), timeout)

    async def restart_autostart(self, timeout: float) -> list[Reply]:
        return await self.fan_out(sorted(self.view.workers()), lambda: Command(op="restart_autostart"), timeout)
