"""The system under test, started for the run: a private Redis, one worker whose models are
mock engines (``scripts/mock_engine.py``, one per kind of load), routers A and B."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from llm_lab_router.redis_server import RedisServer, free_port

from .client import Target
from .procs import ROOT, Procs, pin

MOCK_ENGINE = ROOT / "scripts" / "mock_engine.py"

# The engines the bench's worker serves (model id -> mock engine arguments).
FAST = "bench-fast"  # unpaced: non-streamed load, TTFT, chunks/s
PACED = "bench-paced"  # 50 tokens/s: inter-chunk gaps
SLOW = "bench-slow"  # 5 tokens/s: 1,000 concurrent streams
LOGS = "bench-logs"  # access log on: print -> SSE delay
CHATTY = "bench-chatty"  # floods stdout: log pipeline throughput
PROP = "bench-prop"  # started / stopped: state propagation
PACED_RATE = 50.0
SLOW_RATE = 5.0


def engine_args(model: str, opts: argparse.Namespace) -> list[str]:
    args = {
        FAST: ["--max-tokens", "16"],
        PACED: ["--tokens-per-second", str(PACED_RATE), "--max-tokens", "25"],
        SLOW: ["--tokens-per-second", str(SLOW_RATE), "--max-tokens", "15"],
        LOGS: [],
        CHATTY: ["--chatty", str(opts.log_rate)],
        PROP: [],
    }[model]
    return args if model == LOGS else [*args, "--quiet"]


class Cluster:
    """Redis, one worker (the engines are its models), routers A and B — or, with
    ``--direct-only``, just the engines (a self-check of the harness without a router)."""

    def __init__(self, opts: argparse.Namespace, procs: Procs, work: Path) -> None:
        self.opts = opts
        self.procs = procs
        self.work = work
        self.redis: RedisServer | None = None
        self.routers: list[Target] = []
        self.router_pids: list[int] = []
        self.urls: dict[str, str] = {}  # model -> engine URL (the "direct" side)
        self.pids: dict[str, int] = {}  # model -> engine pid
        self.ports = {m: free_port() for m in (FAST, PACED, SLOW, LOGS, CHATTY, PROP)}
        # unique: a worker reaps processes left by an earlier worker of the same id
        self.worker_id = f"bench-{procs.token[:8]}"
        if opts.engine_port:
            self.ports[FAST] = opts.engine_port

    def engine_argv(self, model: str, port: str) -> list[str]:
        return [sys.executable, str(MOCK_ENGINE), "--port", port, "--model", model, *engine_args(model, self.opts)]

    def config(self) -> str:
        # log_maxlen: the throughput test counts lines with XLEN, so the stream must not be trimmed
        lines = ["[worker]", f'id = "{self.worker_id}"', "log_maxlen = 5000000", ""]
        for model, port in self.ports.items():
            argv = self.engine_argv(model, "{port}")
            argv[0] = "{python}"
            lines += ["[[models]]", f"id = {json.dumps(model)}", f"port = {port}",
                      f"command = {json.dumps(argv)}", "startup_timeout = 30", "stop_grace = 3",
                      'restart = "no"', ""]
        return "\n".join(lines)

    async def start(self) -> None:
        if self.opts.direct_only:
            for model in (FAST, PACED, SLOW, LOGS, PROP):
                port = str(self.ports[model])
                self.pids[model] = self.procs.start(f"engine-{model}", self.engine_argv(model, port)).pid
                self.urls[model] = f"http://127.0.0.1:{port}"
            for model in self.urls:
                await wait_http(Target("engine", self.urls[model], model), "/health", 15, self.procs)
            return
        self.redis = RedisServer(self.work / "redis", extra=["--appendonly", "no"] if self.opts.no_aof else None)
        self.redis.start()
        # the private redis-server is a Procs member too, so it is stopped with everything else
        self.procs.procs.insert(0, ("redis", self.redis.proc))  # type: ignore[arg-type]
        cfg = self.work / "models.toml"
        cfg.write_text(self.config())
        cli = [sys.executable, "-m", "llm_lab_router.cli"]
        self.procs.start("worker", [*cli, "worker", "--config", str(cfg), "--redis", self.redis.url,
                                    "--worker-id", self.worker_id], env={"LLM_ROUTER_STATE_DIR": str(self.work / "state")})
        for name in ("router-a", "router-b"):
            port = free_port()
            proc = self.procs.start(name, [*cli, "serve", "--redis", self.redis.url, "--port", str(port)])
            self.routers.append(Target(name, f"http://127.0.0.1:{port}", FAST))
            self.router_pids.append(proc.pid)
        for r in self.routers:
            await wait_http(r, "/health", 30, self.procs)
        a = self.routers[0]
        deadline = time.monotonic() + 30
        while True:  # the worker has published its catalog
            models = await list_models(a)
            if all(m in models for m in self.ports):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the worker's models did not appear on the router: {sorted(models)}\n"
                                   + self.procs.tail("worker"))
            self.procs.check_alive()
            await asyncio.sleep(0.1)
        await asyncio.gather(*(self.start_model(m) for m in (FAST, PACED, SLOW, LOGS)))

    async def start_model(self, model: str) -> None:
        resp = await self.routers[0].call("POST", f"/api/models/{model}/start", timeout=60)
        if resp.status != 200:
            raise RuntimeError(f"starting {model} via the router: HTTP {resp.status} {bytes(resp.body)[:500]!r}")
        card = (await list_models(self.routers[0]))[model]
        urls = [i["url"] for i in card.get("instances", []) if i.get("state") == "running"]
        if not urls:
            raise RuntimeError(f"{model} started but no running instance is listed: {card}")
        self.urls[model] = urls[0]
        info = await self.routers[0].call("GET", f"/api/models/{model}/info")
        if info.status == 200:
            self.pids[model] = next((int(i.get("pid") or 0) for i in info.json().get("model", {}).get("instances", [])
                                     if i.get("url") == urls[0]), 0)
        if self.opts.pin:
            pin(self.procs)

    async def stop_model(self, model: str) -> None:
        await self.routers[0].call("POST", f"/api/models/{model}/stop", timeout=60)

    @property
    def router_pid(self) -> int:
        return self.router_pids[0]


async def wait_http(target: Target, path: str, timeout: float, procs: Procs) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if (await target.call("GET", path, timeout=2)).status == 200:
                return
        except (OSError, asyncio.TimeoutError):
            pass
        procs.check_alive()
        if time.monotonic() > deadline:
            raise RuntimeError(f"{target.base}{path} did not answer 200 within {timeout}s")
        await asyncio.sleep(0.05)


async def list_models(router: Target) -> dict[str, dict]:
    resp = await router.call("GET", "/v1/models")
    if resp.status != 200:
        return {}
    return {m["id"]: m for m in resp.json().get("data", [])}
