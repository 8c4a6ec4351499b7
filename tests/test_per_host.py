"""Per-host control: ``POST /api/models/{alias}/start?worker=H`` and ``.../stop?worker=H``.

Two real workers on one Redis, one router, the mock engine: a start with ``worker`` runs the
model on that host only (even where another host could take it, or already runs it), a stop
with ``worker`` stops that host's instance only, and a host that is unknown, not live or
without the model in its catalog is a 404 that starts nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import wait_for
from helpers import Router, get_json, model_block, request, start_router, start_worker, wait_models, write_config
from llm_lab_router.protocol import Keys

A, B = f"pa{os.getpid()}", f"pb{os.getpid()}"  # per session: a concurrent suite's workers have other ids
SHARED = model_block("shared", aliases=["both"])
ONLY_B = model_block("only-b")


@pytest.fixture
def two_hosts(procs, redis_url, tmp_path: Path) -> Router:
    start_worker(procs, redis_url, write_config(tmp_path / "a.toml", SHARED), A)
    start_worker(procs, redis_url, write_config(tmp_path / "b.toml", SHARED, ONLY_B), B)
    router = start_router(procs, redis_url)
    wait_for(lambda: len(get_json(f"{router.url}/api/devices/info")["hosts"]) == 2
             if request("GET", f"{router.url}/api/devices/info").status == 200 else False,
             timeout=20, message="both workers live")
    wait_models(router, 2)
    wait_for(lambda: get_json(f"{router.url}/api/models/shared/info")["model"]["workers"] == sorted([A, B]),
             timeout=20, message="both catalogs")
    return router


def states(router: Router, model: str) -> dict[str, str]:
    return {i["worker"]: i["state"] for i in get_json(f"{router.url}/api/models/{model}/info")["model"]["instances"]}


def test_start_and_stop_on_one_host(two_hosts: Router) -> None:
    url = two_hosts.url
    resp = request("POST", f"{url}/api/models/both/start?worker={B}", timeout=30)
    assert resp.status == 200, resp.body
    assert resp.json() == {"success": True, "message": f"模型 'both' 启动成功 (worker '{B}')", "model": "shared",
                           "state": "running", "workers": [B]}
    assert states(two_hosts, "shared").get(B) == "running" and states(two_hosts, "shared").get(A) != "running"

    # A runs it too once asked by name, although it already serves on B
    resp = request("POST", f"{url}/api/models/shared/start?worker={A}", timeout=30)
    assert resp.status == 200 and resp.json()["workers"] == [A], resp.body
    assert states(two_hosts, "shared") == {A: "running", B: "running"}

    resp = request("POST", f"{url}/api/models/shared/stop?worker={A}", timeout=30)
    assert resp.status == 200, resp.body
    assert resp.json() == {"success": True, "message": f"模型 'shared' 停止成功 (worker '{A}')", "model": "shared",
                           "workers": [A]}
    wait_for(lambda: states(two_hosts, "shared").get(A) == "stopped", message="A's instance stopped")
    assert states(two_hosts, "shared")[B] == "running"  # B's was left alone

    resp = request("POST", f"{url}/api/models/shared/stop", timeout=30)  # no worker: every host
    assert resp.status == 200 and resp.json()["workers"] == sorted([A, B])


def test_start_without_waiting_on_one_host(two_hosts: Router) -> None:
    resp = request("POST", f"{two_hosts.url}/api/models/shared/start?worker={A}&wait=false")
    assert resp.status == 202 and resp.json()["workers"] == [A] and resp.json()["state"] == "starting"
    wait_for(lambda: states(two_hosts, "shared").get(A) == "running", timeout=20, message="running on A")
    assert states(two_hosts, "shared").get(B) != "running"


def test_an_unknown_host_or_one_without_the_model_is_refused(two_hosts: Router, rds) -> None:
    url = two_hosts.url
    for action in ("start", "stop"):
        resp = request("POST", f"{url}/api/models/shared/{action}?worker=nowhere")
        assert resp.status == 404, resp.body
        assert resp.json()["success"] is False and "worker 'nowhere' is not live" in resp.json()["message"]
        assert A in resp.json()["message"] and B in resp.json()["message"]  # the live ones, to pick from
        resp = request("POST", f"{url}/api/models/only-b/{action}?worker={A}")
        assert resp.status == 404 and f"not in the catalog of worker '{A}'" in resp.json()["message"], resp.body
        for blank in ("", "%20"):
            resp = request("POST", f"{url}/api/models/shared/{action}?worker={blank}")
            assert resp.status == 400 and "worker" in resp.json()["message"], resp.body
    assert rds.xlen(Keys().commands(A)) == rds.xlen(Keys().commands(B)) == 0  # nothing was sent to a worker
    assert set(states(two_hosts, "shared").values()) <= {"stopped"}


def test_openapi_documents_the_worker_parameter(two_hosts: Router) -> None:
    paths = get_json(f"{two_hosts.url}/openapi.json")["paths"]
    for action in ("start", "stop"):
        op = paths[f"/api/models/{{alias}}/{action}"]["post"]
        assert "worker" in [p["name"] for p in op["parameters"]]
        assert "404" in op["responses"]


def test_a_stop_a_host_does_not_confirm_names_it_in_failed_and_the_cli_says_so_in_english(procs, redis_url,
                                                                                         rds) -> None:
    from click.testing import CliRunner
    from helpers import FakeWorker
    from llm_lab_router.cli import main
    from llm_lab_router.protocol import CatalogEntry

    FakeWorker(rds, "ghost").publish(CatalogEntry(id="shared"))  # a lease and a catalog, no process reading commands
    router = start_router(procs, redis_url, env={"LLM_ROUTER_STOP_TIMEOUT": "0.3"})
    wait_models(router, 1)
    resp = request("POST", f"{router.url}/api/models/shared/stop?worker=ghost")
    assert resp.status == 503, resp.body
    assert resp.json()["failed"] == {"ghost": "worker 'ghost' did not answer 'stop' within 0.3s"}
    assert resp.json()["message"].startswith("模型 'shared' 停止失败")  # the API keeps the manual's words

    for args in (["stop", "shared"], ["stop-all"]):
        result = CliRunner().invoke(main, [*args, "--url", router.url])
        assert result.exit_code == 1, result.output
        assert "Error: could not stop" in result.output and "on 1 host (ghost: worker 'ghost' did not answer" \
            in result.output and "模型" not in result.output and "部分" not in result.output, result.output


def test_the_cli_starts_and_stops_on_one_host(two_hosts: Router) -> None:
    from click.testing import CliRunner
    from llm_lab_router.cli import main

    result = CliRunner().invoke(main, ["start", "both", "--worker", B, "--url", two_hosts.url, "--timeout", "30"])
    assert result.exit_code == 0 and f"shared is running on {B} http://" in result.output, result.output
    assert A not in result.output and states(two_hosts, "shared").get(A) != "running"
    result = CliRunner().invoke(main, ["stop", "both", "--worker", B, "--url", two_hosts.url])
    assert result.exit_code == 0 and result.output.strip() == f"shared stopped on {B}", result.output
    result = CliRunner().invoke(main, ["start", "only-b", "--worker", A, "--url", two_hosts.url])
    assert result.exit_code == 4 and f"not in the catalog of worker '{A}'" in result.output, result.output
