"""The router process: the Tornado application (its routes: router/http/routes.py) and ``main``.

``main`` runs on asyncio (uvloop when installed). SIGTERM/SIGINT stop it gracefully: the
listener closes, log streams end with ``stream_end``, in-flight requests get
``shutdown_grace`` seconds, then Redis and the upstream pool are closed.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import signal
import sys

import tornado.web
from llm_lab_router.redact import redact_url as redact
from llm_lab_router.router.core.options import RouterOptions
from llm_lab_router.router.http import handlers as h
from llm_lab_router.router.http.auth import AccessPolicy, startup_refusal
from llm_lab_router.router.http.exchange import Dispatcher
from llm_lab_router.router.http.fdguard import ConnectionCaps, GuardedServer, default_caps
from llm_lab_router.router.http.openapi import document_bytes
from llm_lab_router.router.http.origin import SitePolicy, parse_origins
from llm_lab_router.router.http.routes import ROUTES, Route, own_v1_patterns
from llm_lab_router.router.services import Services
from llm_lab_router.timeline import resolutions
from tornado.routing import URLSpec

log = logging.getLogger("router")
access_log = logging.getLogger("router.access")

LISTEN_BACKLOG = 4096
MAX_FDS = 65536


def log_request(handler: tornado.web.RequestHandler) -> None:
    """One line per request: method, path, status, milliseconds (never the body, query or
    headers, which may carry prompts and keys). Forwarded ``/v1`` requests never reach the
    application: the batched access log (router/observe/accesslog.py) has more to say of them,
    at a fraction of the cost."""
    req = handler.request
    access_log.info("%s %s %d %.1fms", req.method, req.path, handler.get_status(), 1000 * req.request_time())


def url_specs(services: Services, routes: tuple[Route, ...]) -> list[URLSpec]:
    """Tornado's rules: each route with a handler (the forwarded ones go to ``Exchange``), in
    table order; an API handler is given the route's access and query parameters."""
    return [URLSpec(r.tornado_pattern, r.handler,
                    {"services": services, "access": r.access, "query": r.query}
                    if issubclass(r.handler, h.BaseHandler) else dict(r.args))
            for r in routes if r.handler is not None]


def make_app(services: Services, access: AccessPolicy | None = None,
             routes: tuple[Route, ...] = ROUTES) -> tornado.web.Application:
    """The application of the router's own routes (``routes``), with ``/openapi.json`` rendered
    from the same table; any other path is ``NotFoundHandler``'s 404."""
    return tornado.web.Application(
        url_specs(services, routes),
        default_handler_class=h.NotFoundHandler, default_handler_args={"services": services},
        log_function=log_request, compress_response=False, access=access or AccessPolicy(),
        openapi=document_bytes(services.options, routes))


def make_server(services: Services, access: AccessPolicy | None = None,
                site: SitePolicy | None = None) -> GuardedServer:
    """Forwarded ``/v1`` requests take the lean path (router/http/exchange.py), the rest the app;
    ``site`` checks every request a browser may have made first (router/http/origin.py)."""
    access = access or AccessPolicy()
    options = services.options
    dispatcher = Dispatcher(make_app(services, access), services, access, own_v1_patterns(), site)
    caps = ConnectionCaps(*default_caps(options), services.metrics)  # within NOFILE (router/http/fdguard.py)
    return GuardedServer(dispatcher, max_body_size=options.max_body_size, max_header_size=options.max_header_size,
                         head_timeout=options.header_timeout, body_timeout=options.body_timeout, caps=caps)


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
    try:
        site = SitePolicy(host, parse_origins(options.allow_origins))
    except ValueError as exc:
        log.error("LLM_ROUTER_ALLOW_ORIGINS: %s", exc)
        return 2
    services = Services(redis_url, prefix, options)
    await services.start()
    # header_timeout bounds both a slow request head (slowloris) and an idle keep-alive connection;
    # body_timeout a slow body; each on one shared timer instead of Tornado's per request (router/http/slowbody.py).
    server = make_server(services, access, site)
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
        resolutions()  # the timeline's (LLM_ROUTER_HISTORY_RESOLUTIONS): refused here, in one line
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
