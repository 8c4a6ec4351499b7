"""The shared HTTP/1.1 response parser (llm_router/http1.py): framing, strictness, the bounds
that keep a hostile engine from growing a buffer or costing quadratic time, and properties
(hypothesis): any valid response — 1xx heads, 204/304, HEAD answers, sized, chunked (with
extensions and trailers) or until-close bodies — parses the same however it is split, is never
complete before its end, and garbage is a ``ProtocolError`` within the bounds. Last, the
pause/resume path of the router's client that reads through it."""

from __future__ import annotations

import asyncio
import random
import string
from typing import NamedTuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from llm_lab_router.http1 import MAX_CHUNK_LINE, MAX_HEAD, MAX_INTERIM, MAX_TRAILERS, ProtocolError, ResponseParser
from llm_lab_router.router.core.options import RouterOptions
from llm_lab_router.router.forward.upstream import PAUSE_AT, Upstream

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


# --------------------------------------------------------------------------- properties

TOKEN = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
FRAMING = {"content-length", "transfer-encoding", "connection"}
names = st.text(TOKEN, min_size=1, max_size=12).filter(lambda n: n.lower() not in FRAMING)
values = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
                 max_size=30).map(lambda v: v.strip(" \t"))


class Case(NamedTuple):
    raw: bytes
    status: int
    headers: list[tuple[str, str]]
    body: bytes  # what the parser must deliver
    until_close: bool  # complete only once the connection closes
    head_only: bool
    interim: int


@st.composite
def responses(draw: st.DrawFn) -> Case:
    """A valid response as an engine could send it: 1xx heads, any status, headers, and its
    body framed by Content-Length, chunks (with extensions and trailers) or the close."""
    interim = draw(st.lists(st.sampled_from([100, 102, 103]), max_size=3))
    status = draw(st.sampled_from([200, 201, 204, 304, 400, 404, 500, 503]))
    headers = draw(st.lists(st.tuples(names, values), max_size=5))
    body = draw(st.binary(max_size=400))
    framing = draw(st.sampled_from(["length", "chunked", "close"]))
    head_only = draw(st.booleans())
    raw = b"".join(b"HTTP/1.1 %d Early\r\nX-Hint: %d\r\n\r\n" % (s, s) for s in interim)
    raw += b"HTTP/1.1 %d Whatever It Says\r\n" % status
    raw += b"".join(f"{k}: {v}\r\n".encode("latin-1") for k, v in headers)
    bodyless = head_only or status in (204, 304)
    sent = b"" if bodyless else body
    if framing == "length":
        raw += b"Content-Length: %d\r\n\r\n" % len(body) + sent
    elif framing == "chunked":
        raw += b"Transfer-Encoding: chunked\r\n\r\n"
        if not bodyless:
            cuts = sorted(set(draw(st.lists(st.integers(1, max(len(body) - 1, 1)), max_size=6))))
            for a, b in zip([0, *cuts], [*cuts, len(body)]):
                if body[a:b]:
                    ext = draw(st.sampled_from([b"", b";name", b";name=value", b' ; q="x y"']))
                    raw += b"%x%s\r\n%s\r\n" % (b - a, ext, body[a:b])
            raw += b"0\r\n" + b"".join(b"X-Trailer-%d: %d\r\n" % (i, i) for i in range(draw(st.integers(0, 2))))
            raw += b"\r\n"
    else:
        raw += b"\r\n" + sent
    return Case(raw, status, headers, sent, framing == "close" and not bodyless, head_only, len(interim))


def split_feed(case: Case, cuts: list[int]) -> tuple[ResponseParser, bytes]:
    """Feed ``case`` cut at ``cuts``; the body as taken after every read."""
    p = ResponseParser(case.head_only)
    got = b""
    points = sorted(set(c % (len(case.raw) + 1) for c in cuts))
    for a, b in zip([0, *points], [*points, len(case.raw)]):
        p.feed(case.raw[a:b])
        got += p.take()
    return p, got


