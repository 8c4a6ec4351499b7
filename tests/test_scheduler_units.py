"""Swap-aware scheduling decisions as pure functions (router/control/scheduler.py): residency, drain,
batching, turn and starvation, and the plain LRU policy kept for comparison."""

from __future__ import annotations

import msgspec
from llm_lab_router.protocol import CatalogEntry, ModelUsage, RouterUsage, WaitEntry, to_json, usage_of
from llm_lab_router.router.control.host_rank import Eviction
from llm_lab_router.router.control.pending import line_reason
from llm_lab_router.router.control.scheduler import (
    Blocked,
    Waiter,
    after_turn,
    ahead_of,
    decide_swap,
    free_room_for,
    in_line,
    merge_waiters,
    starving,
)
from test_placement_units import entry, inst, snap

NOW = 1000.0
BIG = {"h": entry("b", (["cuda:0"], 16000))}  # b needs all of h's GPU but what a (8000) holds
SNAPS = {"h": snap("h", 24000)}


def loaded(started_at: float = NOW - 100, model: str = "a") -> list:
    return [inst(model, "h", started_at=started_at)]


def decide(instances=None, usage=None, waiters=(), residency=None, policy="swap", now=NOW, model="b",
           entries=BIG, idle_release=None, snaps=SNAPS, priority=0):
    """``residency`` and ``idle_release``: per model id (every instance of it alike), or per
    (model, worker) instance."""
    instances = instances if instances is not None else loaded()
    return decide_swap(model, entries, snaps, instances, usage or {}, list(waiters),
                       per_instance(residency, instances), now, policy, per_instance(idle_release, instances), priority)


def per_instance(settings: dict | None, instances) -> dict:
    got = {k: v for k, v in (settings or {}).items() if isinstance(k, tuple)}
    return got | {(i.model, i.worker): v for m, v in (settings or {}).items() if isinstance(m, str)
                  for i in instances if i.model == m}


def test_an_idle_model_past_its_residency_is_evicted():
    d = decide(residency={"a": 60})
    assert (d.action, d.plan, d.position) == ("evict", Eviction("h", ["a"]), 1)


def test_residency_keeps_a_fresh_model_and_gives_the_time_it_ends():
    d = decide(instances=loaded(started_at=NOW - 10), residency={"a": 60})
    assert d.action == "wait"
    assert d.blocked == [Blocked(kind="residency", model="a", until=NOW + 50)]
    assert d.eta == NOW + 50
    assert decide(instances=loaded(started_at=NOW - 10), residency={"a": 60}, now=NOW + 50).action == "evict"


def test_residency_is_per_instance_an_older_copy_elsewhere_does_not_end_it():
    """A model 10 s into its 60 s residency on host h is not evicted because an older copy of
    it (out of its residency) runs on host z: each copy has its own, by its own host's config."""
    entries = {"h": entry("b", (["cuda:0"], 16000))}  # b fits only on h, by evicting a
    snaps = {"h": snap("h", 24000), "z": snap("z", 24000)}
    copies = [inst("a", "h", started_at=NOW - 10), inst("a", "z", started_at=NOW - 500)]
    for order in (copies, copies[::-1]):  # whichever copy is listed last
        d = decide(instances=order, entries=entries, residency={"a": 60}, snaps=snaps)
        assert (d.action, d.blocked) == ("wait", [Blocked(kind="residency", model="a", until=NOW + 50)]), d
    # per host too: z's config gives a no residency, h's 60 s: h's copy is still protected
    d = decide(instances=copies, entries=entries, residency={("a", "h"): 60, ("a", "z"): 0}, snaps=snaps)
    assert d.action == "wait"
    d = decide(instances=copies, entries=entries, residency={("a", "h"): 0, ("a", "z"): 60}, snaps=snaps)
    assert (d.action, d.plan) == ("evict", Eviction("h", ["a"]))
    # idle_release too: set on z's copy only, it ends no residency on h
    d = decide(instances=copies, entries=entries, residency={"a": 60}, idle_release={("a", "z"): 1}, snaps=snaps)
    assert d.action == "wait"


