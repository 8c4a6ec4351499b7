"""One HTTP/1.1 response parser (sans-IO), shared by the router's engine client
(router/forward/upstream.py) and the benchmark's load generator (scripts/bench.py).

Feed it the bytes of one connection as they arrive (``feed``); it says when there is news (the
head, body bytes, the end) and keeps the de-chunked body bytes in ``body`` until they are taken.
It does no I/O and no timing: the caller owns the socket, the timeouts and back-pressure.

Why its own parser: the router's engine hop cannot afford a general HTTP client on the hot path
(router/forward/upstream.py says why), and the benchmark must not measure one either.

It does not trust the peer. An engine is a separate process that may run third-party code; a
response that never ends a line must not grow a buffer without bound nor cost quadratic time
(150 MB of chunk-size digits once blocked the router's event loop for 75 s). So:

* every state that waits for a delimiter is bounded: ``MAX_HEAD`` for the status line and
  header fields (of each 1xx interim head too, and at most ``MAX_INTERIM`` of those),
  ``MAX_CHUNK_LINE`` for a chunk-size line with its extensions, ``MAX_TRAILERS`` for the
  trailer section; past a bound, ``ProtocolError``;
* no byte is copied or scanned twice per read: the parser walks the received bytes with an
  offset; only an incomplete element (bounded as above) is kept, in a ``bytearray`` that grows
  in place and is compacted once the element is complete, and a delimiter search resumes where
  the previous one stopped;
* framing is read strictly (RFC 9112): ``HTTP/1.x`` and a three-digit status, token field names,
  no control characters or bare CR/LF in the head, digits-only ``Content-Length`` (repeats must
  agree), ``Transfer-Encoding`` and ``Content-Length`` never together, hex-only chunk sizes, CRLF
  after every chunk; no obsolete line folding, no ``101`` (nothing here asks for an upgrade).

Framing (RFC 9112 section 6.3): no body after a ``HEAD`` request or for 204/304; chunked when
``chunked`` is the last transfer coding; else ``Content-Length``; else until the connection
closes.
"""

from __future__ import annotations

import re

HEAD, FIXED, CHUNK_SIZE, CHUNK_DATA, CHUNK_END, TRAILER, UNTIL_CLOSE, DONE = range(8)

MAX_HEAD = 64 * 1024  # status line and header fields of one response head (Envoy: 60 KiB)
MAX_CHUNK_LINE = 4096  # chunk size and extensions (Go's net/http: 4096)
MAX_TRAILERS = 64 * 1024  # the whole trailer section
MAX_INTERIM = 16  # 1xx heads before the final one

_BAD_HEAD = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]|\r(?!\n)|(?<!\r)\n")
_STATUS_LINE = re.compile(r"HTTP/1\.([01]) ([0-9]{3})(?: .*)?", re.S)
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_LENGTH = re.compile(r"[0-9]{1,18}")
_CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\x00-\x08\x0a-\x1f\x7f]*)?")


class ProtocolError(ValueError):
    """The peer's response breaks HTTP/1.1 framing or a limit; the connection is unusable."""


