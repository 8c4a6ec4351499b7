"""The engine-hop HTTP client (router/forward/upstream.py) against a scripted in-process server:
framing, pooling, timeouts, cancellation, the stale-connection retry, and the header policy."""

from __future__ import annotations

import asyncio

import pytest
from llm_lab_router.router.core.errors import ApiError
from llm_lab_router.router.forward.proxy import upstream_target
from llm_lab_router.router.forward.upstream import (
    ConnectFailed,
    InvalidHeader,
    UpstreamBroken,
    UpstreamTimeout,
    forward_headers,
    keep_response_header,
)
from scripted_http import Server, client, fetch, ok, read_request, run


def test_sized_answers_reuse_one_pooled_connection() -> None:
    requests: list[bytes] = []

    async def script(reader, writer) -> None:
        while True:
            requests.append(await read_request(reader))
            writer.write(ok(b'{"ok":true}'))

    async def main() -> None:
        async with Server(script) as srv:
            up = client()
            for _ in range(3):
                status, body, resp = await fetch(up, srv.url)
                assert (status, body) == (200, b'{"ok":true}')
            assert srv.connections == 1
            assert resp.headers == [("Content-Type", "application/json")]  # Server/Content-Length dropped
            first = requests[0]
            assert first.startswith(b"POST /v1/x?a=1 HTTP/1.1\r\nHost: 127.0.0.1:")
            assert b"X-Test: 1\r\n" in first and b"Content-Length: 7\r\n" in first and first.endswith(b'{"m":1}')
            await up.close()
    run(main())


def test_chunked_stream_arrives_chunk_by_chunk() -> None:
    go_on = None

    async def script(reader, writer) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"7\r\ndata: 1\r\n")
        await go_on.wait()
        writer.write(b"7\r\ndata: 2\r\n0\r\n\r\n")

    async def main() -> None:
        nonlocal go_on
        go_on = asyncio.Event()
        async with Server(script) as srv:
            up = client()
            deadline = asyncio.get_running_loop().time() + 5
            resp = await up.open("POST", srv.url, "/s", [], b"{}", deadline)
            assert resp.content_type == "text/event-stream"
            assert await resp.read(deadline=deadline) == b"data: 1"  # before the rest was even written
            assert not resp.at_eof
            go_on.set()
            assert await resp.read(timeout=5) == b"data: 2"
            assert await resp.read(timeout=5) == b"" and resp.at_eof
            resp.release()
            assert len(up.idle[resp.conn.key]) == 1  # complete: back in the pool
            await up.close()
    run(main())


def test_first_byte_and_idle_timeouts() -> None:
    async def silent(reader, writer) -> None:
        await read_request(reader)

    async def stalls(reader, writer) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")

    async def main() -> None:
        up = client()
        async with Server(silent) as srv:
            with pytest.raises(UpstreamTimeout, match="first-byte"):
                await up.open("POST", srv.url, "/", [], b"", asyncio.get_running_loop().time() + 0.2)
            await asyncio.wait_for(srv.closed.wait(), 2)  # the abandoned request's connection closed
        async with Server(stalls) as srv:
            resp = await up.open("POST", srv.url, "/", [], b"", asyncio.get_running_loop().time() + 5)
            assert await resp.read(timeout=0.2) == b"abc"
            with pytest.raises(UpstreamTimeout, match="idle"):
                await resp.read(timeout=0.2)
            resp.close()
            await asyncio.wait_for(srv.closed.wait(), 2)
    run(main())


def test_cancel_mid_stream_closes_the_connection() -> None:
    async def endless(reader, writer) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        while True:
            writer.write(b"1\r\nx\r\n")
            await writer.drain()  # raises once the client closed
            await asyncio.sleep(0.01)

    async def main() -> None:
        async with Server(endless) as srv:
            up = client()
            resp = await up.open("POST", srv.url, "/", [], b"", asyncio.get_running_loop().time() + 5)
            reader = asyncio.ensure_future(resp.read(timeout=5))
            await reader
            task = asyncio.ensure_future(resp.read(timeout=5))
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            resp.close()
            await asyncio.wait_for(srv.closed.wait(), 2)
            assert not up.idle.get(resp.conn.key)
    run(main())


