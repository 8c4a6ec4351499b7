"""The usage ledger (llm_router/ledger.py, router/observe/ledger.py, worker/gpu_time.py), end to
end: two real routers and a real worker on a stand-in 40 GB GPU; two keys in two groups use two
models through both routers; a third model (auto_start) is used by nobody. The
ledger's sums equal the engines' own request counts; GPU time is split by tokens; idle
residency goes to ``idle``."""

from __future__ import annotations

import asyncio
import csv
import json
import os
import subprocess
import sys

import redis.asyncio as aredis
from conftest import wait_for
from fake_nvml import fake_gpu_env
from helpers import SseStream, chat_body, engine_stats, request, start_router, start_worker, write_config
from llm_lab_router.ledger import HOUR
from llm_lab_router.protocol import Keys
from llm_lab_router.redis_server import free_port
from llm_lab_router.router.observe.accesslog import RequestRecord
from llm_lab_router.router.observe.ledger import Ledger, gpu_shares, parse_hour, report
from llm_lab_router.worker.gpu_time import split_by_hour
from test_placement import gpu_model, instances, uid, wait_devices

KEYS = {"alice": "alice-ledger-key-0123456789", "bob": "bob-ledger-key-0123456789",
        "ops": "ops-ledger-admin-0123456789"}
KEYS_TOML = f"""
[groups.vision]
[groups.nlp]

[[keys]]
name = "alice"
key = "{KEYS['alice']}"
group = "vision"

[[keys]]
name = "bob"
key = "{KEYS['bob']}"
group = "nlp"
"""


def auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}"}


def chat(router, name: str, model: str) -> None:
    resp = request("POST", f"{router.url}/v1/chat/completions", chat_body(model, max_tokens=3), headers=auth(name),
                   timeout=30)
    assert resp.status == 200, resp.body


def usage(router, name: str = "ops", query: str = "") -> dict:
    resp = request("GET", f"{router.url}/api/usage{query}", headers=auth(name))
    assert resp.status == 200, resp.body
    return resp.json()


def rows(body: dict) -> dict[str, dict]:
    return {r["name"]: r for r in body["rows"]}


def test_the_ledger_counts_every_request_once_across_routers_and_splits_gpu_time(procs, redis_url, tmp_path):
    wid, b, c, d = uid("w"), uid("b"), uid("c"), uid("d")
    config = write_config(tmp_path / "host.toml", gpu_model(b, 10000), gpu_model(c, 10000),
                          gpu_model(d, 10000, auto_start=True))
    start_worker(procs, redis_url, config, wid, env=fake_gpu_env(40000))
    keys = tmp_path / "keys.toml"
    keys.write_text(KEYS_TOML)
    env = {"LLM_ROUTER_API_KEYS_FILE": str(keys), "LLM_ROUTER_ADMIN_KEYS": KEYS["ops"], "LLM_ROUTER_READ_ACCESS": "public"}
    r1, r2 = start_router(procs, redis_url, env=env), start_router(procs, redis_url, env=env)
    for r in (r1, r2):
        wait_devices(r, wid)

    for router, name, model, times in ((r1, "alice", b, 3), (r2, "alice", b, 2), (r2, "bob", b, 1),
                                       (r1, "bob", c, 3), (r2, "bob", c, 1)):
        for _ in range(times):
            chat(router, name, model)
    stream = SseStream(f"{r1.url}/v1/chat/completions", method="POST", headers=auth("alice"),
                       body=chat_body(c, stream=True, max_tokens=4))  # no usage asked for: estimated
    assert stream.status == 200 and stream.events_until(lambda ev: ev.get("data") == "[DONE]")[-1]["data"] == "[DONE]"
    stream.close()
    served = sum(engine_stats(instances(r1, m)[wid]["url"])["requests"] for m in (b, c))
    assert served == 11

    # both routers' counts reach Redis within a second or so; any router reports the sum
    wait_for(lambda: usage(r2)["total"]["requests"] == served, timeout=10, message="the ledger's sum")
    by_key = rows(usage(r1))
    assert (by_key["alice"]["requests"], by_key["bob"]["requests"]) == (6, 5)
    assert by_key["alice"]["errors"] == by_key["bob"]["errors"] == 0
    assert by_key["bob"]["tokens_in"] > 0 and by_key["bob"]["tokens_out"] > 0 and by_key["bob"]["tokens_estimated"] == 0
    assert by_key["alice"]["tokens_estimated"] > 0  # her stream reported no usage
    by_model = rows(usage(r1, query="?by=model"))
    assert (by_model[b]["requests"], by_model[c]["requests"]) == (6, 5)
    assert {r["name"] for r in usage(r1, query="?by=group")["rows"]} >= {"vision", "nlp"}

    # GPU time: every running model's resident GPU-seconds, all of it attributed
    wait_for(lambda: all(rows(usage(r1, query="?by=model")).get(m, {}).get("gpu_hours", 0) > 0 for m in (b, c, d)),
             timeout=10, message="GPU time of the three models")
    body = usage(r1, query="?by=model")
    assert "idle" in rows(usage(r1)) and rows(usage(r1))["idle"]["requests"] == 0  # d: auto_start, unused
    by_key_total = sum(r["gpu_hours"] for r in usage(r1)["rows"])
    assert abs(by_key_total - body["total"]["gpu_hours"]) < 1e-3

    # a client key sees its own rows only; no key, no report
    mine = usage(r1, "alice")
    assert [r["name"] for r in mine["rows"]] == ["alice"] and mine["total"]["requests"] == 6
    assert request("GET", f"{r1.url}/api/usage").status == 401
    assert request("GET", f"{r1.url}/api/usage?by=team", headers=auth("ops")).status == 400

    cli = [sys.executable, "-m", "llm_lab_router.cli", "usage", "--url", r1.url, "--since", "1d", "--by", "group"]
    env = {**os.environ, "LLM_ROUTER_API_KEY": KEYS["ops"]}
    done = subprocess.run([*cli, "--csv"], capture_output=True, text=True, timeout=30, env=env)
    assert done.returncode == 0, done.stderr
    table = {row["group"]: row for row in csv.DictReader(done.stdout.splitlines())}
    assert (table["vision"]["requests"], table["nlp"]["requests"], table["total"]["requests"]) == ("6", "5", "11")
    done = subprocess.run([*cli, "--json"], capture_output=True, text=True, timeout=30, env=env)
    assert done.returncode == 0 and json.loads(done.stdout)["by"] == "group", done.stderr


