#!/usr/bin/env python3
"""The benchmark suite: the router measured side by side with direct calls to the same engine.

    ./dev.sh bench                 # full run (< 5 min): prints the table
    ./dev.sh bench --quick         # about 1 min
    ./dev.sh bench --smoke         # a few requests per section (the test suite runs this)
    ./dev.sh bench --json out.json # also write every raw figure
    ./dev.sh bench --compare http://127.0.0.1:4000 --engine-port 18001   # + another proxy

It starts everything it needs — a private redis-server, one worker whose models are mock
engines (``scripts/mock_engine.py``), two routers — measures, stops every process it started
(process groups; also on Ctrl-C or an error) and prints one table: metric, direct, router,
delta or ratio, target, verdict.

Method (docs/BENCHMARKS.md says more):

* **Side by side.** Every "router" figure has a "direct" twin measured in the same run
  against the *same engine process* (the instance URL the router itself publishes), so the
  delta holds on a noisy machine.
* **ABAB.** Each load is run in several short rounds, direct and router alternating (the order
  flips every round); a round is a warm-up followed by a measured window, on connections
  opened before the clock starts. Reported values are medians over rounds; deltas and ratios
  are medians of the *paired* per-round deltas / ratios.
* **A lean load generator.** A raw HTTP/1.1 keep-alive client on asyncio (uvloop) protocols:
  no per-request allocations beyond the response record, so the generator, which shares the
  machine's cores with the router and the engine, stays the cheapest process of the three.
  It runs in this process, never in the router's or the engine's.

Only what the project ships is needed (tornado, redis, msgspec, psutil; uvloop if present).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

import msgspec
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llm_router.http1 import ResponseParser  # noqa: E402
from llm_router.lifeline import processes_with_env  # noqa: E402
from llm_router.redis_server import RedisServer, free_port  # noqa: E402
from llm_router.redis_url import async_client  # noqa: E402
from llm_router.sse import SseParser  # noqa: E402

import bench_viewers  # noqa: E402  (scripts/, this file's directory)

MOCK_ENGINE = ROOT / "scripts" / "mock_engine.py"
SESSION_ENV = "LLM_ROUTER_BENCH_SESSION"
now = time.perf_counter

# The engines the bench's worker serves (model id -> mock engine arguments).
FAST = "bench-fast"  # unpaced: non-streamed load, TTFT, chunks/s
PACED = "bench-paced"  # 50 tokens/s: inter-chunk gaps
SLOW = "bench-slow"  # 5 tokens/s: 1,000 concurrent streams
LOGS = "bench-logs"  # access log on: print -> SSE delay
CHATTY = "bench-chatty"  # floods stdout: log pipeline throughput
PROP = "bench-prop"  # started / stopped: state propagation
PACED_RATE = 50.0
SLOW_RATE = 5.0


# =========================================================================== HTTP client

class Response:
    """One HTTP response as the client saw it, with the timing of every SSE frame."""

    __slots__ = ("keep_body", "on_frame", "status", "headers", "body", "nbytes", "frames", "times",
                 "token_times", "done_seen", "parser", "t_sent", "t_end")

    def __init__(self, sse: bool = False, keep_body: bool = False,
                 on_frame: Callable[[str, float], None] | None = None) -> None:
        self.keep_body = keep_body
        self.on_frame = on_frame
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = bytearray()
        self.nbytes = 0
        self.frames = 0
        self.times: list[float] = []  # arrival of each SSE frame
        self.token_times: list[float] = []  # arrival of each frame carrying generated text
        self.done_seen = False
        self.parser = SseParser() if sse else None
        self.t_sent = 0.0
        self.t_end = 0.0

    def feed(self, data: bytes, t: float) -> None:
        self.nbytes += len(data)
        if self.keep_body:
            self.body += data
        if self.parser is None:
            return
        for event in self.parser.feed(data):
            frame = event.data or ""
            self.frames += 1
            self.times.append(t)
            if '"content":"' in frame and '"content":""' not in frame or '"text":"' in frame:
                self.token_times.append(t)
            elif frame == "[DONE]":
                self.done_seen = True
            if self.on_frame is not None:
                self.on_frame(frame, t)

    @property
    def ttft(self) -> float:
        return (self.times[0] - self.t_sent) if self.times else float("nan")

    def json(self) -> Any:
        return json.loads(bytes(self.body))


class HttpConn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; one request at a time (no pipelining). Responses are
    read by the router's own parser (llm_router/http1.py)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = ResponseParser()
        self.resp: Response | None = None
        self.fut: asyncio.Future | None = None
        self.closed = False

    @classmethod
    async def open(cls, host: str, port: int) -> "HttpConn":
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(cls, host, port)
        return conn

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.resp is not None:
            if self.parser.closed():
                self._deliver(now())
            else:
                self._fail(ConnectionError(f"connection closed mid-response ({exc or 'eof'})"))

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True

    def request(self, raw: bytes, resp: Response) -> asyncio.Future:
        if self.closed:
            raise ConnectionError("connection is closed")
        self.resp = resp
        self.parser = ResponseParser(head_only=raw.startswith(b"HEAD "))
        self.fut = fut = asyncio.get_running_loop().create_future()
        resp.t_sent = now()
        self.transport.write(raw)  # type: ignore[union-attr]
        return fut

    def data_received(self, data: bytes) -> None:
        t = now()
        if self.resp is None:
            return  # bytes after a response we gave up on
        try:
            self.parser.feed(data)
        except Exception as exc:  # a malformed response: an error for this request
            self._fail(exc)
            self.close()
            return
        self._deliver(t)

    def _deliver(self, t: float) -> None:
        """Hand what the parser has to the response; finish it once complete."""
        resp, parser = self.resp, self.parser
        assert resp is not None
        if parser.status and not resp.status:
            resp.status = parser.status
            if resp.keep_body:
                resp.headers = dict(parser.headers)
        if parser.body:
            resp.feed(parser.take(), t)
        if parser.done:
            self._finish(t)

    def _fail(self, exc: Exception) -> None:
        fut, self.resp, self.fut = self.fut, None, None
        if fut is not None and not fut.done():
            fut.set_exception(exc)

    def _finish(self, t: float) -> None:
        resp, fut = self.resp, self.fut
        self.resp = self.fut = None
        assert resp is not None and fut is not None
        resp.t_end = t
        if self.parser.close_after:
            self.close()
        if not fut.done():
            fut.set_result(resp)


@dataclass
class Target:
    """Where a load goes: the engine itself, our router, or another proxy (--compare)."""

    name: str
    base: str  # http://host:port[/prefix]
    model: str
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        u = urlsplit(self.base)
        if u.scheme != "http":
            raise SystemExit(f"error: only http:// targets are supported, not {self.base!r}")
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or 80
        self.prefix = u.path.rstrip("/")
        if self.prefix.endswith("/v1"):
            self.prefix = self.prefix[:-3]

    def raw(self, method: str, path: str, body: bytes | None = None, model: str | None = None) -> bytes:
        extra = "".join(f"{k}: {v}\r\n" for k, v in self.headers.items())
        head = f"{method} {self.prefix}{path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n{extra}"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        elif method in ("POST", "PUT"):
            head += "Content-Length: 0\r\n"
        return (head + "\r\n").encode() + (body or b"")

    def chat(self, stream: bool, max_tokens: int, model: str | None = None) -> bytes:
        body = msgspec.json.encode({
            "model": model or self.model, "stream": stream, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": "Say something short."}],
        })
        return self.raw("POST", "/v1/chat/completions", body)

    async def connect(self) -> HttpConn:
        return await HttpConn.open(self.host, self.port)

    async def call(self, method: str, path: str, body: bytes | None = None, timeout: float = 30.0) -> Response:
        """One request on a fresh connection, body kept (control calls, not measured)."""
        conn = await self.connect()
        try:
            return await asyncio.wait_for(conn.request(self.raw(method, path, body), Response(keep_body=True)),
                                          timeout)
        finally:
            conn.close()


# =========================================================================== statistics

def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def median(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


@dataclass
class Run:
    """What one closed-loop run against one target measured."""

    target: str
    n: int = 0
    errors: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)  # s
    ttfts: list[float] = field(default_factory=list)  # s
    gaps: list[float] = field(default_factory=list)  # s, between token frames
    frames: int = 0
    cpu_us: float = float("nan")  # CPU of the watched process per answered request
    error_samples: list[str] = field(default_factory=list)

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(what)

    def summary(self) -> dict[str, float]:
        out = {"n": self.n, "errors": self.errors, "rps": self.n / self.seconds if self.seconds else 0.0,
               "p50_ms": pct(self.latencies, 0.5) * 1e3, "p99_ms": pct(self.latencies, 0.99) * 1e3}
        if self.ttfts:
            out.update(ttft_p50_ms=pct(self.ttfts, 0.5) * 1e3, ttft_p99_ms=pct(self.ttfts, 0.99) * 1e3)
        if self.gaps:
            out.update(gap_p50_ms=pct(self.gaps, 0.5) * 1e3, gap_p99_ms=pct(self.gaps, 0.99) * 1e3)
        if self.frames:  # every SSE frame that arrived within the window, whole streams or not
            out["chunks_per_s"] = self.frames / self.seconds if self.seconds else 0.0
        if self.cpu_us == self.cpu_us:
            out["cpu_us"] = self.cpu_us
        if self.error_samples:
            out["error_samples"] = self.error_samples
        return out


async def closed_loop(target: Target, raw: bytes, concurrency: int, duration: float, warmup: float,
                      sse: bool = False, cpu_pid: int = 0) -> Run:
    """``concurrency`` connections, each sending the next request as soon as the last is
    answered; only requests that start after the warm-up and end within the window count.

    With ``cpu_pid``, also the CPU time that process spent per answered request (warm-up
    included): a figure that, unlike wall-clock throughput, hardly moves on a busy machine."""
    run = Run(target.name)
    conns = await asyncio.gather(*(target.connect() for _ in range(concurrency)))
    answered = [0]
    cpu0 = cpu_seconds(cpu_pid)
    t0 = now()
    measure_from, end = t0 + warmup, t0 + warmup + duration

    async def client(conn: HttpConn) -> None:
        while True:
            start = now()
            if start >= end:
                break
            resp = Response(sse=sse)
            try:
                await conn.request(raw, resp)
            except Exception as exc:
                run.error(f"{type(exc).__name__}: {exc}")
                conn.close()
                if not (conn := await reconnect()):
                    return
                continue
            answered[0] += 1
            if sse:
                run.frames += sum(1 for t in resp.times if measure_from <= t <= end)
            if resp.status != 200 or (sse and not resp.done_seen):
                run.error(f"HTTP {resp.status}" + (" (stream without [DONE])" if resp.status == 200 else ""))
            elif start >= measure_from and resp.t_end <= end:
                run.n += 1
                run.latencies.append(resp.t_end - start)
                if sse:
                    run.ttfts.append(resp.ttft)
                    tt = resp.token_times
                    run.gaps.extend(b - a for a, b in zip(tt, tt[1:]))
            if conn.closed and not (conn := await reconnect()):
                return
        conn.close()

    async def reconnect() -> HttpConn | None:
        try:
            return await target.connect()
        except OSError as exc:
            run.error(f"connect: {exc}")
            await asyncio.sleep(0.1)
            return None

    tasks = [asyncio.ensure_future(client(c)) for c in conns]
    done, pending = await asyncio.wait(tasks, timeout=warmup + duration + 60)
    for t in pending:  # a hung request: an error, not a hung benchmark
        t.cancel()
        run.error("timeout (no answer within 60 s)")
    run.seconds = duration
    if cpu_pid and answered[0]:
        run.cpu_us = (cpu_seconds(cpu_pid) - cpu0) / answered[0] * 1e6
    return run


def cpu_seconds(pid: int) -> float:
    if not pid:
        return 0.0
    try:
        t = psutil.Process(pid).cpu_times()
        return t.user + t.system
    except psutil.Error:
        return float("nan")


async def ab_rounds(targets: list[Target], rounds: int, make: Callable[..., Any],
                    prime: float = 0.0) -> dict[str, list[dict]]:
    """Run ``make(target)`` for every target in each round; the order flips every round.

    First, unless ``prime`` is 0, one unmeasured ``make(target, prime)`` per target: the
    router's upstream pool fills and both sides settle (without it, the first c=256 round
    through the router ran at a quarter of the rate of the later ones)."""
    out: dict[str, list[dict]] = {t.name: [] for t in targets}
    primed: dict[str, int] = {}
    if prime:
        for t in targets:
            primed[t.name] = int((await make(t, prime))["errors"])
    for r in range(rounds):
        order = targets[r % len(targets):] + targets[:r % len(targets)] if r % 2 == 0 else list(reversed(targets))
        for t in order:
            out[t.name].append(await make(t))
    for name, errors in primed.items():  # errors while priming are errors too
        out[name][0]["errors"] += errors
        out[name][0]["priming_errors"] = errors
    return out


# =========================================================================== processes

class Procs:
    """Every process the bench starts: own process group, log file, stopped at the end."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.token = uuid.uuid4().hex
        os.environ[SESSION_ENV] = self.token  # inherited by children *and* their children
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "wb")
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                                start_new_session=True)
        log.close()
        self.procs.append((name, proc))
        return proc

    def tail(self, name: str, n: int = 30) -> str:
        path = self.log_dir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])

    def check_alive(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.tail(name)}")

    def stop_all(self, grace: float = 8.0) -> None:
        """SIGTERM (the worker stops its engines), then SIGKILL to each process group; Redis
        last, so the worker can still report while it stops."""
        last = [p for p in self.procs if p[0] == "redis"]
        for phase in ([p for p in self.procs if p[0] != "redis"], last):
            self._stop(phase, grace)
        # Engines live in process groups of their own: anything still carrying our token goes.
        for p in processes_with_env(SESSION_ENV, self.token):
            try:
                p.kill()
            except psutil.Error:
                pass

    @staticmethod
    def _stop(procs: list[tuple[str, subprocess.Popen]], grace: float) -> None:
        for name, proc in reversed(procs):
            if proc.poll() is None:
                try:  # SIGINT: a worker stops its engines (SIGTERM would leave them running)
                    proc.send_signal(signal.SIGINT if name == "worker" else signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace
        for _, proc in procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                proc.wait(2)
            except subprocess.TimeoutExpired:
                pass


def raise_fd_limit() -> int:
    """1,000 streams need ~3,000 descriptors in the router; children inherit the soft limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def rss_mb(pid: int) -> float:
    try:
        return psutil.Process(pid).memory_info().rss / 2**20
    except psutil.Error:
        return float("nan")


# =========================================================================== the cluster

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
        cli = [sys.executable, "-m", "llm_router.cli"]
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
            pin(self)

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


# =========================================================================== sections

@dataclass
class Row:
    section: str
    metric: str
    values: dict[str, float]  # target name -> value
    unit: str = ""
    delta: str = ""
    target: str = ""
    ok: bool | None = None
    errors: dict[str, int] = field(default_factory=dict)


class Bench:
    def __init__(self, opts: argparse.Namespace, cluster: Cluster) -> None:
        self.opts = opts
        self.cluster = cluster
        self.rows: list[Row] = []
        self.raw: dict[str, Any] = {}

    def targets(self, model: str, compare: bool = False) -> list[Target]:
        ts = [Target("direct", self.cluster.urls[model], model)]
        if self.cluster.routers:
            ts.append(Target("router", self.cluster.routers[0].base, model))
        if compare and self.opts.compare:
            headers = {"Authorization": f"Bearer {self.opts.compare_key}"} if self.opts.compare_key else {}
            ts.append(Target("compare", self.opts.compare, self.opts.compare_model or model, headers))
        return ts

    def cpu_pid(self, t: Target) -> int:
        """Whose CPU a run is charged to: the engine's when direct, router A's through it."""
        if t.name == "router":
            return self.cluster.router_pid
        if t.name == "direct":
            return self.cluster.pids.get(t.model, 0)
        return 0

    def say(self, msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    def paired(self, runs: dict[str, list[dict]], key: str, how: str) -> tuple[dict[str, float], float, float]:
        """Medians per target, and the median of the per-round router-vs-direct delta / ratio
        (and compare-vs-direct)."""
        med = {name: median([r.get(key, float("nan")) for r in rs]) for name, rs in runs.items()}
        if not how:
            return med, float("nan"), float("nan")
        out = []
        for other in ("router", "compare"):
            if other not in runs:
                out.append(float("nan"))
                continue
            pairs = zip(runs["direct"], runs[other])
            vals = [(o[key] - d[key]) if how == "delta" else (o[key] / d[key] if d[key] else float("nan"))
                    for d, o in pairs]
            out.append(median(vals))
        return med, out[0], out[1]

    def add(self, section: str, metric: str, runs: dict[str, list[dict]], key: str, how: str, unit: str,
            target: str = "", check: Callable[[float], bool] | None = None) -> None:
        med, d_router, d_compare = self.paired(runs, key, how)
        fmt = (lambda v: f"{v:+.3f} {unit}") if how == "delta" else (lambda v: f"x{v:.2f}")
        delta = " / ".join(fmt(v) for v in (d_router, d_compare) if v == v) if how else ""
        ok = check(d_router) if check and d_router == d_router else None
        errors = {name: sum(int(r["errors"]) for r in rs) for name, rs in runs.items()}
        self.rows.append(Row(section, metric, med, unit, delta, target, ok, errors))

    # --- non-streamed chat -------------------------------------------------------------

    async def chat(self) -> None:
        o = self.opts
        targets = self.targets(FAST, compare=True)
        for c in o.concurrency:
            self.say(f"chat completions, concurrency {c} ...")

            async def one(t: Target, prime: float = 0.0, c: int = c) -> dict:
                return (await closed_loop(t, t.chat(False, 16), c, prime or o.duration, o.warmup,
                                          cpu_pid=self.cpu_pid(t))).summary()

            runs = await ab_rounds(targets, o.rounds, one, o.prime * (3 if c >= 128 else 1))
            self.raw[f"chat_c{c}"] = runs
            sec = f"chat c={c}"
            self.add(sec, "requests/s", runs, "rps", "ratio", "req/s",
                     "router >= 0.5 x direct" if c == 32 else "", (lambda v: v >= 0.5) if c == 32 else None)
            self.add(sec, "latency p50", runs, "p50_ms", "delta", "ms",
                     "+< 0.3 ms" if c == 1 else "", (lambda v: v < 0.3) if c == 1 else None)
            self.add(sec, "latency p99", runs, "p99_ms", "delta", "ms")
            if c == 32:
                self.add(sec, "CPU/request: engine | router", runs, "cpu_us", "", "us")

    # --- streamed chat -----------------------------------------------------------------

    async def streams(self) -> None:
        o = self.opts
        self.say("streamed chat: time to first token (concurrency 1) ...")
        fast = self.targets(FAST, compare=True)

        async def ttft(t: Target, prime: float = 0.0) -> dict:
            return (await closed_loop(t, t.chat(True, 16), 1, prime or o.duration, o.warmup, sse=True)).summary()

        runs = await ab_rounds(fast, o.rounds, ttft, o.prime)
        self.raw["stream_ttft"] = runs
        self.add("stream", "TTFT p50 (c=1)", runs, "ttft_p50_ms", "delta", "ms", "+< 1 ms", lambda v: v < 1.0)
        self.add("stream", "TTFT p99 (c=1)", runs, "ttft_p99_ms", "delta", "ms")

        self.say(f"streamed chat: inter-chunk gap ({PACED_RATE:.0f} tokens/s, 16 streams of {o.gap_tokens} tokens) ...")

        async def gaps(t: Target, prime: float = 0.0) -> dict:
            return (await closed_loop(t, t.chat(True, o.gap_tokens), 16, prime or o.gap_duration, o.warmup,
                                      sse=True)).summary()

        runs = await ab_rounds(self.targets(PACED), o.rounds, gaps)
        self.raw["stream_gap"] = runs
        self.add("stream", f"chunk gap p50 @{PACED_RATE:.0f}/s", runs, "gap_p50_ms", "delta", "ms")
        self.add("stream", f"chunk gap p99 @{PACED_RATE:.0f}/s", runs, "gap_p99_ms", "delta", "ms")

        self.say("streamed chat: chunks/s (unpaced, 32 streams of 256 tokens) ...")

        async def chunks(t: Target, prime: float = 0.0) -> dict:
            return (await closed_loop(t, t.chat(True, 256), 32, prime or o.duration, o.warmup, sse=True)).summary()

        runs = await ab_rounds(fast, o.rounds, chunks, o.prime)
        self.raw["stream_chunks"] = runs
        self.add("stream", "chunks/s (c=32)", runs, "chunks_per_s", "ratio", "chunk/s")

    # --- 1,000 concurrent streams --------------------------------------------------------

    async def many_streams(self) -> None:
        o = self.opts
        n = o.streams
        sec = f"{n} streams"
        results: dict[str, list[dict]] = {}
        rss_base = rss_peak = float("nan")
        for t in self.targets(SLOW):
            self.say(f"{n} concurrent streams of {o.stream_tokens} tokens at {SLOW_RATE:g} tokens/s, {t.name} ...")
            sampler = None
            peak = [0.0]
            if t.name == "router":
                rss_base = rss_mb(self.cluster.router_pid)

                async def sample() -> None:
                    while True:
                        peak[0] = max(peak[0], rss_mb(self.cluster.router_pid))
                        await asyncio.sleep(0.05)

                sampler = asyncio.ensure_future(sample())
            res = await self.concurrent_streams(t, n, o.ramp)
            if sampler is not None:
                sampler.cancel()
                rss_peak = max(peak[0], rss_mb(self.cluster.router_pid))
            results[t.name] = [res]
            await asyncio.sleep(0.5)
        self.raw["many_streams"] = results
        errors = {k: int(v[0]["errors"]) for k, v in results.items()}
        self.rows.append(Row(sec, "errors", {k: float(v) for k, v in errors.items()}, "",
                             "", "0", sum(errors.values()) == 0, errors))
        self.rows.append(Row(sec, "max open at once", {k: v[0]["max_open"] for k, v in results.items()}, ""))
        self.add(sec, "client connect p99", results, "connect_p99_ms", "delta", "ms")
        self.add(sec, "TTFT p50", results, "ttft_p50_ms", "delta", "ms")
        self.add(sec, "TTFT p99", results, "ttft_p99_ms", "delta", "ms")
        if self.cluster.routers:
            self.rows.append(Row(sec, "router RSS idle", {"router": rss_base}, "MB"))
            self.rows.append(Row(sec, "router RSS peak", {"router": rss_peak}, "MB", f"{rss_peak - rss_base:+.1f} MB",
                                 "< 150 MB", rss_peak < 150))

    async def concurrent_streams(self, t: Target, n: int, ramp: float) -> dict:
        tokens = self.opts.stream_tokens
        raw = t.chat(True, tokens)
        run = Run(t.name)
        connects: list[float] = []
        open_now = [0, 0]

        async def one(i: int) -> None:
            await asyncio.sleep(ramp * i / n)
            t_connect = now()
            try:
                conn = await t.connect()
            except OSError as exc:
                run.error(f"connect: {exc}")
                return
            connects.append(now() - t_connect)
            open_now[0] += 1
            open_now[1] = max(open_now[1], open_now[0])
            resp = Response(sse=True)
            try:
                await conn.request(raw, resp)
                if resp.status != 200 or not resp.done_seen or resp.frames < tokens + 2:
                    run.error(f"HTTP {resp.status}, {resp.frames} frames, [DONE] {resp.done_seen}")
                else:
                    run.n += 1
                    run.ttfts.append(resp.ttft)
                    run.latencies.append(resp.t_end - resp.t_sent)
            except Exception as exc:
                run.error(f"{type(exc).__name__}: {exc}")
            finally:
                open_now[0] -= 1
                conn.close()

        tasks = [asyncio.ensure_future(one(i)) for i in range(n)]
        _, pending = await asyncio.wait(tasks, timeout=ramp + tokens / SLOW_RATE + 60)
        for p in pending:
            p.cancel()
            run.error("timeout")
        out = run.summary()
        out["max_open"] = open_now[1]
        out["connect_p50_ms"] = pct(connects, 0.5) * 1e3
        out["connect_p99_ms"] = pct(connects, 0.99) * 1e3
        out["connect_max_ms"] = max(connects, default=float("nan")) * 1e3
        out["error_samples"] = run.error_samples
        return out

    # --- log pipeline --------------------------------------------------------------------

    async def logs(self) -> None:
        if not self.cluster.routers:
            return
        o = self.opts
        self.say("log pipeline: delay from print to SSE client ...")
        delays, errors = await self.log_delay(o.log_probes)
        self.raw["log_delay_ms"] = delays
        self.rows.append(Row("logs", "print -> SSE p50", {"router": pct(delays, 0.5)}, "ms", errors={"router": errors}))
        self.rows.append(Row("logs", "print -> SSE p99", {"router": pct(delays, 0.99)}, "ms"))

        rds = async_client(self.cluster.redis.url)  # type: ignore[union-attr]
        key = f"llm:logs:{CHATTY}"
        try:
            self.say(f"log pipeline: throughput (an engine printing {o.log_rate:,} lines/s) ...")
            await self.cluster.start_model(CHATTY)
            await asyncio.sleep(o.warmup + 0.5)
            len0, t0 = await rds.xlen(key), now()
            await asyncio.sleep(o.log_window)
            len1, t1 = await rds.xlen(key), now()
            # how far behind the printing the shipping is: the worker stamps a line when it reads it
            newest = await rds.xrevrange(key, count=1)
            lag = (time.time() - float(newest[0][1][b"ts"])) * 1e3 if newest else float("nan")
            await self.cluster.stop_model(CHATTY)
            drained = await drain(rds, key)
        finally:
            await rds.aclose()
        pushed = (len1 - len0) / (t1 - t0)
        self.raw["log_throughput"] = {"pushed_per_s": pushed, "window_s": t1 - t0, "xlen": [len0, len1],
                                      "ship_lag_ms": lag, "drained_after_stop": drained}
        self.rows.append(Row("logs", "lines/s into Redis", {"router": pushed}, "line/s", "", ">= 50000",
                             pushed >= 50_000))
        # lines read but not yet shipped when the window closed: ~0 means the worker kept up with
        # the engine (so it can do more); a full buffer means this rate is the worker's ceiling
        self.rows.append(Row("logs", "backlog at window end", {"router": float(drained)}, "lines",
                             "saturated: ceiling" if drained > pushed * 0.1 else "kept up"))

    async def log_delay(self, probes: int) -> tuple[list[float], int]:
        """The engine prints an access-log line right after it writes a response; the delay is
        from the response reaching us to that line arriving on the router's log SSE."""
        token = uuid.uuid4().hex[:8]
        seen: dict[int, float] = {}
        marker = f"/bench-probe-{token}-"

        def on_frame(frame: str, t: float) -> None:
            i = frame.find(marker)
            if i >= 0:
                j = i + len(marker)
                k = j
                while k < len(frame) and frame[k].isdigit():
                    k += 1
                seen.setdefault(int(frame[j:k]), t)

        router = self.cluster.routers[-1]  # router B: the log path never touches router A
        sse = await router.connect()
        sse_resp = Response(sse=True, on_frame=on_frame)
        sse_fut = sse.request(router.raw("GET", f"/api/models/{LOGS}/logs/stream?tail=0"), sse_resp)
        sse_fut.add_done_callback(lambda f: f.exception() if not f.cancelled() else None)
        await asyncio.sleep(0.3)  # subscribed
        engine = Target("engine", self.cluster.urls[LOGS], LOGS)
        conn = await engine.connect()
        sent: dict[int, float] = {}
        errors = 0
        for i in range(probes):
            resp = await conn.request(engine.raw("GET", f"/bench-probe-{token}-{i}"), Response())
            sent[i] = resp.t_end
            await asyncio.sleep(0.02)
        deadline = now() + 3
        while len(seen) < probes and now() < deadline:
            await asyncio.sleep(0.02)
        conn.close()
        sse.close()
        if sse_resp.status != 200:
            errors += probes
        errors += sum(1 for i in sent if i not in seen)
        return [(seen[i] - sent[i]) * 1e3 for i in sent if i in seen], errors

    # --- state propagation ----------------------------------------------------------------

    async def propagation(self) -> None:
        if len(self.cluster.routers) < 2:
            return
        o = self.opts
        self.say(f"state propagation: {o.prop_cycles} start/stop cycles via router A, watched on router B ...")
        a, b = self.cluster.routers
        rds = async_client(self.cluster.redis.url)  # type: ignore[union-attr]
        pubsub = rds.pubsub()
        await pubsub.subscribe("llm:events")
        events: list[tuple[float, dict]] = []  # (wall time received, instance)
        seen_b: list[tuple[float, str]] = []  # (wall time, status) on every change seen on B
        stop = asyncio.Event()

        async def listen() -> None:
            async for msg in pubsub.listen():
                if msg.get("type") == "message":
                    ev = json.loads(msg["data"])
                    inst = ev.get("instance") or {}
                    if inst.get("model") == PROP:
                        events.append((time.time(), inst))

        async def poll_b() -> None:
            conn = await b.connect()
            raw = b.raw("GET", "/v1/models")
            last = None
            polls = 0
            while not stop.is_set():
                resp = await conn.request(raw, Response(keep_body=True))
                polls += 1
                t = time.time()
                card = next((m for m in resp.json().get("data", []) if m["id"] == PROP), {})
                status = card.get("status")
                if status != last:
                    seen_b.append((t, status))
                    last = status
                if conn.closed:
                    conn = await b.connect()
            conn.close()
            self.raw["propagation_polls"] = polls

        listener = asyncio.ensure_future(listen())
        poller = asyncio.ensure_future(poll_b())
        errors = 0
        try:
            await asyncio.sleep(0.2)
            for _ in range(o.prop_cycles):
                for action, state in (("start", "running"), ("stop", "stopped")):
                    resp = await a.call("POST", f"/api/models/{PROP}/{action}", timeout=60)
                    if resp.status != 200:
                        errors += 1
                    deadline = now() + 10
                    while not (seen_b and seen_b[-1][1] == state) and now() < deadline:
                        await asyncio.sleep(0.005)
                    if not (seen_b and seen_b[-1][1] == state):
                        errors += 1
                    await asyncio.sleep(0.1)
        finally:
            stop.set()
            await asyncio.wait([poller], timeout=5)
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)
            await pubsub.aclose()
            await rds.aclose()
        # For each state change the worker wrote (``updated_at`` is its wall clock, on this
        # machine), when did router B first show the model in that state?
        write_to_b, event_to_b = [], []
        for t_event, inst in events:
            state, written = inst.get("state"), float(inst.get("updated_at") or 0)
            if state not in ("running", "stopped") or not written:
                continue
            vis = next((t for t, s in seen_b if s == state and t >= written - 0.001), None)
            if vis is not None:
                write_to_b.append((vis - written) * 1e3)
                event_to_b.append((vis - t_event) * 1e3)
        self.raw["propagation_ms"] = {"write_to_b": write_to_b, "event_to_b": event_to_b}
        self.rows.append(Row("propagation", "worker write -> B p50", {"router": pct(write_to_b, 0.5)}, "ms",
                             errors={"router": errors}))
        self.rows.append(Row("propagation", "worker write -> B p99", {"router": pct(write_to_b, 0.99)}, "ms",
                             f"n={len(write_to_b)}"))


    # --- profile ---------------------------------------------------------------------------

    async def profile(self, out: str, seconds: float) -> None:
        """py-spy samples router A while it serves the concurrency-32 chat load."""
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(spy).exists():
            raise RuntimeError("--profile needs py-spy: pip install py-spy")
        fmt = {".svg": "flamegraph", ".json": "speedscope"}.get(Path(out).suffix, "raw")
        self.say(f"profiling router A (pid {self.cluster.router_pid}) under chat c=32 for {seconds:g}s -> {out}")
        router = self.targets(FAST)[-1]
        load = asyncio.ensure_future(closed_loop(router, router.chat(False, 16), 32, seconds + 1.0, 0.5))
        await asyncio.sleep(0.5)
        proc = await asyncio.create_subprocess_exec(
            spy, "record", "--pid", str(self.cluster.router_pid), "--duration", str(int(seconds)), "--rate", "200",
            "--format", fmt, "--output", out, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        _, err = await proc.communicate()
        run = await load
        if proc.returncode != 0:
            raise RuntimeError(f"py-spy failed: {err.decode(errors='replace')[-500:]}")
        self.raw["profile"] = {"file": out, "format": fmt, "load": run.summary()}


async def drain(rds: Any, key: str, timeout: float = 15.0) -> int:
    """Wait until the worker has shipped what it had queued (the stream stops growing)."""
    start = last = await rds.xlen(key)
    deadline = now() + timeout
    while now() < deadline:
        await asyncio.sleep(0.3)
        n = await rds.xlen(key)
        if n == last:
            break
        last = n
    return last - start


# =========================================================================== report

def fmt_value(v: float | None, unit: str) -> str:
    if v is None or v != v:
        return "-"
    if unit == "us":
        return f"{v:,.0f}"
    if unit in ("ms",):
        return f"{v:.3f}" if v < 10 else f"{v:.1f}"
    if unit == "MB":
        return f"{v:.1f}"
    return f"{v:,.0f}"


def table(rows: list[Row], columns: list[str]) -> str:
    head = ["section", "metric", "unit", *columns, "delta / ratio", "target", "ok", "errors"]
    body = []
    for r in rows:
        verdict = "" if r.ok is None else ("PASS" if r.ok else "FAIL")
        errs = "/".join(str(r.errors.get(c, "-")) for c in columns) if r.errors else ""
        body.append([r.section, r.metric, r.unit, *(fmt_value(r.values.get(c), r.unit) for c in columns),
                     r.delta, r.target, verdict, errs])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    right = {3 + i for i in range(len(columns))}

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [line(head), line(["-" * w for w in widths])]
    last = None
    for cells in body:
        if last is not None and cells[0] != last:
            out.append("")
        last = cells[0]
        out.append(line(cells))
    return "\n".join(out)


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "platform": platform.platform(),
            "loop": "uvloop" if _has_uvloop() else "asyncio"}


