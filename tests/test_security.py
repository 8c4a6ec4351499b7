"""API keys, the non-loopback start refusal, upstream credentials and header filtering.

Unit tests for ``router.http.auth`` first, then real router processes with keys on.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys

import pytest
from conftest import ROOT, role_url, wait_for
from helpers import FakeWorker, chat_body, request, start_router, wait_routable
from llm_lab_router.protocol import CatalogEntry, Keys, command_of
from llm_lab_router.redis_server import free_port
from llm_lab_router.router.core.errors import ApiError
from llm_lab_router.router.forward.upstream import forward_headers
from llm_lab_router.router.http.auth import (
    AccessPolicy,
    KeyFileError,
    KeyRing,
    Role,
    parse_keys,
    required_role,
    startup_refusal,
)
from llm_lab_router.router.http.routes import ROUTES
from raw_engine import engine  # noqa: F401  (the fixture)

CLIENT_KEY = "client-key-0123456789abcdef"
ADMIN_KEY = "admin-key-0123456789abcdef"
ENGINE_KEY = "engine-key-0123456789abcdef"
KEY_ENV = {"LLM_ROUTER_API_KEYS": CLIENT_KEY, "LLM_ROUTER_ADMIN_KEYS": f"sha256:{hashlib.sha256(ADMIN_KEY.encode()).hexdigest()}"}
CHAT = CatalogEntry(id="chat", aliases=["chat"], mode="chat", on_demand=False)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# --------------------------------------------------------------------------- units


def test_keys_are_kept_as_digests_and_checked_by_role() -> None:
    ring = KeyRing(parse_keys(f"# clients\n{CLIENT_KEY}\n", "f"), parse_keys(ADMIN_KEY, "g"))
    assert CLIENT_KEY.encode() not in b"".join(ring.client)  # digests only
    assert ring.identify(CLIENT_KEY) == (Role.CLIENT, None)  # a plain key: no profile
    assert ring.identify(ADMIN_KEY) == (Role.ADMIN, None)
    assert ring.identify(CLIENT_KEY + "x") == (None, None) and ring.identify("") == (None, None)
    with pytest.raises(KeyFileError):
        parse_keys("short", "f")
    with pytest.raises(KeyFileError):
        parse_keys("a key with spaces in it", "f")
    with pytest.raises(KeyFileError, match="cannot read"):
        KeyRing.load("/nonexistent/keys", env={})


@pytest.mark.parametrize("method, path, need", [
    ("GET", "/health", Role.PUBLIC), ("GET", "/ui/", Role.PUBLIC), ("GET", "/openapi.json", Role.PUBLIC),
    ("GET", "/", Role.CLIENT), ("GET", "/v1/models", Role.CLIENT), ("GET", "/api/devices/info", Role.CLIENT),
    ("GET", "/api/models/x/logs/stream", Role.CLIENT), ("POST", "/v1/chat/completions", Role.CLIENT),
    ("POST", "/api/models/x/start", Role.ADMIN), ("POST", "/api/models/stop-all", Role.ADMIN),
    ("POST", "/api/models/restart-autostart", Role.ADMIN), ("POST", "/api/logs/x/clear", Role.ADMIN),
    ("GET", "/debug/stats", Role.ADMIN),
])
def test_required_roles(method: str, path: str, need: Role) -> None:
    """The role each route of the table (router/http/routes.py) needs, with reads for clients
    and for anyone (``read_access = "public"``)."""
    access = next(r.access for r in ROUTES if re.fullmatch(r.tornado_pattern, path))
    assert required_role(access, method, "client") is need
    public_read = Role.PUBLIC if need is Role.CLIENT and method == "GET" and not path.startswith("/v1/chat") else need
    assert required_role(access, method, "public") is public_read
    if access == "read":
        assert required_role(access, "POST", "public") is Role.CLIENT  # a read is GET/HEAD only


def test_policy_answers_401_and_403_and_takes_the_cookie_for_reads_only() -> None:
    policy = AccessPolicy(KeyRing.load(env=KEY_ENV))
    policy.check("GET", "read", f"Bearer {CLIENT_KEY}", None)
    policy.check("GET", "read", None, CLIENT_KEY)  # the dashboard's cookie
    policy.check("POST", "admin", f"Bearer {ADMIN_KEY}", None)
    for method, access, auth, cookie, status in [
        ("GET", "read", None, None, 401), ("GET", "read", "Bearer nope-nope-nope-nope", None, 401),
        ("GET", "read", f"Basic {CLIENT_KEY}", None, 401),
        ("POST", "admin", f"Bearer {CLIENT_KEY}", None, 403),
        ("POST", "admin", None, ADMIN_KEY, 401),  # no cookie on a state change (CSRF)
    ]:
        with pytest.raises(ApiError) as err:
            policy.check(method, access, auth, cookie)
        assert err.value.status == status, (method, access, auth, cookie)


def test_only_loopback_may_run_without_keys() -> None:
    empty = KeyRing()
    assert startup_refusal("127.0.0.1", empty, False) is None and startup_refusal("::1", empty, False) is None
    assert "--insecure" in startup_refusal("0.0.0.0", empty, False)
    assert startup_refusal("0.0.0.0", empty, True) is None
    assert startup_refusal("10.1.2.3", KeyRing.load(env=KEY_ENV), False) is None


def test_forwarded_headers_drop_client_credentials_and_hop_by_hop() -> None:
    sent = [("Authorization", f"Bearer {CLIENT_KEY}"), ("Cookie", f"llm_router_key={CLIENT_KEY}"),
            ("Connection", "keep-alive, X-Secret-Hop"), ("X-Secret-Hop", "1"), ("Keep-Alive", "5"), ("TE", "trailers"),
            ("Upgrade", "h2c"), ("Proxy-Authorization", "x"), ("Content-Type", "application/json"), ("X-Trace", "t")]
    assert forward_headers(sent) == [("Content-Type", "application/json"), ("X-Trace", "t")]
    assert forward_headers(sent, ENGINE_KEY)[-1] == ("Authorization", f"Bearer {ENGINE_KEY}")


# --------------------------------------------------------------------------- a router with keys


@pytest.fixture
def keyed(procs, redis_url, rds, engine):
    fake = FakeWorker(rds, "w-sec")
    fake.publish(CHAT)
    fake.instance("chat", "running", engine.url, api_key=ENGINE_KEY)
    router = start_router(procs, redis_url, env=KEY_ENV)
    wait_routable_with_key(router)
    return router


def wait_routable_with_key(router) -> None:
    wait_for(lambda: any(m["status"] == "running" for m in
                         request("GET", f"{router.url}/v1/models", headers=bearer(CLIENT_KEY)).json()["data"]),
             message="chat routable")


def test_keys_on_a_live_router(keyed, procs, engine) -> None:
    url = keyed.url
    assert request("GET", f"{url}/health").status == 200  # load balancer probes need no key
    assert request("GET", f"{url}/ui/").status == 200
    no_key = request("GET", f"{url}/v1/models")
    assert no_key.status == 401 and no_key.json()["error"]["code"] == "missing_api_key"
    assert request("GET", f"{url}/api/logs/stats").json() == {"success": False, "message": no_key.json()["error"]["message"]}
    assert request("GET", f"{url}/api/logs/stats", headers={"Cookie": f"llm_router_key={CLIENT_KEY}"}).status == 200
    forbidden = request("POST", f"{url}/api/models/stop-all", headers=bearer(CLIENT_KEY))
    assert forbidden.status == 403 and forbidden.json()["success"] is False
    assert request("POST", f"{url}/api/logs/chat/clear", headers=bearer(ADMIN_KEY)).status == 200
    # Anonymous bodies are refused before they are read.
    assert request("POST", f"{url}/v1/chat/completions", chat_body("chat")).status == 401
    assert engine.heads == []
    # The engine gets its own key, never the client's.
    resp = request("POST", f"{url}/v1/chat/completions", chat_body("chat"),
                   headers={**bearer(CLIENT_KEY), "Cookie": f"llm_router_key={CLIENT_KEY}",
                            "Connection": "X-Hop", "X-Hop": "secret"})
    assert resp.status == 200, resp.body
    head = engine.heads[-1].decode().lower()
    assert f"authorization: bearer {ENGINE_KEY}".lower() in head
    assert CLIENT_KEY not in head and "cookie" not in head and "x-hop" not in head
    # The CLI client sends LLM_ROUTER_API_KEY.
    cli = [sys.executable, "-m", "llm_lab_router.cli", "models", "--url", url]
    assert subprocess.run(cli, capture_output=True, env=_env(LLM_ROUTER_API_KEY=CLIENT_KEY), cwd=ROOT).returncode == 0
    denied = subprocess.run(cli, capture_output=True, text=True, env=_env(), cwd=ROOT)
    assert denied.returncode != 0 and "API key" in denied.stderr
    # Keys are never logged.
    log = procs.log(keyed.proc)
    assert CLIENT_KEY not in log and ADMIN_KEY not in log and ENGINE_KEY not in log


def test_read_access_public(procs, redis_url) -> None:
    router = start_router(procs, redis_url, env={**KEY_ENV, "LLM_ROUTER_READ_ACCESS": "public"})
    assert request("GET", f"{router.url}/v1/models").status == 200
    assert request("GET", f"{router.url}/api/logs/stats").status == 200
    assert request("POST", f"{router.url}/api/models/stop-all").status == 401


def test_every_route_and_method_answers_as_its_access_says(procs, redis_url) -> None:
    """A live router with keys (reads public): each route of the table, each of its methods,
    without a key and with a client key. Nothing runs: state changes are admin routes, refused."""
    router = start_router(procs, redis_url, env={**KEY_ENV, "LLM_ROUTER_READ_ACCESS": "public"})
    for route in ROUTES:
        url = router.url + re.sub(r"\{[^}]+\}", "nope", route.path)
        for method in route.ops:
            anonymous = request(method.upper(), url).status
            client = request(method.upper(), url, headers=bearer(CLIENT_KEY)).status
            # "logs": a read route unless --logs-read admin (tests/test_local_access.py)
            opened = route.access == "public" or (route.access in ("read", "logs") and method in ("get", "head"))
            assert (anonymous == 401) is not opened, (method, route.path, anonymous)
            assert client == 403 if route.access == "admin" else client not in (401, 403), (method, route.path, client)


def _env(**extra: str) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_ROUTER_API_KEY")}
    return {**env, **extra}


@pytest.mark.parametrize("command", ["serve", "up"])
def test_non_loopback_without_keys_refuses_to_start(command, tmp_path) -> None:
    argv = [sys.executable, "-m", "llm_lab_router.cli", command, "--host", "0.0.0.0", "--port", str(free_port())]
    if command == "up":
        argv += ["--data-dir", str(tmp_path)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=_env(), cwd=ROOT)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--insecure" in lines[0] and "LLM_ROUTER_API_KEYS" in lines[0], done.stderr
    assert not list(tmp_path.iterdir())  # nothing was started


def test_insecure_flag_lets_it_start(procs, redis_url) -> None:
    port = free_port()
    proc = procs.start([sys.executable, "-m", "llm_lab_router.cli", "serve", "--redis", role_url(redis_url, "router"),
                        "--host", "0.0.0.0", "--port", str(port), "--insecure"], name="router-insecure",
                       env={"LLM_ROUTER_REDIS_READ_URL": role_url(redis_url, "reader")})

    def up() -> bool:
        assert proc.poll() is None, procs.log(proc)
        try:
            return request("GET", f"http://127.0.0.1:{port}/health", timeout=1).status == 200
        except OSError:
            return False
    wait_for(up, timeout=20, message="the --insecure router")


def test_a_request_cannot_choose_the_command_line(procs, redis_url, rds) -> None:
    """Start takes the model's name only: a command in the query is a 400, one in the body is
    dropped, and the command the worker gets names no program."""
    fake = FakeWorker(rds, "w-cmd")
    fake.publish(CatalogEntry(id="chat", aliases=["chat"]))
    router = start_router(procs, redis_url)
    wait_for(lambda: request("GET", f"{router.url}/api/models/chat/info").status == 200, message="chat listed")
    bad = request("POST", f"{router.url}/api/models/chat/start?wait=false&command=/bin/sh")
    assert bad.status == 400 and "'command'" in bad.json()["message"]
    evil = {"command": ["/bin/sh", "-c", "touch /tmp/pwned"], "args": ["x"], "env": {"LD_PRELOAD": "x"}}
    fake.publish()  # a fresh heartbeat: a slow start of the router must not make the lease look stale
    started = request("POST", f"{router.url}/api/models/chat/start?wait=false", evil)
    assert started.status in (200, 202), started.body
    entries = wait_for(lambda: rds.xrange(Keys().commands("w-cmd")), message="the start command in the stream")
    for _, fields in entries:
        assert "/bin/sh" not in str(fields) and "LD_PRELOAD" not in str(fields)
        assert command_of(fields).model == "chat"
