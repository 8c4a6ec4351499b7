"""The shipped Redis ACL users (examples/redis-users.acl), which the session Redis runs with
(conftest): a worker and a router run with their restricted users, the router's user cannot do
what it has no business doing, and the suite's own ACL check catches a denied command."""

from __future__ import annotations

import uuid

import pytest
import redis as redis_sync
from conftest import role_url, wait_for
from helpers import (
    DEMO_MODELS,
    SseStream,
    chat_body,
    process_url,
    request,
    start_router,
    start_worker,
    wait_models,
    wait_status,
    write_config,
)
from llm_lab_router.protocol import Keys


def acl_log(rds: redis_sync.Redis) -> list:
    return rds.execute_command("ACL", "LOG")


def test_session_redis_has_the_shipped_users(redis_server, redis_urls, redis_url, rds) -> None:
    with pytest.raises(redis_sync.AuthenticationError):
        redis_sync.Redis(host=redis_server.host, port=redis_server.port).ping()  # `default` is off
    assert rds.acl_whoami() == "admin"
    assert role_url(redis_url, "worker") == redis_urls.worker and role_url(redis_url, "router") == redis_urls.router
    assert sorted(rds.acl_users()) == ["admin", "default", "router", "worker"]
    for url in (redis_urls.worker, redis_urls.router):
        client = redis_sync.Redis.from_url(url)
        assert client.ping()
        client.close()
    other = "redis://127.0.0.1:6379/0"  # a test's private Redis without users keeps its URL
    assert role_url(other, "router") == other
    assert process_url(redis_url, "router", prefix="other:") == redis_url  # outside `~llm:*`: admin


def test_worker_and_router_work_with_their_acl_users(procs, redis_urls, rds, tmp_path) -> None:
    wid = f"w-{uuid.uuid4().hex[:8]}"
    start_worker(procs, redis_urls.worker, write_config(tmp_path / "models.toml", *DEMO_MODELS), wid)
    router = start_router(procs, redis_urls.router)
    wait_models(router, 2)
    assert request("POST", f"{router.url}/api/models/demo-chat/start").status == 200
    wait_status(router, "demo-chat", "running")
    assert request("POST", f"{router.url}/v1/chat/completions", chat_body("demo-chat")).status == 200
    logs = SseStream(f"{router.url}/api/models/demo-chat/logs/stream?tail=5")
    assert logs.events_until(lambda ev: ev.get("data", {}).get("type") == "historical_complete")
    logs.close()
    assert request("POST", f"{router.url}/api/logs/demo-chat/clear").status == 200
    assert request("POST", f"{router.url}/api/models/demo-chat/stop").status == 200
    assert acl_log(rds) == [], "a role lacks a permission it needs"

    # What a compromised router must not be able to do.
    keys = Keys()
    rt = redis_sync.Redis.from_url(redis_urls.router)
    lease = keys.worker(wid)
    for attempt in (lambda: rt.flushall(), lambda: rt.config_get("dir"), lambda: rt.delete(lease),
                    lambda: rt.pexpire(lease, 1), lambda: rt.set(keys.devices(wid), "{}"),
                    lambda: rt.publish(keys.events(), "{}"), lambda: rt.get("other-app:secret"),
                    lambda: rt.lpush(keys.reply("x"), "{}"), lambda: rt.keys("*"),
                    lambda: rt.xreadgroup("workers", "thief", {keys.commands(wid): ">"}, count=1)):
        with pytest.raises(redis_sync.exceptions.NoPermissionError):
            attempt()
    with pytest.raises(redis_sync.exceptions.ResponseError, match="(?i)permission|can't run"):  # quotas' EVAL:
        rt.eval("return redis.call('DEL', KEYS[1])", 1, lease)  # a script runs with the router's rights only
    rt.close()
    assert len(acl_log(rds)) >= 1  # what the suite's per-test check (conftest) fails on
    rds.execute_command("ACL", "LOG", "RESET")  # these denials were the point
    wait_for(lambda: rds.exists(lease), message="the lease still there")
