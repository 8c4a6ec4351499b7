"""``RawEngine``: an HTTP "engine" of a few lines of raw sockets that can answer properly,
send garbage, hang mid-stream or never end a line, and records the request heads it gets;
``engine``, the fixture that runs one for a test (test_hostile, test_security)."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field

import pytest

OK_BODY = b'{"id":"x","object":"chat.completion","choices":[]}'
CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
# Answers that never end a line: what they start with, then what they repeat (up to ENDLESS_CAP).
ENDLESS = {
    "digits": (CHUNKED_HEAD, b"1" * 65536),  # a chunk-size line of digits without end
    "headers": (b"HTTP/1.1 200 OK\r\n", b"X-Pad: " + b"a" * 1000 + b"\r\n"),  # a head without end
    "trailer": (CHUNKED_HEAD + b"%x\r\n%s\r\n0\r\n" % (len(b"data: {}\n\n"), b"data: {}\n\n"),
                b"X" * 65536),  # a trailer line without end, after one event
}
ENDLESS_CAP = 16 * 1024 * 1024  # enough to show the old quadratic parser stuck, not to hurt the machine
LATE_END = 2.0  # s between a ``late_end`` stream's [DONE] event and its body's end


@dataclass
class RawEngine:
    """An HTTP "engine" on raw sockets. ``mode``: ``ok`` (a JSON answer), ``garbage`` (bytes
    that are no HTTP, then close), ``hang`` (an SSE head and one event, then silence until the
    router hangs up), ``late_end`` (an SSE head, one event and ``[DONE]``, the chunked body's
    end ``LATE_END`` s later), or one of ``ENDLESS`` (a line that never ends, sent until the
    router hangs up). ``connections`` counts the connections made to it (a request or not),
    ``heads`` holds every request head received; ``closed`` counts connections the router closed."""

    mode: str = "ok"
    heads: list[bytes] = field(default_factory=list)
    closed: int = 0
    connections: int = 0

    def __post_init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            self.heads.append(head)
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            while len(body) < length:
                body += conn.recv(65536)
            if self.mode == "ok":
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(OK_BODY), OK_BODY))
            elif self.mode == "garbage":
                conn.sendall(b"\x00\xffNOT HTTP AT ALL\r\n\r\n\x16\x03\x01")
            elif self.mode in ENDLESS:
                start, filler = ENDLESS[self.mode]
                try:
                    conn.sendall(start)
                    for _ in range(ENDLESS_CAP // len(filler)):
                        conn.sendall(filler)
                    conn.settimeout(30)
                    while conn.recv(65536):  # the cap: hold the connection until the router hangs up
                        pass
                except OSError:
                    pass
            elif self.mode == "hang":
                event = b'data: {"choices": ["tok"]}\n\n'
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
                             b"\r\n%x\r\n%s\r\n" % (len(event), event))
                conn.settimeout(30)
                try:
                    while conn.recv(65536):
                        pass
                except OSError:
                    pass
            elif self.mode == "late_end":
                events = (b'data: {"choices": ["tok"]}\n\n', b"data: [DONE]\n\n")
                conn.sendall(CHUNKED_HEAD + b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events))
                time.sleep(LATE_END)
                try:
                    conn.sendall(b"0\r\n\r\n")
                except OSError:  # the router hung up meanwhile
                    pass
            self.closed += 1

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def engine():
    eng = RawEngine()
    yield eng
    eng.close()
