"""The load generator's HTTP/1.1 client: keep-alive connections on asyncio protocols, one
request at a time, responses read by the router's own parser (llm_router/http1.py) and
event streams by the project's SSE parser (llm_router/sse.py); every SSE frame timed."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import urlsplit

import msgspec
from llm_lab_router.http1 import ResponseParser
from llm_lab_router.sse import SseParser

now = time.perf_counter


class Response:
    """One HTTP response as the client saw it, with the timing of every SSE frame."""

    __slots__ = ("keep_body", "on_frame", "status", "headers", "body", "nbytes", "frames", "times",
                 "token_times", "done_seen", "parser", "t_sent", "t_end")

    def __init__(self, sse: bool = False, keep_body: bool = False,
                 on_frame: Callable[[str, float], None] | None = None) -> None:
        self.keep_body = keep_body
        self.on_frame = on_frame
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = bytearray()
        self.nbytes = 0
        self.frames = 0
        self.times: list[float] = []  # arrival of each SSE frame
        self.token_times: list[float] = []  # arrival of each frame carrying generated text
        self.done_seen = False
        self.parser = SseParser() if sse else None
        self.t_sent = 0.0
        self.t_end = 0.0

    def feed(self, data: bytes, t: float) -> None:
        self.nbytes += len(data)
        if self.keep_body:
            self.body += data
        if self.parser is None:
            return
        for event in self.parser.feed(data):
            frame = event.data or ""
            self.frames += 1
            self.times.append(t)
            if '"content":"' in frame and '"content":""' not in frame or '"text":"' in frame:
                self.token_times.append(t)
            elif frame == "[DONE]":
                self.done_seen = True
            if self.on_frame is not None:
                self.on_frame(frame, t)

    @property
    def ttft(self) -> float:
        return (self.times[0] - self.t_sent) if self.times else float("nan")

    def json(self) -> Any:
        return json.loads(bytes(self.body))


class HttpConn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; one request at a time (no pipelining). Responses are
    read by the router's own parser (llm_router/http1.py)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = ResponseParser()
        self.resp: Response | None = None
        self.fut: asyncio.Future | None = None
        self.closed = False

    @classmethod
    async def open(cls, host: str, port: int) -> "HttpConn":
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(cls, host, port)
        return conn

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.resp is not None:
            if self.parser.closed():
                self._deliver(now())
            else:
                self._fail(ConnectionError(f"connection closed mid-response ({exc or 'eof'})"))

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True

    def request(self, raw: bytes, resp: Response) -> asyncio.Future:
        if self.closed:
            raise ConnectionError("connection is closed")
        self.resp = resp
        self.parser = ResponseParser(head_only=raw.startswith(b"HEAD "))
        self.fut = fut = asyncio.get_running_loop().create_future()
        resp.t_sent = now()
        self.transport.write(raw)  # type: ignore[union-attr]
        return fut

    def data_received(self, data: bytes) -> None:
        t = now()
        if self.resp is None:
            return  # bytes after a response we gave up on
        try:
            self.parser.feed(data)
        except Exception as exc:  # a malformed response: an error for this request
            self._fail(exc)
            self.close()
            return
        self._deliver(t)

    def _deliver(self, t: float) -> None:
        """Hand what the parser has to the response; finish it once complete."""
        resp, parser = self.resp, self.parser
        assert resp is not None
        if parser.status and not resp.status:
            resp.status = parser.status
            if resp.keep_body:
                resp.headers = dict(parser.headers)
        if parser.body:
            resp.feed(parser.take(), t)
        if parser.done:
            self._finish(t)

    def _fail(self, exc: Exception) -> None:
        fut, self.resp, self.fut = self.fut, None, None
        if fut is not None and not fut.done():
            fut.set_exception(exc)

    def _finish(self, t: float) -> None:
        resp, fut = self.resp, self.fut
        self.resp = self.fut = None
        assert resp is not None and fut is not None
        resp.t_end = t
        if self.parser.close_after:
            self.close()
        if not fut.done():
            fut.set_result(resp)


@dataclass
class Target:
    """Where a load goes: the engine itself, our router, or another proxy (--compare)."""

    name: str
    base: str  # http://host:port[/prefix]
    model: str
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        u = urlsplit(self.base)
        if u.scheme != "http":
            raise SystemExit(f"error: only http:// targets are supported, not {self.base!r}")
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or 80
        self.prefix = u.path.rstrip("/")
        if self.prefix.endswith("/v1"):
            self.prefix = self.prefix[:-3]

    def raw(self, method: str, path: str, body: bytes | None = None, model: str | None = None) -> bytes:
        extra = "".join(f"{k}: {v}\r\n" for k, v in self.headers.items())
        head = f"{method} {self.prefix}{path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n{extra}"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        elif method in ("POST", "PUT"):
            head += "Content-Length: 0\r\n"
        return (head + "\r\n").encode() + (body or b"")

    def chat(self, stream: bool, max_tokens: int, model: str | None = None) -> bytes:
        body = msgspec.json.encode({
            "model": model or self.model, "stream": stream, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": "Say something short."}],
        })
        return self.raw("POST", "/v1/chat/completions", body)

    async def connect(self) -> HttpConn:
        return await HttpConn.open(self.host, self.port)

    async def call(self, method: str, path: str, body: bytes | None = None, timeout: float = 30.0) -> Response:
        """One request on a fresh connection, body kept (control calls, not measured)."""
        conn = await self.connect()
        try:
            return await asyncio.wait_for(conn.request(self.raw(method, path, body), Response(keep_body=True)),
                                          timeout)
        finally:
            conn.close()
