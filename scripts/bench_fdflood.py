#!/usr/bin/env python3
"""A router under a descriptor flood (issue 24, item 2): with ``NOFILE`` lowered, more slow
connections than it may hold. Measures the connections it held, ``/health``'s latency from
another address meanwhile (p50/p99), the router's CPU time over the flood (psutil) and how much
its log grew, then closes the flood and times the first ``/health`` after.

The flood comes from 127.0.0.2 (its own client address: the per-address cap applies to it);
``/health`` from 127.0.0.1, on a fresh connection each time, as a load balancer's probe.

    .venv/bin/python scripts/bench_fdflood.py --nofile 1024 --connections 1100 --seconds 20
    .venv/bin/python scripts/bench_fdflood.py ... --env LLM_ROUTER_MAX_CONNECTIONS=5000  # EMFILE path
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llm_lab_router.redis_server import RedisServer, free_port  # noqa: E402

FLOOD_ADDRESS = "127.0.0.2"


def with_nofile(argv: list[str], nofile: int) -> list[str]:
    """``argv`` run with RLIMIT_NOFILE (soft and hard) set to ``nofile`` first."""
    return [sys.executable, "-c", "import os, resource, sys; "
            f"resource.setrlimit(resource.RLIMIT_NOFILE, ({nofile}, {nofile})); os.execv(sys.argv[1], sys.argv[1:])",
            *argv]


def health_ms(url: str, timeout: float = 5.0) -> float:
    """One ``GET /health`` on a fresh connection: milliseconds, or ``inf`` if it failed."""
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as resp:
            resp.read()
            ok = resp.status == 200
    except OSError:
        ok = False
    return (time.perf_counter() - started) * 1000 if ok else float("inf")


def open_flood(port: int, count: int) -> list[socket.socket]:
    """``count`` connections from ``FLOOD_ADDRESS``, each with one byte of a request head sent."""
    socks = []
    for _ in range(count):
        s = socket.socket()
        s.bind((FLOOD_ADDRESS, 0))
        s.setblocking(False)
        try:
            s.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        socks.append(s)
    time.sleep(0.2)
    for s in socks:
        try:
            s.send(b"G")
        except OSError:
            pass
    return socks


def held(socks: list[socket.socket]) -> int:
    """How many flood connections the router still holds (the others it closed: EOF or reset)."""
    count = 0
    for s in socks:
        try:
            count += s.recv(1, socket.MSG_PEEK) != b""
        except BlockingIOError:
            count += 1  # open, nothing to read
        except OSError:
            pass
    return count


def flood(url: str, pid: int, log_path: Path, connections: int, seconds: float, trickle: float = 2.0) -> dict:
    """The flood against a running router (``pid``, its log at ``log_path``); the figures."""
    port = int(url.rsplit(":", 1)[1])
    proc = psutil.Process(pid)
    log_before = log_path.stat().st_size
    cpu_before = sum(proc.cpu_times()[:2])
    started = time.monotonic()
    socks = open_flood(port, connections)
    latencies = []
    next_trickle = time.monotonic() + trickle
    while time.monotonic() - started < seconds:
        latencies.append(health_ms(url))
        if time.monotonic() >= next_trickle:  # one more header byte each, as a slowloris does
            for s in socks:
                try:
                    s.send(b"E")
                except OSError:
                    pass
            next_trickle += trickle
        time.sleep(0.05)
    holding = held(socks)
    cpu = sum(proc.cpu_times()[:2]) - cpu_before
    elapsed = time.monotonic() - started
    with open(log_path, "rb") as f:  # what the flood wrote: the log less the probes' access lines
        f.seek(log_before)
        grown = [ln for ln in f.read().splitlines(keepends=True) if b"GET /health 200" not in ln]
    log_growth = sum(map(len, grown))
    for s in socks:
        s.close()
    closed_at = time.monotonic()
    after = float("inf")
    while after == float("inf") and time.monotonic() - closed_at < 10:
        after = health_ms(url, timeout=1)
    recovered = time.monotonic() - closed_at
    again = open_flood(port, 50)  # service resumes: new connections are held again
    time.sleep(0.3)
    resumed = held(again)
    for s in again:
        s.close()
    ok = sorted(x for x in latencies if x != float("inf"))
    return {
        "connections": connections, "held": holding, "seconds": round(elapsed, 1),
        "health_requests": len(latencies), "health_failed": len(latencies) - len(ok),
        "health_p50_ms": round(statistics.median(ok), 1) if ok else None,
        "health_p99_ms": round(ok[min(len(ok) - 1, int(len(ok) * 0.99))], 1) if ok else None,
        "router_cpu_s": round(cpu, 2), "router_cpu_pct": round(100 * cpu / elapsed, 1),
        "log_growth_bytes": log_growth, "log_growth_lines": len(grown),
        "log_sample": [ln.decode(errors="replace").strip()[:240] for ln in grown[:5]], "recovered_s": round(recovered, 2), "resumed_held": resumed,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nofile", type=int, default=1024)
    ap.add_argument("--connections", type=int, default=1100)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--trickle", type=float, default=5.0, help="seconds between two header bytes of a connection")
    ap.add_argument("--env", action="append", default=[], help="NAME=VALUE for the router (repeatable)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        redis_server = RedisServer(Path(tmp) / "redis", port=free_port()).start()
        port = free_port()
        log_path = Path(tmp) / "router.log"
        env = {**os.environ, **dict(item.split("=", 1) for item in args.env)}
        with open(log_path, "wb") as log:
            router = subprocess.Popen(with_nofile([sys.executable, "-m", "llm_lab_router.cli", "serve", "--redis",
                                                   redis_server.url, "--port", str(port)], args.nofile),
                                      stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 20
            while health_ms(url, timeout=1) == float("inf"):
                if router.poll() is not None or time.monotonic() > deadline:
                    print(log_path.read_text(), file=sys.stderr)
                    return 1
                time.sleep(0.1)
            figures = flood(url, router.pid, log_path, args.connections, args.seconds, args.trickle)
        finally:
            router.terminate()
            router.wait(10)
            redis_server.stop()
    print(json.dumps({"nofile": args.nofile, "env": args.env, **figures}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