def _has_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


# =========================================================================== main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="llm-router benchmarks: router vs direct calls to the same engine.")
    p.add_argument("--quick", action="store_true", help="shorter rounds (about 1 minute)")
    p.add_argument("--smoke", action="store_true", help="a few requests per section (a test, not a measure)")
    p.add_argument("--json", metavar="FILE", help="also write the table and every raw figure as JSON")
    p.add_argument("--compare", metavar="URL",
                   help="also load another OpenAI proxy pointed at the bench's fast engine (see --engine-port)")
    p.add_argument("--compare-model", metavar="NAME", help=f"model name the --compare proxy expects (default {FAST})")
    p.add_argument("--compare-key", metavar="KEY", help="Bearer key for the --compare proxy")
    p.add_argument("--engine-port", type=int, default=0, metavar="PORT",
                   help="port of the fast mock engine, so a --compare proxy can be configured for it")
    p.add_argument("--only", metavar="SECTIONS", default="chat,stream,streams,logs,propagation,viewers",
                   help="comma-separated subset of: chat,stream,streams,logs,propagation,viewers")
    p.add_argument("--rounds", type=int, help="ABAB rounds per load")
    p.add_argument("--duration", type=float, help="measured seconds per round")
    p.add_argument("--concurrency", default="1,32,256", help="non-streamed concurrency levels")
    p.add_argument("--streams", type=int, help="concurrent streams in the many-streams test (default 1000)")
    p.add_argument("--log-rate", type=int, default=100_000, help="lines/s the chatty engine prints")
    p.add_argument("--viewers", type=int, help="concurrent log viewers in the viewers section (default 5000)")
    p.add_argument("--profile", metavar="FILE",
                   help="after the sections, py-spy router A under the chat c=32 load (.svg flame graph, "
                        ".json speedscope, else py-spy's raw collapsed stacks); use --only '' to profile alone")
    p.add_argument("--profile-seconds", type=float, default=15.0, metavar="S")
    p.add_argument("--pin", action="store_true",
                   help="pin the load generator to CPU 0 and every other process to the other CPUs")
    p.add_argument("--no-aof", action="store_true", help="run Redis without its append-only file")
    p.add_argument("--direct-only", action="store_true",
                   help="no Redis, worker or router: engines started directly (a self-check of the harness)")
    p.add_argument("--keep-logs", action="store_true", help="keep the processes' logs (printed path)")
    opts = p.parse_args(argv)
    opts.concurrency = [int(c) for c in opts.concurrency.split(",") if c]
    opts.only = set(opts.only.split(",")) - {""}
    if opts.smoke:
        preset = dict(rounds=1, duration=0.25, warmup=0.05, prime=0.1, streams=50, stream_tokens=2, gap_tokens=5,
                      gap_duration=0.3, ramp=0.2, prop_cycles=1, log_window=0.5, log_probes=5,
                      viewers=50, viewer_samples=20, viewer_starts=1)
    elif opts.quick:
        preset = dict(rounds=2, duration=1.0, warmup=0.2, prime=0.5, streams=1000, stream_tokens=15, gap_tokens=25,
                      gap_duration=1.0, ramp=1.0, prop_cycles=4, log_window=2.0, log_probes=30,
                      viewers=5000, viewer_samples=200, viewer_starts=2)
    else:
        preset = dict(rounds=4, duration=2.0, warmup=0.3, prime=0.5, streams=1000, stream_tokens=15, gap_tokens=25,
                      gap_duration=2.0, ramp=1.0, prop_cycles=10, log_window=3.0, log_probes=100,
                      viewers=5000, viewer_samples=300, viewer_starts=3)
    for k, v in preset.items():
        if getattr(opts, k, None) is None:
            setattr(opts, k, v)
    return opts


