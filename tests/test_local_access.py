"""What other local users of a router's host can reach: engine logs (``--logs-read``) and the
Redis password (``--redis-url-file`` keeps it off the command line that ``ps`` shows).

Real router processes on the session Redis (its ACL users), real sockets."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import psutil
from conftest import REDIS_PASSWORDS, ROOT, role_url, wait_for
from helpers import FakeWorker, SseStream, request, start_router
from llm_lab_router.protocol import CatalogEntry
from llm_lab_router.redis_server import free_port

CLIENT_KEY = "client-key-0123456789abcdef"
ADMIN_KEY = "admin-key-0123456789abcdef"
KEY_ENV = {"LLM_ROUTER_API_KEYS": CLIENT_KEY,
           "LLM_ROUTER_ADMIN_KEYS": f"sha256:{hashlib.sha256(ADMIN_KEY.encode()).hexdigest()}"}
CHAT = CatalogEntry(id="chat", aliases=["chat"], mode="chat", on_demand=False)


def test_logs_read_admin_keeps_engine_logs_from_client_keys(procs, redis_url, rds) -> None:
    FakeWorker(rds, "w-logs").publish(CHAT)
    default = start_router(procs, redis_url, env=KEY_ENV)
    strict = start_router(procs, redis_url, env={**KEY_ENV, "LLM_ROUTER_LOGS_READ": "admin"})
    for router in (default, strict):
        wait_for(lambda r=router: request("GET", f"{r.url}/v1/models/chat",
                                          headers={"Authorization": f"Bearer {CLIENT_KEY}"}).status == 200,
                 message="chat listed")
    s = SseStream(f"{default.url}/api/models/chat/logs/stream?tail=0", headers={"Authorization": f"Bearer {CLIENT_KEY}"})
    assert s.status == 200  # today's behaviour stays the default
    s.conn.close()
    denied = request("GET", f"{strict.url}/api/models/chat/logs/stream?tail=0",
                     headers={"Authorization": f"Bearer {CLIENT_KEY}"})
    assert denied.status == 403, denied.body
    assert denied.json()["success"] is False and "--logs-read admin" in denied.json()["message"]
    s = SseStream(f"{strict.url}/api/models/chat/logs/stream?tail=0", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert s.status == 200
    s.conn.close()
    # the rest of the client's read routes are as before
    assert request("GET", f"{strict.url}/api/logs/stats", headers={"Authorization": f"Bearer {CLIENT_KEY}"}).status == 200


def test_logs_read_admin_without_admin_keys_refuses_to_start() -> None:
    done = subprocess.run([sys.executable, "-m", "llm_lab_router.cli", "serve", "--port", str(free_port()),
                           "--logs-read", "admin"], capture_output=True, text=True, timeout=30, cwd=ROOT,
                          env={"PATH": "/usr/bin:/bin", "LLM_ROUTER_API_KEYS": CLIENT_KEY})
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--logs-read admin needs admin keys" in lines[0], done.stderr


def test_redis_url_file_keeps_the_password_off_the_command_line(procs, redis_url, rds, tmp_path) -> None:
    url = role_url(redis_url, "router")
    password = REDIS_PASSWORDS["router"]
    assert password in url
    url_file = tmp_path / "router.url"
    url_file.write_text(url + "\n")
    url_file.chmod(0o600)
    FakeWorker(rds, "w-url").publish(CHAT)
    router = start_router(procs, "", args=["--redis-url-file", str(url_file)],
                          env={"LLM_ROUTER_REDIS_READ_URL": role_url(redis_url, "reader")})
    wait_for(lambda: request("GET", f"{router.url}/v1/models/chat").status == 200, timeout=20,
             message="the router reads the catalog through the URL file's user")
    assert not any(password in arg for arg in psutil.Process(router.proc.pid).cmdline())
    both = subprocess.run([sys.executable, "-m", "llm_lab_router.cli", "serve", "--redis-url-file", str(url_file),
                           "--redis", url, "--port", str(free_port())], capture_output=True, text=True, timeout=30,
                          cwd=ROOT)
    assert both.returncode == 2 and "not both" in both.stderr
    empty = tmp_path / "empty.url"
    empty.write_text("\n")
    none = subprocess.run([sys.executable, "-m", "llm_lab_router.cli", "worker", "--redis-url-file", str(empty)],
                          capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert none.returncode == 2 and f"{empty}: no Redis URL in the file" in none.stderr
