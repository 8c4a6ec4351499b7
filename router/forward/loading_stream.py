"""A streamed request that waits for its model to load: answer at once, keep the line alive.

Loading a model takes minutes (vLLM); a connection silent that long is cut by clients, nginx
and load balancers. So a ``"stream": true`` request whose model must first be started gets the
SSE head and a comment line at once, then one comment every ``loading_keepalive`` seconds
(SSE parsers, the openai SDK's included, skip comments) until the model runs. The head is then
already sent: ``LoadingStream`` relays the engine's 200 stream body as is and turns anything
else (an engine's error answer, a failed start, 502/504) into one ``data: {"error": ...}``
event that ends the stream, in OpenAI's error shape.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any, Iterable, Protocol

import msgspec

from llm_lab_router.router.core.errors import WaitReason
from llm_lab_router.router.core.errors import ApiError, encode, error_body


SSE_HEAD = (("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache"), ("X-Accel-Buffering", "no"))
MAX_ERROR_BODY = 64 * 1024  # of an engine's error answer kept for the error event


def sse_data(obj: Any) -> bytes:
    """One SSE event whose data is ``obj`` as JSON."""
    return b"data: " + encode(obj) + b"\n\n"


def loading_comment(name: str, reason: WaitReason | None = None) -> bytes:
    """``: loading model 'X'``, then the wait's reason as JSON when the router knows it
    (``starting`` with an ETA, ``queued`` for a swap: router.control.explain)."""
    if reason is None:
        return f": loading model '{name}'\n\n".encode()
    return f": loading model '{name}' ".encode() + encode(reason) + b"\n\n"


def error_event(err: ApiError) -> bytes:
    """``err`` as the SSE event a stream ends with, in OpenAI's error shape."""
    return sse_data(error_body(err, openai_shape=True))


def upstream_error(status: int, body: bytes) -> ApiError:
    """An engine's non-200 answer as an ``ApiError``: its ``message``/``code`` when the body is
    OpenAI's shape (``{"error": {...}}``) or vLLM's flat one, else its text."""
    try:
        doc = msgspec.json.decode(body)
    except msgspec.DecodeError:
        doc = None
    detail = doc.get("error", doc) if isinstance(doc, dict) else None
    detail = detail if isinstance(detail, dict) else {}
    message = detail.get("message")
    if not isinstance(message, str) or not message:
        message = body.decode("utf-8", "replace").strip() or _phrase(status)
    code = detail.get("code")
    return ApiError(status, message, None if code is None else str(code))


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return f"status {status}"


class Sink(Protocol):
    """Where the answer goes (the HTTP handler)."""

    def begin(self, status: int, headers: Iterable[tuple[str, str]]) -> None: ...

    async def send(self, data: bytes, last: bool = False) -> None:
        """Relay bytes at once; ``last``: they end the answer."""

    def abort(self) -> None:
        """Drop the connection: the body sent so far is known to be incomplete."""


class LoadingStream:
    """The ``Sink`` a request relays through once its SSE head went out during a load."""

    def __init__(self, sink: "Sink") -> None:
        self.sink = sink
        self._error_status = 0  # the engine answered this (not 200): its body becomes an event
        self._error_body = bytearray()
        self._ended = False

    async def open(self, name: str, model: str = "") -> None:
        """Send the head and the first comment (a flush: the client sees the answer begin);
        ``model``: the model that serves (``X-Router-Model``)."""
        self.sink.begin(200, (*SSE_HEAD, ("X-Router-Model", model)) if model else SSE_HEAD)
        await self.sink.send(loading_comment(name))

    async def keepalive(self, name: str, reason: WaitReason | None = None) -> None:
        await self.sink.send(loading_comment(name, reason))

    # --- Sink, for the relay ---

    def begin(self, status: int, headers: Iterable[tuple[str, str]]) -> None:
        """The engine's head: the client already has one; remember a failure status."""
        if status != 200:
            self._error_status = status

    async def send(self, data: bytes, last: bool = False) -> None:
        if self._error_status:
            if len(self._error_body) < MAX_ERROR_BODY:
                self._error_body += data[:MAX_ERROR_BODY - len(self._error_body)]
            if last:
                await self.end()
            return
        await self.sink.send(data, last)
        self._ended = last

    def abort(self) -> None:
        self.sink.abort()

    async def fail(self, err: ApiError) -> None:
        """End the stream with ``err`` as an error event."""
        self._ended = True
        await self.sink.send(error_event(err), last=True)

    async def end(self) -> None:
        """After the relay: an engine's error answer, kept so far, goes out as the last event."""
        if self._error_status and not self._ended:
            await self.fail(upstream_error(self._error_status, bytes(self._error_body)))
