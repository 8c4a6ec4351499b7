"""OpenAI forwarding through a real router process to real mock engines.

The worker's keys are written by ``FakeWorker`` (exactly as ``protocol.py`` lays them out), so
each test controls which instance runs where, including dead and silent ones, with no worker
process in the way.
"""

from __future__ import annotations

import signal
import socket

import msgspec
import pytest
from conftest import wait_for
from helpers import (
    FakeWorker,
    SseStream,
    chat_body,
    engine_stats,
    get_json,
    request,
    start_router,
    wait_engine,
    wait_routable,
)
from llm_lab_router.protocol import CatalogEntry
from llm_lab_router.redis_server import RedisServer, free_port

CHAT = CatalogEntry(id="chat", aliases=["chat", "gpt-3.5-turbo"], mode="chat", on_demand=False)
EMBED = CatalogEntry(id="embed", aliases=["embed", "ada"], mode="embedding", on_demand=False)


@pytest.fixture
def fake(rds) -> FakeWorker:
    return FakeWorker(rds, "w1")


def serve_engine(mock_engine, fake: FakeWorker, *args: str, model: str = "chat") -> str:
    """A mock engine, announced as the running instance of ``model`` on the fake worker."""
    _, url = mock_engine(*args, "--quiet", model=model)
    wait_engine(url)
    fake.instance(model, "running", url)
    return url


def chat_stream(router, max_tokens: int, timeout: float = 15) -> SseStream:
    return SseStream(f"{router.url}/v1/chat/completions", method="POST", timeout=timeout,
                     body=chat_body("chat", stream=True, max_tokens=max_tokens))


def wait_instances(router, count: int) -> None:
    def running() -> int:
        return sum(i["state"] == "running" for i in get_json(f"{router.url}/v1/models")["data"][0]["instances"])
    wait_for(lambda: running() == count, message=f"{count} running instances")


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there: connection refused


def test_chat_is_relayed_unchanged_with_router_headers(procs, redis_url, fake, mock_engine) -> None:
    fake.publish(CHAT)
    router = start_router(procs, redis_url)
    serve_engine(mock_engine, fake)
    wait_routable(router, "chat")
    resp = request("POST", f"{router.url}/v1/chat/completions", chat_body("gpt-3.5-turbo", max_tokens=3))
    assert resp.status == 200, resp.body
    body = resp.json()
    assert body["object"] == "chat.completion" and body["model"] == "gpt-3.5-turbo"  # the body went through as sent
    assert resp.headers["Content-Type"].startswith("application/json")
    assert resp.headers["X-Router-Worker"] == "w1" and float(resp.headers["X-Router-Overhead-Ms"]) >= 0


def test_stream_arrives_chunk_by_chunk(procs, redis_url, fake, mock_engine) -> None:
    fake.publish(CHAT)
    router = start_router(procs, redis_url)
    serve_engine(mock_engine, fake, "--hang-mid-stream")
    wait_routable(router, "chat")
    stream = chat_stream(router, 12)
    assert stream.status == 200 and stream.headers["Content-Type"].startswith("text/event-stream")
    assert stream.headers["X-Accel-Buffering"] == "no"
    # The engine sends 2 chunks and then nothing, never ending its answer: they reach the
    # client all the same (held back until the end, they would never come: the read fails).
    first, second = stream.event(), stream.event()
    stream.close()
    assert "choices" in first["data"] and "choices" in second["data"]


def test_client_disconnect_cancels_the_upstream_request(procs, redis_url, fake, mock_engine) -> None:
    fake.publish(CHAT)
    router = start_router(procs, redis_url)
    # one token every 5 s: only a cancel on the client's close (not the next write) is in time
    engine = serve_engine(mock_engine, fake, "--tokens-per-second", "0.2")
    wait_routable(router, "chat")
    stream = chat_stream(router, 300)
    assert "choices" in stream.event()["data"]
    assert engine_stats(engine)["active_streams"] == 1
    stream.close()
    stats = wait_for(lambda: (s := engine_stats(engine))["cancelled_streams"] == 1 and s, timeout=1.5,
                     message="the engine to see the stream cancelled")
    assert stats["active_streams"] == 0 and stats["completed_streams"] == 0


def test_dead_backend_gives_502_fast(procs, redis_url, fake) -> None:
    fake.publish(CHAT, EMBED)
    router = start_router(procs, redis_url)
    fake.instance("chat", "running", dead_url())
    wait_routable(router, "chat")
    resp = request("POST", f"{router.url}/v1/chat/completions", chat_body("chat"))
    assert resp.status == 502 and resp.seconds < 2
    assert resp.json()["error"]["type"] == "upstream_error"