def check(case: Case, p: ResponseParser, got: bytes) -> None:
    assert p.status == case.status and p.interim == case.interim
    assert [(k, v) for k, v in p.headers if k not in FRAMING] == [(k.lower(), v) for k, v in case.headers]
    assert got == case.body
    if case.until_close:
        assert not p.done and p.close_after
        assert p.closed() and p.done
    else:
        assert p.done and not p.close_after
    assert not p._pending and not p.body


@settings(max_examples=300, deadline=None)
@given(responses(), st.lists(st.integers(0, 10_000), max_size=12))
def test_any_response_split_anywhere_parses_the_same(case: Case, cuts: list[int]) -> None:
    check(case, *split_feed(case, cuts))


@settings(max_examples=40, deadline=None)
@given(responses())
def test_split_at_every_point_and_never_done_before_the_end(case: Case) -> None:
    for k in range(len(case.raw) + 1):
        p = ResponseParser(case.head_only)
        p.feed(case.raw[:k])
        if k < len(case.raw):
            assert not p.done, k  # a truncated response is never taken for a whole one
        got = p.take()
        p.feed(case.raw[k:])
        check(case, p, got + p.take())
    p, got = split_feed(case, list(range(len(case.raw))))  # one byte per read
    check(case, p, got)


@settings(max_examples=100, deadline=None)
@given(responses(), st.binary(min_size=1, max_size=20))
def test_bytes_after_the_end_make_the_connection_unusable(case: Case, extra: bytes) -> None:
    if case.until_close:
        return  # those bytes are body
    p = parse(case.raw + extra, head_only=case.head_only)
    assert p.done and p.close_after


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([b"", b"HTTP/1.1 200 OK\r\n", CHUNKED, CHUNKED + b"3\r\nabc\r\n0\r\n"]),
       st.lists(st.binary(max_size=3000), max_size=8))
def test_garbage_is_a_protocol_error_or_waits_within_the_bounds(start: bytes, reads: list[bytes]) -> None:
    p = ResponseParser()
    try:
        for data in [start, *reads]:
            p.feed(data)
            assert len(p._pending) <= max(MAX_HEAD, MAX_TRAILERS, MAX_CHUNK_LINE)
    except ProtocolError:
        pass


# --------------------------------------------------------------------------- pause / resume


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(1, 200_000), min_size=8, max_size=30), st.integers(0, 8), st.integers(0, 2**32))
def test_a_reader_behind_pauses_the_engine_and_resumes_it(sizes: list[int], big_at: int, seed: int) -> None:
    """Through the router's client (router/forward/upstream.py): a body written faster than it is read
    pauses reading from the engine once ``PAUSE_AT`` bytes wait, resumes on the next read, and
    arrives whole and in order; the connection then goes back to the pool."""
    sizes = sizes[:big_at] + [PAUSE_AT + 1] + sizes[big_at:]  # at least one pause
    body = random.Random(seed).randbytes(sum(sizes))

    async def engine(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        pos = 0
        for n in sizes:
            writer.write(b"%x\r\n%s\r\n" % (n, body[pos:pos + n]))
            pos += n
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        await reader.read()

    async def main() -> None:
        server = await asyncio.start_server(engine, "127.0.0.1", 0)
        url = "http://127.0.0.1:%d" % server.sockets[0].getsockname()[1]
        up = Upstream(RouterOptions())
        loop = asyncio.get_running_loop()
        resp = await up.open("POST", url, "/", [], b"{}", loop.time() + 10)
        got = b""
        paused = 0
        while True:
            if sum(sizes) - len(got) > PAUSE_AT:
                while not resp.paused:  # the reader is behind: the engine's bytes pile up ...
                    await asyncio.sleep(0.001)
                assert not resp.conn.transport.is_reading() and resp.parser.buffered > PAUSE_AT
                paused += 1
            chunk = await resp.read(timeout=10)
            if not chunk:
                break
            got += chunk
            assert not resp.paused  # ... and a read resumes it
        assert got == body and paused >= 1 and resp.at_eof
        resp.release()
        assert up.idle[resp.conn.key] == [resp.conn]  # complete: pooled
        await up.close()
        server.close()

    asyncio.run(asyncio.wait_for(main(), 60))
