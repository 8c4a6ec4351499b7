"""Prometheus metrics of a router: ``GET /metrics`` (text exposition format).

Two kinds:

* **request metrics**, updated on the hot path (``RouterMetrics.observe``, once per forwarded
  request, from the ``RequestRecord`` the proxy filled): requests by model/route/status,
  upstream errors and retries, latency and time-to-first-byte histograms, in-flight gauge.
  Labelled children are cached per label tuple, so a request costs a dict lookup and a few
  locked adds, not prometheus-client's ``labels()`` parsing.
* **cluster metrics**, rendered at scrape time from the ``ClusterView`` the router already
  holds (``router.observe.cluster_metrics``, cached per worker): instances by state, restarts, workers,
  device memory per host/GPU. No worker needs an HTTP port for them; every router shows the
  same cluster.

Several router processes (``serve --workers N``, router/supervisor.py) share one scrape target:
the supervisor gives them a private ``PROMETHEUS_MULTIPROC_DIR``, the request metrics go to
files there (prometheus-client's multiprocess mode) and any child's ``/metrics`` sums every
child's (in flight: the live children's); the cluster gauges come from the answering child's
view alone, so they are not multiplied by N.

Label cardinality stays bounded: ``model`` is a catalog id (or ``""`` when the request named
no known model), ``route`` one of ``ROUTES`` or ``other``.
"""

from __future__ import annotations

import os
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from llm_lab_router.router.observe.accesslog import RequestRecord, Usage
from llm_lab_router.router.observe.cluster_metrics import ClusterMetrics
from llm_lab_router.router.observe.history import History
from llm_lab_router.router.core.view import ClusterView

CONTENT_TYPE = CONTENT_TYPE_LATEST
ROUTES = frozenset({
    "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/moderations",
    "/v1/audio/transcriptions", "/v1/audio/translations", "/v1/audio/speech", "/v1/images/generations",
    "/v1/rerank", "/v1/score",
})
LATENCY_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120, 300)
COLD_START_BUCKETS = (.5, 1, 2.5, 5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600)
# why a request waited (the ``cause`` label): a swap (the scheduler), a cold start, a concurrency slot
WaitCause = Literal["swap", "start", "slot"]
TTFB_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60)


def route_label(path: str) -> str:
    path = path.rstrip("/")
    return path if path in ROUTES else "other"


