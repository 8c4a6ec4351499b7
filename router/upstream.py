"""HTTP to the model servers: one pooled aiohttp session and the exchange's three timeouts.

Timeouts are separate because they guard different things: ``connect`` (a dead or unreachable
host, fail over quickly), ``first byte`` (from sending the request to the first body bytes: a
long prompt may legitimately take minutes), ``idle`` (between two chunks once the answer
flows: a stream that goes silent is stuck). aiohttp's own ``sock_read`` cannot tell the first
two apart, so reads are bounded here with ``asyncio.timeout``.

Failures are classified for the proxy: ``ConnectFailed`` (nothing reached the engine: try
another instance), ``UpstreamTimeout`` (504), ``UpstreamBroken`` (the engine went away
mid-answer).
"""

from __future__ import annotations

import asyncio
from typing import Iterable

import aiohttp

from router.options import RouterOptions

# Hop-by-hop headers (RFC 9110 7.6.1) and those the HTTP layers recompute.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "host", "content-length", "expect",
})
RESPONSE_SKIP = HOP_BY_HOP | {"date", "server"}


class UpstreamError(Exception):
    pass


class ConnectFailed(UpstreamError):
    """The engine could not be reached or dropped the request before answering: retryable."""


class UpstreamTimeout(UpstreamError):
    pass


class UpstreamBroken(UpstreamError):
    """The engine's answer stopped before its end (crash, reset)."""


def forward_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """End-to-end request headers, as the client sent them (Authorization included: engines
    may check their own key)."""
    return [(k, v) for k, v in headers if k.lower() not in HOP_BY_HOP]


def response_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(k, v) for k, v in headers if k.lower() not in RESPONSE_SKIP]


class Upstream:
    """The router's one client session to every engine (keep-alive, large pool)."""

    def __init__(self, options: RouterOptions) -> None:
        self.options = options
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            # Keep-alive shorter than uvicorn's 5 s default, so a pooled connection is not
            # reused just as the engine closes it.
            connector = aiohttp.TCPConnector(limit=self.options.upstream_connections, limit_per_host=0,
                                             keepalive_timeout=4.0, enable_cleanup_closed=True)
            self._session = aiohttp.ClientSession(
                connector=connector, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
                # Bytes are relayed as they come: never ask for an encoding the client did not.
                skip_auto_headers=("Accept-Encoding", "Content-Type", "User-Agent"),
                timeout=aiohttp.ClientTimeout(total=None, connect=None, sock_read=None,
                                              sock_connect=self.options.connect_timeout))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def open(self, method: str, url: str, headers: list[tuple[str, str]], body: bytes,
                   deadline: float) -> aiohttp.ClientResponse:
        """Send the request; return once the response headers are in (by ``deadline``, a
        loop time). A pooled connection the engine closed at the same moment is retried once."""
        for attempt in (1, 2):
            try:
                async with asyncio.timeout_at(deadline):
                    return await self.session.request(method, url, headers=headers, data=body or None,
                                                      allow_redirects=False)
            except TimeoutError:
                raise UpstreamTimeout(f"no answer from {url} within the first-byte timeout") from None
            except aiohttp.ServerDisconnectedError as exc:
                if attempt == 2:
                    raise ConnectFailed(f"{url} closed the connection: {exc}") from None
            except (aiohttp.ClientConnectorError, aiohttp.ServerTimeoutError, aiohttp.ClientOSError) as exc:
                raise ConnectFailed(f"cannot reach {url}: {exc}") from None
            except aiohttp.ClientError as exc:
                raise ConnectFailed(f"{url}: {type(exc).__name__}: {exc}") from None
        raise AssertionError("unreachable")

    @staticmethod
    async def read(resp: aiohttp.ClientResponse, *, deadline: float | None = None,
                   timeout: float | None = None) -> bytes:
        """The next chunk as it arrives (``b""`` at the end), bounded by a loop-time
        ``deadline`` (first byte) or a ``timeout`` (idle)."""
        try:
            async with (asyncio.timeout_at(deadline) if deadline is not None else asyncio.timeout(timeout)):
                return await resp.content.readany()
        except TimeoutError:
            raise UpstreamTimeout("the engine sent nothing within the "
                                  + ("first-byte" if deadline is not None else "idle") + " timeout") from None
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise UpstreamBroken(f"the engine's answer broke off: {type(exc).__name__}: {exc}") from None
