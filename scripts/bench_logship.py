"""How fast one worker's ``LogPipe`` ships spooled lines into Redis, alone.

Writes ``--lines`` engine-like lines into a model's spool file first, then starts a
``LogPipe`` against a private ``redis-server`` and times until every line is in the stream.
``--profile`` prints where the worker's time goes (cProfile). The end-to-end figure, with a
real engine and routers, is ``scripts/bench.py --only logs``; this one isolates the shipper.

    .venv/bin/python scripts/bench_logship.py [--lines 300000] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import tempfile
import time
from pathlib import Path

import redis.asyncio as aredis
from llm_lab_router.protocol import Keys
from llm_lab_router.redis_server import RedisServer
from llm_lab_router.worker.logpipe import LogPipe

LINE = b"chatty 12345: slot 0 | task 12345 | n_past = 1234 | decode ok\n"  # as the mock engine's


async def ship(url: str, spool: Path, lines: int) -> float:
    """Lines per second from a full spool file to the stream."""
    client = aredis.Redis.from_url(url)
    pipe = LogPipe(client, Keys(), host="bench", maxlen=10 * lines, buffer_lines=100_000, spool_dir=spool)
    out, err = pipe.engine_output("m")
    os.write(out, LINE * lines)
    started = time.perf_counter()
    pipe.start()
    while await client.xlen("llm:logs:m") < lines:
        await asyncio.sleep(0.01)
    rate = lines / (time.perf_counter() - started)
    await pipe.close()
    os.close(out)
    os.close(err)
    await client.aclose()
    return rate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lines", type=int, default=300_000)
    p.add_argument("--profile", action="store_true")
    opts = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-logship-") as tmp:
        server = RedisServer(Path(tmp) / "redis", extra=["--appendonly", "no", "--save", ""]).start()
        try:
            run = lambda: asyncio.run(ship(server.url, Path(tmp) / "spool", opts.lines))  # noqa: E731
            if opts.profile:
                prof = cProfile.Profile()
                rate = prof.runcall(run)
                pstats.Stats(prof).sort_stats("tottime").print_stats(12)
            else:
                rate = run()
            print(f"{opts.lines:,} lines shipped at {rate:,.0f} lines/s")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
