"""The one Server-Sent Events parser: for the CLI (``llm_router.client``), the tests and the
benchmark, which read the router's streams (chat completions, log follow).

Incremental on bytes, as they come off a socket: ``SseParser.feed(chunk)`` returns the events
that chunk completed, whatever the split points (inside a line, inside a ``\\r\\n``, inside a
UTF-8 character), so readers need no buffering of their own. It follows the SSE spec where
our streams need it: ``data:`` lines of one event are joined with newlines, one space after the
colon is dropped, an event ends at a blank line and a block without one at the end of the
stream is dropped, ``\\n`` and ``\\r\\n`` both end a line. Unlike a browser's ``EventSource``
it also reports comment-only blocks (``: keep-alive``, ``: loading model 'x'``): the router's
keep-alives are part of what the tests check. A lone ``\\r`` as line end is not supported
(no server we read sends it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable, Iterator


@dataclass(slots=True)
class SseEvent:
    """One block of lines up to a blank line."""

    data: str | None = None  # the ``data:`` lines joined with "\n"; None: the block had none
    id: str | None = None  # the block's ``id:``; None: it had none
    comment: str | None = None  # the text of its last comment line

    def json(self) -> Any:
        """``data`` decoded as JSON (``ValueError`` when it is not JSON)."""
        if self.data is None:
            raise ValueError("the event has no data")
        return json.loads(self.data)


class SseParser:
    """Feed bytes in, get whole events out."""

    def __init__(self) -> None:
        self._rest = b""  # an incomplete line carried to the next chunk
        self._event = SseEvent()
        self._seen = False  # the current block has at least one line

    def feed(self, chunk: bytes) -> list[SseEvent]:
        """The events ``chunk`` completes, in order."""
        *lines, self._rest = (self._rest + chunk if self._rest else chunk).split(b"\n")
        events = []
        for raw in lines:
            event = self._line(raw[:-1] if raw.endswith(b"\r") else raw)
            if event is not None:
                events.append(event)
        return events

    def _line(self, raw: bytes) -> SseEvent | None:
        if not raw:
            if not self._seen:
                return None
            event, self._event, self._seen = self._event, SseEvent(), False
            return event
        self._seen = True
        line = raw.decode("utf-8", "replace")
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if not name:
            self._event.comment = value
        elif name == "data":
            self._event.data = value if self._event.data is None else f"{self._event.data}\n{value}"
        elif name == "id":
            self._event.id = value
        return None  # other fields (event:, retry:) carry nothing our readers use


def sse_events(chunks: Iterable[bytes]) -> Iterator[SseEvent]:
    """Every event of a byte stream (lines, or chunks split anywhere)."""
    parser = SseParser()
    for chunk in chunks:
        yield from parser.feed(chunk)
