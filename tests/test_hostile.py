"""Hostile clients and hostile engines against a real router process.

Every test ends the same way: the router still answers ``/health`` and nothing leaked (its
open descriptors and asyncio tasks, read from ``/debug/stats``, are back to their baseline;
RSS within bounds). Engines are ``RawEngine``: a few lines of raw sockets that can answer
properly, send garbage, or hang mid-stream, and that record the request heads they get.
"""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import wait_for
from helpers import (
    FakeWorker,
    SseStream,
    chat_body,
    engine_stats,
    get_json,
    request,
    start_router,
    wait_engine,
    wait_routable,
)
from llm_lab_router.protocol import CatalogEntry
from llm_lab_router.router.core.errors import ApiError
from llm_lab_router.router.forward.proxy import sniff
from raw_engine import OK_BODY, RawEngine, engine  # noqa: F401  (engine: the fixture)

CHAT = CatalogEntry(id="chat", aliases=["chat"], mode="chat", on_demand=False)
GOOD = CatalogEntry(id="good", aliases=[], mode="chat", on_demand=False)
DEBUG_ENV = {"LLM_ROUTER_DEBUG_ENDPOINTS": "1", "LLM_ROUTER_MAX_BODY_SIZE": "100000",
             "LLM_ROUTER_HEADER_TIMEOUT": "1", "LLM_ROUTER_IDLE_TIMEOUT": "1", "LLM_ROUTER_MAX_JSON_DEPTH": "32"}


@pytest.fixture
def spare():
    """A well-behaved engine of another model ("good"), served by the same router."""
    eng = RawEngine()
    yield eng
    eng.close()


@pytest.fixture
def router(procs, redis_url, rds, engine, spare):
    fake = FakeWorker(rds, "w-hostile")
    fake.publish(CHAT, GOOD)
    fake.instance("chat", "running", engine.url)
    fake.instance("good", "running", spare.url)
    r = start_router(procs, redis_url, env=DEBUG_ENV)
    wait_routable(r, "chat")
    wait_routable(r, "good")
    return r


def stats(router) -> dict:
    return get_json(f"{router.url}/debug/stats")


def settled(router) -> dict:
    """Descriptors and tasks once the router is idle (baseline)."""
    request("GET", f"{router.url}/health")
    return stats(router)


def assert_no_leak(router, baseline: dict) -> None:
    """/health answers; fds and tasks fall back to the baseline (a little slack for the pools)."""
    assert request("GET", f"{router.url}/health").status == 200
    wait_for(lambda: (s := stats(router))["fds"] <= baseline["fds"] + 4 and s["tasks"] <= baseline["tasks"] + 1,
             timeout=15, interval=0.1, message=f"fds/tasks back to {baseline}")
    assert stats(router)["rss_mb"] < baseline["rss_mb"] + 100


