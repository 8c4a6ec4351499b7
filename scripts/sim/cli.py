"""Command line of the simulator: ``fleet`` plays hosts until SIGTERM; ``measure`` runs the
scale benchmark (docs/BENCHMARKS.md, "Scale"); ``history`` measures the timeline's Redis memory
at full retention (docs/BENCHMARKS.md, "Redis memory at full retention")."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from pathlib import Path

from llm_lab_router.protocol import Keys
from llm_lab_router.redis_url import async_client

from scripts.sim.fleet import Fleet, host_ids, make_host, model_ids


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.sim")
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fleet", help="play N worker hosts on a Redis until SIGTERM")
    f.add_argument("--redis", required=True)
    f.add_argument("--prefix", default="llm:")
    f.add_argument("--hosts", type=int, default=50)
    f.add_argument("--models", type=int, default=10)
    f.add_argument("--engines", required=True, help="comma-separated engine URLs behind the running instances")
    f.add_argument("--change-rate", type=float, default=1.0, help="state changes per host per minute")
    f.add_argument("--devices-interval", type=float, default=5.0)
    f.add_argument("--heartbeat", type=float, default=1.0)
    f.add_argument("--lease-ttl", type=float, default=5.0)
    f.add_argument("--log-rate", type=float, default=6.0, help="log batches (5 lines) per host per minute")
    f.add_argument("--tag", default="", help="worker ids are sim-<tag>-NNNN")
    f.add_argument("--ready-file", type=Path, help="written once every host has published")
    f.epilog = "SIGUSR1 pauses the state changes, SIGUSR2 resumes them; SIGTERM: goodbye and exit."
    m = sub.add_parser("measure", help="the scale benchmark")
    from scripts.sim.measure import add_arguments
    add_arguments(m)
    h = sub.add_parser("history", help="Redis memory of the timeline at full retention (simulated clock)")
    from scripts.sim.history import add_arguments as history_arguments
    history_arguments(h)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.cmd == "fleet":
        return asyncio.run(_fleet(args))
    if args.cmd == "history":
        from scripts.sim.history import run as history
        return asyncio.run(history(args))
    from scripts.sim.measure import run
    return asyncio.run(run(args))


async def _fleet(args: argparse.Namespace) -> int:
    redis = async_client(args.redis)
    engines = args.engines.split(",")
    models = model_ids(args.models)
    hosts = [make_host(wid, models, engines[n % len(engines)]) for n, wid in enumerate(host_ids(args.hosts, args.tag))]
    fleet = Fleet(redis, Keys(args.prefix), hosts, engines, heartbeat=args.heartbeat, lease_ttl=args.lease_ttl,
                  devices_interval=args.devices_interval, change_rate=args.change_rate, log_rate=args.log_rate)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, lambda: setattr(fleet, "paused", True))
    loop.add_signal_handler(signal.SIGUSR2, lambda: setattr(fleet, "paused", False))
    run = asyncio.create_task(fleet.run(stop))
    await fleet.ready.wait()
    logging.info("%d hosts published", len(hosts))
    if args.ready_file:
        args.ready_file.write_text("ready\n")
    await run
    try:
        await asyncio.wait_for(fleet.goodbye(), 10)
    except Exception as exc:
        logging.warning("goodbye failed: %s", exc)
    logging.info("fleet stopped after %d state changes", fleet.changes)
    await redis.aclose()
    return 0
