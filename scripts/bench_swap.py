#!/usr/bin/env python3
"""What prefetch (worker/prefetch.py) saves on a swap: a model that must wait for another's
residency, then load its weights, with its file evicted from the page cache versus prefetched.

Two engines (``--engine``): the mock engine with ``--load-file`` (the default: it reads its weight
file whole before it listens, what loading weights costs llama-server from a cold page cache, and
allocates no VRAM), or a real ``llama-server`` (``--engine llama-server --llama-server PATH``,
scripts/build_llama_server.sh builds one) serving GGUFs of ``--mib`` MiB with random weights
(scripts/make_tiny_gguf.py's ``shape_of_size``) on the CPU (``-ngl 0 -t 1``: no GPU is needed;
llama.cpp maps the file with ``MAP_POPULATE``, so it reads it whole at load). Two workers on one
Redis and one router, each with one stand-in GPU (tests/fake_nvml.py) that holds one of its two
models at a time: ``prefetch = true`` on one, ``false`` on the other, otherwise the same. Per
round and worker (alternating which goes first): ``X-a`` loaded with ``min_residency`` R s,
``X-b``'s file (on the disk of ``--dir``) evicted with ``posix_fadvise(DONTNEED)`` (as ``vmtouch
-e`` does, no root needed), then a streamed chat for ``X-b``: it waits R s, ``X-a`` is stopped,
``X-b`` starts and answers.

Prints per configuration the median request to first token and the cold start as the worker saw
it (its events ``starting`` to ``running on``: process start, weights, warm-up, first health
answer): the cold start that prefetch is to halve. Usage::

    python scripts/bench_swap.py [--mib 1024] [--residency 4] [--rounds 2] [--dir /var/tmp]
    python scripts/bench_swap.py --engine llama-server --llama-server PATH [--mib 1024] ...
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis as redis_sync
from llm_lab_router.protocol import Keys, log_entry
from llm_lab_router.redis_server import RedisServer, free_port

from scripts.bench.procs import Procs

MOCK = ROOT / "scripts" / "mock_engine.py"
CONFIGS = ("cold", "prefetch")
LLAMA_ARGS = ["-c", "256", "-t", "1", "--parallel", "1", "-ngl", "0"]  # on one core of the CPU


def write_weights(path: Path, mib: int, engine: str) -> None:
    """``mib`` MiB of random bytes (the mock engine reads them), or a GGUF of about that size."""
    if engine == "llama-server":
        sys.path.insert(0, str(ROOT / "scripts"))
        from make_tiny_gguf import shape_of_size, write  # the `real` extra: numpy, gguf

        write(str(path), shape=shape_of_size(mib))
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
        return
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        f.writelines(block for _ in range(mib))
        f.flush()
        os.fsync(f.fileno())


def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def config(name: str, prefetch: bool, weights: dict[str, Path], residency: float, llama_server: str = "") -> str:
    """The worker's config: its two models, served by the mock engine or by ``llama_server``."""
    low = free_port()
    lines = ["[worker]", f'id = "{name}"', "devices_interval = 0.5", "heartbeat_interval = 0.5",
             f"port_range = [{low}, {low + 20}]", f"prefetch = {json.dumps(prefetch)}", "prefetch_reserve_mb = 1024", ""]
    for model, path in weights.items():
        if llama_server:
            env_path = f"{Path(llama_server).parent}{os.pathsep}{os.environ.get('PATH', os.defpath)}"
            engine = ['engine = "llama.cpp"', f"engine_args = {json.dumps(LLAMA_ARGS)}",
                      f"env = {{ PATH = {json.dumps(env_path)} }}"]
        else:
            argv = ["{python}", str(MOCK), "--port", "{port}", "--host", "{host}", "--model", "{id}", "--quiet",
                    "--load-file", str(path), "--max-tokens", "4"]
            engine = [f"command = {json.dumps(argv)}"]
        lines += ["[[models]]", f'id = "{model}"', *engine, f'model_path = "{path}"',
                  'devices = ["cuda"]', "vram_mb = 12000", f"min_residency = {residency}", "startup_timeout = 120",
                  "stop_grace = 3", ""]
    return "\n".join(lines)


def call(method: str, url: str, body: dict | None = None, timeout: float = 120) -> dict:
    data = json.dumps(body).encode() if body is not None else b""
    req = urllib.request.Request(url, data=data if method == "POST" else None, method=method,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read() or b"{}")


