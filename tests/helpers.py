"""Helpers for the router suites: real router/worker processes, fake worker state, HTTP and SSE.

- ``start_router`` / ``start_worker``: ``llm-router serve`` / ``worker`` as real processes
  (through the ``procs`` fixture, so teardown stops them), returned once they answer.
- ``model_block`` / ``write_config``: a host config whose models run ``scripts/mock_engine.py``.
- ``FakeWorker``: writes a worker's lease, catalog and instances straight into Redis (as the
  worker would, per ``protocol.py``), so proxy and log tests need no worker process: only a
  router and the mock engines they point at.
- ``request`` (one HTTP request), ``SseStream`` (an open event stream, read event by event).
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from http.client import HTTPConnection, HTTPMessage
from pathlib import Path
from typing import Any, Callable, Iterable
from urllib.parse import urlsplit

import redis as redis_sync
from conftest import MOCK_ENGINE, Processes, role_url, wait_for
from llm_lab_router.protocol import CatalogEntry, Event, Instance, Keys, WorkerInfo, to_hash, to_json
from llm_lab_router.redis_server import free_port
from llm_lab_router.sse import SseEvent, SseParser

ROUTER_ENV = {"LLM_ROUTER_RESYNC_INTERVAL": "0.5"}


# --------------------------------------------------------------------------- HTTP


@dataclass
class Response:
    status: int
    headers: HTTPMessage
    body: bytes
    seconds: float = 0.0

    def json(self) -> Any:
        return json.loads(self.body)


def request(method: str, url: str, body: Any = None, *, headers: dict[str, str] | None = None,
         timeout: float = 15) -> Response:
    """One request; ``body`` may be bytes or anything JSON-encodable. Never raises for a status."""
    parts = urlsplit(url)
    conn = HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    started = time.monotonic()
    try:
        conn.request(method, parts.path + (f"?{parts.query}" if parts.query else ""), body=data, headers=hdrs)
        resp = conn.getresponse()
        return Response(resp.status, resp.headers, resp.read(), time.monotonic() - started)
    finally:
        conn.close()


def get_json(url: str) -> Any:
    resp = request("GET", url)
    assert resp.status == 200, (resp.status, resp.body)
    return resp.json()


class SseStream:
    """An open streaming response, read line by line (SSE events or raw chunks)."""

    def __init__(self, url: str, *, method: str = "GET", body: Any = None, headers: dict[str, str] | None = None,
                 timeout: float = 15, recv_buffer: int = 0) -> None:
        parts = urlsplit(url)
        self.conn = HTTPConnection(parts.hostname, parts.port, timeout=timeout)
        if recv_buffer:  # a small receive window (set before connecting): a slow reader's socket fills fast
            self.conn.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, recv_buffer)
            self.conn.sock.settimeout(timeout)
            self.conn.sock.connect((parts.hostname, parts.port))
        data = None if body is None else json.dumps(body).encode()
        self.conn.request(method, parts.path + (f"?{parts.query}" if parts.query else ""), body=data,
                          headers={"Content-Type": "application/json", **(headers or {})})
        self.resp = self.conn.getresponse()
        self.status = self.resp.status
        self.headers = self.resp.headers
        self._parser = SseParser()
        self._ready: list[SseEvent] = []

    def event(self) -> dict[str, Any]:
        """The next event: ``{"id", "data" (decoded JSON or raw text), "comment"}`` (the keys the
        block had; a comment-only block is an event too); ``{}`` at the end."""
        while not self._ready:
            line = self.resp.readline()
            if not line:
                return {}
            self._ready.extend(self._parser.feed(line))
        ev = self._ready.pop(0)
        event: dict[str, Any] = {}
        if ev.comment is not None:
            event["comment"] = ev.comment
        if ev.id is not None:
            event["id"] = ev.id
        if ev.data is not None:
            try:
                event["data"] = ev.json()
            except ValueError:
                event["data"] = ev.data
        return event

    def events_until(self, predicate, limit: int = 10000) -> list[dict[str, Any]]:
        """Read events until one satisfies ``predicate`` (included) or the stream ends."""
        got = []
        for _ in range(limit):
            ev = self.event()
            if not ev:
                break
            got.append(ev)
            if predicate(ev):
                break
        return got

    def close(self) -> None:
        """Drop the connection, as a client that goes away does."""
        self.resp.close()
        self.conn.close()


# --------------------------------------------------------------------------- processes


@dataclass
class Router:
    url: str
    proc: subprocess.Popen


def process_url(redis_url: str, role: str, prefix: str | None = None, wid: str = "") -> str:
    """The URL a ``role`` process gets: its ACL user's (a worker's: ``wid``'s own), unless it runs
    under another key ``prefix``, which the shipped users (``~llm:...``, ``&llm:...``) do not
    cover, by design: a deployment with its own prefix writes its own patterns; the test keeps
    the admin's URL."""
    return redis_url if prefix else role_url(redis_url, role, wid)


