"""Shared fixtures: a real redis-server for the session, real processes, no orphans.

Every process a test starts inherits ``LLM_ROUTER_TEST_SESSION``; at the end of the
session any process still carrying it is a leak: it is killed and the session fails.

The session Redis runs with the shipped ACL users (``examples/redis-users.acl``, ``default``
off): ``redis_url`` is the admin's URL (the test's own view, as an operator's), ``role_url``
turns it into a router's, a reader's or a worker's (each worker id its own user, created on first
use, as ``llm-router redis-user add-worker --apply`` would: ``helpers.start_worker``/``start_router``
do so), and a command a user is denied (``ACL LOG``) fails the test that caused it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import hashlib
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

import psutil
import pytest
import redis as redis_sync
from llm_lab_router.lifeline import die_with_parent, processes_with_env, stop_group
from llm_lab_router.redis_server import RedisServer, free_port
from llm_lab_router.redis_users import ROLES, acl_text, apply_worker_user, worker_acl_line, worker_user
from llm_lab_router.redis_users import with_user as url_with_user

ROOT = Path(__file__).resolve().parent.parent
MOCK_ENGINE = ROOT / "scripts" / "mock_engine.py"
SESSION_TOKEN = uuid.uuid4().hex
os.environ["LLM_ROUTER_TEST_SESSION"] = SESSION_TOKEN
TEST_NAME_ENV = "LLM_ROUTER_TEST_NAME"
# Workers keep their log spool and lock under the session's own directory, not in $HOME.
os.environ["LLM_ROUTER_STATE_DIR"] = tempfile.mkdtemp(prefix="llm-router-test-state-")
os.environ.setdefault("PYTHONUNBUFFERED", "1")


def _leaked_processes() -> list[psutil.Process]:
    return processes_with_env("LLM_ROUTER_TEST_SESSION", SESSION_TOKEN)


def _described(p: psutil.Process) -> str:
    """A leaked process: its pid, command line and the test that was running when it started."""
    try:
        return f"{p.pid} {' '.join(p.cmdline()[:10])} (started during {p.environ().get(TEST_NAME_ENV, '?')})"
    except psutil.Error:
        return str(p.pid)


@pytest.fixture(autouse=True)
def _name_the_test(request):
    """Processes started during a test carry its name (``TEST_NAME_ENV``), so a process that
    outlives the session names the test that started it."""
    os.environ[TEST_NAME_ENV] = request.node.nodeid
    yield
    os.environ.pop(TEST_NAME_ENV, None)


@pytest.fixture(scope="session", autouse=True)
def no_orphans_at_end():
    """Fail the session if any process started by it outlives it."""
    yield
    deadline = time.monotonic() + 15  # a router child still draining (SIGTERM from its dying parent) on a loaded machine
    leaked = _leaked_processes()
    while leaked and time.monotonic() < deadline:
        time.sleep(0.1)
        leaked = _leaked_processes()
    if leaked:
        desc = [_described(p) for p in leaked if p.is_running()]
        for p in leaked:
            try:
                p.kill()
            except psutil.Error:
                pass
        pytest.fail(f"processes left behind by the test session: {desc}")


ACL_FILE = ROOT / "examples" / "redis-users.acl"
REDIS_PASSWORDS = {role: uuid.uuid4().hex for role in ROLES}
_WORKERS_MADE: set[tuple[str, str]] = set()  # (server, worker id) whose user exists


def with_user(url: str, role: str) -> str:
    """``url`` logged in as ``role`` of the session's ACL users."""
    return url_with_user(url, role, REDIS_PASSWORDS[role])


def worker_password(wid: str) -> str:
    """Each worker user's own password (no worker can log in as another)."""
    return hashlib.sha256(f"{REDIS_PASSWORDS['admin']}:{wid}".encode()).hexdigest()[:32]


def worker_url(admin_url: str, wid: str) -> str:
    """Worker ``wid``'s URL, its user created first (once per server) through ``admin_url``."""
    parts = urlsplit(admin_url)
    if (parts.netloc, wid) not in _WORKERS_MADE:
        admin = redis_sync.Redis.from_url(admin_url)
        try:
            apply_worker_user(admin, wid, worker_acl_line(wid, worker_password(wid)))
        finally:
            admin.close()
        _WORKERS_MADE.add((parts.netloc, wid))
    return url_with_user(admin_url, worker_user(wid), worker_password(wid))