def test_drain_is_per_instance_an_idle_copy_may_go_while_another_copy_serves():
    """a runs on h and z; b fits only on h. A request served by z's copy does not hold h's;
    one served by h's copy does, and so does one still queued (any copy may serve it)."""
    entries = {"h": entry("b", (["cuda:0"], 16000))}
    snaps = {"h": snap("h", 24000), "z": snap("z", 24000)}
    copies = [inst("a", "h", started_at=NOW - 500), inst("a", "z", started_at=NOW - 500)]
    on_z = {"a": ModelUsage(inflight=1, serving={"z": 1})}
    d = decide(instances=copies, entries=entries, usage=on_z, snaps=snaps)
    assert (d.action, d.plan) == ("evict", Eviction("h", ["a"]))
    on_h = {"a": ModelUsage(inflight=1, serving={"h": 1})}
    d = decide(instances=copies, entries=entries, usage=on_h, snaps=snaps)
    assert (d.action, d.blocked) == ("wait", [Blocked(kind="draining", model="a", requests=1)])
    queued = {"a": ModelUsage(inflight=2, serving={"z": 1})}
    d = decide(instances=copies, entries=entries, usage=queued, snaps=snaps)
    assert (d.action, d.blocked) == ("wait", [Blocked(kind="draining", model="a", requests=1)])
    # the plain policy drains per instance alike
    d = decide(instances=copies, entries=entries, usage=on_z, snaps=snaps, policy="lru")
    assert (d.action, d.plan) == ("evict", Eviction("h", ["a"]))


def test_usage_sums_each_live_routers_requests_per_worker():
    rows = {"router:r1": to_json(RouterUsage(inflight=2, serving={"h": 1}, at=NOW)),
            "router:r2": to_json(RouterUsage(inflight=1, serving={"h": 1}, at=NOW - 1)),
            "router:dead": to_json(RouterUsage(inflight=5, serving={"z": 5}, at=NOW - 60))}
    got = usage_of(rows, NOW)
    assert (got.inflight, got.serving) == (3, {"h": 2})
    assert (got.requests_on("h"), got.requests_on("z")) == (3, 1)  # one queued: it holds every copy
    assert usage_of(rows, NOW, exclude="r1").serving == {"h": 1}


def test_idle_release_ends_residency_early_only_when_set_and_the_model_is_unused():
    fresh = loaded(started_at=NOW - 10)
    quiet = {"a": ModelUsage(last_used=NOW - 5)}  # its last request ended 5 s ago
    assert decide(instances=fresh, usage=quiet, residency={"a": 60}).action == "wait"  # off by default
    d = decide(instances=fresh, usage=quiet, residency={"a": 60}, idle_release={"a": 4})
    assert (d.action, d.plan) == ("evict", Eviction("h", ["a"]))
    # used more recently than idle_release: residency still holds, with its full end as the ETA
    d = decide(instances=fresh, usage=quiet, residency={"a": 60}, idle_release={"a": 6})
    assert (d.action, d.blocked) == ("wait", [Blocked(kind="residency", model="a", until=NOW + 50)])
    # never used since it became running: the idle time counts from then
    assert decide(instances=fresh, residency={"a": 60}, idle_release={"a": 9}).action == "evict"
    assert decide(instances=fresh, residency={"a": 60}, idle_release={"a": 11}).action == "wait"
    # a request in flight is drain, whatever idle_release says
    busy = {"a": ModelUsage(inflight=1, last_used=NOW - 30)}
    assert decide(instances=fresh, usage=busy, residency={"a": 60}, idle_release={"a": 4}).action == "wait"


def test_draining_a_busy_model_waits_and_is_never_overridden_by_starvation():
    busy = {"a": ModelUsage(inflight=2)}
    d = decide(usage=busy)
    assert (d.action, d.blocked, d.eta) == ("wait", [Blocked(kind="draining", model="a", requests=2)], 0.0)
    starved = Waiter(model="b", since=NOW - 500, max_wait=60)
    assert decide(usage=busy, waiters=[starved]).action == "wait"  # never abort
    assert decide(usage={"a": ModelUsage(inflight=0)}, waiters=[starved]).action == "evict"


def test_a_higher_priority_use_since_loading_holds_the_model_even_for_a_starving_waiter():
    used = {"a": ModelUsage(last_used=NOW - 1, priorities={10: NOW - 20, -5: NOW - 1})}
    starved = Waiter(model="b", since=NOW - 500, max_wait=60)
    d = decide(usage=used, priority=-5, waiters=[starved])
    assert (d.action, d.blocked, d.eta) == ("wait", [Blocked(kind="priority", model="a", priority=10)], 0.0)
    assert decide(usage=used, priority=10).action == "evict"  # equal priorities: today's rules
    assert decide(usage=used, priority=11).action == "evict"
    # used at priority 10 before this residency only (it was evicted and loaded again since)
    assert decide(instances=loaded(started_at=NOW - 10), usage=used, priority=-5).action == "evict"
    assert decide(usage=used, priority=-5, residency={"a": 600}, waiters=[starved]).blocked[0].kind == "priority"