def start_router(procs: Processes, redis_url: str, *, env: dict[str, str] | None = None,
                 prefix: str | None = None, timeout: float = 20, host: str = "127.0.0.1",
                 wrap: Callable[[list[str]], list[str]] = list, args: Iterable[str] = ()) -> Router:
    """``llm-router serve`` on a free port of ``host``; returns once ``/health`` answers.
    ``wrap`` turns the argv into the one to run (e.g. inside a network namespace); ``args``: more
    options (``redis_url`` ``""``: no ``--redis``, e.g. with ``--redis-url-file`` in ``args``)."""
    port = free_port()  # in a namespace the port is surely free too: nothing else binds there
    redis = ["--redis", process_url(redis_url, "router", prefix)] if redis_url else []
    argv = [sys.executable, "-m", "llm_lab_router.cli", "serve", *redis, "--port", str(port), *args]
    if host != "127.0.0.1":
        argv += ["--host", host]
    if prefix:
        argv += ["--prefix", prefix]
    reader = {"LLM_ROUTER_REDIS_READ_URL": process_url(redis_url, "reader", prefix)}  # the cluster view's user
    proc = procs.start(wrap(argv), name="router", env={**ROUTER_ENV, **reader, **(env or {})})
    url = f"http://{host}:{port}"

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"router exited with {proc.returncode}:\n{procs.log(proc)}")
        try:
            return request("GET", f"{url}/health", timeout=1).status == 200
        except OSError:
            return False

    wait_for(up, timeout=timeout, interval=0.05, message="the router to answer /health")
    return Router(url, proc)


def start_worker(procs: Processes, redis_url: str, config: Path, wid: str,
                 prefix: str | None = None, wrap: Callable[[list[str]], list[str]] = list,
                 env: dict[str, str] | None = None) -> subprocess.Popen:
    argv = [sys.executable, "-m", "llm_lab_router.cli", "worker", "--config", str(config),
            "--redis", process_url(redis_url, "worker", prefix, wid), "--worker-id", wid]
    if prefix:
        argv += ["--prefix", prefix]
    return procs.start(wrap(argv), name=f"worker-{wid}", env=env, stop_signal=signal.SIGINT)


def wait_models(router: Router, count: int, timeout: float = 20) -> list[dict]:
    """Wait until the router lists ``count`` models (the worker has published its catalog)."""
    return wait_for(lambda: (d := get_json(f"{router.url}/v1/models")["data"]) and len(d) >= count and d,
                    timeout=timeout, interval=0.05, message=f"{count} models listed")  # type: ignore[return-value]


def wait_status(router: Router, alias: str, status: str, timeout: float = 20) -> dict:
    def check():
        resp = request("GET", f"{router.url}/api/models/{alias}/info")
        return resp.status == 200 and resp.json()["model"]["status"] == status and resp.json()["model"]
    return wait_for(check, timeout=timeout, interval=0.05, message=f"{alias} {status}")  # type: ignore[return-value]


def toml_value(value: Any) -> str:
    return json.dumps(value)  # JSON strings, numbers, booleans and arrays are valid TOML


def model_block(model_id: str, *, aliases: Iterable[str] = (), mode: str = "chat",
                engine_args: Iterable[str] = (), command: list[str] | None = None, **settings: Any) -> str:
    """One ``[[models]]`` entry running the mock engine (extra flags in ``engine_args``), or
    ``command``."""
    command = command or ["{python}", str(MOCK_ENGINE), "--port", "{port}", "--host", "{host}", "--model", "{id}",
                          "--quiet", *engine_args]
    lines = ["[[models]]", f"id = {toml_value(model_id)}", f"aliases = {toml_value(list(aliases))}",
             f"mode = {toml_value(mode)}", f"command = {toml_value(command)}", "startup_timeout = 20.0",
             "stop_grace = 3.0"]
    lines += [f"{k} = {toml_value(v)}" for k, v in settings.items()]
    return "\n".join(lines) + "\n"


def write_config(path: Path, *models: str, **worker: Any) -> Path:
    """A host config with fast heartbeats and a private port range."""
    low = free_port()
    settings = {"heartbeat_interval": 0.2, "lease_ttl": 2.0, "devices_interval": 0.5,
                "port_range": [low, min(low + 40, 65535)], **worker}
    text = "[worker]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in settings.items()) + "\n"
    path.write_text(text + "\n".join(models))
    return path


