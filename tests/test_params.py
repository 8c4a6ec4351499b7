"""Query parameters (router/http/query.py): absent takes the default, present must be valid.

Empty, blank or non-ASCII values are a 400 naming the parameter and change nothing in Redis;
they were read as "absent" (``keep_minutes=`` cleared a model's whole log, ``wait=`` started
and waited) or crashed (``tail=²`` was a 500).
"""

from __future__ import annotations

import time

import pytest
from helpers import FakeWorker, request, start_router
from llm_lab_router.protocol import CatalogEntry, Keys, LogEntry, log_fields
from llm_lab_router.router.core.errors import ApiError
from llm_lab_router.router.core.options import RouterOptions
from llm_lab_router.router.http.query import MAX_COUNT, U64, route_params

KEYS = Keys()
CHAT = CatalogEntry(id="chat", aliases=["chat"])
PARAMS = route_params(RouterOptions(log_tail_default=200, log_tail_max=10000))
# blank, a space, a tab, a Unicode digit ('²', then Arabic-Indic 3), fullwidth 5
BLANKS = ("", "%20", "%09", "%20%20")
NOT_ASCII = ("%C2%B2", "%D9%A3", "%EF%BC%95")


def args(**values: str) -> dict[str, list[bytes]]:
    return {name: [value.encode()] for name, value in values.items()}


def refused(call, name: str) -> str:
    with pytest.raises(ApiError) as err:
        call()
    assert err.value.status == 400 and name in err.value.message and err.value.code == "invalid_parameter"
    return err.value.message


# --------------------------------------------------------------------------- units


def test_absent_takes_the_default_and_valid_values_parse() -> None:
    assert PARAMS.keep_minutes.parse({}) == 0 and PARAMS.keep_minutes.parse(args(keep_minutes="60")) == 60
    assert PARAMS.tail.parse({}) == 200 and PARAMS.tail.parse(args(tail="0")) == 0
    assert PARAMS.tail.parse(args(tail="10000")) == 10000 and PARAMS.tail.parse(args(tail="007")) == 7
    assert PARAMS.wait.parse({}) is True and PARAMS.wait.parse(args(wait="FALSE")) is False
    assert PARAMS.wait.parse(args(wait="on")) is True and PARAMS.wait.parse(args(wait="0")) is False
    assert PARAMS.last_event_id.parse({}, None) is None
    assert PARAMS.last_event_id.parse(args(last_event_id="1700000000000-3"), None) == "1700000000000-3"
    assert PARAMS.last_event_id.parse(args(last_event_id="1-1"), "1700000000000") == "1700000000000"  # header wins
    assert PARAMS.last_event_id.parse({}, f"{U64}-{U64}") == f"{U64}-{U64}"
    assert PARAMS.keep_minutes.parse(args(keep_minutes=str(MAX_COUNT))) == MAX_COUNT


@pytest.mark.parametrize("value", ["", " ", "\t", "  ", "\u00a0"])
@pytest.mark.parametrize("name", ["keep_minutes", "tail", "wait", "last_event_id"])
def test_present_but_blank_is_refused_naming_the_parameter(name, value) -> None:
    param = PARAMS.by_name()[name]
    message = refused(lambda: param.parse(args(**{name: value}), *((None,) if name == "last_event_id" else ())),
                      name)
    if value == "":
        assert "empty" in message


@pytest.mark.parametrize("value", ["²", "٣", "５", "-1", "+1", "1.5", "1e3", " 5", "5 ", "0x10", "1_000",
                                   "1" * 19, "9" * 5000])
def test_numbers_are_ascii_digits_only(value) -> None:
    refused(lambda: PARAMS.keep_minutes.parse(args(keep_minutes=value)), "keep_minutes")
    refused(lambda: PARAMS.tail.parse(args(tail=value)), "tail")


def test_tail_above_its_maximum_and_flags_outside_the_words_are_refused() -> None:
    refused(lambda: PARAMS.tail.parse(args(tail="10001")), "tail")
    for value in ("maybe", "2", "truee", "ｔrue"):
        refused(lambda: PARAMS.wait.parse(args(wait=value)), "wait")


