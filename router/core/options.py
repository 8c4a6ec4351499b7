"""The router's tunables, in one typed struct.

``llm-router serve`` passes only the Redis URL, prefix, host and port; everything else has a
default here and can be overridden per deployment with ``LLM_ROUTER_<FIELD>`` environment
variables (``LLM_ROUTER_FIRST_BYTE_TIMEOUT=900``), so timeouts can be tuned without a code
change and tests can shorten them.
"""

from __future__ import annotations

import os
from typing import Annotated, Literal, Mapping

import msgspec
from llm_lab_router.audit import DEFAULT_MAXLEN as DEFAULT_AUDIT_MAXLEN
from llm_lab_router.ledger import DEFAULT_RETENTION_DAYS

Seconds = Annotated[float, msgspec.Meta(gt=0)]
ENV_PREFIX = "LLM_ROUTER_"


class RouterOptions(msgspec.Struct, kw_only=True, frozen=True):
    # OpenAI forwarding. Separate timeouts: a long prompt may take minutes before its first
    # token, but a stream that goes silent for minutes afterwards is stuck.
    connect_timeout: Seconds = 5.0
    first_byte_timeout: Seconds = 600.0
    idle_timeout: Seconds = 300.0
    upstream_connections: Annotated[int, msgspec.Meta(ge=1)] = 4096
    max_body_size: Annotated[int, msgspec.Meta(ge=1024)] = 64 * 1024 * 1024
    # Control plane.
    start_timeout: Seconds = 300.0  # the least on-demand and /start wait (a model's startup_timeout + 30 s can be more)
    # A streamed request waiting for its model to load gets an SSE comment this often, so that
    # clients, proxies and load balancers do not cut the idle connection (router/forward/loading_stream.py).
    loading_keepalive: Seconds = 5.0
    stop_timeout: Seconds = 120.0  # stop, stop-all, restart-autostart replies
    # A model whose on-demand start failed is not started on demand again for this long (its
    # requests get a 503 at once, or a fallback): router/control/start_backoff.py. 0: off.
    start_backoff: Annotated[float, msgspec.Meta(ge=0)] = 30.0
    # Who may evict whom when a model fits nowhere (router/control/scheduler.py): "swap" honours each
    # model's min_residency, drains busy models and serves the longest-waiting model first
    # (max_wait bounds it); "lru" evicts the least recently used idle model at once.
    scheduler: Literal["swap", "lru"] = "swap"
    resync_interval: Seconds = 2.0  # full re-read of the cluster view
    # Redis's memory (router/observe/redis_memory.py): read this often; a timeline event and a
    # warning when used memory crosses redis_memory_warn of maxmemory, or when Redis evicted keys.
    redis_memory_check: Seconds = 30.0
    redis_memory_warn: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.8
    pubsub_check: Seconds = 1.0  # a silent events subscription is PINGed this often; dead after 3 silent checks
    # The Redis URL the cluster view reads the workers' records with (LLM_ROUTER_REDIS_READ_URL):
    # a read-only user (``reader`` in examples/redis-users.acl), because on Redis 6.2 a user that
    # may read a key may write it with any command it has, and the router's own user must not
    # be able to write a worker's records. "" = the ``--redis`` URL (one user for both).
    redis_read_url: str = ""
    # Every lease gone at once looks like Redis restarted empty: keep the view this long.
    empty_grace: Annotated[float, msgspec.Meta(ge=0)] = 5.0
    # Limits: requests beyond a model's max_concurrency wait in a queue of at most queue_limit
    # (per model, per router) for at most queue_timeout, else 429 with Retry-After.
    queue_limit: Annotated[int, msgspec.Meta(ge=0)] = 100
    queue_timeout: Seconds = 60.0
    # Quotas of keys with limits (router/limits/quotas.py): a request in flight holds a lease this
    # long, renewed by its router (a dead router's leases expire after it); with Redis
    # unreachable, "open" admits unchecked, "closed" refuses (503).
    quota_lease_ttl: Annotated[float, msgspec.Meta(ge=0.3)] = 10.0
    quota_redis_down: Literal["open", "closed"] = "open"
    # A request's concurrency lease is dropped before its answer's last bytes go out; a Redis
    # that answers slowly holds them at most this long (the drop goes on in the background).
    quota_release_wait: Seconds = 0.25
    # GPU-time budgets (router/limits/budgets.py): a group's use is re-read at most this often,
    # when one of its requests would start a model; quota_redis_down applies to them too.
    budget_refresh: Seconds = 10.0
    # Prefix-affinity routing (router/forward/affinity.py): no instance gets more than this factor × the
    # mean outstanding requests (this router's counts); a full preferred instance spills over.
    affinity_load_factor: Annotated[float, msgspec.Meta(ge=1.0)] = 1.25
    # Model use (llm:used:{model}) is reported at most once per usage_interval per model.
    usage_interval: Seconds = 1.0
    # The audit trail (llm:audit, llm_router/audit.py) keeps about this many entries (workers:
    # the same LLM_ROUTER_AUDIT_MAXLEN).
    audit_maxlen: Annotated[int, msgspec.Meta(ge=100)] = DEFAULT_AUDIT_MAXLEN
    # The usage ledger (llm:ledger:{hour}, llm_router/ledger.py) keeps each hour this many days
    # (workers: the same LLM_ROUTER_LEDGER_RETENTION_DAYS); routers write it once a second.
    ledger_retention_days: Annotated[int, msgspec.Meta(ge=1)] = DEFAULT_RETENTION_DAYS
    # Log streaming (SSE).
    keepalive_interval: Seconds = 15.0
    log_block_ms: Annotated[int, msgspec.Meta(ge=10, le=1000)] = 1000  # XREAD BLOCK; short so cancels are prompt
    log_tail_default: Annotated[int, msgspec.Meta(ge=0)] = 200
    log_tail_max: Annotated[int, msgspec.Meta(ge=1)] = 10000
    # Log viewers (router/logs/fanout.py): Redis reads of logs (history, catch-up, the live XREAD)
    # take at most log_page_size entries (fewer for long lines: ~256 KiB a page), each page
    # flushed to the client before the next is read; a viewer's queue of live entries (and
    # history kept to avoid a second read) holds at most log_viewer_buffer bytes. Pools, each
    # bounded, none waiting behind another: redis_connections for the control plane,
    # log_connections for history pages, log_readers for the live reads (one per watched model).
    log_page_size: Annotated[int, msgspec.Meta(ge=1, le=10000)] = 100
    log_viewer_buffer: Annotated[int, msgspec.Meta(ge=1024)] = 1024 * 1024
    redis_connections: Annotated[int, msgspec.Meta(ge=4)] = 100
    log_connections: Annotated[int, msgspec.Meta(ge=1)] = 8
    log_readers: Annotated[int, msgspec.Meta(ge=1)] = 64
    # Shutdown: how long open streams get to say stream_end and finish.
    shutdown_grace: Seconds = 5.0
    # Hostile clients (router/http/validate.py). header_timeout: a connection must deliver a
    # request's headers (or its next one, when kept alive) within this long (slowloris);
    # body_timeout: the whole body within this long.
    header_timeout: Seconds = 60.0
    body_timeout: Seconds = 300.0
    # write_timeout: a write to a client (a flush of a streamed answer, the end of any answer)
    # that the client does not take within this long ends its request: the client stopped
    # reading and would otherwise hold an engine request and a concurrency slot (nginx's
    # send_timeout, 60 s). Counted in llm_router_requests_aborted_total{reason="write_timeout"}.
    write_timeout: Seconds = 60.0
    max_header_size: Annotated[int, msgspec.Meta(ge=4096)] = 64 * 1024
    # Client connections (router/http/fdguard.py): at most max_connections open (0: half of what
    # NOFILE leaves after the Redis pools and 64), at most max_connections_per_address of them
    # from one address (0: all but a tenth of max_connections); more are closed as accepted.
    max_connections: Annotated[int, msgspec.Meta(ge=0)] = 0
    max_connections_per_address: Annotated[int, msgspec.Meta(ge=0)] = 0
    max_api_body_size: Annotated[int, msgspec.Meta(ge=0)] = 64 * 1024  # /api routes take no real body
    max_json_depth: Annotated[int, msgspec.Meta(ge=1)] = 128  # of forwarded JSON bodies
    # Web pages (router/http/origin.py): origins (comma-separated scheme://host[:port]) whose
    # pages may make state-changing requests and read answers (CORS); none by default.
    allow_origins: str = ""
    # /debug/stats (tasks, fds, RSS: for leak tests and operators); admin key when keys are on.
    debug_endpoints: bool = False
    # One JSON line per forwarded request on stderr (router/observe/accesslog.py), written in batches.
    access_log: bool = True
    # Set by ``serve --workers N``'s supervisor for each child (router/supervisor.py): which of
    # how many router processes this is; > 1 means listen with SO_REUSEPORT and admit only this
    # process's share of each model's concurrency limit.
    processes: Annotated[int, msgspec.Meta(ge=1)] = 1
    process_index: Annotated[int, msgspec.Meta(ge=0)] = 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ, **overrides: object) -> "RouterOptions":
        """Defaults, then ``LLM_ROUTER_<FIELD>`` variables, then explicit ``overrides``.

        A bad value raises ``ValueError`` naming the variable (not a traceback deep in msgspec).
        """
        values: dict[str, object] = {}
        for name in cls.__struct_fields__:
            raw = env.get(ENV_PREFIX + name.upper())
            if raw is not None:
                values[name] = raw
        values.update(overrides)
        try:
            return msgspec.convert(values, cls, strict=False)
        except msgspec.ValidationError as exc:
            raise ValueError(f"router option: {exc} (environment variables {ENV_PREFIX}<FIELD>)") from None
