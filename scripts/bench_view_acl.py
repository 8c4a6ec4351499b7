#!/usr/bin/env python3
"""What per-worker Redis users cost a router (docs/security.md, "Why key names, not HMAC").

The router reads workers' records on its view refresh, never per request; what changed there:
the index of workers is a set (``SMEMBERS llm:workers``) plus one ``MGET`` of each worker's own
version key, where it was one ``HGETALL llm:versions``; every event is checked against the
channel it came on. Starts a private ``redis-server`` on 127.0.0.1 (the tests' binary), writes
``--workers`` workers of ``--models`` models each through the worker's own pipeline steps
(``worker.publish``), then times, in alternating rounds:

- the index read, old (``HGETALL`` of a hash of every worker's version) and new;
- a whole steady-state ``ClusterView.resync()`` (nothing changed: what a router does every
  ``resync_interval``);
- one instance event through ``ClusterView._on_message`` (decode, ownership check, apply)
  against ``apply_event`` alone.

Prints medians and p99 in microseconds. Usage::

    python scripts/bench_view_acl.py [--workers 500] [--models 10] [--rounds 200]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llm_lab_router.protocol import (  # noqa: E402
    CatalogEntry, Event, Instance, Keys, WorkerInfo, WorkerVersion, from_json, to_json,
)
from llm_lab_router.redis_server import RedisServer  # noqa: E402
from llm_lab_router.redis_url import async_client  # noqa: E402
from llm_lab_router.router.core.view import ClusterView  # noqa: E402
from llm_lab_router.worker.publish import publish_all_ops  # noqa: E402


def summary(samples: list[float]) -> str:
    ordered = sorted(samples)
    return (f"median {statistics.median(ordered) * 1e6:9.1f} us   "
            f"p99 {ordered[int(0.99 * (len(ordered) - 1))] * 1e6:9.1f} us")


async def main(workers: int, models: int, rounds: int) -> None:
    keys = Keys()
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp), extra=["--appendonly", "no", "--save", ""]).start()
        redis = async_client(server.url)
        try:
            now = time.time()
            for n in range(workers):
                wid = f"gpu{n}"
                info = WorkerInfo(id=wid, host=wid, pid=1, version="bench", started_at=now, heartbeat_at=now)
                catalog = [CatalogEntry(id=f"m{i}") for i in range(models)]
                instances = [Instance(model=f"m{i}", worker=wid, state="running", url=f"http://{wid}:{i}")
                             for i in range(models)]
                async with redis.pipeline(transaction=True) as pipe:
                    publish_all_ops(pipe, keys, info, 3600, catalog, instances, WorkerVersion())
                    await pipe.execute()
                await redis.hset("bench:old-versions", wid, f"{WorkerVersion().epoch}:1")  # the old index
            view = ClusterView(redis, keys)
            await view.resync()
            assert len(view.workers()) == workers, len(view.workers())
            wids = sorted(view.workers())

            old, new, resync = [], [], []
            for _ in range(rounds):
                t = time.perf_counter()
                await redis.hgetall("bench:old-versions")
                old.append(time.perf_counter() - t)
                t = time.perf_counter()
                await view._read_versions()
                new.append(time.perf_counter() - t)
                t = time.perf_counter()
                await view.resync()
                resync.append(time.perf_counter() - t)

            channel = keys.events(wids[0])
            events = [to_json(Event(kind="instance", worker=wids[0], instance=Instance(
                model="m0", worker=wids[0], state="running", url="http://x:1", seq=s))) for s in range(rounds * 10)]
            checked, bare = [], []
            for data in events:
                t = time.perf_counter()
                await view._on_message(channel, data)
                checked.append(time.perf_counter() - t)
                t = time.perf_counter()
                view.apply_event(from_json(data, Event))
                bare.append(time.perf_counter() - t)
        finally:
            await redis.aclose()
            server.stop()
    print(f"{workers} workers x {models} models, {rounds} rounds")
    print(f"index read, old HGETALL llm:versions : {summary(old)}")
    print(f"index read, new SMEMBERS + MGET      : {summary(new)}")
    print(f"steady-state resync (new, whole)     : {summary(resync)}")
    print(f"instance event, decode+check+apply   : {summary(checked)}")
    print(f"instance event, apply_event only     : {summary(bare)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=500)
    parser.add_argument("--models", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    asyncio.run(main(args.workers, args.models, args.rounds))
