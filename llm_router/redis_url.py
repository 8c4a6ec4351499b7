"""Redis URL → client: the one place every component (worker, router, ``up``, CLI, bench)
turns ``--redis`` into a connection, so a Sentinel deployment is one URL everywhere.

Forms (the first five are redis-py's own ``from_url``):

- ``redis://[user:pass@]host:6379/0``, ``rediss://…`` (TLS), ``unix:///path.sock?db=0``
- ``redis+sentinel://[user:pass@]s1:26379,s2:26379,s3:26379/<master-name>[/<db>]``
- ``rediss+sentinel://…`` the same over TLS (to the Sentinels and to the data nodes)

In the Sentinel forms ``user:pass`` is the *data* user (the ACL user the process works as on
the master, as in ``redis://``); the Sentinels' own credentials, when they have
``requirepass``/ACLs, are query parameters ``sentinel_username`` / ``sentinel_password``,
because a Sentinel is a different server with its own users. ``ssl_*`` query parameters
(``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``, ``ssl_cert_reqs``) go to both.

Why redis-py's Sentinel pool is enough to follow a fail-over: each *new* connection asks the
Sentinels for the current master (skipping a Sentinel that still reports the old master as
down), a connection to a demoted master answers ``READONLY`` and is turned into a
``ConnectionError``, and Sentinel itself kills every client of a node it reconfigures. So the
components' existing loops (retry on ``ConnectionError``, resync after reconnect) re-resolve
the master on their next try; nothing here has to watch Sentinel.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis
import redis.asyncio as aredis
import redis.asyncio.sentinel as asentinel
import redis.sentinel

SENTINEL_SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}  # scheme -> TLS
SENTINEL_PORT = 26379
SSL_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs")
# A Sentinel answers from memory: a slow one is a dead one, try the next.
SENTINEL_TIMEOUT = 1.0



def read_url_file(path: str) -> str:
    """The Redis URL kept in the file ``path`` (its first non-empty line): ``--redis-url-file``,
    so that a password never sits on a command line, which ``ps`` shows to every local user.
    Raises ``ValueError`` with one line naming the file."""
    try:
        text = open(path, encoding="utf-8").read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the Redis URL file: {getattr(exc, 'strerror', None) or exc}") from None
    url = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if not url:
        raise ValueError(f"{path}: no Redis URL in the file")
    return url

@dataclass(frozen=True)
class SentinelUrl:
    """A parsed ``redis+sentinel://`` URL."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None
    ssl: bool = False
    ssl_options: dict[str, str] = field(default_factory=dict)

    def data_kwargs(self) -> dict[str, Any]:
        """Connection arguments for the master (and replicas)."""
        kw: dict[str, Any] = {"db": self.db, "username": self.username, "password": self.password}
        if self.ssl:
            kw.update(ssl=True, **self.ssl_options)
        return kw

    def sentinel_kwargs(self) -> dict[str, Any]:
        """Connection arguments for the Sentinels themselves."""
        kw: dict[str, Any] = {"username": self.sentinel_username, "password": self.sentinel_password,
                              "socket_timeout": SENTINEL_TIMEOUT, "socket_connect_timeout": SENTINEL_TIMEOUT}
        if self.ssl:
            kw.update(ssl=True, **self.ssl_options)
        return kw


def parse_sentinel_url(url: str) -> SentinelUrl | None:
    """The Sentinel URL's parts, None for any other scheme; ``ValueError`` names what is wrong."""
    parts = urlsplit(url)
    if parts.scheme not in SENTINEL_SCHEMES:
        return None
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    username, password = None, None
    if userinfo:
        user, sep, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if sep else None
    sentinels = tuple(_host_port(h, url) for h in hostlist.split(",") if h)
    if not sentinels:
        raise ValueError(f"{describe(url)}: no Sentinel address (redis+sentinel://host:26379,…/<master-name>/<db>)")
    path = [unquote(p) for p in parts.path.split("/") if p]
    if not path or len(path) > 2:
        raise ValueError(f"{describe(url)}: the path must be /<master-name> or /<master-name>/<db>")
    if len(path) == 2 and not path[1].isdigit():
        raise ValueError(f"{describe(url)}: database must be a number, got {path[1]!r}")
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    unknown = set(query) - {"sentinel_username", "sentinel_password", *SSL_OPTIONS}
    if unknown:
        raise ValueError(f"{describe(url)}: unknown query parameter(s) {', '.join(sorted(unknown))}")
    return SentinelUrl(sentinels=sentinels, service=path[0], db=int(path[1]) if len(path) == 2 else 0,
                       username=username, password=password,
                       sentinel_username=query.get("sentinel_username"),
                       sentinel_password=query.get("sentinel_password"),
                       ssl=SENTINEL_SCHEMES[parts.scheme],
                       ssl_options={k: query[k] for k in SSL_OPTIONS if k in query})