def test_connect_failure_fails_over_to_another_instance(procs, redis_url, rds, mock_engine) -> None:
    w1, w2 = FakeWorker(rds, "w1"), FakeWorker(rds, "w2")
    w1.publish(CHAT)
    w2.publish(CHAT)
    router = start_router(procs, redis_url)
    w1.instance("chat", "running", dead_url())
    engine = serve_engine(mock_engine, w2)
    wait_instances(router, 2)
    for _ in range(4):
        resp = request("POST", f"{router.url}/v1/chat/completions", chat_body("chat", max_tokens=1))
        assert resp.status == 200 and resp.headers["X-Router-Worker"] == "w2"
    assert engine_stats(engine)["requests"] == 4


def test_requests_spread_over_two_instances(procs, redis_url, rds, mock_engine) -> None:
    w1, w2 = FakeWorker(rds, "w1"), FakeWorker(rds, "w2")
    least = msgspec.structs.replace(CHAT, routing="least-outstanding")  # identical requests take turns
    w1.publish(least)
    w2.publish(least)
    router = start_router(procs, redis_url)
    a, b = serve_engine(mock_engine, w1), serve_engine(mock_engine, w2)
    wait_instances(router, 2)
    for _ in range(6):
        assert request("POST", f"{router.url}/v1/chat/completions", chat_body("chat", max_tokens=1)).status == 200
    assert engine_stats(a)["requests"] == 3 and engine_stats(b)["requests"] == 3


def test_engine_crash_mid_stream_ends_the_stream_with_an_error_event(procs, redis_url, fake, mock_engine) -> None:
    fake.publish(CHAT)
    router = start_router(procs, redis_url)
    serve_engine(mock_engine, fake, "--crash-mid-stream", "--tokens-per-second", "50")
    wait_routable(router, "chat")
    stream = chat_stream(router, 50, timeout=10)
    events = stream.events_until(lambda ev: False)  # to the end of the stream: it must end
    stream.close()
    assert any("choices" in ev.get("data", {}) for ev in events[:-1])  # the bytes so far arrived
    assert events[-1]["data"]["error"]["code"] == "stream_interrupted"
    assert all(ev.get("data") != "[DONE]" for ev in events)


def test_engine_that_stalls_mid_stream_is_cut_after_the_idle_timeout(procs, redis_url, fake, mock_engine) -> None:
    fake.publish(CHAT)
    router = start_router(procs, redis_url, env={"LLM_ROUTER_IDLE_TIMEOUT": "0.5"})
    engine = serve_engine(mock_engine, fake, "--hang-mid-stream", "--tokens-per-second", "50")
    wait_routable(router, "chat")
    stream = chat_stream(router, 50, timeout=10)
    events = stream.events_until(lambda ev: False)
    stream.close()
    assert "idle" in events[-1]["data"]["error"]["message"]  # not cut: the 10 s read fails
    wait_for(lambda: engine_stats(engine)["active_streams"] == 0, timeout=3, message="the stalled stream closed")


def test_silent_upstream_gives_504_after_the_first_byte_timeout(procs, redis_url, fake) -> None:
    fake.publish(CHAT)
    router = start_router(procs, redis_url, env={"LLM_ROUTER_FIRST_BYTE_TIMEOUT": "0.5"})
    with socket.socket() as silent:  # accepts connections (kernel backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        fake.instance("chat", "running", f"http://127.0.0.1:{silent.getsockname()[1]}")
        wait_routable(router, "chat")
        resp = request("POST", f"{router.url}/v1/chat/completions", chat_body("chat"))
    assert resp.status == 504 and 0.4 < resp.seconds < 3
    assert resp.json()["error"]["type"] == "timeout_error"


def test_request_errors_in_openai_shape(procs, redis_url, fake, mock_engine) -> None:
    fake.publish(CHAT, EMBED)
    router = start_router(procs, redis_url)
    serve_engine(mock_engine, fake, model="embed")
    wait_routable(router, "embed")
    url = router.url
    cases = [
        ("POST", "/v1/chat/completions", chat_body("nope"), 404, "model_not_found"),
        ("POST", "/v1/chat/completions", {"messages": []}, 400, "missing_model"),
        ("POST", "/v1/chat/completions", b'{"model": "chat", ', 400, "invalid_json"),
        ("POST", "/v1/chat/completions", chat_body("ada"), 400, "model_mode_mismatch"),
        ("POST", "/v1/embeddings", {"model": "chat", "input": "x"}, 400, "model_mode_mismatch"),
        ("POST", "/v1/chat/completions", chat_body("chat"), 503, "model_not_running"),  # not on_demand
    ]
    for method, path, body, status, code in cases:
        resp = request(method, url + path, body)
        assert (resp.status, resp.json()["error"]["code"]) == (status, code), (path, body, resp.body)
    not_running = request("POST", url + "/v1/chat/completions", chat_body("chat")).json()["error"]["message"]
    assert not_running == "model 'chat' is not running"
    ok = request("POST", url + "/v1/embeddings", {"model": "ada", "input": "x"})
    assert ok.status == 200 and ok.json()["data"][0]["object"] == "embedding"