@pytest.mark.parametrize("value", ["yesterday", "٣", "1-", "-1", "1-2-3", f"{U64 + 1}", f"1-{U64 + 1}",
                                   "1" * 21, "1700000000000-0\n"])
def test_stream_ids_are_checked_before_redis_sees_them(value) -> None:
    refused(lambda: PARAMS.last_event_id.parse(args(last_event_id=value), None), "last_event_id")
    refused(lambda: PARAMS.last_event_id.parse({}, value), "Last-Event-ID")
    refused(lambda: PARAMS.last_event_id.parse({}, ""), "Last-Event-ID")  # a blank header too
    refused(lambda: PARAMS.last_event_id.parse(args(last_event_id=value), "1-0"), "last_event_id")  # header or not


def test_the_openapi_parameters_say_they_are_optional_and_what_absence_means() -> None:
    for param in PARAMS.by_name().values():
        doc = param.openapi()
        assert doc["in"] == "query" and doc["required"] is False
        assert "Absent: " + param.absent in doc["description"] and "empty or blank is a 400" in doc["description"]
    assert PARAMS.tail.openapi()["schema"] == {"type": "integer", "minimum": 0, "maximum": 10000, "default": 200}
    assert PARAMS.keep_minutes.openapi()["schema"]["default"] == 0


# --------------------------------------------------------------------------- a real router


@pytest.fixture
def router(procs, redis_url, rds):
    FakeWorker(rds, "w1").publish(CHAT)
    return start_router(procs, redis_url)


def add_logs(rds, count: int) -> None:
    for i in range(count):
        rds.xadd(KEYS.logs("chat"), log_fields(LogEntry(timestamp=time.time(), message=f"line {i}")))


def test_a_blank_keep_minutes_clears_nothing_and_an_absent_one_clears_all(procs, router, rds) -> None:
    add_logs(rds, 5)
    for value in (*BLANKS, *NOT_ASCII, "-1"):
        resp = request("POST", f"{router.url}/api/logs/chat/clear?keep_minutes={value}")
        assert resp.status == 400, (value, resp.status, resp.body)
        assert resp.json()["success"] is False and "keep_minutes" in resp.json()["message"], value
        assert rds.xlen(KEYS.logs("chat")) == 5, value
    assert "POST /api/logs/chat/clear 400" in procs.log(router.proc)

    kept = request("POST", f"{router.url}/api/logs/chat/clear?keep_minutes=60")
    assert kept.status == 200 and rds.xlen(KEYS.logs("chat")) == 5  # all recent: all kept
    cleared = request("POST", f"{router.url}/api/logs/chat/clear")  # absent: the manual's "clear all"
    assert cleared.json() == {"success": True, "message": "模型 'chat' 已清空全部日志，删除 5 条", "model": "chat",
                              "deleted": 5, "keep_minutes": 0}
    assert rds.xlen(KEYS.logs("chat")) == 0


def test_blank_or_non_ascii_tail_wait_and_last_event_id_are_400(router, rds) -> None:
    add_logs(rds, 3)
    cases = [*(f"tail={v}" for v in (*BLANKS, *NOT_ASCII)), *(f"last_event_id={v}" for v in (*BLANKS, "%D9%A3",
                                                                                               "1" * 21))]
    for query in cases:
        resp = request("GET", f"{router.url}/api/models/chat/logs/stream?{query}", timeout=5)
        assert resp.status == 400 and query.split("=")[0] in resp.json()["message"], (query, resp.status)
    for value in ("", " ", "\xb2"):  # a header is Latin-1: '²' is the one Unicode digit it can carry
        resp = request("GET", f"{router.url}/api/models/chat/logs/stream", headers={"Last-Event-ID": value}, timeout=5)
        assert resp.status == 400 and "Last-Event-ID" in resp.json()["message"], (value, resp.status)

    for value in (*BLANKS, "%C2%B9"):
        resp = request("POST", f"{router.url}/api/models/chat/start?wait={value}", timeout=5)
        assert resp.status == 400 and "wait" in resp.json()["message"], (value, resp.status)
    assert rds.exists(KEYS.commands("w1")) == 0  # no start was sent to the worker
    assert rds.xlen(KEYS.logs("chat")) == 3
    assert request("GET", f"{router.url}/health").status == 200
