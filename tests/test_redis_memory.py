"""The shared Redis's memory, watched by routers (router/observe/redis_memory.py): its figures in
/metrics, and timeline events when it runs high or evicts keys (the history then may undercount)."""

from __future__ import annotations

import redis as redis_sync
from conftest import wait_for
from helpers import get_json, request, start_router
from llm_lab_router.redis_server import RedisServer
from test_metrics import metric

MAXMEMORY = 6 * 1024 * 1024


def test_a_redis_near_its_maxmemory_and_its_evictions_are_told(procs, tmp_path) -> None:
    server = RedisServer(tmp_path / "redis", extra=["--appendonly", "no", "--save", "", "--maxmemory",
                                                    str(MAXMEMORY), "--maxmemory-policy", "volatile-lru"]).start()
    try:
        rds = redis_sync.Redis.from_url(server.url)
        env = {"LLM_ROUTER_REDIS_MEMORY_CHECK": "0.2"}
        routers = [start_router(procs, server.url, env=env) for _ in range(2)]

        def scraped(name: str) -> float | None:
            return metric(request("GET", f"{routers[0].url}/metrics").body.decode(), name)

        wait_for(lambda: scraped("llm_router_redis_maxmemory_bytes") == MAXMEMORY, timeout=10,
                 message="maxmemory in /metrics")
        assert 0 < scraped("llm_router_redis_used_memory_bytes") < MAXMEMORY
        assert scraped("llm_router_redis_evicted_keys") == 0

        def kinds() -> list[str]:
            return [e["kind"] for e in get_json(f"{routers[0].url}/api/events?from=-5m")["events"]]

        assert not {"redis_memory_high", "redis_evicted"} & set(kinds())
        for i in range(600):  # 12 MB of keys with a TTL into 6 MB: Redis evicts (volatile-lru)
            rds.set(f"filler:{i}", b"x" * 20_000, ex=3600)
        assert int(rds.info("stats")["evicted_keys"]) > 0
        wait_for(lambda: {"redis_memory_high", "redis_evicted"} <= set(kinds()), timeout=10,
                 message="the events of a full Redis")
        events = get_json(f"{routers[0].url}/api/events?from=-5m")["events"]
        evicted = [e for e in events if e["kind"] == "redis_evicted"]
        high = [e for e in events if e["kind"] == "redis_memory_high"]
        assert "may undercount" in evicted[0]["detail"] and "volatile-lru" in evicted[0]["detail"]
        assert "maxmemory" in high[0]["detail"]
        assert len(high) == 1  # one router wrote it (a claim), once (on crossing, not at every check)
        wait_for(lambda: scraped("llm_router_redis_evicted_keys") > 0, timeout=10,  # router 0's next check
                 message="the evictions in /metrics")
        wait_for(lambda: "Redis uses" in procs.log(routers[1].proc), timeout=10,
                 message="the other router's warning in its log")  # each router logs what it saw
    finally:
        procs.stop_all()
        server.stop()
