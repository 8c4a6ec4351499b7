"""The router's service objects, wired in one place; handlers only call these.

Redis clients: ``redis`` for short commands (socket timeout, so a stalled Redis fails a
request instead of hanging it) and ``blocking`` for what legitimately waits (``BLPOP`` of
command replies, the ``llm:events:*`` subscription), with no socket timeout and no silent
reconnect, so the view notices a lost subscription and resyncs; ``view_redis`` and
``view_blocking``, the same two for the cluster view, logged in as the read-only user of
``redis_read_url`` when one is given (the workers' records: docs/security.md); for log viewers,
``log_pages`` (history and catch-up pages) and ``log_readers`` (one ``XREAD BLOCK`` per
watched model). ``redis`` and the log pools are bounded and a caller waits for a free
connection rather than failing; the control plane's pools never serve a log read, so no
number of log viewers can starve ``/health``, ``start`` or on-demand starts.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from llm_lab_router.audit import AuditTrail
from llm_lab_router.clock import CLOCK
from llm_lab_router.loops import supervised
from llm_lab_router.protocol import Keys
from llm_lab_router.redis_url import async_client, pooled_client
from llm_lab_router.router.control.admin import Manager
from llm_lab_router.router.control.client import ControlClient
from llm_lab_router.router.control.in_use import UsageReporter
from llm_lab_router.router.core.options import RouterOptions
from llm_lab_router.router.core.view import ClusterView
from llm_lab_router.router.forward.balancer import Balancer
from llm_lab_router.router.forward.proxy import Proxy
from llm_lab_router.router.forward.upstream import Upstream
from llm_lab_router.router.limits.budgets import Budgets
from llm_lab_router.router.limits.quotas import Quotas
from llm_lab_router.router.logs.stream import LogStreamer
from llm_lab_router.router.observe.accesslog import AccessLog, RequestRecord, usage_of
from llm_lab_router.router.observe.history import History
from llm_lab_router.router.observe.history_query import TimelineReader
from llm_lab_router.router.observe.redis_memory import RedisMemory
from llm_lab_router.router.observe.ledger import Ledger
from llm_lab_router.router.observe.metrics import RouterMetrics
from llm_lab_router.timeline import resolutions
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff


log = logging.getLogger("router")

def pooled(redis_url: str, size: int, wait: float) -> Redis:
    """A client on a pool of at most ``size`` connections, where a caller
    waits up to ``wait`` s for a free one (then ``ConnectionError``) instead of failing at once."""
    return pooled_client(redis_url, size, wait, socket_timeout=10, socket_connect_timeout=2,
                         retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 1))


def blocking(redis_url: str) -> Redis:
    """A client for what legitimately waits (``BLPOP``, a subscription): no socket timeout, no
    silent reconnect (the caller notices a lost connection)."""
    return async_client(redis_url, socket_timeout=None, socket_connect_timeout=2, socket_keepalive=True,
                        retry=Retry(NoBackoff(), 0))


class Services:
    def __init__(self, redis_url: str, prefix: str = "llm:", options: RouterOptions | None = None) -> None:
        self.options = options or RouterOptions()
        self.keys = Keys(prefix)
        self.redis = pooled(redis_url, self.options.redis_connections, wait=5.0)
        self.blocking = blocking(redis_url)
        self.shutdown = asyncio.Event()
        self.view_redis, self.view_blocking = self.redis, self.blocking
        if (read_url := self.options.redis_read_url) and read_url != redis_url:
            self.view_redis = pooled(read_url, self.options.redis_connections, wait=5.0)
            self.view_blocking = blocking(read_url)
        self.view = ClusterView(self.view_redis, self.keys, pubsub_redis=self.view_blocking,
                                resync_interval=self.options.resync_interval, pubsub_check=self.options.pubsub_check,
                                empty_grace=self.options.empty_grace)
        self.balancer = Balancer(self.options.affinity_load_factor)
        self.usage = UsageReporter(self.redis, self.keys, router_id=uuid.uuid4().hex[:12],
                                   interval=self.options.usage_interval, serving=self._serving)
        self.history = History(self.redis, self.keys, self.usage.router_id, resolutions(), clock=CLOCK.now,
                               reader=self.view_redis)
        # gauges are the workers' own keys: read as the read-only user when there is one
        self.timeline = TimelineReader(self.redis, self.view_redis, self.keys, self.history.resolutions)
        self.metrics = RouterMetrics(self.view, self.history)
        self.redis_memory = RedisMemory(self.redis, self.keys, self.history, self.options.redis_memory_check,
                                        self.options.redis_memory_warn, self.metrics.redis_memory)
        self.ledger = Ledger(self.redis, self.keys, self.options.ledger_retention_days)
        self.audit = AuditTrail(self.redis, self.keys, f"router:{self.usage.router_id}", self.options.audit_maxlen)
        self.control = ControlClient(self.redis, self.blocking, self.keys, self.view, usage=self.usage,
                                     scheduler=self.options.scheduler, metrics=self.metrics,
                                     start_backoff=self.options.start_backoff, history=self.history,
                                     audit=self.audit, ledger=self.ledger)
        self.upstream = Upstream(self.options)
        self.access_log = AccessLog(self.options.access_log)
        self.quotas = Quotas(self.redis, self.keys, self.usage.router_id, self.options.quota_lease_ttl,
                             self.options.quota_redis_down, self.metrics,
                             release_wait=self.options.quota_release_wait)
        self.history.inflight, self.history.queued = self.usage.all_inflight, self.control.waiting_now
        self.budgets = Budgets(self.redis, self.keys, self.options.quota_redis_down, self.options.budget_refresh)
        self.proxy = Proxy(self.view, self.control, self.balancer, self.upstream, self.options, self.metrics,
                           usage=self.usage, quotas=self.quotas, budgets=self.budgets)
        self.manager = Manager(self.view, self.control, self.redis, self.keys, self.options)
        self.log_pages = pooled(redis_url, self.options.log_connections, wait=30.0)
        self.log_readers = pooled(redis_url, self.options.log_readers, wait=30.0)
        self.logs = LogStreamer(self.log_pages, self.log_readers, self.keys, self.options, self.shutdown)
        self.requests: set[asyncio.Task] = set()  # long requests (streams) in flight, for shutdown

    def _serving(self, model: str) -> dict[str, int]:
        """This router's requests of ``model`` being served now, per worker: the balancer's
        outstanding count of each running instance (drain per instance, ``llm:used:{model}``)."""
        return {i.worker: n for i in self.view.running_instances(model) if (n := self.balancer.outstanding(i.url))}

    def finished(self, rec: RequestRecord, status: int) -> None:
        """A forwarded request is over: count it and log it (the usage is parsed once, for both)."""
        ended_at = time.monotonic()
        usage = usage_of(rec, status)
        self.metrics.observe(rec, status, ended_at, usage)
        self.access_log.add(rec, status, ended_at, usage)
        self.ledger.add(rec, status, usage)
        if rec.lease is not None:
            self.quotas.settle(rec.lease, usage, rec.streamed, rec.events)

    async def start(self) -> None:
        await CLOCK.first(self.redis)  # before the first stamp it writes (llm_lab_router.clock)
        await self.view.start()
        loops = [("usage", self.usage.run), ("quotas", self.quotas.run), ("capacity", self.proxy.follow_capacity),
                 ("clock", lambda: CLOCK.keep(self.redis)), ("history", self.history.run), ("ledger", self.ledger.run),
                 ("redis-memory", self.redis_memory.run)]
        if self.options.scheduler == "swap":
            loops.append(("claims", self.control.watch_claims))
        self._loops = [supervised(name, fn, log, self.metrics.loop_restarted) for name, fn in loops]

    async def drain(self) -> None:
        """Shutdown, first part: log streams say ``stream_end``; in-flight requests get
        ``shutdown_grace`` seconds to finish, then are cancelled (closing their upstreams)."""
        self.shutdown.set()
        if self.requests:
            _, late = await asyncio.wait(set(self.requests), timeout=self.options.shutdown_grace)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)

    async def close(self) -> None:
        for task in getattr(self, "_loops", []):
            task.cancel()
        await asyncio.gather(*getattr(self, "_loops", []), return_exceptions=True)
        await self.history.flush(final=True)  # the current slot too: a restart leaves no hole
        await self.quotas.close()
        await self.ledger.flush()  # the last second's requests
        await self.view.close()
        await self.upstream.close()
        self.access_log.flush()
        await self.logs.close()
        await self.log_pages.aclose()
        await self.log_readers.aclose()
        for client in {id(c): c for c in (self.redis, self.blocking, self.view_redis, self.view_blocking)}.values():
            await client.aclose()
