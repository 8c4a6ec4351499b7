"""Descriptor exhaustion (router/http/fdguard.py): a router with NOFILE lowered to 1024 and
1,100 slow connections from one address keeps answering ``/health`` from another, at low CPU,
with a log line or two, and serves new connections at once when the flood goes; with a cap set
above NOFILE (``accept()`` fails with EMFILE), it pauses accepting instead of spinning.

Real router processes (NOFILE set before exec), real sockets, the flood and the figures of
``scripts/bench_fdflood.py`` (docs/BENCHMARKS.md quotes its runs)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from conftest import ROOT
from helpers import request, start_router
from llm_lab_router.router.core.options import RouterOptions
from llm_lab_router.router.http.fdguard import default_caps
from test_metrics import metric

_spec = importlib.util.spec_from_file_location("bench_fdflood", ROOT / "scripts" / "bench_fdflood.py")
bench = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
_spec.loader.exec_module(bench)  # type: ignore[union-attr]

NOFILE = 1024


def test_default_caps_leave_descriptors_for_redis_and_engines() -> None:
    options = RouterOptions()
    assert default_caps(options, 1024) == (394, 355)  # (1024 - 100 - 8 - 64 - 64) / 2; all but a tenth
    assert default_caps(options, 65536) == (32650, 29385)
    assert default_caps(RouterOptions(max_connections=100), 1024) == (100, 90)
    assert default_caps(RouterOptions(max_connections=100, max_connections_per_address=100), 1024) == (100, 100)
    assert default_caps(options, 200) == (16, 8)  # a floor, whatever the limit


def flooded_router(procs, redis_url, **env: str):
    router = start_router(procs, redis_url, env=env, wrap=lambda argv: bench.with_nofile(argv, NOFILE))
    return router, Path(router.proc.log_path)


def test_a_descriptor_flood_leaves_health_answering_at_low_cpu(procs, redis_url) -> None:
    router, log = flooded_router(procs, redis_url)
    figures = bench.flood(router.url, router.proc.pid, log, connections=1100, seconds=4)
    _, per_address = default_caps(RouterOptions(), NOFILE)
    assert figures["held"] == per_address, figures  # the flood's address got its cap, no more
    assert figures["health_failed"] == 0 and figures["health_p99_ms"] < 1000, figures
    assert figures["router_cpu_pct"] < 50, figures  # spinning on accept() was 100 %
    assert figures["log_growth_lines"] <= 3, figures  # one warning per 10 s, no tracebacks
    assert figures["recovered_s"] < 2 and figures["resumed_held"] == 50, figures
    text = request("GET", f"{router.url}/metrics").body.decode()
    assert metric(text, "llm_router_connections_refused_total", reason="per_address") >= 1100 - per_address
    assert metric(text, "llm_router_client_connections") is not None
    assert "refused (per address, 127.0.0.2)" in procs.log(router.proc)


def test_emfile_pauses_accepting_instead_of_spinning(procs, redis_url) -> None:
    router, log = flooded_router(procs, redis_url, LLM_ROUTER_MAX_CONNECTIONS="5000",
                                 LLM_ROUTER_MAX_CONNECTIONS_PER_ADDRESS="5000")
    figures = bench.flood(router.url, router.proc.pid, log, connections=1100, seconds=4)
    assert figures["router_cpu_pct"] < 50, figures
    # the pause's warning; with no descriptor left, a Redis reconnect may say it failed too
    assert figures["log_growth_lines"] <= 8, figures
    assert figures["recovered_s"] < 3 and figures["resumed_held"] == 50, figures
    assert "Traceback" not in procs.log(router.proc)
    assert "accept() failed (Too many open files" in procs.log(router.proc)
    assert metric(request("GET", f"{router.url}/metrics").body.decode(), "llm_router_accept_paused_total") >= 1