def test_any_v1_route_and_multipart_uploads_are_forwarded(procs, redis_url, fake, mock_engine) -> None:
    fake.publish(CHAT)
    router = start_router(procs, redis_url)
    serve_engine(mock_engine, fake)
    wait_routable(router, "chat")
    body = (b"--B\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\nRIFF\r\n"
            b"--B\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nchat\r\n--B--\r\n")
    resp = request("POST", f"{router.url}/v1/audio/transcriptions", body,
                   headers={"Content-Type": "multipart/form-data; boundary=B"})
    # the mock engine has no such route: its own 404 came back through the router
    assert resp.status == 404 and resp.headers["X-Router-Worker"] == "w1"
    assert "Unknown route" in resp.json()["error"]["message"]


def test_oversized_body_is_refused_with_413(procs, redis_url, fake) -> None:
    fake.publish(CHAT)
    router = start_router(procs, redis_url, env={"LLM_ROUTER_MAX_BODY_SIZE": "4096"})
    resp = request("POST", f"{router.url}/v1/chat/completions", chat_body("chat", padding="x" * 5000))
    assert resp.status == 413 and resp.json()["error"]["code"] == "body_too_large"


def test_on_demand_start_failure_is_503_with_the_reason(procs, redis_url, fake) -> None:
    """No worker answers the start command: the request fails within the start timeout."""
    fake.publish(CatalogEntry(id="lazy", aliases=["lazy"], on_demand=True))
    router = start_router(procs, redis_url, env={"LLM_ROUTER_START_TIMEOUT": "0.5"})
    resp = request("POST", f"{router.url}/v1/chat/completions", chat_body("lazy"))
    assert resp.status == 503 and resp.json()["error"]["code"] == "model_start_failed"
    assert "did not answer" in resp.json()["error"]["message"] and resp.seconds < 3


def test_a_dead_workers_models_leave_routing_when_its_lease_expires(procs, redis_url, rds, mock_engine) -> None:
    w1, w2 = FakeWorker(rds, "w1"), FakeWorker(rds, "w2")
    w1.publish(CHAT)
    w2.publish(EMBED)
    router = start_router(procs, redis_url)
    serve_engine(mock_engine, w2, model="embed")
    wait_routable(router, "embed")
    w2.leave()  # killed without a goodbye: only its lease expires
    wait_for(lambda: [m["id"] for m in get_json(f"{router.url}/v1/models")["data"]] == ["chat"], timeout=5,
             message="the dead worker's model gone")
    resp = request("POST", f"{router.url}/v1/embeddings", {"model": "embed", "input": "x"})
    assert resp.status == 404


def test_redis_outage_keeps_running_models_routable(procs, tmp_path, mock_engine) -> None:
    """Redis goes away: nothing is evicted, forwarding continues from the view, control
    routes answer 503, log streams end with an error event, health says degraded. Redis
    comes back empty: still nothing is evicted while the workers publish again."""
    import redis as redis_sync

    server = RedisServer(tmp_path / "redis", extra=["--appendonly", "no", "--save", ""]).start()
    try:
        rds = redis_sync.Redis.from_url(server.url)
        fake = FakeWorker(rds, "w1")
        fake.publish(CHAT)
        router = start_router(procs, server.url)
        serve_engine(mock_engine, fake)
        wait_routable(router, "chat")
        logs = SseStream(f"{router.url}/api/models/chat/logs/stream")
        assert logs.event()["data"]["type"] == "historical_complete"
        rds.close()
        server.kill()

        error = logs.events_until(lambda ev: ev.get("data", {}).get("type") == "error")[-1]
        assert "Redis" in error["data"]["message"]
        wait_for(lambda: get_json(f"{router.url}/health")["redis"] == "unreachable", timeout=5,
                 message="health to report Redis unreachable")
        assert get_json(f"{router.url}/health")["status"] == "degraded"
        for _ in range(3):
            assert request("POST", f"{router.url}/v1/chat/completions", chat_body("chat", max_tokens=1)).status == 200
        stop = request("POST", f"{router.url}/api/models/chat/stop")
        assert stop.status == 503 and stop.json()["success"] is False and "Redis" in stop.json()["message"]
        assert [m["status"] for m in get_json(f"{router.url}/v1/models")["data"]] == ["running"]

        server = RedisServer(tmp_path / "redis2", port=server.port, extra=["--appendonly", "no", "--save", ""])
        server.start()
        wait_for(lambda: get_json(f"{router.url}/health")["redis"] == "ok", timeout=5, message="Redis back")
        assert request("POST", f"{router.url}/v1/chat/completions", chat_body("chat", max_tokens=1)).status == 200
        rds = redis_sync.Redis.from_url(server.url)
        fake = FakeWorker(rds, "w1")
        fake.publish(CHAT, EMBED)  # the worker's heartbeat found its lease gone and published again
        wait_for(lambda: len(get_json(f"{router.url}/v1/models")["data"]) == 2, timeout=5,
                 message="the republished catalog")
        rds.close()
    finally:
        server.stop()


