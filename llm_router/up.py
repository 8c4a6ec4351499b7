"""``llm-router up``: the single-host, all-in-one mode.

It runs the same pieces a lab runs, as separate processes: Redis (the one at the given
URL if it answers, else a private ``redis-server`` with the shipped ``redis.conf``), one
worker and one router. Each child gets its own process group; Ctrl-C or SIGTERM stops the
router, then the worker (which stops its models), then Redis — nothing is left running.
If a child dies on its own, everything is stopped and ``up`` exits 1.

The port is checked before anything starts (a busy one is one line naming it and ``--port``,
exit 1), and ``serving http://…`` is printed only once the router answers there; then the URL
is recorded for the client commands (``llm_router.up_url``) until ``up`` stops.

A private Redis is locked down as a lab's is: data directory 0700, ``default`` user off, the
shipped ACL users with passwords generated once and kept in the data directory
(``redis_users.PrivateUsers``), the worker logging in as its own user (``worker.<id>``), the
router as ``router`` and, for its cluster view, ``reader``. No password is ever printed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import redis as redis_sync
from llm_lab_router.lifeline import die_with_parent, stop_group
from llm_lab_router.redact import redact_url
from llm_lab_router.redis_server import RedisServer, free_port
from llm_lab_router.redis_url import parse_sentinel_url, sync_client
from llm_lab_router.redis_users import PrivateUsers, worker_user
from llm_lab_router.safepath import safe_python_m
from llm_lab_router.up_url import client_url, forget, record

HEALTH_POLL = 0.1  # s between checks that the router answers


def redis_answers(url: str) -> bool:
    try:
        client = sync_client(url, socket_connect_timeout=0.5, socket_timeout=0.5)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis_sync.RedisError, OSError, ValueError):
        return False


def port_is_free(host: str, port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


@dataclass
class Stack:
    """The children of ``up``, stopped in reverse order of start."""

    children: list[tuple[str, subprocess.Popen]] = field(default_factory=list)
    redis: RedisServer | None = None

    def spawn(self, name: str, argv: list[str], env: dict[str, str], stop_signal: int = signal.SIGTERM) -> subprocess.Popen:
        """``stop_signal``: what stops it with everything it started (a worker's is SIGINT:
        SIGTERM would leave its models running for a next worker)."""
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=die_with_parent(stop_signal))
        proc.stop_signal = stop_signal  # type: ignore[attr-defined]
        self.children.append((name, proc))
        return proc

    def dead_child(self) -> str | None:
        for name, proc in self.children:
            if proc.poll() is not None:
                return f"{name} exited with code {proc.returncode}"
        return None

    def stop(self, grace: float = 30.0) -> None:
        for name, proc in reversed(self.children):
            if not stop_group(proc, proc.stop_signal, grace, reap=None):  # type: ignore[attr-defined]
                print(f"llm-router up: {name} did not stop in {grace}s; killed it", file=sys.stderr)
        if self.redis is not None:
            self.redis.stop()


def start_private_redis(data_dir: Path, port: int, prefix: str, worker_id: str) -> tuple[RedisServer, dict[str, str]]:
    """``up``'s own Redis, locked down; returns it and each user's URL (with its password)."""
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    data_dir.chmod(0o700)
    users = PrivateUsers(data_dir / "redis", workers=[worker_id])
    server = RedisServer(users.directory, port=port, extra=["--aclfile", str(users.acl_file(prefix))]).start()
    urls = users.urls(server.url)
    print(f"llm-router up: started redis-server at {server.url} (data in {server.data_dir}, mode 0700); "
          f"default user off, users {'/'.join(users.users)}; their URLs, with passwords, are in "
          f"{users.directory}/<user>.url (mode 0600; admin.url for redis-cli, with the password in "
          f"REDISCLI_AUTH), e.g. llm-router worker --redis-url-file {users.url_file(worker_user(worker_id))}",
          file=sys.stderr)
    return server, urls


def router_answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=1) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


@dataclass
class WorkerArgs:
    """What ``up`` passes on to its worker (``--worker-id``, ``--state-dir``)."""

    worker_id: str  # as the worker will call itself (the config's, the host name, or the override)
    argv: list[str] = field(default_factory=list)


def run_up(config_path: str, redis_url: str | None, host: str, port: int, prefix: str, data_dir: str,
           serve_args: list[str] | None = None, worker: WorkerArgs | None = None) -> int:
    if not port_is_free(host, port):
        print(f"llm-router up: port {port} on {host} is in use (another llm-router up?); "
              f"choose a free one with --port", file=sys.stderr)
        return 1
    worker = worker or WorkerArgs(worker_id="")
    stack = Stack()
    stopping = False
    recorded: Path | None = None

    def on_signal(signum, _frame) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        if redis_url and redis_answers(redis_url):
            print(f"llm-router up: using Redis at {redact_url(redis_url)}", file=sys.stderr)
            worker_url = router_url = reader_url = redis_url
        else:
            if redis_url and parse_sentinel_url(redis_url):  # a lab's HA Redis: never replace it by a private one
                raise RuntimeError(f"no Redis master answers through the Sentinels of {redact_url(redis_url)}")
            if redis_url:
                print(f"llm-router up: no Redis answers at {redact_url(redis_url)}; starting one", file=sys.stderr)
            wanted = urlparse(redis_url).port if redis_url else None
            rport = wanted if wanted and port_is_free("127.0.0.1", wanted) else free_port()
            stack.redis, urls = start_private_redis(Path(data_dir), rport, prefix, worker.worker_id)
            worker_url, router_url, reader_url = urls[worker_user(worker.worker_id)], urls["router"], urls["reader"]
        # each child gets its URL in LLM_ROUTER_REDIS_URL (out of ps); a URL file of ours would win over it
        env = {**{k: v for k, v in os.environ.items() if k != "LLM_ROUTER_REDIS_URL_FILE"}, "LLM_ROUTER_PREFIX": prefix}
        # -P: nothing is imported from the cwd (see ``safepath``); the cwd stays, for relative paths
        stack.spawn("worker", safe_python_m("llm_lab_router.cli", "worker", "--config", config_path, *worker.argv),
                    {**env, "LLM_ROUTER_REDIS_URL": worker_url}, stop_signal=signal.SIGINT)
        stack.spawn("router", safe_python_m("llm_lab_router.cli", "serve", "--host", host, "--port", str(port),
                                            *(serve_args or [])),
                    {**env, "LLM_ROUTER_REDIS_URL": router_url, "LLM_ROUTER_REDIS_READ_URL": reader_url})
        url = client_url(host, port)
        while not stopping and not stack.dead_child() and not router_answers(url):
            time.sleep(HEALTH_POLL)
        if not stopping and not stack.dead_child():
            recorded = record(url, worker.worker_id)
            print(f"llm-router up: serving {url} (config {config_path}); Ctrl-C stops everything",
                  file=sys.stderr)
        while not stopping:
            dead = stack.dead_child()
            if dead:
                print(f"llm-router up: {dead}; stopping everything", file=sys.stderr)
                return 1
            time.sleep(0.2)
        return 0
    except RuntimeError as exc:
        print(f"llm-router up: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the cleanup
        if recorded is not None:
            forget(recorded)
        stack.stop()
        print("llm-router up: stopped", file=sys.stderr)