def _host_port(text: str, url: str) -> tuple[str, int]:
    if text.startswith("["):  # [::1]:26379
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":")
    else:
        host, _, port = text.partition(":")
    if not host or (port and not port.isdigit()):
        raise ValueError(f"{describe(url)}: bad Sentinel address {text!r}")
    return host, int(port) if port else SENTINEL_PORT


class _SentinelRedis(aredis.Redis):
    """The master client; closing it also closes its connections to the Sentinels."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        await self.connection_pool.sentinel_manager.aclose()


class _SyncSentinelRedis(redis.Redis):
    def close(self) -> None:
        super().close()
        for client in self.connection_pool.sentinel_manager.sentinels:
            client.close()


def async_client(url: str, **kwargs: Any) -> aredis.Redis:
    """An asyncio client of the master ``url`` names; ``kwargs`` as for ``Redis.from_url``."""
    spec = parse_sentinel_url(url)
    if spec is None:
        return aredis.Redis.from_url(url, **kwargs)
    manager = asentinel.Sentinel(spec.sentinels, sentinel_kwargs=spec.sentinel_kwargs())
    return manager.master_for(spec.service, redis_class=_SentinelRedis, **spec.data_kwargs(), **kwargs)


class _BlockingSentinelPool(asentinel.SentinelConnectionPool, aredis.BlockingConnectionPool):
    """The master's pool, bounded, where a caller waits for a free connection (as
    ``BlockingConnectionPool`` does for a plain URL) instead of failing at once."""


def pooled_client(url: str, max_connections: int, wait: float, **kwargs: Any) -> aredis.Redis:
    """An asyncio client on a pool of at most ``max_connections``; a caller waits up to ``wait``
    s for a free connection (then ``ConnectionError``). ``kwargs`` as for ``async_client``."""
    spec = parse_sentinel_url(url)
    if spec is None:
        pool = aredis.BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=wait, **kwargs)
        return aredis.Redis.from_pool(pool)
    manager = asentinel.Sentinel(spec.sentinels, sentinel_kwargs=spec.sentinel_kwargs())
    return manager.master_for(spec.service, redis_class=_SentinelRedis, connection_pool_class=_BlockingSentinelPool,
                              max_connections=max_connections, timeout=wait, **spec.data_kwargs(), **kwargs)


def sync_client(url: str, **kwargs: Any) -> redis.Redis:
    """A blocking client of the master ``url`` names (CLI, ``up``, tests)."""
    spec = parse_sentinel_url(url)
    if spec is None:
        return redis.Redis.from_url(url, **kwargs)
    manager = redis.sentinel.Sentinel(spec.sentinels, sentinel_kwargs=spec.sentinel_kwargs())
    return manager.master_for(spec.service, redis_class=_SyncSentinelRedis, **spec.data_kwargs(), **kwargs)


def describe(url: str) -> str:
    """``url`` without its passwords, for log lines and error messages."""
    parts = urlsplit(url)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    query = [("sentinel_password=***" if q.startswith("sentinel_password=") else q) for q in parts.query.split("&")]
    if ":" not in userinfo and "&".join(query) == parts.query:
        return url
    netloc = f"{userinfo.partition(':')[0]}:***@{hosts}" if ":" in userinfo else parts.netloc
    return parts._replace(netloc=netloc, query="&".join(query)).geturl()


@dataclass(frozen=True)
class RedisNodes:
    """Who serves ``url`` now: the master, its replicas, and how that was learnt."""

    master: str
    replicas: list[str]
    via: str  # "sentinel 10.0.0.5:26379, service llm" or "direct"


def redis_nodes(url: str, timeout: float = 2.0) -> RedisNodes:
    """Ask the Sentinels (or the node itself) which node is master; ``redis.RedisError`` or
    ``OSError`` when nobody answers."""
    spec = parse_sentinel_url(url)
    if spec is None:
        client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        try:
            info = client.info("replication")
            kw = client.connection_pool.connection_kwargs
        finally:
            client.close()
        here = kw.get("path") or f"{kw.get('host')}:{kw.get('port')}"
        if info.get("role") == "master":
            replicas = [f"{v['ip']}:{v['port']}" for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)]
            return RedisNodes(master=here, replicas=replicas, via="direct")
        return RedisNodes(master=f"{info.get('master_host')}:{info.get('master_port')}", replicas=[here],
                          via=f"direct (the URL names a replica, {here})")
    manager = redis.sentinel.Sentinel(spec.sentinels, sentinel_kwargs=spec.sentinel_kwargs())
    try:
        host, port = manager.discover_master(spec.service)
        replicas = [f"{h}:{p}" for h, p in manager.discover_slaves(spec.service)]
        asked = manager.sentinels[0].connection_pool.connection_kwargs  # discover_master moved it first
    finally:
        for client in manager.sentinels:
            client.close()
    return RedisNodes(master=f"{host}:{port}", replicas=replicas,
                      via=f"sentinel {asked['host']}:{asked['port']}, service {spec.service}")