def test_concurrent_streams_are_independent(procs, redis_url, fake, mock_engine) -> None:
    fake.publish(CHAT)
    router = start_router(procs, redis_url)
    engine = serve_engine(mock_engine, fake, "--hang-mid-stream")
    wait_routable(router, "chat")
    # Every answer sends 2 chunks and then never ends: 8 of them are under way side by side,
    # each with its own chunks (one after another, the second would never begin).
    streams = [chat_stream(router, 10) for _ in range(8)]
    try:
        for s in streams:
            assert s.status == 200 and all("choices" in s.event()["data"] for _ in range(2))
        assert engine_stats(engine)["active_streams"] == 8
    finally:
        for s in streams:
            s.close()
    wait_for(lambda: engine_stats(engine)["active_streams"] == 0, message="the 8 answers cancelled")


def test_shutdown_lets_a_stream_in_flight_finish(procs, redis_url, fake, mock_engine) -> None:
    fake.publish(CHAT)
    router = start_router(procs, redis_url)
    serve_engine(mock_engine, fake, "--tokens-per-second", "20")
    wait_routable(router, "chat")
    stream = chat_stream(router, 16)
    assert "choices" in stream.event()["data"]
    router.proc.send_signal(signal.SIGTERM)
    events = stream.events_until(lambda ev: ev.get("data") == "[DONE]")
    stream.close()
    assert events[-1]["data"] == "[DONE]"
    assert router.proc.wait(10) == 0


def test_only_forwarded_v1_requests_take_the_lean_path() -> None:
    """router/http/exchange.py takes the proxy's /v1 requests; the router's own /v1 routes and
    methods the proxy does not take stay with the Tornado application."""
    from llm_lab_router.router.http.exchange import Dispatcher
    from llm_lab_router.router.http.routes import own_v1_patterns

    d = Dispatcher(None, None, None, own_v1_patterns())  # type: ignore[arg-type]
    assert d.forwards("POST", "/v1/chat/completions") and d.forwards("HEAD", "/v1/embeddings")
    assert d.forwards("GET", "/v1/models/chat/extra") and d.forwards("GET", "/v1/models/")
    assert not d.forwards("GET", "/v1/models") and not d.forwards("GET", "/v1/models/chat")
    assert not d.forwards("TRACE", "/v1/chat/completions") and not d.forwards("GET", "/api/models/chat/info")
    assert not d.forwards("GET", "/v1") and not d.forwards("GET", "/health")


def test_the_lean_path_answers_as_the_web_layer_did(procs, redis_url, fake, mock_engine) -> None:
    """Headers, keep-alive, HEAD and the split between forwarded and own /v1 routes."""
    from http.client import HTTPConnection

    import tornado

    fake.publish(CHAT)
    router = start_router(procs, redis_url)
    serve_engine(mock_engine, fake)
    wait_routable(router, "chat")
    conn = HTTPConnection("127.0.0.1", int(router.url.rsplit(":", 1)[1]), timeout=15)
    try:
        for _ in range(3):  # one connection, kept alive
            conn.request("POST", "/v1/chat/completions", body=msgspec.json.encode(chat_body("chat", max_tokens=2)),
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            body = resp.read()
            assert resp.status == 200 and msgspec.json.decode(body)["object"] == "chat.completion"
            assert resp.headers["Server"] == f"TornadoServer/{tornado.version}" and resp.headers["Date"]
            assert int(resp.headers["Content-Length"]) == len(body) and resp.headers["X-Router-Worker"] == "w1"
    finally:
        conn.close()
    head = request("HEAD", f"{router.url}/v1/chat/completions", chat_body("chat", max_tokens=2))
    assert head.body == b"" and head.headers["X-Router-Worker"] == "w1"  # forwarded, no body relayed
    trace = request("TRACE", f"{router.url}/v1/chat/completions")
    assert trace.status == 405 and "error" in trace.json()  # Tornado's 405, in OpenAI's shape
    assert get_json(f"{router.url}/v1/models")["object"] == "list"  # the router's own
    assert get_json(f"{router.url}/v1/models/chat")["id"] == "chat"
    assert request("GET", f"{router.url}/v1/models/chat/x").json()["error"]["code"] == "missing_model"  # forwarded
