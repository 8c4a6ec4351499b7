"""A crash loop stays within its limits when requests keep coming.

The engine crashes after each request it serves (``--crash-after 1``), as a vLLM whose engine
core died does. Requests keep arriving through a router: each on-demand start of the failed
model is a restart — counted, backed off, bounded by ``max_restarts`` within
``restart_window`` — until the budget is spent and requests get a 503 saying so. Only an
operator's start resets the budget, and the last failure stays visible in ``/info``.
"""

from __future__ import annotations

from conftest import wait_for
from helpers import chat_body, get_json, model_block, request, start_router, start_worker, wait_models, write_config


def instance(router, model: str) -> dict:
    (inst,) = get_json(f"{router.url}/api/models/{model}/info")["model"]["instances"]
    return inst


def test_requests_do_not_restart_a_crash_looping_engine_beyond_its_budget(procs, redis_url, tmp_path):
    block = model_block("loop", engine_args=["--crash-after", "1"], restart="on-failure", max_restarts=2,
                        restart_window=120.0)
    start_worker(procs, redis_url, write_config(tmp_path / "w.toml", block), "loop-host")
    router = start_router(procs, redis_url)
    wait_models(router, 1)
    statuses = []
    for _ in range(6):
        resp = request("POST", f"{router.url}/v1/chat/completions", chat_body("loop", max_tokens=1), timeout=60)
        statuses.append(resp.status)
        if resp.status != 200:
            break
        # the engine dies after its answer: wait until the router has seen it go (a request sent
        # in between meets the dead engine: a 502, see docs/deploy.md)
        wait_for(lambda: instance(router, "loop")["state"] != "running", timeout=10, message="the crash seen")
    # the first start, then two restarts (1 s, 2 s of back-off): three requests served, then refused
    assert statuses == [200, 200, 200, 503], statuses
    error = resp.json()["error"]
    assert "not restarting: 2 restarts within 120s" in error["message"], error
    inst = instance(router, "loop")
    assert inst["state"] == "failed" and inst["restarts"] == 2
    assert inst["last_error"] and inst["last_error_at"] > 0

    # an operator's start gives a fresh budget; the last failure stays on show while it runs
    assert request("POST", f"{router.url}/api/models/loop/start", timeout=60).status == 200
    inst = instance(router, "loop")
    assert inst["state"] == "running" and inst["last_error"] and inst["last_error_at"] > 0, inst
