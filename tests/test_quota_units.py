"""Units of the fair model queue (router/limits/concurrency.py), the structured keys file (router/http/auth.py)
and the token count a quota charges (router/limits/quotas.py)."""

from __future__ import annotations

import asyncio
import hashlib
import json

import pytest
from llm_lab_router.protocol import Keys
from llm_lab_router.router.http.auth import KeyFileError, KeyRing, Role, parse_structured_keys, read_key_file
from llm_lab_router.router.core.errors import ApiError
from llm_lab_router.router.limits.concurrency import Limits
from llm_lab_router.router.limits.profile import LimitSpec
from llm_lab_router.router.limits.quotas import Lease, refusal, subjects_of, tokens_used
from llm_lab_router.router.observe.accesslog import Usage

A_KEY = "a-key-0123456789abcdef"
B_KEY = "b-key-0123456789abcdef"


# --- the fair queue ---------------------------------------------------------------------------


def served_order(arrivals: list[tuple[str, int, float]]) -> list[str]:
    """Hold the only slot, queue ``arrivals`` (lane, priority, weight) in order, let go: the
    order the queue serves them in."""
    async def scenario() -> list[str]:
        limits = Limits(queue_limit=100, queue_timeout=5)
        order: list[str] = []

        async def call(lane: str, priority: int, weight: float) -> None:
            async with limits.admit("m", 1, lane, priority, weight):
                order.append(lane)

        async with limits.admit("m", 1):
            tasks = []
            for lane, priority, weight in arrivals:
                tasks.append(asyncio.create_task(call(lane, priority, weight)))
                await asyncio.sleep(0)
            assert limits.queued("m") == len(arrivals)
        await asyncio.gather(*tasks)
        assert limits.queued("m") == 0
        return order

    return asyncio.run(scenario())


def test_equal_weights_alternate_however_many_one_key_queues():
    order = served_order([("a", 0, 1.0)] * 6 + [("b", 0, 1.0)] * 3)
    assert order == ["a", "b", "a", "b", "a", "b", "a", "a", "a"]


def test_weights_share_slots_in_proportion():
    order = served_order([("a", 0, 2.0)] * 6 + [("b", 0, 1.0)] * 6)
    assert order[:9].count("a") == 6 and order[:9].count("b") == 3, order


def test_higher_priority_goes_first_and_the_anonymous_lane_is_one_lane():
    order = served_order([("", 0, 1.0)] * 3 + [("vip", 2, 1.0)] * 2 + [("mid", 1, 1.0)])
    assert order == ["vip", "vip", "mid", "", "", ""]


def test_a_lane_that_was_idle_gets_no_credit_for_it():
    async def scenario() -> list[str]:
        limits = Limits(queue_limit=100, queue_timeout=5)
        order: list[str] = []

        async def call(lane: str) -> None:
            async with limits.admit("m", 1, lane):
                order.append(lane)

        async with limits.admit("m", 1):  # a is served alone for a while...
            first = [asyncio.create_task(call("a")) for _ in range(4)]
            await asyncio.sleep(0)
        await asyncio.gather(*first)
        async with limits.admit("m", 1):  # ...then a and b queue together: they alternate
            rest = [asyncio.create_task(call("a")) for _ in range(3)]
            await asyncio.sleep(0)
            rest += [asyncio.create_task(call("b")) for _ in range(3)]
            await asyncio.sleep(0)
        await asyncio.gather(*rest)
        return order[4:]

    order = asyncio.run(scenario())
    assert order[:4].count("b") == 2, order


def test_queue_limit_counts_every_lane():
    async def scenario() -> None:
        limits = Limits(queue_limit=2, queue_timeout=5)
        async with limits.admit("m", 1):
            waiting = [asyncio.create_task(limits.admit("m", 1, lane).__aenter__()) for lane in ("a", "b")]
            await asyncio.sleep(0)
            assert limits.queued("m") == 2  # one in each lane
            with pytest.raises(Exception, match="2 requests already queued"):
                async with limits.admit("m", 1, "c"):
                    pass
            for task in waiting:
                task.cancel()
            await asyncio.gather(*waiting, return_exceptions=True)
            assert limits.queued("m") == 0

    asyncio.run(scenario())


