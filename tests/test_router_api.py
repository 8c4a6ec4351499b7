"""The management API (the manual's contract) against real processes: a router, a worker
running mock engines, one Redis. Shapes, messages and status codes."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
from conftest import wait_for
from helpers import (
    DEMO_MODELS,
    Router,
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
from llm_lab_router.protocol import Keys, LogEntry, log_fields

# Worker ids are per host: a concurrent suite's worker with the same id would refuse ours.
W1 = f"w{os.getpid()}"

KEYS = Keys()


def engines_of(worker: subprocess.Popen, model: str) -> list[psutil.Process]:
    """Live mock engine processes serving ``model`` under ``worker`` (other test sessions on
    the machine may run the same models)."""
    found = []
    try:
        children = psutil.Process(worker.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    for proc in children:
        try:
            if model in proc.cmdline() and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:
            continue
    return found


@dataclass
class Cluster:
    worker: subprocess.Popen
    routers: list[Router]

    @property
    def router(self) -> Router:
        return self.routers[0]

    def engines(self, model: str) -> list[psutil.Process]:
        return engines_of(self.worker, model)


def cluster(procs, redis_url: str, tmp_path: Path, *models: str, routers: int = 1) -> Cluster:
    """A worker ``W1`` with ``models`` and ``routers`` routers, once the models are listed."""
    config = write_config(tmp_path / "models.toml", *(models or DEMO_MODELS))
    worker = start_worker(procs, redis_url, config, W1)
    started = [start_router(procs, redis_url) for _ in range(routers)]
    for router in started:
        wait_models(router, len(models or DEMO_MODELS))
    return Cluster(worker, started)


def test_root_health_and_model_list_shapes(procs, redis_url, tmp_path) -> None:
    c = cluster(procs, redis_url, tmp_path)
    router = c.router
    assert get_json(f"{router.url}/") == {"message": "LLM-Manager API Server", "version": "0.1.0",
                                         "models_url": "/v1/models"}
    health = get_json(f"{router.url}/health")
    assert health == {"status": "healthy", "models_count": 2, "running_models": 0, "workers": 1, "redis": "ok"}
    listing = get_json(f"{router.url}/v1/models")
    assert listing["object"] == "list"
    chat = next(m for m in listing["data"] if m["id"] == "demo-chat")
    assert chat == {"id": "demo-chat", "object": "model", "created": 0, "owned_by": "llm-router",
                    "aliases": ["demo-chat", "gpt-3.5-turbo", "chatgpt"], "status": "stopped", "mode": "chat",
                    "instances": [{"worker": W1, "state": "stopped", "url": ""}]}
    assert get_json(f"{router.url}/v1/models/chatgpt")["id"] == "demo-chat"
    assert request("GET", f"{router.url}/v1/models/nope").json()["error"]["type"] == "not_found_error"


def test_start_info_stop(procs, redis_url, tmp_path) -> None:
    c = cluster(procs, redis_url, tmp_path)
    router = c.router
    resp = request("POST", f"{router.url}/api/models/chatgpt/start")
    assert resp.status == 200 and resp.json() == {"success": True, "message": "模型 'chatgpt' 启动成功",
                                                  "model": "demo-chat", "state": "running", "workers": [W1]}
    info = get_json(f"{router.url}/api/models/gpt-3.5-turbo/info")
    assert info["success"] is True and info["model"]["id"] == "demo-chat" and info["model"]["status"] == "running"
    (inst,) = info["model"]["instances"]
    assert inst["worker"] == W1 and inst["state"] == "running" and inst["pid"] > 0
    assert inst["url"].startswith("http://127.0.0.1:") and inst["started_at"] > 0 and inst["last_error"] == ""
    assert len(c.engines("demo-chat")) == 1
    assert get_json(f"{router.url}/health")["running_models"] == 1
    assert request("POST", f"{router.url}/v1/chat/completions", chat_body("chatgpt", max_tokens=2)).status == 200

    resp = request("POST", f"{router.url}/api/models/chatgpt/stop")
    assert resp.status == 200 and resp.json() == {"success": True, "message": "模型 'chatgpt' 停止成功",
                                                  "model": "demo-chat", "workers": [W1]}
    assert wait_status(router, "chatgpt", "stopped")["instances"][0]["pid"] == 0
    wait_for(lambda: not c.engines("demo-chat"), timeout=5, message="the engine process gone")


def test_start_without_waiting_answers_202_at_once(procs, redis_url, tmp_path) -> None:
    slow = model_block("slow", engine_args=["--startup-delay", "1.5"])
    c = cluster(procs, redis_url, tmp_path, slow)
    router = c.router
    resp = request("POST", f"{router.url}/api/models/slow/start?wait=false")
    assert resp.status == 202 and resp.seconds < 1
    assert resp.json() == {"success": True, "message": "模型 'slow' 正在启动", "model": "slow", "state": "starting",
                           "workers": []}
    wait_status(router, "slow", "running", timeout=15)
    assert request("POST", f"{router.url}/api/models/slow/start?wait=maybe").status == 400


def test_failed_start_is_503_with_the_reason_and_last_log_lines(procs, redis_url, tmp_path) -> None:
    broken = model_block("broken", restart="no", command=[
        sys.executable, "-c", "import sys; print('loading weights'); sys.exit('CUDA out of memory')"])
    c = cluster(procs, redis_url, tmp_path, broken)
    router = c.router
    resp = request("POST", f"{router.url}/api/models/broken/start")
    assert resp.status == 503 and resp.json()["success"] is False
    message = resp.json()["message"]
    assert message.startswith("模型 'broken' 启动失败") and "CUDA out of memory" in message
    assert "last log lines" in message and "loading weights" in message
    assert get_json(f"{router.url}/api/models/broken/info")["model"]["status"] == "failed"


def test_unknown_alias_is_404_on_every_model_route(procs, redis_url, tmp_path) -> None:
    c = cluster(procs, redis_url, tmp_path)
    router = c.router
    for method, path in [("POST", "start"), ("POST", "stop"), ("GET", "info"), ("GET", "logs/stream")]:
        resp = request(method, f"{router.url}/api/models/nope/{path}")
        assert resp.status == 404 and resp.json()["success"] is False and "nope" in resp.json()["message"], path
    assert request("POST", f"{router.url}/api/logs/nope/clear").status == 404
    assert request("GET", f"{router.url}/api/nothing").json() == {"success": False,
                                                                  "message": "no route GET /api/nothing"}
    assert request("GET", f"{router.url}/api/models/stop-all").status == 405


def test_concurrent_requests_for_a_stopped_model_start_it_once(procs, redis_url, rds, tmp_path) -> None:
    chat = model_block("lazy-chat", aliases=["lazy"], engine_args=["--startup-delay", "1"])
    c = cluster(procs, redis_url, tmp_path, chat)
    router = c.router
    statuses: list[int] = []

    def one() -> None:
        statuses.append(request("POST", f"{router.url}/v1/chat/completions", chat_body("lazy", max_tokens=1),
                                timeout=30).status)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert statuses == [200] * 8
    assert len(c.engines("lazy-chat")) == 1
    assert rds.xlen(KEYS.commands(W1)) == 1  # one start command: the router's starts are shared
    info = get_json(f"{router.url}/api/models/lazy/info")["model"]
    assert len(info["instances"]) == 1 and info["instances"][0]["restarts"] == 0


def test_restart_autostart_and_stop_all(procs, redis_url, tmp_path) -> None:
    auto = model_block("auto-a", auto_start=True)
    c = cluster(procs, redis_url, tmp_path, auto, *DEMO_MODELS)
    router = c.router
    wait_status(router, "auto-a", "running")
    assert request("POST", f"{router.url}/api/models/demo-chat/start").status == 200

    resp = request("POST", f"{router.url}/api/models/restart-autostart", timeout=30)
    assert resp.status == 200
    assert resp.json() == {"success": True, "message": "已重启 1 个autostart模型", "started_models": ["auto-a"]}
    wait_status(router, "demo-chat", "stopped")  # restart-autostart stops everything first
    wait_status(router, "auto-a", "running")

    resp = request("POST", f"{router.url}/api/models/stop-all", timeout=30)
    assert resp.status == 200 and resp.json() == {"success": True, "message": "所有模型已关闭",
                                                  "models": ["auto-a"], "workers": [W1]}
    wait_for(lambda: {m["status"] for m in get_json(f"{router.url}/v1/models")["data"]} == {"stopped"},
             message="every model stopped")


def test_two_routers_on_one_redis_answer_alike(procs, redis_url, tmp_path) -> None:
    c = cluster(procs, redis_url, tmp_path, routers=2)
    a, b = c.routers
    assert request("POST", f"{a.url}/api/models/chatgpt/start").status == 200
    wait_status(b, "chatgpt", "running")
    resp = request("POST", f"{b.url}/v1/chat/completions", chat_body("chatgpt", max_tokens=2))
    assert resp.status == 200 and resp.json()["object"] == "chat.completion"
    assert get_json(f"{a.url}/v1/models") == get_json(f"{b.url}/v1/models")
    assert request("POST", f"{b.url}/api/models/demo-chat/stop").status == 200
    wait_status(a, "chatgpt", "stopped")
    assert len(c.engines("demo-chat")) == 0


def test_devices_info(procs, redis_url, tmp_path) -> None:
    alone = start_router(procs, redis_url)
    resp = request("GET", f"{alone.url}/api/devices/info")
    assert resp.status == 503 and resp.json()["success"] is False

    cluster(procs, redis_url, tmp_path)
    body = wait_for(lambda: (r := request("GET", f"{alone.url}/api/devices/info")).status == 200 and r.json(),
                    timeout=10, message="devices published")
    assert body["success"] is True
    cpu = body["devices"]["cpu"]
    assert cpu["online"] is True and cpu["info"]["cpu_count"] >= 1
    assert set(cpu["info"]) == {"cpu_count", "memory_total", "memory_used", "memory_free"}
    assert set(body["devices"]["cuda"]["info"]) == {"device_count", "device_name", "memory_total", "memory_used",
                                                    "memory_free"}
    assert list(body["hosts"]) == [W1] and body["hosts"][W1]["cpu"]["memory_total"] > 0


def test_log_stats_and_clear(procs, redis_url, rds, tmp_path) -> None:
    c = cluster(procs, redis_url, tmp_path)
    router = c.router
    assert request("POST", f"{router.url}/api/models/chatgpt/start").status == 200
    now_ms = int(time.time() * 1000)
    old = now_ms - 2 * 3600 * 1000  # two hours ago
    for i in range(3):
        rds.xadd(KEYS.logs("demo-embed"), log_fields(LogEntry(timestamp=old / 1000, message=f"old {i}")),
                 id=f"{old}-{i}")
    rds.xadd(KEYS.logs("demo-embed"), log_fields(LogEntry(timestamp=time.time(), message="recent")))

    lines_before = rds.xlen(KEYS.logs("demo-chat"))  # the running model may still be logging:
    stats = get_json(f"{router.url}/api/logs/stats")  # its count is bracketed, not guessed
    chat_lines = rds.xlen(KEYS.logs("demo-chat"))
    assert lines_before > 0
    assert stats["success"] is True
    assert stats["stats"]["total_models"] == 2 and stats["stats"]["models_with_logs"] == 2
    assert lines_before + 4 <= stats["stats"]["total_log_entries"] <= chat_lines + 4

    resp = request("POST", f"{router.url}/api/logs/text-embedding-ada-002/clear?keep_minutes=60")
    assert resp.status == 200
    assert resp.json() == {"success": True, "message": "模型 'text-embedding-ada-002' 已清理 60 分钟前的日志，删除 3 条",
                           "model": "demo-embed", "deleted": 3, "keep_minutes": 60}
    assert rds.xlen(KEYS.logs("demo-embed")) == 1

    for bad in ("-1", "abc", "1.5"):
        resp = request("POST", f"{router.url}/api/logs/chatgpt/clear?keep_minutes={bad}")
        assert resp.status == 400 and "keep_minutes" in resp.json()["message"]

    resp = request("POST", f"{router.url}/api/logs/chatgpt/clear")
    removed = int(resp.json()["message"].rsplit("删除 ", 1)[1].split(" ")[0])
    assert resp.status == 200 and resp.json()["message"].startswith("模型 'chatgpt' 已清空全部日志")
    assert removed >= chat_lines


def test_log_stream_follows_a_real_model(procs, redis_url, tmp_path) -> None:
    c = cluster(procs, redis_url, tmp_path)
    router = c.router
    assert request("POST", f"{router.url}/api/models/chatgpt/start").status == 200
    stream = SseStream(f"{router.url}/api/models/chatgpt/logs/stream")
    history = stream.events_until(lambda ev: ev["data"]["type"] == "historical_complete")
    assert len(history) > 1 and all(ev["data"]["log"]["host"] == W1 for ev in history[:-1])
    assert request("POST", f"{router.url}/api/models/chatgpt/stop").status == 200
    live = stream.event()
    stream.close()
    assert live["data"]["type"] == "realtime" and stream_id(live["id"]) > stream_id(history[-2]["id"])


def stream_id(text: str) -> tuple[int, int]:
    ms, seq = text.split("-")
    return int(ms), int(seq)
