"""Placement and eviction by VRAM, end to end: real workers on stand-in GPUs, real routers.

Each worker reads its GPUs from ``LLM_ROUTER_FAKE_GPUS`` through the testing hook
``LLM_ROUTER_NVML_MODULE=tests.fake_nvml``; the stand-in readings never show the models'
memory, so the declared ``vram_mb`` of placed models is what keeps GPUs from overcommitting.
"""

from __future__ import annotations

import threading
import time
import uuid

import psutil
from conftest import wait_for
from fake_nvml import fake_gpu_env
from helpers import (
    SseStream,
    chat_body,
    get_json,
    model_block,
    request,
    start_router,
    start_worker,
    wait_models,
    wait_status,
    write_config,
)
from llm_lab_router.protocol import Keys, log_entry, usage_of

SLOW = ["--tokens-per-second", "4", "--max-tokens", "400"]  # a stream that lasts as long as a test needs


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def gpu_model(model_id: str, vram_mb: int, devices=("cuda",), **settings) -> str:
    return model_block(model_id, devices=list(devices), vram_mb=vram_mb, **settings)


def gpu_worker(procs, redis_url, tmp_path, wid: str, free_mib: list[int], *models: str):
    cfg = write_config(tmp_path / f"{wid}.toml", *models)
    return start_worker(procs, redis_url, cfg, wid, env=fake_gpu_env(*free_mib))


def wait_devices(router, *wids: str) -> None:
    """Until the router has every host's device snapshot (it places from them)."""
    def seen() -> bool:
        resp = request("GET", f"{router.url}/api/devices/info")
        return resp.status == 200 and set(wids) <= set(resp.json()["hosts"])
    wait_for(seen, timeout=20, message=f"device snapshots of {wids}")


def instances(router, model: str) -> dict[str, dict]:
    return {i["worker"]: i for i in get_json(f"{router.url}/api/models/{model}/info")["model"]["instances"]}


def running_on(router, model: str) -> list[str]:
    return [w for w, i in instances(router, model).items() if i["state"] == "running"]


def wait_inflight(rds, model: str, count: int) -> None:
    """Until the routers' reports in ``llm:used:{model}`` show ``count`` requests in flight."""
    wait_for(lambda: usage_of(rds.hgetall(Keys().used(model)), time.time()).inflight == count, timeout=10,
             message=f"{model} with {count} requests in flight")


def open_stream(router, model: str) -> SseStream:
    stream = SseStream(f"{router.url}/v1/chat/completions", method="POST", body=chat_body(model, stream=True))
    assert stream.status == 200
    assert stream.event()  # the answer has begun: the request is in flight
    return stream


def test_model_lands_on_the_host_where_it_fits_with_cuda_visible_devices(procs, redis_url, tmp_path):
    small, big = uid("a"), uid("b")  # the host that does not fit sorts first
    model = gpu_model("fits", 16000)
    gpu_worker(procs, redis_url, tmp_path, small, [10000], model)
    gpu_worker(procs, redis_url, tmp_path, big, [4000, 20000], model)
    router = start_router(procs, redis_url)
    wait_devices(router, small, big)

    resp = request("POST", f"{router.url}/api/models/fits/start", timeout=30)
    assert resp.status == 200, resp.body
    inst = instances(router, "fits")[big]
    assert (inst["state"], inst["gpus"]) == ("running", "1")
    assert psutil.Process(inst["pid"]).environ()["CUDA_VISIBLE_DEVICES"] == "1"
    assert running_on(router, "fits") == [big]


