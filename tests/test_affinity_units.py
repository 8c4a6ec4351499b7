"""Prefix-affinity routing and fallback chains as pure functions (router/forward/affinity.py,
router/forward/fallbacks.py, ``Balancer.choose``); the same behaviour through real routers is in
tests/test_affinity.py."""

from __future__ import annotations

import json
import math
from collections import Counter

import msgspec
from llm_lab_router.protocol import CatalogEntry, Instance
from llm_lab_router.router.forward.affinity import AffinityRing, Ring, load_bound, routing_key
from llm_lab_router.router.forward.balancer import AFFINITY, LEAST, SPILL, Balancer
from llm_lab_router.router.forward.fallbacks import fallback_chain, with_model

SYSTEM = {"role": "system", "content": "You are helpful. " * 200}


def chat(*turns: str, system: dict = SYSTEM, **extra) -> bytes:
    """A conversation: user, assistant, user... (``turns`` alternate, starting with the user)."""
    msgs = [system] + [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
    return json.dumps({"model": "m", "messages": msgs, **extra}).encode()


def keys(n: int) -> list[int]:
    return [routing_key("m", chat(f"question {i}"), []) for i in range(n)]


def test_every_turn_of_a_conversation_has_the_same_key_and_conversations_differ() -> None:
    k1 = routing_key("m", chat("hello"), [])
    k2 = routing_key("m", chat("hello", "hi there", "and then?"), [])
    k3 = routing_key("m", chat("hello", "hi there", "and then?", "this", "more"), [])
    assert k1 == k2 == k3 is not None
    assert routing_key("m", chat("another conversation"), []) != k1
    assert routing_key("other-model", chat("hello"), []) != k1  # the model is part of the key


def test_role_written_after_content_is_found_too() -> None:
    body = json.dumps({"messages": [{"content": "sys", "role": "system"}, {"content": "q1", "role": "user"},
                                    {"content": "a1", "role": "assistant"}]}).encode()
    short = json.dumps({"messages": [{"content": "sys", "role": "system"}, {"content": "q1", "role": "user"}]}).encode()
    assert routing_key("m", body, []) == routing_key("m", short, [])


def test_session_header_wins_over_user_which_wins_over_messages() -> None:
    body = chat("hello", user="alice")
    assert routing_key("m", body, []) == routing_key("m", chat("other", user="alice"), [])
    by_header = routing_key("m", body, [("X-Session-Id", "s1")])
    assert by_header == routing_key("m", chat("zzz"), [("x-session-id", "s1")])
    assert by_header != routing_key("m", body, [])


def test_completion_prompt_keys_on_its_leading_block_and_no_key_without_one() -> None:
    head = "x" * 2000
    a = json.dumps({"model": "m", "prompt": head + " first turn"}).encode()
    b = json.dumps({"model": "m", "prompt": head + " first turn, second turn"}).encode()
    assert routing_key("m", a, []) == routing_key("m", b, []) is not None
    assert routing_key("m", b'{"model": "m", "input": "x"}', []) is None
    assert routing_key("m", b"not json", []) is None


def test_ring_is_the_same_from_the_same_set_whatever_the_order() -> None:
    a, b = Ring(["w3", "w1", "w2"]), Ring(["w2", "w3", "w1"])
    assert a.points == b.points and a.owners == b.owners
    assert all(a.owner(k) == b.owner(k) for k in keys(200))


def test_ring_spreads_keys_and_walk_visits_every_node_once() -> None:
    ring = Ring([f"w{i}" for i in range(4)])
    counts = Counter(ring.owner(k) for k in keys(4000))
    assert set(counts) == {"w0", "w1", "w2", "w3"} and min(counts.values()) > 4000 / 4 * 0.5, counts
    walked = list(ring.walk(keys(1)[0]))
    assert sorted(walked) == ["w0", "w1", "w2", "w3"]


def test_adding_or_removing_an_instance_moves_about_one_key_in_n() -> None:
    ks = keys(4000)
    four = Ring(["w0", "w1", "w2", "w3"])
    five = Ring(["w0", "w1", "w2", "w3", "w4"])
    three = Ring(["w0", "w1", "w2"])
    moved_add = sum(four.owner(k) != five.owner(k) for k in ks) / len(ks)
    # adding w4: only keys that go to w4 move (~1/5)
    assert all(five.owner(k) == "w4" for k in ks if four.owner(k) != five.owner(k))
    assert 0.1 < moved_add < 0.3, moved_add
    moved_remove = sum(four.owner(k) != three.owner(k) for k in ks) / len(ks)
    assert all(four.owner(k) == "w3" for k in ks if four.owner(k) != three.owner(k))  # only w3's keys move
    assert 0.15 < moved_remove < 0.35, moved_remove


def test_bounded_load_spills_to_the_next_on_the_ring_and_the_bound_holds() -> None:
    ring = AffinityRing(1.25)
    workers = ["w0", "w1", "w2", "w3"]
    key = keys(1)[0]
    first = Ring(workers).owner(key)
    load: dict[str, int] = {}
    for n in range(40):  # every request has the same key: the hot conversation
        chosen, is_first = ring.choose("m", key, workers, load)
        assert chosen is not None
        load[chosen] = load.get(chosen, 0) + 1
        total = sum(load.values())
        assert max(load.values()) <= math.ceil(1.25 * total / len(workers)), (n, load)
        if n == 0:
            assert chosen == first and is_first
    assert len(load) == 4 and load[first] == max(load.values())
    assert load_bound(0, 4, 1.25) == 1 and load_bound(7, 4, 1.25) == 3


def test_the_ring_is_cached_until_the_set_changes() -> None:
    ring = AffinityRing()
    r1 = ring.ring("m", ["w0", "w1"])
    assert ring.ring("m", ["w0", "w1"]) is r1
    assert ring.ring("m", ["w0", "w1", "w2"]) is not r1


def inst(worker: str) -> Instance:
    return Instance(model="m", worker=worker, state="running", url=f"http://{worker}")


def test_balancer_choose_reports_affinity_spill_and_least() -> None:
    b = Balancer(1.0)
    insts = [inst("w0"), inst("w1")]
    key = keys(1)[0]
    chosen, how = b.choose("m", insts, key)
    assert how == AFFINITY
    with b.track(chosen.url):  # full at c = 1.0: the same key spills
        other, how = b.choose("m", insts, key)
        assert how == SPILL and other.url != chosen.url
    assert b.choose("m", insts, None)[1] == LEAST
    assert b.choose("m", insts, key, exclude={chosen.url}) == (insts[1 - insts.index(chosen)], LEAST)
    assert b.choose("m", insts[:1], key) == (insts[0], "")  # one instance: nothing to decide


def entry(model: str, *fallbacks: str, aliases: tuple[str, ...] = ()) -> CatalogEntry:
    return CatalogEntry(id=model, aliases=[model, *aliases], fallbacks=list(fallbacks))


def test_fallback_chain_is_depth_first_resolves_aliases_skips_unknown_and_ends_cycles() -> None:
    entries = {e.id: e for e in (entry("a", "b-alias", "c", "ghost"), entry("b", "d", "a", aliases=("b-alias",)),
                                  entry("c", "a"), entry("d", "b"))}
    names = {n: e.id for e in entries.values() for n in e.aliases}
    assert fallback_chain("a", entries.get, names.get) == ["a", "b", "d", "c"]
    assert fallback_chain("c", entries.get, names.get) == ["c", "a", "b", "d"]


def test_with_model_rewrites_only_the_model() -> None:
    body = json.dumps({"model": "a", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.1}).encode()
    doc = msgspec.json.decode(with_model(body, "b"))
    assert doc == {"model": "b", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.1}
    assert with_model(b"[1, 2]", "b") == b"[1, 2]" and with_model(b"{nope", "b") == b"{nope"