def role_url(url: str, role: str, wid: str = "") -> str:
    """The least-privileged URL for a process of ``role`` ("worker" with its ``wid``, "router",
    "reader") given the URL a test holds: the session Redis's admin URL becomes the role's; any
    other (a test's private Redis without ACL users, or a URL already naming a user) is
    returned as it is."""
    parts = urlsplit(url)
    if parts.username == "admin" and parts.password == REDIS_PASSWORDS["admin"]:
        if role == "worker":
            assert wid, "a worker's URL names its worker id"
            return worker_url(url, wid)
        return with_user(url, role)
    return url


@dataclass(frozen=True)
class RedisUrls:
    """The session Redis as each role logs in to it (``worker``: each worker id its own user)."""

    admin: str
    router: str
    reader: str

    def worker(self, wid: str) -> str:
        return worker_url(self.admin, wid)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> RedisServer:
    """The session's Redis, with the shipped ACL users (``default`` off): the suite runs with
    exactly the users operators deploy (and ``up`` runs), never a list of its own."""
    tmp = tmp_path_factory.mktemp("redis")
    (tmp / "users.acl").write_text(acl_text(REDIS_PASSWORDS))
    server = RedisServer(tmp / "data", extra=["--appendonly", "no", "--aclfile", str(tmp / "users.acl")])
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_urls(redis_server: RedisServer) -> RedisUrls:
    return RedisUrls(**{role: with_user(redis_server.url, role) for role in ROLES})


@pytest.fixture(autouse=True)
def no_acl_denials(request):
    """Fail a test during which the session Redis refused a command to a role (``ACL LOG``):
    a permission missing from ``examples/redis-users.acl`` fails loudly here instead of
    degrading a feature quietly. Autouse, so it is torn down after ``procs`` has stopped the
    test's processes (their last commands count too). Tests that provoke denials on purpose
    reset the log themselves."""
    if "redis_server" not in request.fixturenames:
        yield
        return
    admin = redis_sync.Redis.from_url(request.getfixturevalue("redis_urls").admin, decode_responses=True)
    admin.execute_command("ACL", "LOG", "RESET")
    yield
    denied = admin.execute_command("ACL", "LOG")
    admin.execute_command("ACL", "LOG", "RESET")
    admin.close()
    if denied:
        what = sorted({(e["username"], e["reason"], e["object"]) for e in denied})
        pytest.fail(f"the session Redis denied (user, reason, command/key): {what}: "
                    f"a role lacks a permission in {ACL_FILE.relative_to(ROOT)}")


@pytest.fixture
def redis_url(redis_urls: RedisUrls) -> str:
    """The session's Redis as its admin (the test's own assertions and set-up), emptied before
    each test. Processes get their role's URL from it through ``role_url``."""
    client = redis_sync.Redis.from_url(redis_urls.admin)
    client.flushall()
    client.close()
    return redis_urls.admin


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
              cwd: str | os.PathLike | None = None, stop_signal: int = signal.SIGTERM,
              uid: int | None = None) -> subprocess.Popen:
        """``stop_signal``: how teardown (and ``stop`` by default) asks it to stop; a worker's
        is SIGINT, which stops its models (SIGTERM leaves them running for the next worker).
        ``uid``: run it as that user (and group), as another local user of the host would."""
        log = open(self.log_dir / f"{name}-{len(self.procs)}.log", "wb")
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})}, cwd=cwd or ROOT, start_new_session=True,
                                preexec_fn=_as_user(uid, die_with_parent(stop_signal)))  # even if pytest is killed
        proc.log_path = log.name  # type: ignore[attr-defined]
        proc.stop_signal = stop_signal  # type: ignore[attr-defined]
        log.close()
        self.procs.append(proc)
        return proc

    def log(self, proc: subprocess.Popen) -> str:
        return Path(proc.log_path).read_text(errors="replace")  # type: ignore[attr-defined]

    def stop(self, proc: subprocess.Popen, sig: int | None = None, timeout: float = 15) -> int | None:
        """Signal the process itself (as an operator would; by default its ``stop_signal``),
        then make sure its group is gone."""
        stop_group(proc, sig or getattr(proc, "stop_signal", signal.SIGTERM), timeout)
        return proc.returncode

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            self.stop(proc)


def _as_user(uid: int | None, then: Callable[[], None] | None) -> Callable[[], None] | None:
    """A ``preexec_fn``: become ``uid`` (its own group, no others), then run ``then`` (a
    parent-death signal must be armed after the switch: changing uids clears it)."""
    if uid is None:
        return then

    def switch() -> None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        if then is not None:
            then()

    return switch


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
