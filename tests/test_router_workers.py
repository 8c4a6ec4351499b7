"""``llm-router serve --workers N``: N router processes on one port under a supervisor.

Real processes throughout: the supervisor and its children, a mock engine announced by a
``FakeWorker``, clients on fresh connections (so the kernel's ``SO_REUSEPORT`` spreads them)."""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from urllib.parse import urlsplit

import psutil
import pytest
from conftest import wait_for
from helpers import (
    FakeWorker,
    Router,
    SseStream,
    chat_body,
    engine_stats,
    request,
    start_router,
    wait_engine,
)
from llm_lab_router.protocol import USED_ROUTER, CatalogEntry, Keys
from llm_lab_router.router.limits.concurrency import process_share

CHAT = CatalogEntry(id="chat", aliases=["chat"], mode="chat", on_demand=False)


@pytest.fixture
def fake(rds) -> FakeWorker:
    return FakeWorker(rds, "w1")


def engine(mock_engine, fake: FakeWorker, *args: str, entry: CatalogEntry = CHAT) -> str:
    """A mock engine, published as the running instance of ``entry`` before any router starts,
    so that every child's first view already routes to it."""
    _, url = mock_engine(*args, "--quiet", model=entry.id)
    wait_engine(url)
    fake.publish(entry)
    fake.instance(entry.id, "running", url)
    return url


def listening(router: Router) -> list[psutil.Process]:
    """The supervisor's children that listen on the router's port."""
    port = urlsplit(router.url).port
    found = []
    for child in psutil.Process(router.proc.pid).children():
        try:
            if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in child.net_connections("tcp")):
                found.append(child)
        except psutil.Error:
            continue
    return found


def start_workers(procs, redis_url: str, count: int = 2, env: dict[str, str] | None = None) -> Router:
    """A supervised router of ``count`` processes; returns once each of them listens."""
    router = start_router(procs, redis_url, args=["--workers", str(count)], env=env)
    wait_for(lambda: len(listening(router)) == count, timeout=20, message=f"{count} router processes listening")
    return router


def chat(router: Router, n: int = 1) -> list[int]:
    """``n`` requests, each on its own connection."""
    return [request("POST", f"{router.url}/v1/chat/completions", chat_body("chat", max_tokens=2)).status
            for _ in range(n)]


def routers_reporting(rds, model: str = "chat") -> int:
    """How many router processes have reported use of ``model`` (one hash field each)."""
    return sum(field.startswith(USED_ROUTER) for field in rds.hgetall(Keys().used(model)))


def requests_counted(router: Router) -> float:
    text = request("GET", f"{router.url}/metrics").body.decode()
    return sum(float(v) for v in re.findall(r'^llm_router_requests_total\{[^}]*model="chat"[^}]*\} (\S+)$', text, re.M))


def test_share_adds_up_to_the_capacity() -> None:
    assert [process_share(5, i, 2) for i in range(2)] == [3, 2]
    assert [process_share(8, i, 4) for i in range(4)] == [2, 2, 2, 2]
    assert [process_share(1, i, 3) for i in range(3)] == [1, 1, 1]  # below one each: one each
    assert process_share(0, 1, 4) == 0 and process_share(7, 0, 1) == 7


def test_both_processes_serve_and_metrics_count_both(procs, redis_url, rds, fake, mock_engine) -> None:
    rds.delete(Keys().used("chat"))
    engine(mock_engine, fake)
    router = start_workers(procs, redis_url)
    assert chat(router, 40) == [200] * 40
    wait_for(lambda: routers_reporting(rds) == 2, message="both router processes reporting use of chat")
    assert requests_counted(router) == 40  # whichever child answers the scrape
    assert requests_counted(router) == 40
    cluster = request("GET", f"{router.url}/metrics").body.decode()
    assert re.findall(r'^llm_router_instances\{[^}]*model="chat"[^}]*\} (\S+)$', cluster, re.M) == ["1.0"]


def test_a_killed_process_is_restarted_and_the_other_serves_meanwhile(procs, redis_url, fake, mock_engine) -> None:
    engine(mock_engine, fake)
    router = start_workers(procs, redis_url)
    victim, survivor = listening(router)
    victim.kill()
    victim.wait(10)
    assert chat(router, 10) == [200] * 10
    wait_for(lambda: len(now := listening(router)) == 2 and victim.pid not in {p.pid for p in now},
             timeout=20, message="a new router process listening")
    assert survivor.is_running()
    assert chat(router, 10) == [200] * 10
    assert f"(pid {victim.pid}) exited with status -9; restarting" in procs.log(router.proc)


def test_sigterm_drains_every_process(procs, redis_url, fake, mock_engine) -> None:
    engine(mock_engine, fake, "--tokens-per-second", "10")
    router = start_workers(procs, redis_url)
    children = listening(router)
    stream = SseStream(f"{router.url}/v1/chat/completions", method="POST",
                       body=chat_body("chat", stream=True, max_tokens=15))  # ~1.5 s
    assert stream.status == 200 and stream.event()
    router.proc.send_signal(signal.SIGTERM)
    events = stream.events_until(lambda ev: ev.get("data") == "[DONE]")
    stream.close()
    assert events[-1]["data"] == "[DONE]"  # the in-flight stream ended whole
    assert router.proc.wait(30) == 0
    gone, alive = psutil.wait_procs(children, timeout=5)
    assert not alive


def test_a_concurrency_limit_holds_across_the_processes(procs, redis_url, rds, fake, mock_engine) -> None:
    limited = CatalogEntry(id="chat", aliases=["chat"], mode="chat", on_demand=False, max_concurrency=2)
    rds.delete(Keys().used("chat"))
    url = engine(mock_engine, fake, "--tokens-per-second", "20", entry=limited)
    router = start_workers(procs, redis_url)
    results: list[str] = []

    def stream() -> None:
        s = SseStream(f"{router.url}/v1/chat/completions", method="POST", timeout=60,
                      body=chat_body("chat", stream=True, max_tokens=10))  # ~0.5 s once admitted
        results.append(s.events_until(lambda ev: ev.get("data") == "[DONE]")[-1]["data"])
        s.close()

    threads = [threading.Thread(target=stream) for _ in range(12)]
    for t in threads:
        t.start()
    most = 0
    while any(t.is_alive() for t in threads):
        most = max(most, engine_stats(url)["active_streams"])
    for t in threads:
        t.join()
    assert results == ["[DONE]"] * 12
    assert routers_reporting(rds) == 2  # both processes took some of the requests
    assert 1 <= most <= 2  # 2 × one instance, for the whole router: not 2 per process


def test_no_process_outlives_a_killed_supervisor(procs, redis_url, fake, mock_engine) -> None:
    engine(mock_engine, fake)
    router = start_workers(procs, redis_url)
    children = listening(router)
    metrics_dir = children[0].environ()["PROMETHEUS_MULTIPROC_DIR"]  # the supervisor's to remove: left behind
    router.proc.kill()  # no chance to stop them itself
    _, alive = psutil.wait_procs(children, timeout=15)
    shutil.rmtree(metrics_dir, ignore_errors=True)
    assert not alive


def test_a_busy_port_is_refused_before_any_process_starts(redis_url) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "llm_lab_router.cli", "serve", "--redis", redis_url, "--port",
                               str(port), "--workers", "2"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr
