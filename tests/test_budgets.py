"""GPU-time budgets per group (router/limits/budgets.py), end to end: two real routers, a real
worker on a stand-in GPU, a group with a budget of a fraction of a GPU-second's hour. Over
budget, its requests are still served by running models but may not start one (429 with the
reset time); another key may, and then the group uses that model too."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone

import pytest
import redis.asyncio as aredis
from conftest import wait_for
from fake_nvml import fake_gpu_env
from helpers import assert_bad_keys_file, chat_body, request, start_router, start_worker, write_config
from llm_lab_router.protocol import Keys
from llm_lab_router.redis_server import free_port
from llm_lab_router.router.core.errors import ApiError
from llm_lab_router.router.limits.budgets import Budget, Budgets, period_bounds
from test_placement import gpu_model, uid, wait_devices

KEYS = {"tiny": "tiny-budget-key-0123456789", "free": "free-budget-key-0123456789",
        "ops": "ops-budget-admin-0123456789"}
BUDGET = 0.0002  # GPU hours: 0.72 GPU-seconds
KEYS_TOML = f"""
[groups.small]
gpu_hours = {BUDGET}
budget_period = "day"

[[keys]]
name = "tiny"
key = "{KEYS['tiny']}"
group = "small"

[[keys]]
name = "free"
key = "{KEYS['free']}"
"""


def chat(router, name: str, model: str):
    return request("POST", f"{router.url}/v1/chat/completions", chat_body(model, max_tokens=1),
                   headers={"Authorization": f"Bearer {KEYS[name]}"}, timeout=30)


def budgets(router, name: str = "ops") -> list[dict]:
    resp = request("GET", f"{router.url}/api/usage", headers={"Authorization": f"Bearer {KEYS[name]}"})
    assert resp.status == 200, resp.body
    return resp.json()["budgets"]


def test_a_group_over_its_budget_uses_running_models_but_starts_none(procs, redis_url, tmp_path) -> None:
    wid, b, c = uid("w"), uid("b"), uid("c")
    config = write_config(tmp_path / "host.toml", gpu_model(b, 10000), gpu_model(c, 10000))
    start_worker(procs, redis_url, config, wid, env=fake_gpu_env(40000))
    keys = tmp_path / "keys.toml"
    keys.write_text(KEYS_TOML)
    env = {"LLM_ROUTER_API_KEYS_FILE": str(keys), "LLM_ROUTER_ADMIN_KEYS": KEYS["ops"],
           "LLM_ROUTER_READ_ACCESS": "public", "LLM_ROUTER_BUDGET_REFRESH": "0.1"}
    r1, r2 = start_router(procs, redis_url, env=env), start_router(procs, redis_url, env=env)
    for r in (r1, r2):
        wait_devices(r, wid)

    assert chat(r1, "tiny", b).status == 200  # within budget: started on demand
    wait_for(lambda: budgets(r2)[0]["used_gpu_hours"] >= BUDGET, timeout=20, message="the budget used")
    state = budgets(r2, "tiny")  # a client key sees its own group's budget
    assert [(s["group"], s["gpu_hours"], s["period"]) for s in state] == [("small", BUDGET, "day")]

    assert chat(r2, "tiny", b).status == 200  # running: still served
    resp = chat(r2, "tiny", c)  # would start c: refused, saying when the budget resets
    assert resp.status == 429, resp.body
    error = resp.json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "gpu_budget_exceeded")
    resets = period_bounds("day", datetime.now(timezone.utc).timestamp())[1]
    assert "group 'small'" in error["message"]
    assert datetime.fromtimestamp(resets, timezone.utc).strftime("%Y-%m-%d %H:%M UTC") in error["message"]
    assert 1 <= int(resp.headers["Retry-After"]) <= 86400
    assert request("GET", f"{r2.url}/api/models/{c}/info").json()["model"]["status"] == "stopped"

    assert chat(r1, "free", c).status == 200  # a key without a budget starts it
    assert chat(r2, "tiny", c).status == 200  # and the group may use it now it runs


def test_a_budget_on_a_key_is_refused(tmp_path) -> None:
    assert_bad_keys_file(tmp_path / "keys.toml", '[[keys]]\nname = "a"\nkey = "0123456789abcdef0123"\ngpu_hours = 5\n',
                         "keys[0] ('a'): field 'gpu_hours'")


def test_periods_are_utc_days_iso_weeks_and_calendar_months() -> None:
    now = datetime(2026, 2, 18, 15, 30, tzinfo=timezone.utc).timestamp()  # a Wednesday
    day = [datetime.fromtimestamp(t, timezone.utc) for t in period_bounds("day", now)]
    week = [datetime.fromtimestamp(t, timezone.utc) for t in period_bounds("week", now)]
    month = [datetime.fromtimestamp(t, timezone.utc) for t in period_bounds("month", now)]
    assert [(d.month, d.day, d.hour) for d in day] == [(2, 18, 0), (2, 19, 0)]
    assert [(d.month, d.day) for d in week] == [(2, 16), (2, 23)]
    assert [(d.month, d.day) for d in month] == [(2, 1), (3, 1)]


def test_with_redis_down_a_budget_follows_the_quota_policy() -> None:

    async def check(policy: str) -> None:
        down = aredis.Redis(port=free_port(), socket_connect_timeout=0.2)  # nothing listens there
        try:
            await Budgets(down, Keys(), policy).check(Budget(group="g", gpu_hours=1.0))  # type: ignore[arg-type]
        finally:
            await down.aclose()

    asyncio.run(check("open"))  # admitted unchecked
    with pytest.raises(ApiError) as refused:
        asyncio.run(check("closed"))
    assert (refused.value.status, refused.value.code) == (503, "quota_unavailable")
