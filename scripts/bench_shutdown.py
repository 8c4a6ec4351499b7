#!/usr/bin/env python3
"""How long a worker takes to shut down (SIGTERM → exit), over repeated runs.

Each run starts a private redis-server (once), a worker whose config has ``--models`` mock
engines with ``auto_start``, waits until every model runs, sends SIGTERM and times the exit.
A shutdown should cost the engines' own stop time (a mock engine stops in milliseconds) plus a
few Redis round trips; a loop that misses its cancellation shows up as +3 s (the worker's
``SHUTDOWN_TIMEOUT``).

    .venv/bin/python scripts/bench_shutdown.py --runs 10
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llm_lab_router.protocol import Keys  # noqa: E402
from llm_lab_router.redis_server import RedisServer, free_port  # noqa: E402
from llm_lab_router.worker.agent import SHUTDOWN_TIMEOUT  # noqa: E402

MOCK = ROOT / "scripts" / "mock_engine.py"


def write_config(path: Path, models: int) -> None:
    low = free_port()
    lines = ["[worker]", "heartbeat_interval = 0.2", "lease_ttl = 2.0", "devices_interval = 0.5",
             f"port_range = [{low}, {low + 200}]"]
    for i in range(models):
        lines += ["", "[[models]]", f'id = "m{i}"', "auto_start = true", "stop_grace = 3.0",
                  f'command = ["{{python}}", "{MOCK}", "--port", "{{port}}", "--host", "{{host}}", '
                  '"--model", "{id}", "--quiet"]']
    path.write_text("\n".join(lines) + "\n")


def one_run(url: str, config: Path, models: int, wid: str) -> float:
    rds = redis.Redis.from_url(url, decode_responses=True)
    keys = Keys()
    proc = subprocess.Popen([sys.executable, "-m", "llm_lab_router.cli", "worker", "--config", str(config),
                             "--redis", url, "--worker-id", wid], cwd=ROOT, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=open(f"/tmp/bs-{wid}.log","w"), start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not all(rds.hget(keys.instance(f"m{i}", wid), "state") == "running" for i in range(models)):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("the worker did not start its models")
            time.sleep(0.05)
        time.sleep(0.5)  # let every loop settle into its steady state (a blocking read, a sleep)
        began = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        return time.monotonic() - began
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        rds.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--models", type=int, default=2)
    opts = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "models.toml"
        write_config(config, opts.models)
        with RedisServer(Path(tmp) / "redis", conf=None, extra=["--save", "", "--appendonly", "no"]) as server:
            times = [one_run(server.url, config, opts.models, f"bench-shutdown-{os.getpid()}-{i}")
                     for i in range(opts.runs)]
    stuck = sum(t > SHUTDOWN_TIMEOUT for t in times)
    print("shutdown seconds per run: " + " ".join(f"{t:.2f}" for t in times))
    print(f"median {statistics.median(times):.2f} s, max {max(times):.2f} s, "
          f"{stuck} of {len(times)} runs waited out a {SHUTDOWN_TIMEOUT:g} s shutdown timeout")


if __name__ == "__main__":
    main()