def first_token(router: str, model: str) -> float:
    """Seconds from a streamed chat's send to its first content chunk."""
    body = {"model": model, "stream": True, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    req = urllib.request.Request(f"{router}/v1/chat/completions", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    began = time.monotonic()
    with urllib.request.urlopen(req, timeout=300) as resp:
        for line in resp:
            if line.startswith(b"data: {") and any(c.get("delta", {}).get("content")
                                                   for c in json.loads(line[6:]).get("choices", [])):
                took = time.monotonic() - began
                resp.read()
                return took
    raise RuntimeError(f"no token from {model}")


def wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.1)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=1024, help="size of each weight file")
    p.add_argument("--residency", type=float, default=4.0, help="s the loaded model stays before the swap")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--dir", default=None, help="where the weight files go (a real disk, not tmpfs)")
    p.add_argument("--engine", choices=("mock", "llama-server"), default="mock")
    p.add_argument("--llama-server", default="", metavar="PATH", help="the binary (--engine llama-server)")
    p.add_argument("--json", metavar="FILE", help="also write every round's figures as JSON")
    opts = p.parse_args()
    if opts.engine == "llama-server" and not opts.llama_server:
        p.error("--engine llama-server needs --llama-server PATH (scripts/build_llama_server.sh prints it)")
    work = Path(tempfile.mkdtemp(prefix="llm-router-swap-", dir=opts.dir))
    procs = Procs(work)
    try:
        redis = RedisServer(work / "redis", extra=["--appendonly", "no", "--save", ""]).start()
        procs.procs.insert(0, ("redis", redis.proc))  # type: ignore[arg-type]
        weights: dict[str, dict[str, Path]] = {}
        for name in CONFIGS:
            weights[name] = {f"{name}-a": work / f"{name}-a.bin", f"{name}-b": work / f"{name}-b.bin"}
            for path in weights[name].values():
                write_weights(path, opts.mib, opts.engine)
            cfg = work / f"{name}.toml"
            cfg.write_text(config(name, name == "prefetch", weights[name], opts.residency, opts.llama_server))
            gpus = json.dumps([{"name": "stand-in", "memory_total": 20000, "memory_used": 0}])
            procs.start(f"worker-{name}", [sys.executable, "-m", "llm_lab_router.cli", "worker", "--config", str(cfg),
                                           "--redis", redis.url, "--worker-id", name],
                        env={"LLM_ROUTER_STATE_DIR": str(work / "state"), "LLM_ROUTER_NVML_MODULE": "tests.fake_nvml",
                             "LLM_ROUTER_FAKE_GPUS": gpus})
        port = free_port()
        procs.start("router", [sys.executable, "-m", "llm_lab_router.cli", "serve", "--redis", redis.url,
                               "--port", str(port)])
        router = f"http://127.0.0.1:{port}"
        client = redis_sync.Redis.from_url(redis.url, decode_responses=True)
        wait(lambda: _models(router) >= {m for w in weights.values() for m in w}, 30, "the catalogs")
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in CONFIGS}
        for r in range(opts.rounds):
            for name in (CONFIGS if r % 2 == 0 else CONFIGS[::-1]):
                a, b = list(weights[name])
                call("POST", f"{router}/api/models/{b}/stop")
                client.delete(Keys().logs(b))  # this round's load line is then the only one
                call("POST", f"{router}/api/models/{a}/start")
                evict(weights[name][b])
                ttft = first_token(router, b)
                load = _load_time(client, b)
                results[name].append((ttft, load))
                print(f"round {r + 1} {name:8}: first token {ttft:6.2f}s, cold start {load:6.3f}s", file=sys.stderr)
        size = sum(p.stat().st_size for p in weights["cold"].values()) / len(weights["cold"]) / 2**20
        print(f"{opts.engine}, {size:.0f} MiB weights, residency {opts.residency:g}s, {opts.rounds} rounds (medians)")
        print(f"{'':10} {'first token':>12} {'cold start':>12}")
        for name in CONFIGS:
            print(f"{name:10} {statistics.median(t for t, _ in results[name]):11.2f}s "
                  f"{statistics.median(x for _, x in results[name]):11.3f}s")
        cold = statistics.median(x for _, x in results["cold"])
        warm = statistics.median(x for _, x in results["prefetch"])
        print(f"prefetch removes {100 * (1 - warm / cold):.0f}% of the cold start (goal: at least 50%)")
        if opts.json:
            Path(opts.json).write_text(json.dumps({
                "engine": opts.engine, "mib": round(size), "residency": opts.residency,
                "rounds": {n: [{"first_token": t, "cold_start": x} for t, x in rs] for n, rs in results.items()}}))
        return 0
    finally:
        procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)  # gigabytes of weight files


def _models(router: str) -> set[str]:
    try:
        return {m["id"] for m in call("GET", f"{router}/v1/models", timeout=5)["data"]}
    except OSError:
        return set()


def _load_time(client, model: str) -> float:
    """The cold start as the worker saw it: from its newest ``starting`` event to the
    ``running on`` after it, in the model's log stream."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        ready = None
        for _, fields in client.xrevrange(Keys().logs(model), count=200):
            entry = log_entry(fields)
            if entry.stream == "event" and entry.message.startswith("running on"):
                ready = ready or entry.timestamp
            elif entry.stream == "event" and entry.message.startswith("starting") and ready:
                return ready - entry.timestamp
        time.sleep(0.2)
    raise RuntimeError(f"no 'starting' and 'running on' events in the log of {model}")


if __name__ == "__main__":
    sys.exit(main())
