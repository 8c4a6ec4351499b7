"""The shipped Redis ACL users (examples/redis-users.acl): a worker and a router run with
their restricted users, and the router's user cannot do what it has no business doing."""

from __future__ import annotations

import uuid

import pytest
import redis as redis_sync

from conftest import ROOT, wait_for
from helpers import DEMO_MODELS, SseStream, chat_body, request, start_router, start_worker, wait_models, \
    wait_status, write_config
from llm_router.protocol import Keys
from llm_router.redis_server import RedisServer

ACL = ROOT / "examples" / "redis-users.acl"
PASSWORDS = {role: uuid.uuid4().hex for role in ("admin", "worker", "router")}


@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("acl-redis")
    text = ACL.read_text()
    for role, password in PASSWORDS.items():
        text = text.replace(f">CHANGE-ME-{role}", f">{password}")
    (tmp / "users.acl").write_text(text)
    server = RedisServer(tmp / "data", extra=["--appendonly", "no", "--aclfile", str(tmp / "users.acl")]).start()
    yield server
    server.stop()


def role_url(server: RedisServer, role: str) -> str:
    return f"redis://{role}:{PASSWORDS[role]}@{server.host}:{server.port}/0"


def test_worker_and_router_work_with_their_acl_users(procs, acl_redis, tmp_path) -> None:
    admin = redis_sync.Redis.from_url(role_url(acl_redis, "admin"), decode_responses=True)
    admin.flushall()
    admin.execute_command("ACL", "LOG", "RESET")
    with pytest.raises(redis_sync.AuthenticationError):
        redis_sync.Redis(host=acl_redis.host, port=acl_redis.port).ping()  # `default` is off
    wid = f"w-{uuid.uuid4().hex[:8]}"
    start_worker(procs, role_url(acl_redis, "worker"), write_config(tmp_path / "models.toml", *DEMO_MODELS), wid)
    router = start_router(procs, role_url(acl_redis, "router"))
    wait_models(router, 2)
    assert request("POST", f"{router.url}/api/models/demo-chat/start").status == 200
    wait_status(router, "demo-chat", "running")
    assert request("POST", f"{router.url}/v1/chat/completions", chat_body("demo-chat")).status == 200
    logs = SseStream(f"{router.url}/api/models/demo-chat/logs/stream?tail=5")
    assert logs.events_until(lambda ev: ev.get("data", {}).get("type") == "historical_complete")
    logs.close()
    assert request("POST", f"{router.url}/api/logs/demo-chat/clear").status == 200
    assert request("POST", f"{router.url}/api/models/demo-chat/stop").status == 200
    denied = admin.execute_command("ACL", "LOG")
    assert denied == [], f"a role lacks a permission it needs: {denied}"

    # What a compromised router must not be able to do.
    keys = Keys()
    rt = redis_sync.Redis.from_url(role_url(acl_redis, "router"))
    lease = keys.worker(wid)
    for attempt in (lambda: rt.flushall(), lambda: rt.config_get("dir"), lambda: rt.delete(lease),
                    lambda: rt.pexpire(lease, 1), lambda: rt.set(keys.devices(wid), "{}"),
                    lambda: rt.publish(keys.events(), "{}"), lambda: rt.get("other-app:secret"),
                    lambda: rt.lpush(keys.reply("x"), "{}"), lambda: rt.keys("*"),
                    lambda: rt.xreadgroup("workers", "thief", {keys.commands(wid): ">"}, count=1)):
        with pytest.raises(redis_sync.exceptions.NoPermissionError):
            attempt()
    assert admin.exists(lease)
    wait_for(lambda: admin.exists(lease), message="the lease still there")