def test_starving_waiter_overrides_residency():
    fresh = loaded(started_at=NOW - 10)
    young = Waiter(model="b", since=NOW - 30, max_wait=60)
    assert decide(instances=fresh, waiters=[young], residency={"a": 600}).action == "wait"
    old = Waiter(model="b", since=NOW - 61, max_wait=60)
    assert starving(old, NOW) and not starving(young, NOW)
    d = decide(instances=fresh, waiters=[old], residency={"a": 600})
    assert (d.action, d.plan) == ("evict", Eviction("h", ["a"]))


def test_the_oldest_waiting_model_wins_the_next_swap():
    entries = {"h": entry("b", (["cuda:0"], 16000))}
    waiters = [Waiter(model="c", since=NOW - 5), Waiter(model="b", since=NOW - 20)]
    assert decide(waiters=waiters, entries=entries).action == "evict"  # b is older
    d = decide(model="c", waiters=waiters, entries={"h": entry("c", (["cuda:0"], 16000))})
    assert (d.action, d.position, d.blocked) == ("wait", 2, [Blocked(kind="turn", model="b")])


def test_starving_waiter_jumps_ahead_of_an_older_one_without_a_bound():
    line = in_line([Waiter(model="old", since=NOW - 100), Waiter(model="hungry", since=NOW - 50, max_wait=30)], NOW)
    assert [w.model for w in line] == ["hungry", "old"]


def test_a_waiter_that_already_runs_or_starts_does_not_hold_the_line():
    instances = [*loaded(), inst("c", "other", state="starting")]
    waiters = [Waiter(model="c", since=NOW - 50), Waiter(model="b", since=NOW - 5)]
    assert decide(instances=instances, waiters=waiters).action == "evict"


def test_batching_merges_every_routers_waiters_of_a_model_and_drops_dead_routers():
    entries = [WaitEntry(model="b", router="r1", since=NOW - 10, count=3, at=NOW - 1),
               WaitEntry(model="b", router="r2", since=NOW - 30, count=2, at=NOW - 2),
               WaitEntry(model="c", router="r1", since=NOW - 20, count=1, at=NOW),
               WaitEntry(model="d", router="dead", since=NOW - 99, count=5, at=NOW - 60)]
    got = merge_waiters(entries, NOW, stale=10, max_wait={"b": 120})
    assert got == [Waiter(model="b", since=NOW - 30, count=5, max_wait=120), Waiter(model="c", since=NOW - 20)]


def test_no_room_when_no_eviction_could_ever_make_it_fit():
    entries = {"h": entry("b", (["cuda:0"], 30000))}
    assert decide(entries=entries).action == "no_room"
    assert decide(entries=entries, policy="lru").action == "no_room"


def test_lru_policy_ignores_residency_and_turn_but_still_drains():
    fresh = loaded(started_at=NOW - 1)
    waiters = [Waiter(model="c", since=NOW - 50)]
    assert decide(instances=fresh, waiters=waiters, residency={"a": 600}, policy="lru").action == "evict"
    assert decide(instances=fresh, usage={"a": ModelUsage(inflight=1)}, policy="lru").action == "no_room"


def test_blocked_reasons_name_the_plans_victims():
    instances = [inst("x", "h", vram=8000, started_at=NOW - 5), inst("y", "h", vram=8000, started_at=NOW - 500)]
    entries = {"h": CatalogEntry(id="b", devices=[["cuda:0"]], vram_mb=[16000])}
    usage = {"y": ModelUsage(inflight=1, last_used=NOW)}
    d = decide(instances=instances, usage=usage, entries=entries, residency={"x": 60})
    assert d.action == "wait"
    assert d.blocked == [Blocked(kind="residency", model="x", until=NOW + 55)]
    assert d.eta == NOW + 55


def test_a_model_starting_or_stopping_in_the_way_means_wait_not_no_room():
    for state in ("starting", "stopping"):
        d = decide(instances=[inst("a", "h", state=state)])
        assert (d.action, d.blocked) == ("wait", []), state


