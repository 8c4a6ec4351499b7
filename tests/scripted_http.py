"""A scripted in-process HTTP server and the router's engine-hop client pointed at it, for the
tests of router/forward/upstream.py and of the forwarding hot path."""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

from llm_lab_router.router.core.options import RouterOptions
from llm_lab_router.router.forward.upstream import Upstream

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    return head + await reader.readexactly(length)


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nServer: x\r\n" + extra + \
        b"Content-Length: %d\r\n\r\n" % len(body) + body


class Server:
    """A listener whose connections run ``script``; counts connections and sees them close."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.closed = asyncio.Event()

    async def __aenter__(self) -> "Server":
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        self.url = "http://127.0.0.1:%d" % self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.script(reader, writer)
            await reader.read()  # until the client closes
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.closed.set()
            writer.close()


def run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 10))  # type: ignore[arg-type]


def client(**options: float) -> Upstream:
    return Upstream(RouterOptions(**options))  # type: ignore[arg-type]


async def fetch(up: Upstream, url: str, timeout: float = 5.0, method: str = "POST") -> tuple[int, bytes, object]:
    deadline = asyncio.get_running_loop().time() + timeout
    resp = await up.open(method, url, "/v1/x?a=1", [("X-Test", "1")], b'{"m":1}', deadline)
    parts = []
    while chunk := await resp.read(deadline=deadline):
        parts.append(chunk)
    resp.release()
    return resp.status, b"".join(parts), resp