class RouterMetrics:
    """The router's registry and its request metrics."""

    def __init__(self, view: ClusterView | None = None, history: History | None = None) -> None:
        self.history = history  # the timeline's request series (router.observe.history), fed from here
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("llm_router_requests", "Forwarded /v1 requests, by final status "
                                "(499: the client left first)", ["model", "route", "status"], registry=r)
        self.errors = Counter("llm_router_upstream_errors", "Upstream failures (connect, timeout, broken)",
                              ["model", "kind"], registry=r)
        self.retries = Counter("llm_router_upstream_retries", "Requests sent to another instance after a "
                               "connection failure", ["model"], registry=r)
        self.latency = Histogram("llm_router_request_duration_seconds", "Arrival to the end of the answer",
                                 ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("llm_router_time_to_first_token_seconds", "Streamed requests: arrival to the "
                              "first body bytes relayed (the first SSE frame)", ["model"], buckets=TTFB_BUCKETS,
                              registry=r)
        self.tokens = Counter("llm_router_tokens", "Tokens the engines reported in usage",
                              ["model", "kind"], registry=r)
        self.aborted = Counter("llm_router_requests_aborted", "Requests the router ended before their answer "
                               "did, by reason (write_timeout: the client stopped reading)", ["model", "reason"],
                               registry=r)
        self.routing = Counter("llm_router_routing_decisions", "How the instance was chosen among several "
                               "(affinity: the key's own instance; spill: it was full; least: least outstanding)",
                               ["model", "decision"], registry=r)
        self.fallbacks = Counter("llm_router_fallbacks", "Requests served by a fallback model because "
                                 "their model could not serve them", ["model", "served"], registry=r)
        self.in_flight = Gauge("llm_router_requests_in_flight", "Requests being forwarded now", ["model"],
                               registry=r, multiprocess_mode="livesum")
        self.quota_rejections = Counter("llm_router_quota_rejections", "Requests refused (429) by a key's or "
                                        "group's quota (router/limits/quotas.py)", ["key", "scope", "reason"], registry=r)
        self.quota_redis_errors = Counter("llm_router_quota_redis_errors", "Quota checks or settlements that "
                                          "failed on Redis (admitted unchecked when failing open)", registry=r)
        self.cold_start = Histogram("llm_router_cold_start_seconds", "Starts this router sent: the start command "
                                    "to the model serving", ["model"], buckets=COLD_START_BUCKETS, registry=r)
        self.swaps = Counter("llm_router_swaps", "Evictions this router made to start a model (rate: swaps per "
                             "second)", ["model"], registry=r)
        self.queue_wait = Histogram("llm_router_queue_wait_seconds", "Time requests waited before being served, "
                                    "by cause (swap: for the scheduler to allow an eviction; start: for a cold "
                                    "start; slot: for a concurrency slot)", ["model", "cause"],
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.connections = Gauge("llm_router_client_connections", "Client connections open now "
                                 "(router/http/fdguard.py)", registry=r, multiprocess_mode="livesum")
        self.redis_used = Gauge("llm_router_redis_used_memory_bytes", "The shared Redis's used_memory "
                                "(router/observe/redis_memory.py)", registry=r, multiprocess_mode="max")
        self.redis_max = Gauge("llm_router_redis_maxmemory_bytes", "The shared Redis's maxmemory (0: no limit)",
                               registry=r, multiprocess_mode="max")
        self.redis_evicted = Gauge("llm_router_redis_evicted_keys", "Keys the shared Redis evicted since it "
                                   "started (INFO stats evicted_keys)", registry=r, multiprocess_mode="max")
        self.refused_connections = Counter("llm_router_connections_refused", "Client connections closed as "
                                           "accepted, over a cap (limit: max_connections; per_address: "
                                           "max_connections_per_address)", ["reason"], registry=r)
        self.accept_pauses = Counter("llm_router_accept_paused", "accept() failures for lack of descriptors "
                                     "(EMFILE...), each followed by a 100 ms pause of accepting", registry=r)
        self.loop_restarts = Counter("llm_router_loop_restarts", "Background loops (usage, quotas, claims, "
                                     "capacity) restarted after an unexpected exception", ["loop"], registry=r)
        self._children: dict[tuple, object] = {}
        self.scraped = r
        if shared_dir := os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            # One of several router processes: scrape the sum of all of them, not this one's registry.
            self.scraped = CollectorRegistry(auto_describe=True)
            multiprocess.MultiProcessCollector(self.scraped, shared_dir)
        self.cluster = ClusterMetrics(view) if view is not None else None

    def _child(self, metric, *labels: str):
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def started(self, model: str) -> None:
        self._child(self.in_flight, model).inc()

    def ended(self, model: str) -> None:
        self._child(self.in_flight, model).dec()

    def quota_rejected(self, name: str, scope: str, reason: str) -> None:
        """A quota refused a request (``scope``: key or group; ``reason``: rpm, tpm, concurrency)."""
        self._child(self.quota_rejections, name, scope, reason).inc()

    def quota_redis_error(self) -> None:
        self.quota_redis_errors.inc()

    def redis_memory(self, reading) -> None:
        """A reading of ``router.observe.redis_memory`` (``RedisMemoryReading``)."""
        self.redis_used.set(reading.used)
        self.redis_max.set(reading.maxmemory)
        self.redis_evicted.set(reading.evicted)

    def client_connections(self, count: int) -> None:
        self.connections.set(count)

    def connection_refused(self, reason: str) -> None:
        self._child(self.refused_connections, reason).inc()

    def accept_paused(self) -> None:
        self.accept_pauses.inc()

    def loop_restarted(self, loop: str) -> None:
        self._child(self.loop_restarts, loop).inc()

    def swapped(self, model: str) -> None:
        """Models were evicted to make room for ``model``."""
        self._child(self.swaps, model).inc()

    def cold_started(self, model: str, seconds: float) -> None:
        self._child(self.cold_start, model).observe(seconds)

    def waited(self, model: str, cause: WaitCause, seconds: float) -> None:
        """A wait of ``cause`` ended after ``seconds``."""
        self._child(self.queue_wait, model, cause).observe(seconds)
        if self.history is not None:
            self.history.waited(model, seconds)

    def abort(self, model: str, reason: str) -> None:
        """The router ended a request early (``reason``: ``write_timeout``)."""
        self._child(self.aborted, model, reason).inc()

    def observe(self, rec: RequestRecord, status: int, ended_at: float, usage: Usage | None) -> None:
        """One forwarded request is over (``ended_at``: time.monotonic())."""
        model = rec.model
        self._child(self.requests, model, route_label(rec.path), str(status)).inc()
        if not model:
            return  # refused before a model was known: counted, nothing to time
        latency = ended_at - rec.received_at
        self._child(self.latency, model).observe(latency)
        ttft = rec.first_byte_at - rec.received_at if rec.streamed and rec.first_byte_at else None
        if ttft is not None:
            self._child(self.ttft, model).observe(ttft)
        if self.history is not None:
            self.history.request(model, status, latency, ttft, usage.prompt_tokens if usage else None,
                                 usage.completion_tokens if usage else None)
        if rec.retries:
            self._child(self.retries, model).inc(rec.retries)
        if rec.route:
            self._child(self.routing, model, rec.route).inc()
        if rec.served:
            self._child(self.fallbacks, model, rec.served).inc()
        if rec.error:
            self._child(self.errors, model, rec.error).inc()
        if usage is not None:
            if usage.prompt_tokens:
                self._child(self.tokens, model, "prompt").inc(usage.prompt_tokens)
            if usage.completion_tokens:
                self._child(self.tokens, model, "completion").inc(usage.completion_tokens)

    def render(self) -> bytes:
        own = generate_latest(self.scraped)
        return own + self.cluster.render() if self.cluster is not None else own