def pin(cluster: Cluster) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return
    os.sched_setaffinity(0, {cpus[0]})
    others = set(cpus[1:])
    for _, proc in cluster.procs.procs:
        try:
            for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
                p.cpu_affinity(sorted(others))
        except psutil.Error:
            pass


async def amain(opts: argparse.Namespace, procs: Procs, work: Path) -> dict[str, Any]:
    loop, task = asyncio.get_running_loop(), asyncio.current_task()
    for sig in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C: cancel everything, then tear down
        loop.add_signal_handler(sig, task.cancel)  # type: ignore[union-attr]
    cluster = Cluster(opts, procs, work)
    t_setup = now()
    await cluster.start()
    print(f"# set up in {now() - t_setup:.1f}s; fast engine at {cluster.urls[FAST]}"
          + (f", router A {cluster.routers[0].base} (pid {cluster.router_pids[0]}), router B "
             f"{cluster.routers[1].base} (pid {cluster.router_pids[1]})" if cluster.routers else ""),
          file=sys.stderr, flush=True)
    if opts.pin:
        pin(cluster)
    bench = Bench(opts, cluster)
    t0 = now()
    if "chat" in opts.only:
        await bench.chat()
    if "stream" in opts.only:
        await bench.streams()
    if "streams" in opts.only:
        await bench.many_streams()
    if "logs" in opts.only:
        await bench.logs()
    if "propagation" in opts.only:
        await bench.propagation()
    if "viewers" in opts.only:
        await bench_viewers.run(bench, sys.modules[__name__])  # scripts/bench_viewers.py
    if opts.profile:
        await bench.profile(opts.profile, opts.profile_seconds)
    procs.check_alive()
    columns = ["direct", *(["router"] if cluster.routers else []), *(["compare"] if opts.compare else [])]
    return {"rows": bench.rows, "raw": bench.raw, "columns": columns, "seconds": now() - t0}