def test_concurrent_starts_on_two_routers_never_overcommit_a_gpu(procs, redis_url, tmp_path):
    a, b = uid("a"), uid("b")
    models = [gpu_model("one", 8000), gpu_model("two", 8000)]
    gpu_worker(procs, redis_url, tmp_path, a, [10000], *models)
    gpu_worker(procs, redis_url, tmp_path, b, [10000], *models)
    routers = [start_router(procs, redis_url), start_router(procs, redis_url)]
    for r in routers:
        wait_devices(r, a, b)

    results: dict[str, int] = {}

    def start(router, model: str) -> None:
        results[model] = request("POST", f"{router.url}/api/models/{model}/start", timeout=40).status

    threads = [threading.Thread(target=start, args=(r, m)) for r, m in zip(routers, ["one", "two"])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {"one": 200, "two": 200}
    hosts = running_on(routers[0], "one") + running_on(routers[0], "two")
    assert sorted(hosts) == sorted([a, b])  # one each: 8000 + 8000 MiB never on one 10000 MiB GPU


def test_eviction_stops_the_lru_idle_model_never_a_busy_one_else_503(procs, redis_url, rds, tmp_path):
    wid = uid("w")
    gpu_worker(procs, redis_url, tmp_path, wid, [20000],  # room for two of them
               gpu_model("x", 8000, engine_args=SLOW), gpu_model("y", 8000), gpu_model("z", 8000, engine_args=SLOW))
    router = start_router(procs, redis_url)
    wait_devices(router, wid)
    for m in ("x", "y"):
        assert request("POST", f"{router.url}/api/models/{m}/start", timeout=30).status == 200
    busy = open_stream(router, "x")  # x: used first, but its request is still in flight
    try:
        wait_inflight(rds, "x", 1)
        assert request("POST", f"{router.url}/v1/chat/completions", chat_body("y")).status == 200

        # z fits nowhere: x is the least recently used, but busy; y is idle: y goes
        resp = request("POST", f"{router.url}/v1/chat/completions", chat_body("z", max_tokens=1), timeout=30)
        assert resp.status == 200, resp.body
        assert running_on(router, "x") == [wid] and running_on(router, "z") == [wid]
        assert instances(router, "y")[wid]["state"] == "stopped"

        # y again: x and z are both busy now: nothing is stopped (drain) until z's request ends
        other = open_stream(router, "z")
        try:
            wait_inflight(rds, "z", 1)
            got: dict[str, object] = {}
            waiter = threading.Thread(target=lambda: got.update(resp=request(
                "POST", f"{router.url}/v1/chat/completions", chat_body("y", max_tokens=1), timeout=60)))
            waiter.start()
            wait_for(lambda: get_json(f"{router.url}/api/models/y/info")["model"].get("pending"), timeout=20,
                     message="y waiting for a swap")
            pending = get_json(f"{router.url}/api/models/y/info")["model"]["pending"]
            assert pending["kind"] == "queued" and {b["kind"] for b in pending["blocked"]} == {"draining"}
            assert running_on(router, "x") == [wid] and running_on(router, "z") == [wid]
        finally:
            other.close()
        waiter.join(70)
        assert got["resp"].status == 200, got["resp"].body
        assert running_on(router, "x") == [wid] and running_on(router, "y") == [wid]
    finally:
        busy.close()


def idle_stop_at(rds, model: str) -> float | None:
    """When the worker decided to stop ``model`` as idle: its own timestamp of the event it
    logs (None before then)."""
    return next((e.timestamp for _, f in rds.xrange(Keys().logs(model))
                 if "(idle_ttl)" in (e := log_entry(f)).message), None)


def test_idle_ttl_unloads_an_unused_model_and_not_a_used_one(procs, redis_url, rds, tmp_path):
    wid = uid("w")
    ttl = 1.5
    cfg = write_config(tmp_path / "idle.toml", model_block("unused", idle_ttl=ttl),
                       model_block("used", idle_ttl=ttl, engine_args=SLOW))
    start_worker(procs, redis_url, cfg, wid)
    router = start_router(procs, redis_url)
    wait_models(router, 2)  # the worker has published its catalog
    assert request("POST", f"{router.url}/api/models/used/start", timeout=30).status == 200
    stream = open_stream(router, "used")
    try:
        wait_inflight(rds, "used", 1)  # the reaper reads the request in flight from here on
        assert request("POST", f"{router.url}/api/models/unused/start", timeout=30).status == 200
        stop_at = wait_for(lambda: idle_stop_at(rds, "unused"), timeout=15, message="unused stopped as idle")
        wait_status(router, "unused", "stopped", timeout=15)
        # not before its ttl, by the worker's own clock (this test's may lag on a loaded host)
        assert stop_at - float(rds.hget(Keys().instance("unused", wid), "started_at")) >= ttl
        # the round that stopped "unused" found "used" idle for longer (started before it,
        # its request before that), and kept it: a request is in flight
        assert wait_status(router, "used", "running")
        assert stream.event()  # and its request is still being served
    finally:
        stream.close()
    wait_status(router, "used", "stopped", timeout=15)  # unused once its request ended