class ResponseParser:
    """One response on a connection: its head, then its body bytes as they arrive."""

    __slots__ = ("head_only", "state", "status", "headers", "close_after", "remaining", "body", "buffered",
                 "interim", "_pending", "_scan", "_section")

    def __init__(self, head_only: bool = False) -> None:
        self.head_only = head_only  # the answer to a HEAD request: no body whatever the headers say
        self.state = HEAD
        self.status = 0
        self.headers: list[tuple[str, str]] = []  # (lower-case name, value) of the final head
        self.close_after = False  # the connection cannot carry another exchange
        self.remaining = 0  # bytes left of a sized body or of the current chunk
        self.body: list[bytes] = []  # de-chunked body bytes parsed, not yet taken
        self.buffered = 0  # bytes in ``body``
        self.interim = 0  # 1xx heads seen
        self._pending = bytearray()  # an incomplete element (head, chunk line...), bounded
        self._scan = 0  # offset in ``_pending`` where the next delimiter search resumes
        self._section = 0  # trailer bytes so far

    @property
    def done(self) -> bool:
        return self.state == DONE

    def take(self) -> bytes:
        """The body bytes parsed so far (``b""`` if none); they leave the parser."""
        body = self.body
        if not body:
            return b""
        data = body[0] if len(body) == 1 else b"".join(body)
        self.body = []
        self.buffered = 0
        return data

    def closed(self) -> bool:
        """The peer closed the connection: True if that completes the response (a body that
        runs until close, or one already complete)."""
        if self.state == UNTIL_CLOSE:
            self.state = DONE
        return self.state == DONE

    def feed(self, data: bytes) -> bool:
        """Parse ``data``; True when there is news (the head, body bytes, the end). Raises
        ``ProtocolError``. Bytes after the end of the response mark the connection unusable."""
        pending = self._pending
        if pending:
            pending += data
            buf: bytes | bytearray = pending
        else:
            buf = data
        pos, news = self._parse(buf)
        if buf is pending:
            if pos >= len(pending):
                pending.clear()
                self._scan = 0
            elif pos:
                del pending[:pos]  # compaction: once per completed element, never per read
        elif pos < len(data):
            pending += memoryview(data)[pos:]  # an incomplete element: bounded by the limits
        return news

    def _parse(self, buf: bytes | bytearray) -> tuple[int, bool]:
        """Walk ``buf`` from its start (where the current element begins); return how far it
        got and whether there was news."""
        pos, end, news = 0, len(buf), False
        while True:
            st = self.state
            if st == FIXED or st == CHUNK_DATA or st == UNTIL_CLOSE:
                avail = end - pos
                if not avail:
                    return pos, news
                n = avail if st == UNTIL_CLOSE or avail <= self.remaining else self.remaining
                if pos == 0 and n == end and type(buf) is bytes:
                    self.body.append(buf)  # the whole read: no copy (the usual case)
                else:
                    self.body.append(bytes(memoryview(buf)[pos:pos + n]))
                self.buffered += n
                pos += n
                news = True
                if st == UNTIL_CLOSE:
                    continue
                self.remaining -= n
                if self.remaining:
                    return pos, news
                self.state = DONE if st == FIXED else CHUNK_END
            elif st == HEAD:
                i = self._find(buf, pos, b"\r\n\r\n", MAX_HEAD, "response head")
                if i < 0:
                    return pos, news
                head = bytes(buf[pos:i])
                pos = i + 4
                if self._head(head):
                    news = True
            elif st == CHUNK_SIZE:
                i = self._find(buf, pos, b"\r\n", MAX_CHUNK_LINE, "chunk-size line")
                if i < 0:
                    return pos, news
                m = _CHUNK_LINE.fullmatch(buf, pos, i)
                if m is None:
                    raise ProtocolError(f"malformed chunk-size line {bytes(buf[pos:min(i, pos + 40)])!r}")
                size = int(m.group(1), 16)
                pos = i + 2
                if size:
                    self.state, self.remaining = CHUNK_DATA, size
                else:
                    self.state, self._section = TRAILER, 0
            elif st == CHUNK_END:
                if end - pos < 2:
                    if end > pos and buf[pos] != 13:
                        raise ProtocolError("chunk data not followed by CRLF")
                    return pos, news
                if buf[pos] != 13 or buf[pos + 1] != 10:
                    raise ProtocolError("chunk data not followed by CRLF")
                pos += 2
                self.state = CHUNK_SIZE
            elif st == TRAILER:
                i = self._find(buf, pos, b"\r\n", MAX_TRAILERS, "trailer section", self._section)
                if i < 0:
                    return pos, news
                self._section += i + 2 - pos
                empty = i == pos
                pos = i + 2  # trailer fields are not relayed: skipped
                if empty:
                    self.state, news = DONE, True
            else:  # DONE: anything more is out of step; the connection is not reused
                if pos < end:
                    self.close_after = True
                return end, news

    def _find(self, buf: bytes | bytearray, pos: int, delim: bytes, limit: int, what: str, used: int = 0) -> int:
        """Where ``delim`` ends the element that starts at ``pos``, or -1 while it is incomplete;
        ``ProtocolError`` once the element (with ``used`` bytes before it) is over ``limit``.
        The search resumes where the last one stopped (``_scan``): no byte is scanned twice."""
        i = buf.find(delim, pos + self._scan)
        if i < 0:
            if used + len(buf) - pos > limit:
                raise ProtocolError(f"{what} over {limit} bytes")
            self._scan = max(len(buf) - pos - len(delim) + 1, 0)
            return -1
        if used + i - pos > limit:
            raise ProtocolError(f"{what} over {limit} bytes")
        self._scan = 0
        return i

    def _head(self, raw: bytes) -> bool:
        """Read one response head; False for a 1xx interim one (the final head follows)."""
        if _BAD_HEAD.search(raw):
            raise ProtocolError("control character or bare CR/LF in the response head")
        lines = raw.decode("latin-1").split("\r\n")
        m = _STATUS_LINE.fullmatch(lines[0])
        if m is None:
            raise ProtocolError(f"malformed status line {lines[0][:80]!r}")
        status = int(m.group(2))
        if 100 <= status < 200:
            if status == 101:
                raise ProtocolError("101 Switching Protocols to a request that asked for no upgrade")
            self.interim += 1
            if self.interim > MAX_INTERIM:
                raise ProtocolError(f"over {MAX_INTERIM} interim (1xx) responses")
            return False
        if status < 100:
            raise ProtocolError(f"invalid status {status}")
        headers = self.headers
        length = ""
        codings: list[str] = []
        connection: list[str] = []
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if not colon or not _TOKEN.fullmatch(name):  # also: obs-fold, space before the colon
                raise ProtocolError(f"malformed header line {line[:80]!r}")
            name = name.lower()
            value = value.strip(" \t")
            if name == "content-length":
                for v in value.split(","):
                    v = v.strip(" \t")
                    if not _LENGTH.fullmatch(v) or (length and v.lstrip("0") != length.lstrip("0")):
                        raise ProtocolError(f"invalid Content-Length {value[:40]!r}")
                    length = v
            elif name == "transfer-encoding":
                codings += [c.strip(" \t").lower() for c in value.split(",")]
            elif name == "connection":
                connection += [c.strip(" \t").lower() for c in value.split(",")]
            headers.append((name, value))
        self.status = status
        self.close_after = "close" in connection or (m.group(1) == "0" and "keep-alive" not in connection)
        if codings and length:
            raise ProtocolError("both Transfer-Encoding and Content-Length (request smuggling?)")
        if self.head_only or status in (204, 304):
            self.state = DONE
        elif codings:
            if codings[-1] == "chunked":
                self.state = CHUNK_SIZE
            else:  # not chunked last: the body runs until the connection closes (RFC 9112 6.3)
                self.state, self.close_after = UNTIL_CLOSE, True
        elif length:
            self.remaining = int(length)
            self.state = FIXED if self.remaining else DONE
        else:
            self.state, self.close_after = UNTIL_CLOSE, True
        return True
