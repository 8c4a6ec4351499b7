"""The shipped Redis ACL users (examples/redis-users.acl), which the session Redis runs with
(conftest): workers and routers run with their restricted users; a router's user cannot write
what workers own, a worker's user cannot write another worker's keys or read its commands, a
record or event one worker forges for another never receives a prompt, and the suite's own ACL
check catches a denied command."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import redis as redis_sync
from conftest import role_url, wait_for
from helpers import (
    DEMO_MODELS,
    SseStream,
    chat_body,
    get_json,
    process_url,
    request,
    start_router,
    start_worker,
    wait_models,
    wait_status,
    write_config,
)
from llm_lab_router.protocol import (
    LOG_SHIP_SCRIPT, CatalogEntry, Command, Event, Instance, Keys, WorkerInfo, command_fields, to_hash, to_json,
)
from raw_engine import RawEngine

KEYS = Keys()


def acl_log(rds: redis_sync.Redis) -> list:
    return rds.execute_command("ACL", "LOG")


def denied(rds: redis_sync.Redis, *attempts) -> None:
    """Every attempt is refused by Redis's ACL (NOPERM, or a script's command refused); the
    denials were the point, so the log the suite checks (conftest) is emptied after."""
    for attempt in attempts:
        with pytest.raises(redis_sync.exceptions.ResponseError) as refused:
            attempt()
        assert isinstance(refused.value, redis_sync.exceptions.NoPermissionError) or (
            "script" in str(refused.value) and "permission" in str(refused.value).lower()), refused.value
    logged = acl_log(rds)  # what the suite's per-test check fails on (repeats are counted in one entry)
    rds.execute_command("ACL", "LOG", "RESET")
    assert logged


def worker_owned_keys(wid: str) -> list[str]:
    """One key of every kind a worker owns."""
    return [KEYS.worker(wid), KEYS.version(wid), KEYS.catalog(wid), KEYS.instance("demo-chat", wid),
            KEYS.devices(wid), KEYS.log_position(wid, "demo-chat", "stdout"), KEYS.learned(wid, "demo-chat")]


def test_session_redis_has_the_shipped_users(redis_server, redis_urls, redis_url, rds) -> None:
    with pytest.raises(redis_sync.AuthenticationError):
        redis_sync.Redis(host=redis_server.host, port=redis_server.port).ping()  # `default` is off
    assert rds.acl_whoami() == "admin"
    assert {"admin", "default", "router", "reader"} <= set(rds.acl_users())
    assert "worker" not in rds.acl_users()  # no user shared by all workers: each has its own
    assert role_url(redis_url, "worker", "w1") == redis_urls.worker("w1") and "worker.w1" in rds.acl_users()
    assert role_url(redis_url, "router") == redis_urls.router and role_url(redis_url, "reader") == redis_urls.reader
    for url in (redis_urls.worker("w1"), redis_urls.router, redis_urls.reader):
        client = redis_sync.Redis.from_url(url)
        assert client.ping()
        client.close()
    other = "redis://127.0.0.1:6379/0"  # a test's private Redis without users keeps its URL
    assert role_url(other, "router") == other
    assert process_url(redis_url, "router", prefix="other:") == redis_url  # outside the `llm:` patterns: admin


def test_worker_and_router_work_with_their_acl_users(procs, redis_url, redis_urls, rds, tmp_path) -> None:
    wid = f"w-{uuid.uuid4().hex[:8]}"
    start_worker(procs, redis_url, write_config(tmp_path / "models.toml", *DEMO_MODELS), wid)  # as worker.<wid>
    router = start_router(procs, redis_url)  # as router, its cluster view as reader
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

    # What a compromised router must not be able to do: create or change any worker-owned
    # record (the instance URL every router sends a model's prompts to, above all), or
    # anything outside its own keys.
    rt = redis_sync.Redis.from_url(redis_urls.router)
    owned = worker_owned_keys(wid)
    denied(rds, *[lambda k=k: rt.hset(k, "url", "http://evil") for k in owned],
           *[lambda k=k: rt.expire(k, 1) for k in owned],
           *[lambda k=k: rt.hgetall(k) for k in owned[:1]],  # it does not even read them (its view's user does)
           lambda: rt.sadd(KEYS.workers(), "ghost"), lambda: rt.publish(KEYS.events(wid), "{}"),
           lambda: rt.flushall(), lambda: rt.config_get("dir"), lambda: rt.get("other-app:secret"),
           lambda: rt.lpush(KEYS.reply(wid, "x"), "{}"), lambda: rt.keys("*"),
           lambda: rt.xreadgroup("workers", "thief", {KEYS.commands(wid): ">"}, count=1),
           lambda: rt.eval("return redis.call('HSET', KEYS[1], 'url', 'http://evil')", 1, owned[3]))
    rt.close()

    # The view's user reads, and writes nothing at all.
    rd = redis_sync.Redis.from_url(redis_urls.reader)
    assert rd.hgetall(KEYS.worker(wid))
    denied(rds, *[lambda k=k: rd.hset(k, "url", "http://evil") for k in owned],
           lambda: rd.set(KEYS.version(wid), "x"), lambda: rd.delete(KEYS.worker(wid)),
           lambda: rd.publish(KEYS.events(wid), "{}"), lambda: rd.xadd(KEYS.commands(wid), {"data": "{}"}),
           lambda: rd.hset(KEYS.used("demo-chat"), "x", "1"))
    rd.close()
    wait_for(lambda: rds.exists(KEYS.worker(wid)), message="the lease still there")


def test_a_worker_cannot_touch_another_workers_keys_or_commands(procs, redis_url, redis_urls, rds,
                                                                  tmp_path) -> None:
    a, b = f"wa-{uuid.uuid4().hex[:6]}", f"wb-{uuid.uuid4().hex[:6]}"
    start_worker(procs, redis_url, write_config(tmp_path / "models.toml", *DEMO_MODELS), a)
    wait_for(lambda: rds.exists(KEYS.catalog(a)), message="worker A's catalog")
    wb = redis_sync.Redis.from_url(redis_urls.worker(b))
    wb.hset(KEYS.worker(b), "id", b)  # its own keys: fine
    wb.set(KEYS.version(b), "x:1")
    wb.publish(KEYS.events(b), to_json(Event(kind="catalog", worker=b)))
    assert acl_log(rds) == []
    command = command_fields(Command(op="stop_all"))
    denied(rds, *[lambda k=k: wb.hset(k, "url", "http://evil") for k in worker_owned_keys(a)],
           *[lambda k=k: wb.pexpire(k, 1) for k in worker_owned_keys(a)],
           *[lambda k=k: wb.delete(k) for k in worker_owned_keys(a)],
           lambda: wb.hgetall(KEYS.catalog(a)),
           lambda: wb.publish(KEYS.events(a), to_json(Event(kind="worker", worker=a, alive=False))),
           lambda: wb.xadd(KEYS.commands(a), command),  # "stop every model on host A"
           lambda: wb.xreadgroup("workers", b, {KEYS.commands(a): ">"}, count=1),
           lambda: wb.xrange(KEYS.commands(a)),
           lambda: wb.lpush(KEYS.reply(a, "some-command"), "{}"),
           lambda: wb.eval(LOG_SHIP_SCRIPT, 2, KEYS.logs("demo-chat"), KEYS.log_position(a, "demo-chat", "stdout"),
                           100, b, "stdout", "f", 0, 1, "1", "x"),
           lambda: wb.hset(KEYS.waiting(), "m@r", "{}"),
           lambda: wb.set("other-app:secret", "x"))
    wb.close()
    assert rds.exists(KEYS.worker(a)) and rds.hgetall(KEYS.catalog(a))


def test_a_forged_record_never_receives_a_prompt(procs, redis_url, redis_urls, rds, tmp_path) -> None:
    """Worker B (a compromised host, with its own Redis user) claims worker A's model on its own
    channel and in its own keys, the only places it can write: routers take neither."""
    a, b = f"wa-{uuid.uuid4().hex[:6]}", f"wb-{uuid.uuid4().hex[:6]}"
    start_worker(procs, redis_url, write_config(tmp_path / "models.toml", *DEMO_MODELS), a)
    router = start_router(procs, redis_url)
    wait_models(router, 2)
    assert request("POST", f"{router.url}/api/models/demo-chat/start").status == 200
    real = wait_status(router, "demo-chat", "running")["instances"][0]["url"]
    trap = RawEngine()  # an attacker's engine: counts the connections it gets
    forged = Instance(model="demo-chat", worker=a, state="running", url=trap.url, seq=10**6)
    wb = redis_sync.Redis.from_url(redis_urls.worker(b))
    wb.publish(KEYS.events(b), to_json(Event(kind="instance", worker=a, instance=forged)))
    wb.publish(KEYS.events(b), to_json(Event(kind="instance", worker=b, instance=forged)))
    lease = WorkerInfo(id=b, host="b", pid=1, version="x", started_at=0, heartbeat_at=0)
    wb.hset(KEYS.worker(b), mapping=to_hash(lease))
    wb.sadd(KEYS.workers(), b)
    wb.hset(KEYS.catalog(b), mapping={"demo-chat": to_json(CatalogEntry(id="demo-chat", on_demand=False))})
    wb.hset(KEYS.instance("demo-chat", b), mapping=to_hash(forged))  # B's own key, A's name in it
    wb.publish(KEYS.events(b), to_json(Event(kind="catalog", worker=b)))  # read after the two above
    wait_for(lambda: b in get_json(f"{router.url}/api/models/demo-chat/info")["model"]["workers"],
             message="the router to read worker B")
    info = get_json(f"{router.url}/api/models/demo-chat/info")["model"]
    assert [(i["worker"], i["url"]) for i in info["instances"]] == [(a, real)]
    for _ in range(10):
        assert request("POST", f"{router.url}/v1/chat/completions", chat_body("demo-chat")).status == 200
    assert trap.connections == 0
    assert f"written by worker '{b}'" in procs.log(router.proc)  # said once, not per event
    trap.close()
    wb.close()


def test_redis_user_add_worker_makes_a_user_for_that_worker_only(redis_url, rds, tmp_path: Path) -> None:
    wid = f"new-{uuid.uuid4().hex[:6]}"
    secret = tmp_path / "pw"
    cli = [sys.executable, "-m", "llm_lab_router.cli", "redis-user", "add-worker", wid, "--password-file", str(secret)]
    env = {**os.environ, "LLM_ROUTER_REDIS_URL": redis_url}
    done = subprocess.run([*cli, "--apply"], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    password = secret.read_text().strip()
    line = done.stdout.strip()
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600 and password not in line + done.stderr
    assert line.startswith(f"user worker.{wid} on #") and f" ~llm:w:{wid}:* ~llm:cmd:{wid} " in line
    worker = redis_sync.Redis(host=rds.connection_pool.connection_kwargs["host"],
                              port=rds.connection_pool.connection_kwargs["port"], username=f"worker.{wid}",
                              password=password)
    worker.set(KEYS.version(wid), "e:1")
    denied(rds, lambda: worker.set(KEYS.version("someone-else"), "e:1"))
    worker.close()
    again = subprocess.run([*cli, "--apply"], env=env, capture_output=True, text=True, timeout=30)
    assert again.returncode == 2 and "exists" in again.stderr  # a password file is never replaced
    bad = subprocess.run([*cli[:-3], "a:b", "--password-file", str(tmp_path / "x")], env=env, capture_output=True,
                         text=True, timeout=30)
    assert bad.returncode == 2 and "'a:b' is not" in bad.stderr and not (tmp_path / "x").exists()


def test_a_worker_id_that_could_cover_anothers_keys_is_refused(redis_url, tmp_path: Path) -> None:
    config = write_config(tmp_path / "models.toml", *DEMO_MODELS)
    for wid in ("a:b", "gpu*", "x[1]", ""):
        done = subprocess.run([sys.executable, "-m", "llm_lab_router.cli", "worker", "--config", str(config),
                               "--redis", redis_url, "--worker-id", wid or " "], capture_output=True, text=True,
                              timeout=30)
        assert done.returncode == 2 and "is not 1-64 of" in done.stderr, done.stderr
    (tmp_path / "bad.toml").write_text('[worker]\nid = "gpu1:x"\n' + config.read_text().split("\n", 1)[1])
    done = subprocess.run([sys.executable, "-m", "llm_lab_router.cli", "worker", "--config", str(tmp_path / "bad.toml"),
                           "--redis", redis_url], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "bad.toml:2: worker: id: 'gpu1:x' is not 1-64 of" in done.stderr, done.stderr
