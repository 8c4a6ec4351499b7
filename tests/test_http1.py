"""The shared HTTP/1.1 response parser (llm_router/http1.py): framing, strictness and the
bounds that keep a hostile engine from growing a buffer or costing quadratic time."""

from __future__ import annotations

import pytest

from llm_router.http1 import (
    DONE, MAX_CHUNK_LINE, MAX_HEAD, MAX_INTERIM, MAX_TRAILERS, ProtocolError, ResponseParser,
)

CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


def parse(*reads: bytes, head_only: bool = False) -> ResponseParser:
    p = ResponseParser(head_only)
    for data in reads:
        p.feed(data)
    return p


@pytest.mark.parametrize("start, filler, limit", [
    (b"", b"HTTP/1.1 200 OK\r\nX: " + b"a" * 100, MAX_HEAD),  # a head without end
    (CHUNKED, b"f", MAX_CHUNK_LINE),  # a chunk-size line without end
    (CHUNKED + b"1\r\nx\r\n0\r\n", b"T", MAX_TRAILERS),  # a trailer line without end
    (CHUNKED + b"1\r\nx\r\n0\r\n", b"T: x\r\n", MAX_TRAILERS),  # trailer lines without end
])
def test_every_state_waiting_for_a_delimiter_is_bounded(start: bytes, filler: bytes, limit: int) -> None:
    p = ResponseParser()
    p.feed(start)
    with pytest.raises(ProtocolError, match="over"):
        for _ in range(limit // len(filler) + 2):
            p.feed(filler)
    assert len(p._pending) <= limit + len(filler)  # never more than the bound (and one read)


def test_one_huge_read_fails_at_once() -> None:
    with pytest.raises(ProtocolError, match="chunk-size line"):
        parse(CHUNKED + b"1" * 10_000_000)


def test_pending_bytes_are_compacted_not_copied_per_read() -> None:
    """A head trickled byte by byte: the pending buffer only grows in place and is emptied once
    the head is complete (no leftover copy of what was parsed)."""
    p = ResponseParser()
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc"
    for b in raw[:-3]:
        p.feed(bytes([b]))
    assert p.status == 200 and not p._pending
    p.feed(b"abc")
    assert p.done and p.take() == b"abc"


@pytest.mark.parametrize("raw, why", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", "both"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", "Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 1_0\r\n\r\n", "Content-Length"),
    (b"HTTP/1.1 200 OK\r\nX: a\rb\r\n\r\n", "bare CR"),
    (b"HTTP/1.1 200 OK\r\nX: a\x00b\r\n\r\n", "control"),
    (b"HTTP/1.1 200 OK\r\nX: a\r\n folded\r\n\r\n", "header line"),
    (b"HTTP/1.1 200 OK\r\nX : a\r\n\r\n", "header line"),
    (b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n", "header line"),
    (b"HTTP/1.1 2000 OK\r\n\r\n", "status line"),
    (b"HTTP/2 200 OK\r\n\r\n", "status line"),
    (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", "101"),
    (CHUNKED + b"-1\r\n", "chunk-size"),
    (CHUNKED + b"0x1\r\n", "chunk-size"),
    (CHUNKED + b"1_0\r\n", "chunk-size"),
    (CHUNKED + b"11111111111111111\r\n", "chunk-size"),  # over 16 hex digits
    (CHUNKED + b"1\r\nxYZ", "CRLF"),
    (b"HTTP/1.1 100 Continue\r\n\r\n" * (MAX_INTERIM + 1), "interim"),
])
def test_framing_is_read_strictly(raw: bytes, why: str) -> None:
    with pytest.raises(ProtocolError, match=why):
        parse(raw)
