#!/usr/bin/env python3
"""What ``WAIT 1`` (a write acknowledged by a replica, so a fail-over cannot lose it) costs.

Starts a private master and one replica on 127.0.0.1 (the same ``redis-server`` the tests
use), then times, side by side in alternating rounds (ABAB), the writes llm-router makes:

- ``XADD`` of one command entry (what a router sends to a worker), alone and followed by
  ``WAIT 1 1000`` in the same pipeline round trip;
- one batch of 100 log lines through the worker's ``LOG_APPEND_SCRIPT``, alone and with
  ``WAIT 1 1000``.

Prints medians and p99 in microseconds and the ratio. Usage::

    python scripts/bench_wait.py [--rounds 20] [--per-round 200]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402
from llm_lab_router.protocol import LOG_APPEND_SCRIPT, LogEntry, log_append_args  # noqa: E402
from llm_lab_router.redis_server import RedisServer  # noqa: E402

NO_DISK = ["--appendonly", "no", "--save", ""]


def timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        started = time.perf_counter()
        fn()
        out.append((time.perf_counter() - started) * 1e6)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--per-round", type=int, default=200)
    opts = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        master = RedisServer(Path(tmp) / "master", extra=NO_DISK).start()
        replica = RedisServer(Path(tmp) / "replica", extra=[*NO_DISK, "--replicaof", "127.0.0.1", str(master.port)])
        try:
            replica.start()
            client = redis.Redis(host="127.0.0.1", port=master.port)
            while client.info("replication")["connected_slaves"] < 1:
                time.sleep(0.05)
            script = client.register_script(LOG_APPEND_SCRIPT)
            lines = [LogEntry(timestamp=time.time(), message=f"line {i}: slot 0 | decode ok", host="w", stream="stdout")
                     for i in range(100)]
            args = log_append_args(10000, "w", lines)

            def command(wait: bool):
                def run():
                    pipe = client.pipeline(transaction=False)
                    pipe.xadd("bench:commands", {"data": b'{"op":"start","id":"x","model":"m"}'},
                              maxlen=10000, approximate=True)
                    if wait:
                        pipe.execute_command("WAIT", 1, 1000)
                    pipe.execute()
                return run

            def logs(wait: bool):
                def run():
                    script(keys=["bench:logs"], args=args)
                    if wait:
                        client.execute_command("WAIT", 1, 1000)
                return run

            cases = {"command XADD": command, "log batch (100 lines)": logs}
            samples = {(name, w): [] for name in cases for w in (False, True)}
            for _ in range(opts.rounds):
                for name, make in cases.items():
                    for w in (False, True):
                        samples[(name, w)] += timed(make(w), opts.per_round)
            print(f"{'write':24} {'alone p50':>10} {'+WAIT p50':>10} {'ratio':>6} {'alone p99':>10} {'+WAIT p99':>10}  (µs)")
            for name in cases:
                a, b = samples[(name, False)], samples[(name, True)]
                p99 = lambda xs: sorted(xs)[int(len(xs) * 0.99)]  # noqa: E731
                print(f"{name:24} {statistics.median(a):10.0f} {statistics.median(b):10.0f} "
                      f"{statistics.median(b) / statistics.median(a):6.2f} {p99(a):10.0f} {p99(b):10.0f}")
            client.close()
        finally:
            replica.stop()
            master.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