def test_a_swap_wait_is_explained_with_its_eta_and_retry_after():
    from llm_lab_router.router.control.client import ControlError, start_failed
    from llm_lab_router.router.control.explain import retry_after, swap_reason
    from llm_lab_router.router.core.errors import encode, error_body

    d = decide(instances=loaded(started_at=NOW - 10), residency={"a": 60})
    reason = swap_reason("b", d, [Waiter(model="b", since=NOW - 3, count=4)], NOW, cold_start_s=20)
    assert (reason.kind, reason.position, reason.waiting, reason.eta) == ("queued", 1, 4, NOW + 70)
    assert "'a' stays loaded 50s more (min_residency)" in reason.message
    assert retry_after(reason, NOW) == "70" and retry_after(reason, NOW + 100) == "5"
    err = start_failed("model 'b' could not be started", ControlError("timed out", reason=reason))
    assert (err.status, err.code) == (503, "model_start_failed") and "Retry-After" in err.headers
    body = msgspec.json.decode(encode(error_body(err, openai_shape=True)))
    assert body["error"]["reason"]["kind"] == "queued" and body["error"]["code"] == "model_start_failed"
    plain = msgspec.json.decode(encode(error_body(start_failed("x", ControlError("y")), openai_shape=True)))
    assert "reason" not in plain["error"]


def test_a_wait_with_max_wait_has_an_eta_by_its_starvation_bound():
    """Starving, a model goes first and residency stops counting: its ETA is the sooner of the
    residency's end and its max_wait, and a model behind another (``turn``) gets one too."""
    from llm_lab_router.router.control.explain import swap_reason

    held = decide(instances=loaded(started_at=NOW - 10), residency={"a": 600})  # residency ends at NOW + 590
    me = Waiter(model="b", since=NOW - 3, count=1, max_wait=30)
    assert swap_reason("b", held, [me], NOW, cold_start_s=20).eta == NOW + 27 + 20
    assert swap_reason("b", held, [Waiter(model="b", since=NOW - 3)], NOW, cold_start_s=20).eta == NOW + 590 + 20
    behind = after_turn(["c"])
    assert swap_reason("b", behind, [me], NOW, cold_start_s=20).eta == NOW + 27 + 20
    assert swap_reason("b", behind, [Waiter(model="b", since=NOW - 3)], NOW).eta == 0.0  # no bound: unknown
    late = Waiter(model="b", since=NOW - 40, max_wait=30)  # past its bound (a drain holds it): about now
    assert swap_reason("b", behind, [late], NOW, cold_start_s=20).eta == NOW + 20


def test_a_starving_waiter_held_back_by_drain_alone_claims_its_victims():
    from llm_lab_router.router.control.scheduler import claims, closing

    busy = {"a": ModelUsage(inflight=1)}
    hungry = Waiter(model="b", since=NOW - 100, max_wait=60)
    d = decide(usage=busy, waiters=[hungry])
    assert claims(d, hungry, NOW) == ["a"]
    assert claims(d, Waiter(model="b", since=NOW - 10, max_wait=60), NOW) == []  # not starving yet
    d = decide(instances=loaded(started_at=NOW - 10), residency={"a": 60}, waiters=[Waiter(model="b", since=NOW)])
    assert claims(d, Waiter(model="b", since=NOW), NOW) == []  # residency: no claim
    entries = [WaitEntry(model="b", router="r", since=NOW - 100, at=NOW, claims=["a"]),
               WaitEntry(model="c", router="dead", since=NOW - 100, at=NOW - 60, claims=["x"])]
    assert closing(entries, NOW, stale=10) == {"a"}


