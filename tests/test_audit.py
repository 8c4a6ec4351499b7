"""The audit trail (llm_router/audit.py): every action that changes what runs lands in the
bounded stream ``llm:audit`` with who, what, when, from where and how it ended; ``GET
/api/audit`` and ``llm-router audit`` read it. End to end: two real routers, a real worker on
a stand-in 40 GB GPU (two 30 GB models: a start evicts the other), real keys files."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys

import pytest
import redis.asyncio as aredis
from conftest import wait_for
from fake_nvml import fake_gpu_env
from helpers import chat_body, request, start_router, start_worker, write_config
from llm_lab_router.audit import AuditTrail
from llm_lab_router.protocol import Keys
from llm_lab_router.router.http.query import parse_duration
from test_placement import gpu_model, uid, wait_devices

KEYS = {"alice": "alice-key-0123456789abcdef", "ops": "ops-admin-key-0123456789abcdef",
        "sam": "sam-scoped-key-0123456789abcdef"}


def auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}"}


def audit(router, name: str = "ops", query: str = "") -> list[dict]:
    resp = request("GET", f"{router.url}/api/audit{query}", headers=auth(name))
    assert resp.status == 200, resp.body
    return resp.json()["entries"]


def find(entries: list[dict], action: str, **fields) -> dict:
    found = [e for e in entries if e["action"] == action and all(e.get(k) == v for k, v in fields.items())]
    assert found, f"no {action} {fields} in {json.dumps(entries, indent=1)}"
    return found[-1]


@pytest.fixture
def lab(procs, redis_url, rds, tmp_path):
    rds.delete(Keys().audit())
    wid, b, c = uid("w"), uid("b"), uid("c")
    config = write_config(tmp_path / "host.toml", gpu_model(b, 30000), gpu_model(c, 30000))
    worker = start_worker(procs, redis_url, config, wid, env=fake_gpu_env(40000))
    clients, admins = tmp_path / "keys.toml", tmp_path / "admin.toml"
    clients.write_text(f'[[keys]]\nname = "alice"\nkey = "{KEYS["alice"]}"\n\n'
                       f'[[keys]]\nname = "sam"\nkey = "{KEYS["sam"]}"\nadmin = ["nothing-*"]\n')
    admins.write_text(f'[[keys]]\nname = "ops"\nkey = "{KEYS["ops"]}"\n')
    env = {"LLM_ROUTER_API_KEYS_FILE": str(clients), "LLM_ROUTER_ADMIN_KEYS_FILE": str(admins),
           "LLM_ROUTER_READ_ACCESS": "public"}
    r1, r2 = start_router(procs, redis_url, env=env), start_router(procs, redis_url, env=env)
    for r in (r1, r2):
        wait_devices(r, wid)
    return r1, r2, worker, config, wid, b, c


def test_every_action_is_in_the_trail_with_who_what_where_and_the_result(procs, redis_url, rds, lab) -> None:
    r1, r2, worker, config, wid, b, c = lab
    assert request("POST", f"{r1.url}/api/models/{b}/start", headers=auth("ops"), timeout=30).status == 200
    resp = request("POST", f"{r2.url}/v1/chat/completions", chat_body(c, max_tokens=1), headers=auth("alice"),
                   timeout=30)
    assert resp.status == 200, resp.body  # c started on demand for alice, evicting b
    assert request("POST", f"{r1.url}/api/models/{c}/stop", headers=auth("sam"), timeout=30).status == 403
    assert request("POST", f"{r1.url}/api/logs/{b}/clear", headers=auth("ops")).status == 200
    assert request("POST", f"{r2.url}/api/models/stop-all", headers=auth("ops"), timeout=30).status == 200
    assert request("POST", f"{r2.url}/api/models/restart-autostart", headers=auth("ops"), timeout=30).status == 200

    # a worker's own actions: a config reload, then engines adopted by its next run
    config.write_text(config.read_text() + "\n")
    os.kill(worker.pid, signal.SIGHUP)
    wait_for(lambda: any(e["action"] == "reload" for e in audit(r1)), timeout=10, message="the reload recorded")
    assert request("POST", f"{r1.url}/api/models/{b}/start", headers=auth("ops"), timeout=30).status == 200
    assert procs.stop(worker, signal.SIGTERM) == 0  # its engines keep running for the next run
    start_worker(procs, redis_url, config, wid, env=fake_gpu_env(40000))
    wait_for(lambda: any(e["action"] == "adopt" for e in audit(r1)), timeout=20, message="the adoption recorded")

    entries = audit(r2)  # any router serves the whole trail, oldest first
    assert [e["at"] for e in entries] == sorted(e["at"] for e in entries)
    start = find(entries, "start", model=b, who="ops")
    assert (start["client"], start["result"], start["host"]) == ("127.0.0.1", "ok", wid)
    evict = find(entries, "evict", who="alice")
    assert (evict["model"], evict["models"], evict["host"], evict["result"]) == (c, [b], wid, "ok")
    assert f"'{c}'" in evict["detail"] and "'alice'" in evict["detail"]
    on_demand = find(entries, "on_demand_start", model=c)
    assert (on_demand["who"], on_demand["client"], on_demand["host"], on_demand["result"]) == \
        ("alice", "127.0.0.1", wid, "ok")
    refused = find(entries, "stop", who="sam")
    assert refused["model"] == c and refused["result"].startswith("403 ") and "admin scope" in refused["result"]
    assert find(entries, "clear_logs", who="ops")["model"] == b
    assert find(entries, "restart_autostart", who="ops")["result"] == "ok"
    assert find(entries, "stop_all", who="ops")["models"] == [c]
    reload = find(entries, "reload", who=f"worker:{wid}")
    assert (reload["host"], reload["result"]) == (wid, "ok")
    assert find(entries, "adopt", who=f"worker:{wid}")["models"] == [b]

    # the stream itself, as redis-cli XRANGE reads it; only admins read it over HTTP
    assert rds.xlen(Keys().audit()) == len(entries)
    assert request("GET", f"{r1.url}/api/audit", headers=auth("alice")).status == 403
    assert audit(r1, query="?since=1s&limit=1")[-1]["action"] in ("adopt", "start")
    resp = request("GET", f"{r1.url}/api/audit?since=yesterday", headers=auth("ops"))
    assert resp.status == 400 and "since" in resp.json()["message"]

    env = {**os.environ, "LLM_ROUTER_API_KEY": KEYS["ops"]}
    cli = [sys.executable, "-m", "llm_lab_router.cli", "audit", "--url", r1.url, "--since", "1h"]
    done = subprocess.run([*cli, "--json"], capture_output=True, text=True, timeout=30, env=env)
    assert done.returncode == 0 and json.loads(done.stdout)["entries"] == entries, done.stderr
    done = subprocess.run(cli, capture_output=True, text=True, timeout=30, env=env)
    assert done.returncode == 0 and "evict" in done.stdout and "alice" in done.stdout, done.stderr


def test_the_trail_is_bounded(redis_url) -> None:
    async def run() -> int:
        client = aredis.Redis.from_url(redis_url)
        keys = Keys(f"bound-{uid('t')}:")
        trail = AuditTrail(client, keys, "test", maxlen=100)
        try:
            for _ in range(1000):
                await trail.record("k", "stop", model="m")
            return await client.xlen(keys.audit())
        finally:
            await client.delete(keys.audit())
            await client.aclose()
    assert 100 <= asyncio.run(run()) < 300  # MAXLEN ~: trimmed by whole stream nodes


def test_durations() -> None:
    assert [parse_duration(t) for t in ("90", "90s", "15m", "12h", "1d", "2w")] == \
        [90, 90, 900, 43200, 86400, 1209600]
    with pytest.raises(ValueError):
        parse_duration("1y")
