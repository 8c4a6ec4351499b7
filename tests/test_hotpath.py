"""The forwarding hot path's cheaper mechanisms keep their guarantees: the shared body and head
deadlines (router/http/slowbody.py) still cut off a slow body, a slow head and an idle connection,
TCP_NODELAY stays on, and a pooled connection to a host that stopped answering is not retried
on the same host (router/forward/upstream.py)."""

from __future__ import annotations

import asyncio
import errno
import socket
import time

import pytest
import tornado.web
from helpers import request, start_router
from llm_lab_router.router.forward.upstream import ConnectFailed
from llm_lab_router.router.http.slowbody import BodyTimeoutServer
from scripted_http import Server, client, fetch, ok, read_request, run
from tornado.netutil import bind_sockets


@tornado.web.stream_request_body
class Echo(tornado.web.RequestHandler):
    received: asyncio.Event | None = None  # set by a test to learn when a piece has arrived

    def prepare(self) -> None:
        self.size = 0

    def data_received(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if Echo.received is not None:
            Echo.received.set()

    def post(self) -> None:
        self.finish(str(self.size))


def listen(server: BodyTimeoutServer) -> int:
    """Serve on a free port of 127.0.0.1; returns the port."""
    sockets = bind_sockets(0, "127.0.0.1")
    server.add_sockets(sockets)
    return sockets[0].getsockname()[1]


def test_body_deadline_cuts_a_slow_body_and_spares_a_timely_one() -> None:
    async def main() -> None:
        server = BodyTimeoutServer(tornado.web.Application([("/", Echo)]), body_timeout=0.5)
        port = listen(server)
        loop = asyncio.get_running_loop()
        try:
            async def exchange(pieces: list[bytes], gap: float) -> tuple[bytes, float]:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                started = loop.time()
                writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")
                for piece in pieces:
                    await asyncio.sleep(gap)
                    writer.write(piece)
                answer = await asyncio.wait_for(reader.read(), 10)  # until the server closes
                writer.close()
                return answer, loop.time() - started

            # Never completed: cut once the deadline passes, not before (``took`` counts from
            # before the head was sent, so it is never shorter than the server's wait). No upper
            # bound: without the deadline the read would hang into wait_for's 10 s and fail.
            stalled, took = await exchange([b"12345"], 0.0)
            assert stalled == b"" and took >= 0.5
            # Completed in time, over two reads (the second piece goes once the server has the
            # first): answered, and the kept-alive connection is not cut when that request's
            # deadline passes.
            Echo.received = asyncio.Event()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n12345")
            await asyncio.wait_for(Echo.received.wait(), 5)
            writer.write(b"67890")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200")
            assert await asyncio.wait_for(reader.readexactly(2), 5) == b"10"
            await asyncio.sleep(0.6)  # past its deadline: a finished body is no longer watched
            writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx")
            assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(b"HTTP/1.1 200")
            writer.close()
            assert not server.body_deadlines.pending
        finally:
            Echo.received = None
            server.stop()
            await server.close_all_connections()
    run(main())


def test_head_deadline_cuts_a_slow_head_and_an_idle_connection_and_forgets_closed_ones() -> None:
    async def main() -> None:
        server = BodyTimeoutServer(tornado.web.Application([("/", Echo)]), head_timeout=0.5)
        port = listen(server)
        loop = asyncio.get_running_loop()
        try:
            # half a head, never finished: cut at the deadline, not before (counted from before
            # the connection: the server may accept it before open_connection returns)
            started = loop.time()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST / HTTP/1.1\r\nHost: x\r\n")
            assert await asyncio.wait_for(reader.read(), 10) == b"" and loop.time() - started >= 0.5
            writer.close()
            # a request answered on time; the connection then idles past the deadline: cut
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx")
            assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(b"HTTP/1.1 200")
            (conn,) = server._connections
            assert conn.stream.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)  # on for good
            assert await asyncio.wait_for(reader.readexactly(1), 5) == b"1"
            assert await asyncio.wait_for(reader.read(), 10) == b""
            writer.close()
            # a client that closes its idle connection first leaves nothing watched behind
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            while not server.head_deadlines.pending:
                await asyncio.sleep(0.01)
            writer.close()
            while server._connections:
                await asyncio.sleep(0.01)
            assert not server.head_deadlines.pending and not server._waiting
        finally:
            server.stop()
            await server.close_all_connections()
    run(main())


def test_router_enforces_body_timeout(procs, redis_url) -> None:
    router = start_router(procs, redis_url, env={"LLM_ROUTER_BODY_TIMEOUT": "1"})
    port = int(router.url.rsplit(":", 1)[1])
    s = socket.create_connection(("127.0.0.1", port))
    started = time.monotonic()
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
              b"Content-Length: 100\r\n\r\n{\"mo")
    s.settimeout(15)
    try:
        cut = s.recv(1024) == b""
    except ConnectionResetError:
        cut = True
    s.close()
    assert cut and time.monotonic() - started < 14
    assert request("GET", f"{router.url}/health").status == 200


@pytest.mark.parametrize("loss, retried", [
    (None, True),  # EOF: the engine closed the idle connection -> once more on a fresh one
    (ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), True),
    (TimeoutError(errno.ETIMEDOUT, "Connection timed out"), False),  # TCP_USER_TIMEOUT: host gone
])
def test_a_failed_pooled_connection_is_retried_only_when_the_engine_closed_it(loss, retried) -> None:
    async def answer_each(reader, writer) -> None:
        while True:
            await read_request(reader)
            writer.write(ok(b"1"))
            await writer.drain()

    async def main() -> None:
        up = client()
        async with Server(answer_each) as srv:
            assert (await fetch(up, srv.url))[:2] == (200, b"1")
            (conn,) = next(iter(up.idle.values()))  # the pooled connection
            task = asyncio.ensure_future(fetch(up, srv.url))
            while conn.resp is None:  # the request went out on it
                await asyncio.sleep(0)
            conn.transport.abort()  # what the kernel did, reported with ``loss``
            conn.connection_lost(loss)
            if retried:
                assert (await task)[:2] == (200, b"1")
                assert srv.connections == 2
            else:
                with pytest.raises(ConnectFailed, match="stopped answering"):
                    await task
                assert srv.connections == 1  # no second try on the dead host
        await up.close()
    run(main())