def test_gpu_time_splits_by_tokens_then_requests_and_goes_to_idle_unused() -> None:
    hour = {"gpu|m|w1": "30", "gpu|m|w2": "30", "gpu|n|w1": "10", "gpu|u|w1": "7",
            "req|a|g|m": "1", "in|a|g|m": "30", "req|b|-|m": "3", "in|b|-|m": "10",
            "req|a|g|n": "2", "req|b|-|n": "3"}
    counts, gpu, loads = parse_hour(hour)
    assert (gpu, loads) == ({"m": 60.0, "n": 10.0, "u": 7.0}, {})
    shares = gpu_shares(counts, gpu)
    assert shares == {("a", "g", "m"): 45.0, ("b", "-", "m"): 15.0, ("a", "g", "n"): 4.0, ("b", "-", "n"): 6.0,
                      ("idle", "idle", "u"): 7.0}
    by_key = {r.name: r for r in report({0: hour}, "key")}
    assert by_key["a"].requests == 3 and abs(by_key["a"].gpu_hours * 3600 - 49.0) < 0.01
    assert [r.name for r in report({0: hour}, "key", only_key="b")] == ["b"]
    # u was started by c in an earlier hour and left unused since: its GPU time is c's
    earlier = {"load|c|g2|u": "1", "gpu|u|w1": "5"}
    by_key = {r.name: r for r in report({0: earlier, HOUR: hour}, "key")}
    assert abs(by_key["c"].gpu_hours * 3600 - 12.0) < 0.01 and "idle" not in by_key
    assert split_by_hour(HOUR - 10, HOUR + 5) == [(0, 10), (HOUR, 5)]


def test_a_ledger_write_redis_refused_is_added_later(redis_url) -> None:
    """Redis unreachable: the counts are kept and written once it answers (no loss, no double)."""

    async def run() -> dict:
        keys = Keys(f"ledger-{uid('t')}:")
        down = aredis.Redis(port=free_port(), socket_connect_timeout=0.2)  # nothing listens there
        up = aredis.Redis.from_url(redis_url, decode_responses=True)
        ledger = Ledger(down, keys, retention_days=1, clock=lambda: 7200.5)
        rec = RequestRecord("POST", "/v1/chat/completions", 0.0)
        rec.model, rec.prompt_estimate = "m", 10
        for status in (200, 200, 503):
            ledger.add(rec, status, None)
        await ledger.flush()  # refused: kept
        ledger.add(rec, 200, None)
        ledger.redis = up
        await ledger.flush()
        await ledger.flush()  # nothing left: nothing written twice
        try:
            return await up.hgetall(keys.ledger(7200))
        finally:
            await up.delete(keys.ledger(7200))
            await up.aclose()
            await down.aclose()

    assert asyncio.run(run()) == {"req|-|-|m": "4", "err|-|-|m": "1", "in|-|-|m": "40", "est_in|-|-|m": "40"}