DEMO_MODELS = (
    model_block("demo-chat", aliases=["gpt-3.5-turbo", "chatgpt"], engine_args=["--tokens-per-second", "200"]),
    model_block("demo-embed", aliases=["text-embedding-ada-002"], mode="embedding"),
)


# --------------------------------------------------------------------------- fake worker state


@dataclass
class FakeWorker:
    """A worker's keys written by the test, exactly as ``protocol.py`` lays them out."""

    rds: redis_sync.Redis
    wid: str = "fake"
    prefix: str = "llm:"
    keys: Keys = field(init=False)

    def __post_init__(self) -> None:
        self.keys = Keys(self.prefix)
        self.seq = itertools.count(1)  # as a worker counts its writes of an instance (routers order by it)

    def publish(self, *models: CatalogEntry, instances: Iterable[Instance] = ()) -> None:
        now = time.time()
        lease = WorkerInfo(id=self.wid, host="testhost", pid=os.getpid(), version="test", started_at=now,
                           heartbeat_at=now)
        self.rds.hset(self.keys.worker(self.wid), mapping=to_hash(lease))
        self.rds.sadd(self.keys.workers(), self.wid)
        if models:
            self.rds.hset(self.keys.catalog(self.wid), mapping={m.id: to_json(m) for m in models})
        for inst in instances:
            self.rds.hset(self.keys.instance(inst.model, self.wid), mapping=to_hash(inst))
        self.rds.publish(self.keys.events(self.wid), to_json(Event(kind="catalog", worker=self.wid)))

    def instance(self, model: str, state: str = "running", url: str = "", **fields: Any) -> Instance:
        """Write one instance hash and announce it on ``llm:events:{wid}`` (as the worker does)."""
        inst = Instance(model=model, worker=self.wid, state=state, url=url,  # type: ignore[arg-type]
                        updated_at=time.time(), **{"seq": next(self.seq), **fields})
        self.rds.hset(self.keys.instance(model, self.wid), mapping=to_hash(inst))
        self.rds.publish(self.keys.events(self.wid), to_json(Event(kind="instance", worker=self.wid, instance=inst)))
        return inst

    def leave(self) -> None:
        """The lease expires (a worker killed without goodbye): no event, only the key goes."""
        self.rds.delete(self.keys.worker(self.wid))


def wait_routable(router: Router, model: str, timeout: float = 10) -> None:
    """Wait until the router's view shows ``model`` running."""
    wait_for(lambda: any(m["id"] == model and m["status"] == "running"
                         for m in get_json(f"{router.url}/v1/models")["data"]),
             timeout=timeout, interval=0.02, message=f"{model} routable")


def engine_stats(base_url: str) -> dict[str, int]:
    return get_json(f"{base_url}/debug/stats")


def wait_engine(base_url: str, timeout: float = 15) -> None:
    def up() -> bool:
        try:
            return request("GET", f"{base_url}/health", timeout=1).status == 200
        except OSError:
            return False
    wait_for(up, timeout=timeout, interval=0.05, message=f"engine at {base_url}")


def chat_body(model: str, *, stream: bool = False, max_tokens: int | None = None, **extra: Any) -> dict:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream,
                            **extra}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return body


# --------------------------------------------------------------------------- a whole stack

# Worker ids are per host: a concurrent suite's worker "w1" on this machine would refuse ours
# or reap our engines as its orphans (worker/orphans.py), so each session has its own id.
STACK_WORKER = f"w{os.getpid()}"


def start_stack(procs: Processes, redis_url: str, tmp_path: Path, toml: str) -> str:
    """Worker ``STACK_WORKER`` + router, as real processes; returns the router's URL once it
    lists two models. ``toml``: a host config with ``%(engine)s``, ``%(port)d`` and
    ``%(port_end)d`` to fill (the client and dashboard suites)."""
    config = tmp_path / "models.toml"
    engines = free_port()  # a range of our own: a concurrent suite's engine still loading holds no port yet
    config.write_text(toml % {"engine": MOCK_ENGINE, "port": engines, "port_end": engines + 19})
    start_worker(procs, redis_url, config, STACK_WORKER)
    router = start_router(procs, redis_url)
    wait_models(router, 2, timeout=30)
    return router.url


def assert_bad_keys_file(path: Path, text: str, message: str) -> None:
    """``serve`` with the keys file ``text`` at ``path`` stops with exit code 2 and one line
    naming the file and ``message`` (the entry and the field)."""
    path.write_text(text)
    done = subprocess.run([sys.executable, "-m", "llm_lab_router.cli", "serve", "--api-keys-file", str(path)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().count("\n") == 0 and str(path) in done.stderr and message in done.stderr, done.stderr
