"""A half-open events subscription is noticed within seconds, not TCP keepalive's two hours.

A Redis master that loses power leaves the routers' subscription sockets open and silent; the
view's resync (every 2 s) hides it for reads, but events stop. The test freezes a dedicated
redis-server with SIGSTOP (its sockets stay open, nothing answers) and times how long the
router takes to call Redis unreachable (``/health``: ``degraded``).
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from conftest import wait_for
from helpers import get_json, start_router
from llm_lab_router.redis_server import RedisServer


@pytest.fixture
def own_redis(tmp_path):
    server = RedisServer(tmp_path / "redis", extra=["--appendonly", "no", "--save", ""]).start()
    yield server
    os.kill(server.proc.pid, signal.SIGCONT)
    server.proc.kill()
    server.proc.wait()


def test_a_frozen_redis_is_noticed_by_the_subscription_within_seconds(procs, own_redis):
    router = start_router(procs, own_redis.url, env={"LLM_ROUTER_RESYNC_INTERVAL": "30"})
    wait_for(lambda: get_json(f"{router.url}/health")["status"] == "healthy", timeout=10, message="healthy")
    os.kill(own_redis.proc.pid, signal.SIGSTOP)
    frozen = time.monotonic()
    wait_for(lambda: get_json(f"{router.url}/health")["status"] == "degraded", timeout=15,
             message="the router to notice the frozen Redis")
    assert time.monotonic() - frozen < 6  # 3 silent checks of 1 s (PINGs unanswered), then marked
    os.kill(own_redis.proc.pid, signal.SIGCONT)
    wait_for(lambda: get_json(f"{router.url}/health")["status"] == "healthy", timeout=20,
             message="healthy again once Redis answers")
