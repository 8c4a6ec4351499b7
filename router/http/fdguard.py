"""Client connections within the descriptor limit: caps, and no spin when ``accept()`` fails.

With ``NOFILE`` at 1024 and 1,100 clients that each sent a header byte every 5 s, ``accept()``
failed with ``EMFILE``; the listening socket stayed readable, Tornado's accept handler raised,
the loop called it again at once: 100 % CPU, ``/health`` timing out, 138 MB of tracebacks in
16 s. Here:

- **Caps**, checked as each connection is accepted (it is closed at once when over): at most
  ``max_connections`` client connections in all (default: half of what ``NOFILE`` leaves
  after the Redis pools and a margin, since a forwarded request holds an engine connection
  too, so Redis, engines and spool files always find a descriptor), and at most
  ``max_connections_per_address`` from one client address (default: all but a tenth of the
  total), so one host cannot take the last places from the others (a load balancer's probe,
  an operator's ``/health``).
- **EMFILE/ENFILE** (descriptors used elsewhere, or a cap set above the limit): the listening
  sockets leave the loop for ``ACCEPT_PAUSE`` (100 ms) and come back; one warning per
  ``LOG_INTERVAL`` says how many accepts failed meanwhile. Connections wait in the listen
  backlog (the kernel's) instead of spinning the router.

Counted in ``llm_router_client_connections`` (open now), ``llm_router_connections_refused_total
{reason="limit"|"per_address"}`` and ``llm_router_accept_paused_total``.
"""

from __future__ import annotations

import errno
import logging
import resource
import socket
import time
from typing import Any, Callable, Iterable

from tornado.ioloop import IOLoop

from llm_lab_router.router.core.options import RouterOptions
from llm_lab_router.router.http.slowbody import BodyTimeoutServer
from llm_lab_router.router.observe.metrics import RouterMetrics

log = logging.getLogger("router")

ACCEPT_PAUSE = 0.1  # s the listening sockets stay out of the loop after EMFILE
LOG_INTERVAL = 10.0  # s between two warnings about failing accepts
ACCEPT_BATCH = 128  # accepts per readiness event (Tornado's: the listen backlog), so others get the loop
OUT_OF_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
MARGIN = 64  # descriptors for listening sockets, spool and log files, DNS, the event loop itself


def default_caps(options: RouterOptions, nofile: int | None = None) -> tuple[int, int]:
    """``(max_connections, max_connections_per_address)`` with the options' 0s (auto) filled in."""
    if nofile is None:
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    reserved = options.redis_connections + options.log_connections + options.log_readers + MARGIN
    total = options.max_connections or max(16, (nofile - reserved) // 2)
    per_address = options.max_connections_per_address or max(1, total - max(8, total // 10))
    return total, per_address


class ConnectionCaps:
    """Open client connections, in all and per address; the accept side's decisions."""

    def __init__(self, total: int, per_address: int, metrics: RouterMetrics) -> None:
        self.total = total
        self.per_address = per_address
        self.metrics = metrics
        self.open = 0
        self.by_address: dict[str, int] = {}
        self.unnoted: dict[str, int] = {}  # refusals and failed accepts since the last warning, by kind
        self.warned_at = -LOG_INTERVAL

    def admit(self, address: str) -> bool:
        """Count a new connection from ``address``, or refuse it (``False``: close it)."""
        if self.open >= self.total:
            self.metrics.connection_refused("limit")
            self._note("refused (limit)")
            return False
        held = self.by_address.get(address, 0)
        if held >= self.per_address:
            self.metrics.connection_refused("per_address")
            self._note(f"refused (per address, {address})")
            return False
        self.open += 1
        self.by_address[address] = held + 1
        self.metrics.client_connections(self.open)
        return True

    def release(self, address: str) -> None:
        self.open -= 1
        held = self.by_address.get(address, 0) - 1
        if held > 0:
            self.by_address[address] = held
        else:
            self.by_address.pop(address, None)
        self.metrics.client_connections(self.open)

    def accept_failed(self, exc: OSError) -> None:
        """An accept ran out of descriptors: counted, the warning at most once per interval."""
        self.metrics.accept_paused()
        self._note(f"accept() failed ({exc.strerror or exc}; accepting paused {ACCEPT_PAUSE:g}s)")

    def _note(self, kind: str) -> None:
        """One warning per ``LOG_INTERVAL`` for all that happened meanwhile: never a line (or a
        traceback) per connection of a flood."""
        self.unnoted[kind] = self.unnoted.get(kind, 0) + 1
        now = time.monotonic()
        if now - self.warned_at < LOG_INTERVAL:
            return
        what = ", ".join(f"{count} {kind}" for kind, count in self.unnoted.items())
        log.warning("client connections: %s since the last such line (one per %gs at most); %d open (cap %d, "
                    "%d per address: LLM_ROUTER_MAX_CONNECTIONS[_PER_ADDRESS], NOFILE)", what, LOG_INTERVAL,
                    self.open, self.total, self.per_address)
        self.warned_at = now
        self.unnoted = {}


def address_of(address: Any) -> str:
    """The client's IP, the key of the per-address cap (a Unix socket's peer: "")."""
    return address[0] if isinstance(address, tuple) and address else ""


def add_guarded_accept(sock: socket.socket, callback: Callable[[socket.socket, Any], None],
                       caps: ConnectionCaps) -> Callable[[], None]:
    """``tornado.netutil.add_accept_handler`` with the caps and the pause on EMFILE; returns the
    function that stops accepting (as Tornado's does)."""
    loop = IOLoop.current()
    state = {"removed": False, "paused": False}

    def resume() -> None:
        if not state["removed"] and state["paused"]:
            state["paused"] = False
            loop.add_handler(sock, accept, IOLoop.READ)

    def accept(fd: object, events: int) -> None:
        for _ in range(ACCEPT_BATCH):
            if state["removed"] or state["paused"]:
                return
            try:
                connection, address = sock.accept()
            except BlockingIOError:
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno not in OUT_OF_DESCRIPTORS:
                    raise
                caps.accept_failed(exc)
                state["paused"] = True
                loop.remove_handler(sock)
                loop.call_later(ACCEPT_PAUSE, resume)
                return
            if not caps.admit(address_of(address)):
                connection.close()  # over a cap: the client sees the connection closed at once
                continue
            callback(connection, address)

    def remove() -> None:
        if not state["paused"]:
            loop.remove_handler(sock)
        state["removed"] = True

    loop.add_handler(sock, accept, IOLoop.READ)
    return remove


class GuardedServer(BodyTimeoutServer):
    """The router's HTTP server: ``BodyTimeoutServer`` accepting through ``add_guarded_accept``.
    Takes its arguments plus ``caps``."""

    def initialize(self, *args, caps: ConnectionCaps, **kwargs) -> None:  # type: ignore[override]
        super().initialize(*args, **kwargs)
        self.caps = caps

    def add_sockets(self, sockets: Iterable[socket.socket]) -> None:
        for sock in sockets:
            self._sockets[sock.fileno()] = sock
            self._handlers[sock.fileno()] = add_guarded_accept(sock, self._handle_connection, self.caps)

    def on_close(self, server_conn: object) -> None:
        self.caps.release(address_of(getattr(getattr(server_conn, "context", None), "address", None)))
        super().on_close(server_conn)
