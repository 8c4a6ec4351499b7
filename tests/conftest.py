"""Shared fixtures: a real redis-server for the session, real processes, no orphans.

Every process a test starts inherits ``LLM_ROUTER_TEST_SESSION``; at the end of the
session any process still carrying it is a leak: it is killed and the session fails.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable

import psutil
import pytest
import redis as redis_sync

from llm_router.redis_server import RedisServer, free_port

ROOT = Path(__file__).resolve().parent.parent
MOCK_ENGINE = ROOT / "scripts" / "mock_engine.py"
SESSION_TOKEN = uuid.uuid4().hex
os.environ["LLM_ROUTER_TEST_SESSION"] = SESSION_TOKEN
os.environ.setdefault("PYTHONUNBUFFERED", "1")


def _leaked_processes() -> list[psutil.Process]:
    me = os.getpid()
    found = []
    for proc in psutil.process_iter(["pid"]):
        if proc.pid == me:
            continue
        try:
            if proc.environ().get("LLM_ROUTER_TEST_SESSION") == SESSION_TOKEN:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


@pytest.fixture(scope="session", autouse=True)
def no_orphans_at_end():
    """Fail the session if any process started by it outlives it."""
    yield
    deadline = time.monotonic() + 5
    leaked = _leaked_processes()
    while leaked and time.monotonic() < deadline:
        time.sleep(0.1)
        leaked = _leaked_processes()
    if leaked:
        desc = [f"{p.pid} {' '.join(p.cmdline()[:4])}" for p in leaked if p.is_running()]
        for p in leaked:
            try:
                p.kill()
            except psutil.Error:
                pass
        pytest.fail(f"processes left behind by the test session: {desc}")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> RedisServer:
    server = RedisServer(tmp_path_factory.mktemp("redis"), extra=["--appendonly", "no"])
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session's Redis, emptied before each test."""
    client = redis_sync.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture
def rds(redis_url: str) -> redis_sync.Redis:
    """A synchronous client for assertions, as an operator's redis-cli would see it."""
    client = redis_sync.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


class Processes:
    """Starts real processes in their own process groups and stops them all at teardown."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen] = []

    def start(self, argv: list[str], name: str = "proc", env: dict | None = None,
              cwd: str | os.PathLike | None = None) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}-{len(self.procs)}.log", "wb")
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})}, cwd=cwd or ROOT, start_new_session=True)
        proc.log_path = log.name  # type: ignore[attr-defined]
        log.close()
        self.procs.append(proc)
        return proc

    def log(self, proc: subprocess.Popen) -> str:
        return Path(proc.log_path).read_text(errors="replace")  # type: ignore[attr-defined]

    def stop(self, proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 15) -> int | None:
        """Signal the process itself (as an operator would), then make sure its group is gone."""
        if proc.poll() is None:
            try:
                proc.send_signal(sig)
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        return proc.returncode

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            self.stop(proc)


@pytest.fixture
def procs(tmp_path: Path) -> Processes:
    p = Processes(tmp_path)
    yield p
    p.stop_all()


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.02,
             message: str = "condition") -> object:
    """Poll a condition that has no event to await (another process's state); fail loudly."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


@pytest.fixture
def mock_engine(procs: Processes):
    """Start ``scripts/mock_engine.py`` on a free port; returns (process, base_url)."""

    def start(*args: str, model: str = "mock", port: int | None = None) -> tuple[subprocess.Popen, str]:
        port = port or free_port()
        proc = procs.start([sys.executable, str(MOCK_ENGINE), "--port", str(port), "--model", model, *args],
                           name="engine")
        return proc, f"http://127.0.0.1:{port}"

    return start