def test_refused_broken_and_stale_connections() -> None:
    async def once_then_close(reader, writer) -> None:
        await read_request(reader)
        writer.write(ok(b"1"))  # keep-alive by the headers, but the engine closes right after
        await writer.drain()
        writer.close()

    async def breaks(reader, writer) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        await writer.drain()
        writer.transport.abort()

    async def main() -> None:
        up = client()
        async with Server(once_then_close) as srv:
            assert (await fetch(up, srv.url))[:2] == (200, b"1")
            await asyncio.sleep(0.05)  # the engine's close reaches the pooled connection... or not
            assert (await fetch(up, srv.url))[:2] == (200, b"1")  # stale or not: answered
            assert srv.connections == 2
        async with Server(breaks) as srv:
            resp = await up.open("POST", srv.url, "/", [], b"", asyncio.get_running_loop().time() + 5)
            assert await resp.read(timeout=5) == b"partial"
            with pytest.raises(UpstreamBroken):
                await resp.read(timeout=5)
            resp.release()  # incomplete: closed, not pooled
            assert not up.idle.get(resp.conn.key)
        with pytest.raises(ConnectFailed, match="cannot reach"):
            await up.open("POST", srv.url, "/", [], b"", asyncio.get_running_loop().time() + 5)  # closed now
        await up.close()
    run(main())


def test_head_and_until_close_bodies() -> None:
    async def head(reader, writer) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n")  # no body follows a HEAD answer

    async def until_close(reader, writer) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n\r\nall of it")
        await writer.drain()
        writer.close()

    async def main() -> None:
        up = client()
        async with Server(head) as srv:
            status, body, _ = await fetch(up, srv.url, method="HEAD")
            assert (status, body) == (200, b"")
        async with Server(until_close) as srv:
            assert (await fetch(up, srv.url))[:2] == (200, b"all of it")
        await up.close()
    run(main())


def test_header_policy() -> None:
    sent = [("Host", "router"), ("Connection", "keep-alive, X-Hop"), ("X-Hop", "1"), ("Content-Length", "5"),
            ("Authorization", "Bearer client"), ("Content-Type", "application/json"), ("Transfer-Encoding", "x")]
    assert forward_headers(sent) == [("Content-Type", "application/json")]  # the client's key is the router's
    assert forward_headers(sent, "engine-key") == [("Content-Type", "application/json"),
                                                   ("Authorization", "Bearer engine-key")]
    assert keep_response_header("content-type") and keep_response_header("x-ratelimit-remaining-tokens")
    assert not keep_response_header("server") and not keep_response_header("set-cookie")


@pytest.mark.parametrize("name, value", [
    ("X-Evil", "a\rInjected: 1"), ("X-Evil", "a\nInjected: 1"), ("X-Evil", "a\r\nInjected: 1"),
    ("X-Evil", "a\x00b"), ("X-Evil", "a\x7fb"), ("X-Evil", "a\x1bb"), ("X-Evil", "\u0100"),
    ("X Evil", "1"), ("X-Evil:", "1"), ("", "1"), ("X-\u00e9", "1"), ("X-Evil\r\nInjected", "1"),
])
def test_headers_that_could_break_the_line_are_never_forwarded(name: str, value: str) -> None:
    """Whatever the server in front let through (Tornado before 6.5 let a bare CR or a NUL
    pass), forward_headers refuses what could end a line towards the engine."""
    with pytest.raises(InvalidHeader):
        forward_headers([("Content-Type", "application/json"), (name, value)])


def test_header_values_the_rfc_allows_pass() -> None:
    sent = [("X-Tab", "a\tb"), ("X-Latin", "caf\u00e9"), ("X-Sym", "!#$%&'*+-.^_`|~ \"(),/:;<=>?@[\\]{}")]
    assert forward_headers(sent) == sent
    with pytest.raises(InvalidHeader):
        forward_headers(sent, api_key="key\r\nX-Injected: 1")  # the model's key is checked too


def test_a_query_that_could_break_the_request_line_is_refused() -> None:
    assert upstream_target("/v1/x", "a=1&b=%20") == "/v1/x?a=1&b=%20"
    for query in ("a=1 HTTP/1.1\r\nX: y", "a=\x00", "a=\x7f", "a=\tb"):
        with pytest.raises(ApiError):
            upstream_target("/v1/x", query)
