"""The router process: the route table, the Tornado application and ``main``.

``main`` runs on asyncio (uvloop when installed). SIGTERM/SIGINT stop it gracefully: the
listener closes, log streams end with ``stream_end``, in-flight requests get
``shutdown_grace`` seconds, then Redis and the upstream pool are closed.
"""

from __future__ import annotations

import asyncio
import logging
import re
import resource
import signal
import sys

import tornado.web
from llm_lab_router.redact import redact_url as redact
from llm_lab_router.router.core.options import RouterOptions
from llm_lab_router.router.http import handlers as h
from llm_lab_router.router.http.auth import AccessPolicy, startup_refusal
from llm_lab_router.router.http.dashboard import dashboard_routes
from llm_lab_router.router.http.exchange import Dispatcher
from llm_lab_router.router.http.slowbody import BodyTimeoutServer
from llm_lab_router.router.services import Services

log = logging.getLogger("router")
access_log = logging.getLogger("router.access")

LISTEN_BACKLOG = 4096
MAX_FDS = 65536
ALIAS = r"([^/]+)"
# Tornado tries the routes in order: the /v1 API routes, then the proxy (every other /v1 path;
# first after them, so a forwarded request is not matched against every /api route first).
# A new /v1 route of the router's own goes before the proxy.
ROUTES = [
    (r"/v1/models", h.ModelsHandler),
    (rf"/v1/models/{ALIAS}", h.ModelHandler),
    (r"/v1/.*", h.ProxyHandler),
    (r"/", h.RootHandler),
    (r"/health", h.HealthHandler),
    (r"/api/models/restart-autostart", h.RestartAutostartHandler),
    (r"/api/models/stop-all", h.StopAllHandler),
    (rf"/api/models/{ALIAS}/start", h.StartHandler),
    (rf"/api/models/{ALIAS}/stop", h.StopHandler),
    (rf"/api/models/{ALIAS}/info", h.ModelInfoHandler),
    (rf"/api/models/{ALIAS}/logs/stream", h.LogStreamHandler),
    (r"/api/logs/stats", h.LogStatsHandler),
    (rf"/api/logs/{ALIAS}/clear", h.LogClearHandler),
    (r"/api/devices/info", h.DevicesHandler),
    (r"/api/audit", h.AuditHandler),
    (r"/api/usage", h.UsageHandler),
    (r"/openapi.json", h.OpenApiHandler),
    (r"/debug/stats", h.DebugStatsHandler),
    (r"/metrics", h.MetricsHandler),
]


def log_request(handler: tornado.web.RequestHandler) -> None:
    """One line per request: method, path, status, milliseconds (never the body, query or
    headers, which may carry prompts and keys). Forwarded ``/v1`` requests are left to the
    batched access log (router/observe/accesslog.py), which has more to say at a fraction of the cost."""
    if isinstance(handler, h.ProxyHandler):
        return
    req = handler.request
    access_log.info("%s %s %d %.1fms", req.method, req.path, handler.get_status(), 1000 * req.request_time())


def make_app(services: Services, access: AccessPolicy | None = None) -> tornado.web.Application:
    return tornado.web.Application(
        [*[(pattern, handler, {"services": services}) for pattern, handler in ROUTES], *dashboard_routes()],
        default_handler_class=h.NotFoundHandler, default_handler_args={"services": services},
        log_function=log_request, compress_response=False, access=access or AccessPolicy())


def own_v1_routes() -> list[re.Pattern[str]]:
    """The ``/v1`` routes before the proxy's, anchored as Tornado anchors them."""
    proxy = next(i for i, (_, handler) in enumerate(ROUTES) if handler is h.ProxyHandler)
    return [re.compile(pattern + "$") for pattern, _ in ROUTES[:proxy]]


def make_server(services: Services, access: AccessPolicy | None = None) -> BodyTimeoutServer:
    """Forwarded ``/v1`` requests take the lean path (router/http/exchange.py), the rest the app."""
    access = access or AccessPolicy()
    options = services.options
    dispatcher = Dispatcher(make_app(services, access), services, access, own_v1_routes())
    return BodyTimeoutServer(dispatcher, max_body_size=options.max_body_size,
                             max_header_size=options.max_header_size,
                             head_timeout=options.header_timeout, body_timeout=options.body_timeout)


def raise_fd_limit() -> None:
    """A proxy holds two descriptors per stream (client, engine): lift the soft limit to the
    hard one (capped), so a thousand concurrent streams do not hit the usual default of 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard if hard != resource.RLIM_INFINITY else MAX_FDS, MAX_FDS)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


async def serve(redis_url: str, prefix: str, host: str, port: int, options: RouterOptions,
                access: AccessPolicy | None = None) -> int:
    raise_fd_limit()
    services = Services(redis_url, prefix, options)
    await services.start()
    # header_timeout bounds both a slow request head (slowloris) and an idle keep-alive connection;
    # body_timeout a slow body; each on one shared timer instead of Tornado's per request (router/http/slowbody.py).
    server = make_server(services, access)
    try:
        # A deep accept queue: a burst of new connections (a client pool filling up) must not
        # overflow it, or dropped SYNs cost the clients a 1 s retransmit.
        # One of several router processes (serve --workers): the kernel spreads connections.
        server.listen(port, host, backlog=LISTEN_BACKLOG, reuse_port=options.processes > 1)
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", host, port, exc.strerror or exc)
        await services.close()
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("router listening on http://%s:%d (redis %s, prefix %r)", host, port, redact(redis_url), prefix)
    await stop.wait()
    log.info("shutting down")
    server.stop()
    await services.drain()
    await server.close_all_connections()
    await services.close()
    log.info("stopped")
    return 0


def main(redis_url: str, prefix: str = "llm:", host: str = "127.0.0.1", port: int = 8000,
         options: RouterOptions | None = None, access: AccessPolicy | None = None, insecure: bool = False) -> int:
    """Run a router until SIGTERM/SIGINT; returns the exit status (2: refused to start)."""
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        options = options or RouterOptions.from_env()
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    access = access or AccessPolicy()
    if refusal := startup_refusal(host, access.ring, insecure):
        print(f"llm-router serve: {refusal}", file=sys.stderr)
        return 2
    if access.ring.enabled:
        log.info("API keys on: %d client, %d admin; read-only routes %s", len(access.ring.client),
                 len(access.ring.admin), "public" if access.read_access == "public" else "need a client key")
    try:
        import uvloop

        run = uvloop.run
    except ImportError:
        run = asyncio.run
    return run(serve(redis_url, prefix, host, port, options, access))