def full_queue_outcome(queued: list[tuple[str, int, float]], newcomer: tuple[str, int, float],
                       limit: int) -> tuple[list[str], str]:
    """Hold the only slot, queue ``queued`` (lane, priority, weight) up to ``limit``, then send
    ``newcomer``: the queued requests refused (429), as ``lane#index``, and what the newcomer got
    ("429" or "served")."""
    async def scenario() -> tuple[list[str], str]:
        limits = Limits(queue_limit=limit, queue_timeout=5)

        async def call(lane: str, priority: int, weight: float) -> str:
            try:
                async with limits.admit("m", 1, lane, priority, weight):
                    return "served"
            except ApiError as exc:
                assert exc.status == 429 and exc.headers == {"Retry-After": "1"}
                return "429"

        async with limits.admit("m", 1):
            tasks = []
            for item in queued:
                tasks.append(asyncio.create_task(call(*item)))
                await asyncio.sleep(0)
            last = asyncio.create_task(call(*newcomer))
            await asyncio.sleep(0)
            assert limits.queued("m") == limit  # the slot is still held: nobody was served
        outcomes = await asyncio.gather(*tasks)
        return [f"{item[0]}#{i}" for i, (item, got) in enumerate(zip(queued, outcomes)) if got == "429"], await last

    return asyncio.run(scenario())


def test_a_full_queue_gives_a_higher_priority_request_the_newest_low_priority_place():
    displaced, outcome = full_queue_outcome([("low", -5, 1.0)] * 3, ("vip", 10, 1.0), limit=3)
    assert (displaced, outcome) == (["low#2"], "served")  # the newest waiter
    # the lowest priority loses first, whatever its lane's size
    displaced, outcome = full_queue_outcome([("mid", 0, 1.0)] * 2 + [("low", -5, 1.0)], ("vip", 10, 1.0), limit=3)
    assert (displaced, outcome) == (["low#2"], "served")


def test_at_equal_priority_only_a_lane_over_its_share_gives_up_a_place():
    displaced, outcome = full_queue_outcome([("a", 0, 1.0)] * 3, ("b", 0, 1.0), limit=3)
    assert (displaced, outcome) == (["a#2"], "served")
    # a and b hold one place each: neither is over b's share once b holds two
    displaced, outcome = full_queue_outcome([("a", 0, 1.0), ("b", 0, 1.0)], ("b", 0, 1.0), limit=2)
    assert (displaced, outcome) == ([], "429")
    # weight 2 entitles a to twice b's places
    displaced, outcome = full_queue_outcome([("a", 0, 2.0)] * 2 + [("b", 0, 1.0)], ("b", 0, 1.0), limit=3)
    assert (displaced, outcome) == ([], "429")
    # a lower priority is never given a higher one's place
    displaced, outcome = full_queue_outcome([("vip", 10, 1.0)] * 2, ("low", -5, 1.0), limit=2)
    assert (displaced, outcome) == ([], "429")


# --- the keys file --------------------------------------------------------------------------


def test_toml_and_json_forms_give_the_same_profiles(tmp_path):
    toml = tmp_path / "keys.toml"
    toml.write_text(f"""
[groups.lab]
tpm = 1000
max_concurrent = 4

[[keys]]
name = "alice"
key = "{A_KEY}"
group = "lab"
rpm = 60
priority = 2
weight = 3

[[keys]]
name = "bob"
key = "sha256:{hashlib.sha256(B_KEY.encode()).hexdigest()}"
""")
    as_json = tmp_path / "keys.json"
    as_json.write_text(json.dumps({"groups": {"lab": {"tpm": 1000, "max_concurrent": 4}},
                                   "keys": [{"name": "alice", "key": A_KEY, "group": "lab", "rpm": 60,
                                             "priority": 2, "weight": 3},
                                            {"name": "bob", "key": B_KEY}]}))
    assert read_key_file(toml) == read_key_file(as_json)
    ring = KeyRing.load(str(toml), env={})
    role, alice = ring.identify(A_KEY)
    assert role is Role.CLIENT and alice is not None
    assert (alice.name, alice.group, alice.priority, alice.weight) == ("alice", "lab", 2, 3.0)
    assert alice.key_limits == LimitSpec(rpm=60) and alice.group_limits == LimitSpec(tpm=1000, max_concurrent=4)
    assert ring.identify(B_KEY)[1].name == "bob"
    assert ring.identify(B_KEY + "x") == (None, None)
    assert A_KEY not in repr(alice)  # a profile never holds the key


def test_a_plain_key_file_still_works_without_profiles(tmp_path):
    path = tmp_path / "keys"
    path.write_text(f"# comment\n{A_KEY}\n")
    ring = KeyRing.load(str(path), env={})
    assert ring.identify(A_KEY) == (Role.CLIENT, None)