def raw(router, data: bytes, timeout: float = 5) -> bytes:
    """Send raw bytes, return all the router answers until it closes (or the timeout)."""
    port = int(router.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        got = b""
        try:
            while chunk := s.recv(65536):
                got += chunk
                if b"\r\n\r\n" in got and b"Connection: close" not in data and len(got) > 12:
                    break
        except (socket.timeout, ConnectionResetError):
            pass
        return got


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


DEEP_200 = b'{"model": "chat", "x": ' + b"[" * 200 + b"]" * 200 + b"}"
DEEP_20000 = b'{"model": "chat", "x": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"
BODY_LABELS = ["application/json", "multipart/mixed; boundary=x", "Multipart/Related", "text/plain",
               "application/x-www-form-urlencoded", "application/octet-stream", ""]

BAD_REQUESTS = [
    # (method, path, body, extra headers, status, openai shape)
    ("POST", "/v1/chat/completions", b"{not json", {}, 400, True),
    ("POST", "/v1/chat/completions", b'{"model": 5}', {}, 400, True),
    ("POST", "/v1/chat/completions", b"[1, 2]", {}, 400, True),
    ("POST", "/v1/chat/completions", b"", {}, 400, True),
    ("POST", "/v1/chat/completions", b'{"model": "chat"}', {"Content-Type": "multipart/form-data"}, 415, True),
    ("POST", "/v1/chat/completions", b'{"model": "nope"}', {}, 404, True),
    ("POST", "/v1/chat/completions", '{"model": "ch\\u0000at\\u202e\U0001f600"}'.encode(), {}, 404, True),
    ("POST", "/v1/chat/completions", b'{"model": "chat", "x": ' + b"[" * 100 + b"]" * 100 + b"}", {}, 400, True),
    ("POST", "/v1/chat/completions", b'{"model": "chat", "x": "' + b"a" * 200_000 + b'"}', {}, 413, True),
    # Too deep: refused as JSON (400); under any other label refused unread (415: JSON routes
    # take JSON only, so no form a web page can send carries a JSON body in).
    *[("POST", "/v1/chat/completions", DEEP_200, {"Content-Type": ct}, 400 if ct == "application/json" else 415, True)
      for ct in BODY_LABELS],
    *[("POST", "/v1/chat/completions", DEEP_20000, {"Content-Type": ct}, 400 if ct == "application/json" else 415,
       True) for ct in BODY_LABELS],
    ("POST", "/api/models/chat/start", b"x" * 100_000, {}, 413, False),
    ("POST", "/v1/../api/models/stop-all", b'{"model": "chat"}', {}, 400, True),
    ("POST", "/v1/%2e%2e/api/models/stop-all", b'{"model": "chat"}', {}, 400, True),
    ("POST", "/v1//chat/completions", b'{"model": "chat"}', {}, 400, True),
    ("POST", "/v1/chat%2fcompletions", b'{"model": "chat"}', {}, 400, True),
    ("GET", "/v1/models/%C3%A9%00", None, {}, 404, True),
    ("GET", "/api/models/%E2%80%AE%F0%9F%98%80/info", None, {}, 404, False),
    ("DELETE", "/api/models/stop-all", None, {}, 405, False),
    ("PUT", "/health", None, {}, 405, False),
    ("GET", "/api/logs/stats?foo=1", None, {}, 400, False),
    ("POST", "/api/models/chat/start?wait=1&wait=0", None, {}, 400, False),
    ("GET", "/api/models/chat/logs/stream?tail=abc", None, {}, 400, False),
    ("GET", "/api/models/chat/logs/stream?tail=%01", None, {}, 400, False),
    ("GET", "/nowhere", None, {}, 404, False),
]


def test_malformed_requests_are_refused_in_shape_and_never_reach_the_engine(router, engine) -> None:
    baseline = settled(router)
    for method, path, body, headers, status, openai in BAD_REQUESTS:
        resp = request(method, router.url + path, body, headers=headers)
        assert resp.status == status, (method, path, resp.status, resp.body[:200])
        if openai:
            assert set(resp.json()["error"]) >= {"message", "type", "code"}, (path, resp.body)
            if body in (DEEP_200, DEEP_20000):
                assert resp.json()["error"]["code"] == ("json_too_deep" if status == 400 else "unsupported_media_type"), (
                    headers, resp.body)
        else:
            assert resp.json()["success"] is False and resp.json()["message"], (path, resp.body)
    assert "'foo'" in request("GET", f"{router.url}/api/logs/stats?foo=1").json()["message"]
    # Raw request targets no HTTP client library would send.
    # a loopback router answers no other host name (DNS rebinding)
    assert status_of(raw(router, b"GET http://evil.example/v1/models HTTP/1.1\r\nHost: evil.example\r\n\r\n")) == 403
    assert status_of(raw(router, b"GET /v1/models/\x01\x7f HTTP/1.1\r\nHost: localhost\r\n\r\n")) in (0, 400, 404)
    assert status_of(raw(router, b"GET /health HTTP/1.1\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n")) in (0, 400, 431)
    assert status_of(raw(router, b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 5\r\n"
                                 b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")) in (0, 400, 415)  # 415: unlabelled
    chat = json.dumps(chat_body("chat")).encode()
    for evil in (b"X-Evil: a\rInjected: 1", b"X-Evil: a\x00b", b"X Evil: 1", b"X-Evil: a\x1bb"):
        assert status_of(raw(router, b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n" + evil + b"\r\n"
                                     b"Content-Length: %d\r\n\r\n%s" % (len(chat), chat))) in (0, 400), evil
    assert status_of(raw(router, b"POST /v1/chat/completions?a=\x01 HTTP/1.1\r\nHost: localhost\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(chat), chat))) in (0, 400)
    assert request("POST", f"{router.url}/api/logs/chat/clear?keep_minutes=99999999999").status == 200  # keeps all
    assert engine.heads == []  # none of it was forwarded
    ok = request("POST", f"{router.url}/v1/chat/completions", chat_body("chat"))
    assert ok.status == 200 and ok.body == OK_BODY
    assert_no_leak(router, baseline)


def test_slow_clients_neither_block_others_nor_stay_forever(router) -> None:
    baseline = settled(router)
    port = int(router.url.rsplit(":", 1)[1])
    slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
    started = time.monotonic()
    head = b"GET /health HTTP/1.1\r\nHost: localhost\r\n"
    for i in range(len(head) - 1):  # trickle the heads byte by byte ...
        for s in slow:
            try:
                s.send(head[i:i + 1])
            except OSError:
                pass
        if i % 8 == 0:  # ... while other clients are served normally
            assert request("GET", f"{router.url}/health", timeout=5).status == 200
        time.sleep(0.01)

    def cut(s: socket.socket) -> bool:
        s.settimeout(10)
        try:
            return s.recv(1024) == b""
        except socket.timeout:
            return False
        except OSError:  # reset: closed as well
            return True
    assert all(cut(s) for s in slow)  # the header timeout (1 s here) closed them
    assert time.monotonic() - started < 30
    for s in slow:
        s.close()
    assert_no_leak(router, baseline)


def test_a_thousand_connections_opened_and_dropped(router) -> None:
    baseline = settled(router)
    port = int(router.url.rsplit(":", 1)[1])
    for batch in range(10):
        socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(100)]
        for i, s in enumerate(socks):
            if i % 3 == 1:
                s.send(b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"mo")
            elif i % 3 == 2:
                s.send(b"GET /api/models/chat/logs/stream HTTP/1.1\r\n\r\n")
            s.close()
    assert_no_leak(router, baseline)


def test_garbage_from_the_engine_is_a_502(router, engine) -> None:
    baseline = settled(router)
    engine.mode = "garbage"
    for _ in range(3):
        resp = request("POST", f"{router.url}/v1/chat/completions", chat_body("chat"))
        assert resp.status == 502, resp.body
        assert resp.json()["error"]["type"] == "upstream_error"
    assert_no_leak(router, baseline)


def test_engine_hanging_mid_stream_ends_the_stream_and_its_connection(router, engine) -> None:
    baseline = settled(router)
    engine.mode = "hang"
    stream = SseStream(f"{router.url}/v1/chat/completions", method="POST", body=chat_body("chat", stream=True))
    events = stream.events_until(lambda ev: "error" in str(ev.get("data")))
    stream.close()
    assert events[0]["data"] == {"choices": ["tok"]}
    assert events[-1]["data"]["error"]["code"] == "stream_interrupted"  # after the 1 s idle timeout
    wait_for(lambda: engine.closed == 1, timeout=10, message="the router to hang up on the engine")
    assert_no_leak(router, baseline)


@pytest.mark.parametrize("mode", ["digits", "headers"])
def test_an_endless_line_from_the_engine_is_a_fast_502_and_blocks_nobody(procs, router, engine, spare, mode) -> None:
    """A head or chunk-size line that never ends: the parser's bound ends the exchange with a
    502 (before that fix: the buffer grew with quadratic copying, the event loop stalled and the
    request hung until the first-byte timeout), the engine connection is closed, and the other
    model is served meanwhile."""
    baseline = settled(router)
    engine.mode = mode
    with ThreadPoolExecutor(1) as pool:
        hostile = pool.submit(request, "POST", f"{router.url}/v1/chat/completions", chat_body("chat"))
        wait_for(lambda: engine.heads, message="the hostile engine to get the request")
        good = request("POST", f"{router.url}/v1/chat/completions", chat_body("good"))
        assert good.status == 200 and good.body == OK_BODY
        resp = hostile.result()
    assert resp.status == 502, resp.body[:300]
    error = resp.json()["error"]
    assert error["type"] == "upstream_error" and "malformed response" in error["message"], error
    wait_for(lambda: engine.closed == 1, timeout=10, message="the router to hang up on the engine")
    wait_for(lambda: "malformed response from the engine at" in procs.log(router.proc), message="a log line")
    assert request("POST", f"{router.url}/v1/chat/completions", chat_body("good")).status == 200
    assert_no_leak(router, baseline)


def test_an_endless_trailer_ends_the_stream_with_an_error_event(router, engine) -> None:
    """After the answer began, a bound broken (a trailer line without end) ends the stream the
    way an engine that broke off does: an error event, and the engine connection closed."""
    baseline = settled(router)
    engine.mode = "trailer"
    stream = SseStream(f"{router.url}/v1/chat/completions", method="POST", body=chat_body("chat", stream=True))
    events = stream.events_until(lambda ev: "error" in str(ev.get("data")))
    stream.close()
    assert events[0]["data"] == {}
    assert events[-1]["data"]["error"]["code"] == "stream_interrupted", events
    assert "trailer" in events[-1]["data"]["error"]["message"]  # the bound, not the (1 s) idle timeout
    wait_for(lambda: engine.closed == 1, timeout=10, message="the router to hang up on the engine")
    assert_no_leak(router, baseline)


def test_a_client_that_stops_reading_loses_its_slot_and_the_engine_request(procs, redis_url, rds, mock_engine) -> None:
    """A streamed request whose client never reads (a small receive buffer, nothing read): the
    write deadline ends it, so the model's only concurrency slot goes to the next request
    (before: held for as long as the socket stayed open; the next one got 429 after the queue
    timeout), the engine sees its stream cancelled, and /metrics counts it."""
    _, engine_url = mock_engine("--max-tokens", "10000000", "--quiet")  # unpaced: as fast as it can
    wait_engine(engine_url)
    fake = FakeWorker(rds, "w-stall")
    fake.publish(CatalogEntry(id="chat", aliases=[], mode="chat", on_demand=False, max_concurrency=1))
    fake.instance("chat", "running", engine_url)
    router = start_router(procs, redis_url, env={**DEBUG_ENV, "LLM_ROUTER_WRITE_TIMEOUT": "1",
                                                 "LLM_ROUTER_QUEUE_TIMEOUT": "20"})
    wait_routable(router, "chat")
    baseline = settled(router)
    port = int(router.url.rsplit(":", 1)[1])
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect(("127.0.0.1", port))
    body = json.dumps(chat_body("chat", stream=True)).encode()
    stalled.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # ... and never reads
    try:
        wait_for(lambda: engine_stats(engine_url)["requests"] == 1, message="the stalled stream to reach the engine")
        nxt = request("POST", f"{router.url}/v1/chat/completions", chat_body("chat", max_tokens=2), timeout=30)
        assert nxt.status == 200, nxt.body  # the slot was freed (max_concurrency = 1)
        wait_for(lambda: engine_stats(engine_url)["cancelled_streams"] == 1, message="the engine to see the cancel")
        metrics = request("GET", f"{router.url}/metrics").body.decode()
        assert 'llm_router_requests_aborted_total{model="chat",reason="write_timeout"} 1.0' in metrics
        stalled.settimeout(10)
        try:  # closed by the router: EOF after the bytes buffered so far, or a reset
            while stalled.recv(65536):
                pass
        except ConnectionResetError:
            pass
    finally:
        stalled.close()
    assert_no_leak(router, baseline)


def test_json_deeper_than_the_decoder_goes_is_a_400_even_without_the_depth_check() -> None:
    """With ``max_json_depth`` off (or set past what msgspec decodes), a very deep body is a
    400 in the right shape, not msgspec's RecursionError as a 500."""
    with pytest.raises(ApiError) as err:
        sniff(DEEP_20000, "multipart/mixed", max_depth=0)
    assert (err.value.status, err.value.code) == (400, "json_too_deep")
    with pytest.raises(ApiError) as err:
        sniff(DEEP_200, "multipart/mixed; boundary=x", max_depth=128)
    assert err.value.code == "json_too_deep"
    assert sniff(DEEP_200, "multipart/mixed", max_depth=256).model == "chat"