def test_free_room_goes_to_the_models_ahead_in_the_line_first():
    """A fresh start for a model that fits now does not take the room a model ahead of it waits
    for (the starving model evicted; without this, another's new request took the room first)."""
    hungry = Waiter(model="c", since=NOW - 20, max_wait=18)
    older = Waiter(model="a", since=NOW - 19)
    waiters = [older, hungry]
    assert ahead_of("b", waiters, [], NOW) == ["c", "a"]  # b waits since now: last
    assert ahead_of("c", waiters, [], NOW) == []  # starving: first, and takes the room
    assert ahead_of("a", waiters, [], NOW) == ["c"]
    # a model ahead that already starts or runs somewhere holds nothing back
    assert ahead_of("b", waiters, [inst("c", "h", state="starting"), inst("a", "h")], NOW) == []
    # ... but a start its worker has not placed yet holds no room: it keeps its place
    assert ahead_of("b", waiters, [inst("c", "h", state="starting", gpus="", vram=0), inst("a", "h")], NOW) == ["c"]
    hosts = {"a": ["h1"], "c": ["h1", "h2"], "b": ["h1", "h2", "h3"]}.__getitem__
    assert free_room_for(["h1", "h3"], ahead_of("b", waiters, [], NOW), hosts) == ["h3"]
    assert free_room_for(["h1", "h2"], ahead_of("c", waiters, [], NOW), hosts) == ["h1", "h2"]
    assert free_room_for(["h1"], [], hosts) == ["h1"]
    d = after_turn(ahead_of("b", waiters, [], NOW))  # b fits only where c and a wait: its turn comes third
    assert (d.action, d.position, d.blocked) == ("wait", 3, [Blocked(kind="turn", model="c")])


def test_a_models_own_instance_still_stopping_means_wait_not_no_room():
    """Its own instance, evicted a moment ago, holds the room it needs until it is stopped: a
    503 then would make the client retry and lose its place in the line."""
    half = {"h": snap("h", 8000)}  # 16,000 MiB held
    d = decide_swap("b", BIG, half, [inst("b", "h", state="stopping", vram=16000)], {}, [], {}, NOW)
    assert (d.action, d.position) == ("wait", 1)
    assert decide_swap("b", BIG, half, [], {}, [], {}, NOW).action == "no_room"  # held by nothing it may stop


def test_every_router_rebuilds_the_same_pending_line_from_llm_waiting():
    """``router.control.pending.line_reason``: what a router with no request waiting for ``b`` shows —
    the requests of all live routers, the earliest since, the position in the line, what the
    freshest entry's decision says blocks it, and its ETA; behind another model: its turn."""
    held = [Blocked(kind="residency", model="a", until=NOW + 50)]
    board = [WaitEntry(model="b", router="r1", since=NOW - 20, count=2, at=NOW - 1, blocked=held, eta=NOW + 80),
             WaitEntry(model="b", router="r2", since=NOW - 5, count=1, at=NOW - 3),  # an older write
             WaitEntry(model="c", router="r2", since=NOW - 8, count=1, at=NOW - 1),
             WaitEntry(model="c", router="dead", since=NOW - 90, count=4, at=NOW - 30)]  # stale: ignored
    got = line_reason("b", board, loaded(), {}, NOW, stale=10)
    assert (got.kind, got.position, got.waiting, got.since, got.blocked, got.eta) == \
        ("queued", 1, 3, NOW - 20, held, NOW + 80)
    assert "position 1" in got.message and "'a' stays loaded 50s more" in got.message
    behind = line_reason("c", board, loaded(), {}, NOW, stale=10)
    assert (behind.position, behind.waiting, behind.blocked, behind.eta) == \
        (2, 1, [Blocked(kind="turn", model="b")], 0.0)
    assert line_reason("a", board, loaded(), {}, NOW, stale=10) is None  # nobody waits for it
    assert line_reason("c", board[-1:], loaded(), {}, NOW, stale=10) is None  # only a dead router did


def test_an_entry_of_a_router_before_the_published_decision_still_reads():
    """``WaitEntry.blocked``/``eta`` are optional: an older router's entry decodes (no reason
    known: "waiting for room", no ETA), and an older router ignores the new fields."""
    from llm_lab_router.protocol import from_json, to_json

    old = from_json(b'{"model": "b", "router": "r0", "since": 980.0, "count": 2, "at": 999.0, "claims": []}', WaitEntry)
    got = line_reason("b", [old], loaded(), {}, NOW, stale=10)
    assert (got.position, got.waiting, got.blocked, got.eta) == (1, 2, [], 0.0)
    assert got.message.endswith("waiting for room")

    class Before(msgspec.Struct, kw_only=True):  # WaitEntry as routers before it had the fields
        model: str
        router: str
        since: float
        count: int = 1
        at: float = 0.0
        claims: list[str] = []
    new = WaitEntry(model="b", router="r1", since=NOW, at=NOW, blocked=[Blocked(kind="turn", model="c")], eta=NOW + 5)
    assert msgspec.json.decode(to_json(new), type=Before).count == 1