def _interrupted(*_: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    fds = raise_fd_limit()
    work = Path(tempfile.mkdtemp(prefix="llm-router-bench-"))
    procs = Procs(work)
    signal.signal(signal.SIGTERM, _interrupted)
    signal.signal(signal.SIGINT, _interrupted)  # also where SIGINT was inherited as ignored
    started = time.time()
    ok = False
    try:
        try:
            import uvloop

            result = uvloop.run(amain(opts, procs, work))
        except ImportError:
            result = asyncio.run(amain(opts, procs, work))
        ok = True
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted: stopping everything", file=sys.stderr)
        return 130
    except Exception as exc:
        print(f"benchmark failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        for name, _ in procs.procs:
            tail = procs.tail(name, 15)
            if tail:
                print(f"--- {name} (last lines) ---\n{tail}", file=sys.stderr)
        return 1
    finally:
        procs.stop_all()
        if opts.keep_logs or not ok:
            print(f"process logs: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    info = machine()
    mode = "smoke" if opts.smoke else "quick" if opts.quick else "full"
    print(f"\nllm-router benchmark ({mode}: {opts.rounds} rounds x {opts.duration:g}s, ABAB; "
          f"{info['cpus']} CPUs {info['cpu']}; Python {info['python']}; fd limit {fds}"
          + ("; pinned" if opts.pin else "") + ")")
    print(table(result["rows"], result["columns"]))
    failed = [r for r in result["rows"] if r.ok is False]
    total_errors = sum(sum(r.errors.values()) for r in result["rows"])
    print(f"\n{len(failed)} target(s) missed; {total_errors} error(s); measured in {result['seconds']:.0f}s, "
          f"{time.time() - started:.0f}s in all")
    if opts.json:
        Path(opts.json).write_text(json.dumps({
            "machine": info, "options": {k: (sorted(v) if isinstance(v, set) else v) for k, v in vars(opts).items()},
            "columns": result["columns"], "rows": [dataclasses.asdict(r) for r in result["rows"]],
            "errors": total_errors, "raw": result["raw"],
        }, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
