"""max_concurrency with a bounded queue, end to end: a slow engine behind a real router."""

from __future__ import annotations

import threading
import uuid

from helpers import SseStream, chat_body, model_block, request, start_router, start_worker, wait_models, write_config


def test_one_at_a_time_then_one_queued_then_429(procs, redis_url, tmp_path):
    cfg = write_config(tmp_path / "limits.toml",
                       model_block("slow", max_concurrency=1, engine_args=["--tokens-per-second", "10"]))
    start_worker(procs, redis_url, cfg, f"w-{uuid.uuid4().hex[:8]}")
    router = start_router(procs, redis_url, env={"LLM_ROUTER_QUEUE_LIMIT": "1"})
    wait_models(router, 1)  # the worker has published its catalog
    assert request("POST", f"{router.url}/api/models/slow/start", timeout=30).status == 200

    first = SseStream(f"{router.url}/v1/chat/completions", method="POST",
                      body=chat_body("slow", stream=True, max_tokens=20))  # ~2 s
    assert first.status == 200 and first.event()  # holds the only slot
    results = []
    first_done = threading.Event()

    def call() -> None:
        resp = request("POST", f"{router.url}/v1/chat/completions", chat_body("slow", max_tokens=1), timeout=30)
        results.append((resp, first_done.is_set()))

    # Two more: one waits in the queue (limit 1), the other is refused at once, whichever
    # reaches the router first.
    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    while len(results) < 1:
        threads[0].join(0.05)
        threads[1].join(0.05)
    refused, first_over = results[0]
    assert not first_over
    assert refused.status == 429, refused.body
    assert refused.headers["Retry-After"] == "1"
    error = refused.json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
    assert "1 requests already queued" in error["message"]

    first.events_until(lambda ev: ev.get("data") == "[DONE]")
    first_done.set()
    first.close()
    for t in threads:
        t.join()
    queued, after_first = results[1]
    assert queued.status == 200, queued.body
    assert after_first  # it was served only once the first request let go of the slot