@pytest.mark.parametrize("entry, message", [
    ({"name": "a", "key": A_KEY, "rpm": "x"}, "keys[0] ('a'): field 'rpm': Expected `int`"),
    ({"name": "a", "key": A_KEY, "tpmm": 1}, "keys[0] ('a'): Object contains unknown field `tpmm`"),
    ({"name": "a b", "key": A_KEY}, "keys[0] ('a b'): field 'name'"),
    ({"name": "a\n", "key": A_KEY}, "keys[0] ('a\\n'): field 'name'"),  # `$` would take the newline
    ({"key": A_KEY}, "keys[0]: Object missing required field `name`"),
    ({"name": "a", "key": "short"}, "keys[0] ('a'): field 'key': a key must be"),
    ({"name": "a", "key": A_KEY, "group": "g"}, "keys[0] ('a'): field 'group': no group 'g'"),
    ({"name": "a", "key": A_KEY, "weight": 0}, "keys[0] ('a'): field 'weight'"),
])
def test_a_bad_entry_names_the_file_the_entry_and_the_field(entry, message):
    with pytest.raises(KeyFileError) as info:
        parse_structured_keys(json.dumps({"keys": [entry]}), "keys.json", json_form=True)
    assert str(info.value).startswith("keys.json: ") and message in str(info.value), str(info.value)


def test_duplicate_names_and_keys_are_refused():
    twice = [{"name": "a", "key": A_KEY}, {"name": "a", "key": B_KEY}]
    with pytest.raises(KeyFileError, match=r"keys\[1\] \('a'\): the name 'a' is given twice"):
        parse_structured_keys(json.dumps({"keys": twice}), "k.json", json_form=True)
    same = [{"name": "a", "key": A_KEY}, {"name": "b", "key": A_KEY}]
    with pytest.raises(KeyFileError, match=r"keys\[1\] \('b'\): field 'key': the same key"):
        parse_structured_keys(json.dumps({"keys": same}), "k.json", json_form=True)
    with pytest.raises(KeyFileError, match="not valid TOML"):
        parse_structured_keys("[[keys]\n", "k.toml", json_form=False)
    with pytest.raises(KeyFileError, match="group 'lab': field 'rpm'"):
        parse_structured_keys(json.dumps({"groups": {"lab": {"rpm": -1}}}), "k.json", json_form=True)
    with pytest.raises(KeyFileError, match=r"group 'lab\\n': bad name"):
        parse_structured_keys(json.dumps({"groups": {"lab\n": {"rpm": 1}}}), "k.json", json_form=True)


# --- what a quota charges and says ------------------------------------------------------------


def test_tokens_charged_are_the_usage_else_an_estimate():
    ring = KeyRing(profiles=parse_structured_keys(json.dumps(
        {"keys": [{"name": "a", "key": A_KEY, "tpm": 10}]}), "k", json_form=True))
    profile = next(iter(ring.profiles.values()))
    lease = Lease("", subjects_of(profile, Keys()), prompt_estimate=25)
    assert tokens_used(lease, Usage(prompt_tokens=3, completion_tokens=4, total_tokens=7), True, 9) == 7
    assert tokens_used(lease, Usage(prompt_tokens=3, completion_tokens=4), False, -1) == 7
    assert tokens_used(lease, None, True, 9) == 25 + 8  # one token per event, less [DONE]
    assert tokens_used(lease, None, False, -1) == 25


def test_refusal_is_a_429_in_openai_shape_with_whole_seconds():
    profile = next(iter(parse_structured_keys(json.dumps(
        {"groups": {"lab": {"rpm": 5}}, "keys": [{"name": "a", "key": A_KEY, "group": "lab"}]}),
        "k", json_form=True).values()))
    (group,) = subjects_of(profile, Keys())  # the key itself has no limits: one subject
    err = refusal(group, "rpm", 1200, 5)
    assert (err.status, err.code, err.headers) == (429, "rate_limit_exceeded", {"Retry-After": "2"})
    assert "group 'lab'" in err.message and "5 of 5 requests per minute" in err.message
    assert refusal(group, "rpm", 0, 5).headers["Retry-After"] == "1"


def test_a_stream_ends_at_its_done_event_not_at_a_token_that_says_done():
    from llm_lab_router.router.forward.proxy import ends_stream
    assert ends_stream(b'data: {"choices": []}\n\ndata: [DONE]\n\n')
    assert ends_stream(b"data: [DONE]\r\n\r\n") and ends_stream(b"data: [DONE]")
    assert not ends_stream(b'data: {"choices": [{"delta": {"content": "data: [DONE]"}}]}\n\n')
    assert not ends_stream(b"") and not ends_stream(b"{}")
