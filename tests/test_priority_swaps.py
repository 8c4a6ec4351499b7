"""Key priority in swaps (router/control/scheduler.py ``held_by_priority``), end to end: two real
routers sharing Redis, one real worker on a stand-in 40 GB GPU that holds one of two 30 GB
models. The priority 10 key uses ``b`` through one router; the priority -5 key's request for ``c``
through the other waits (with its reason) instead of evicting ``b`` (issue 26)."""

from __future__ import annotations

import threading
import time

from conftest import wait_for
from helpers import chat_body, request, start_router
from test_placement import gpu_model, gpu_worker, instances, running_on, uid, wait_devices

KEYS = {"hi": "high-priority-key-0123456789", "lo": "low-priority-key-0123456789",
        "peer": "peer-priority-key-0123456789"}
ADMIN = "the-admin-key-0123456789abcdef"
KEYS_TOML = f"""
[[keys]]
name = "hi"
key = "{KEYS['hi']}"
priority = 10

[[keys]]
name = "peer"
key = "{KEYS['peer']}"
priority = 10

[[keys]]
name = "lo"
key = "{KEYS['lo']}"
priority = -5
"""


def chat(router, name: str, model: str, results: dict | None = None):
    resp = request("POST", f"{router.url}/v1/chat/completions", chat_body(model, max_tokens=1),
                   headers={"Authorization": f"Bearer {KEYS[name]}"}, timeout=60)
    if results is not None:
        results[name] = resp
    return resp


def pending(router, model: str) -> dict:
    return request("GET", f"{router.url}/api/models/{model}/info").json()["model"].get("pending") or {}


def test_a_lower_priority_key_does_not_evict_a_higher_priority_keys_model(procs, redis_url, tmp_path):
    wid, b, c = uid("w"), uid("b"), uid("c")
    gpu_worker(procs, redis_url, tmp_path, wid, [40000], gpu_model(b, 30000), gpu_model(c, 30000))
    keys = tmp_path / "keys.toml"
    keys.write_text(KEYS_TOML)
    env = {"LLM_ROUTER_API_KEYS_FILE": str(keys), "LLM_ROUTER_ADMIN_KEYS": ADMIN, "LLM_ROUTER_READ_ACCESS": "public"}
    r1, r2 = start_router(procs, redis_url, env=env), start_router(procs, redis_url, env=env)
    for r in (r1, r2):
        wait_devices(r, wid)

    assert chat(r1, "hi", b).status == 200  # started on demand for the priority 10 key
    loaded_at = instances(r1, b)[wid]["started_at"]
    results: dict = {}
    low = threading.Thread(target=chat, args=(r2, "lo", c, results))
    low.start()
    # the low-priority request waits, on either router's view, with the reason
    wait_for(lambda: (pending(r2, c).get("blocked") or [{}])[0].get("kind") == "priority", timeout=10,
             message="c held back by b's priority")
    assert pending(r2, c)["blocked"][0] == {"kind": "priority", "model": b, "priority": 10}
    # b keeps serving its key, warm, through several of r2's decisions (one every 0.5 s)
    until = time.monotonic() + 2.0
    while time.monotonic() < until:
        assert chat(r1, "hi", b).status == 200
        assert running_on(r1, b) == [wid] and running_on(r2, c) == []
    assert "lo" not in results
    assert instances(r1, b)[wid]["started_at"] == loaded_at  # never reloaded

    # an operator frees the GPU: the waiting request is served then
    assert request("POST", f"{r1.url}/api/models/{b}/stop", headers={"Authorization": f"Bearer {ADMIN}"},
                   timeout=30).status == 200
    low.join(60)
    assert results["lo"].status == 200, results["lo"].body
    assert running_on(r2, c) == [wid]

    # equal priorities keep today's rules: the peer key (10) evicts c, last used at -5
    assert chat(r2, "peer", b).status == 200
    assert running_on(r1, b) == [wid] and running_on(r1, c) == []
