"""Per-key quotas across routers (router/limits/quotas.py) and fair queuing across keys
(router/limits/concurrency.py), end to end: real routers sharing the session Redis, a real mock engine
announced by ``FakeWorker``, keys from a real TOML keys file."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import wait_for
from helpers import FakeWorker, SseStream, chat_body, get_json, request, start_router, wait_engine, wait_routable
from llm_lab_router.protocol import CatalogEntry, Keys
from raw_engine import RawEngine

NAMES = ("alice", "bob", "carol", "dave", "erin", "frank", "gina", "hank", "prio", "ivy", "tina")
KEYS = {name: f"{name}-key-0123456789abcdef" for name in NAMES}
KEYS_TOML = f"""
[groups.lab]
rpm = 4

[[keys]]
name = "alice"
key = "{KEYS['alice']}"
rpm = 6

[[keys]]
name = "bob"
key = "{KEYS['bob']}"
max_concurrent = 2

[[keys]]
name = "carol"
key = "{KEYS['carol']}"
tpm = 40

[[keys]]
name = "dave"
key = "{KEYS['dave']}"
group = "lab"

[[keys]]
name = "erin"
key = "{KEYS['erin']}"
group = "lab"

[[keys]]
name = "frank"
key = "{KEYS['frank']}"

[[keys]]
name = "gina"
key = "{KEYS['gina']}"

[[keys]]
name = "hank"
key = "{KEYS['hank']}"
rpm = 7
max_concurrent = 3

[[keys]]
name = "ivy"
key = "{KEYS['ivy']}"
max_concurrent = 1

[[keys]]
name = "tina"
key = "{KEYS['tina']}"
tpm = 100

[[keys]]
name = "prio"
key = "{KEYS['prio']}"
priority = 1
"""
CHAT = CatalogEntry(id="chat", mode="chat", on_demand=False)
ONE_AT_A_TIME = CatalogEntry(id="chat", mode="chat", on_demand=False, max_concurrency=1)
LEASE_TTL = 1.0


def auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}"}


def chat(router, name: str, **kw) -> "object":
    return request("POST", f"{router.url}/v1/chat/completions", chat_body("chat", **kw), headers=auth(name))


def stream(router, name: str, max_tokens: int, **kw) -> SseStream:
    s = SseStream(f"{router.url}/v1/chat/completions", method="POST", headers=auth(name),
                  body=chat_body("chat", stream=True, max_tokens=max_tokens, **kw))
    assert s.status == 200
    assert s.event()  # the engine has begun: the request holds its lease
    return s


def routers(procs, redis_url, keys_file, count: int = 2, **env: str) -> list:
    env = {"LLM_ROUTER_API_KEYS_FILE": str(keys_file), "LLM_ROUTER_QUOTA_LEASE_TTL": str(LEASE_TTL),
           "LLM_ROUTER_READ_ACCESS": "public", **env}
    found = [start_router(procs, redis_url, env=env) for _ in range(count)]
    for r in found:
        wait_routable(r, "chat")
    return found


@pytest.fixture
def keys_file(tmp_path):
    path = tmp_path / "keys.toml"
    path.write_text(KEYS_TOML)
    return path


@pytest.fixture
def engine(rds, mock_engine):
    """A slow-ish mock engine (50 tokens/s) running ``chat``; returns the fake worker."""
    fake = FakeWorker(rds, "w1")
    fake.publish(CHAT)
    _, url = mock_engine("--quiet", "--tokens-per-second", "50", model="chat")
    wait_engine(url)
    fake.instance("chat", "running", url)
    return fake


def tokens_charged(rds, scope: str, name: str) -> int:
    window = rds.hgetall(Keys().quota_window(scope, name))
    return sum(int(v) for k, v in window.items() if k.endswith("t"))


def assert_429(resp, reason_words: str, subject: str) -> int:
    assert resp.status == 429, resp.body
    error = resp.json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
    assert subject in error["message"] and reason_words in error["message"], error["message"]
    retry = int(resp.headers["Retry-After"])
    assert 1 <= retry <= 60
    return retry


def test_rpm_holds_across_two_routers_exactly(procs, redis_url, engine, keys_file) -> None:
    r1, r2 = routers(procs, redis_url, keys_file)
    statuses = [chat(r, "alice", max_tokens=1).status for r in (r1, r2) * 4]
    assert statuses == [200] * 6 + [429] * 2
    retry = assert_429(chat(r2, "alice", max_tokens=1), "6 of 6 requests per minute", "key 'alice'")
    assert retry > 50  # the first request of the window leaves it a minute after it came
    assert chat(r1, "frank", max_tokens=1).status == 200  # another key is not affected
    metrics = request("GET", f"{r2.url}/metrics", headers=auth("frank")).body.decode()
    assert 'llm_router_quota_rejections_total{key="alice",reason="rpm",scope="key"}' in metrics


def test_a_burst_through_two_routers_gets_exactly_the_limits(procs, redis_url, engine, keys_file) -> None:
    """16 requests at once, half through each router: exactly ``max_concurrent`` (3) run, and
    the rest are refused; then the rpm (7) counts exactly what was admitted across both."""
    r1, r2 = routers(procs, redis_url, keys_file)
    results: list[int] = []
    barrier = threading.Barrier(16)

    def call(router) -> None:
        barrier.wait()
        results.append(chat(router, "hank", max_tokens=50).status)  # ~1 s each: they overlap

    threads = [threading.Thread(target=call, args=(r,)) for r in (r1, r2) * 8]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results) == [200] * 3 + [429] * 13, results
    statuses = [chat(r, "hank", max_tokens=1).status for r in (r1, r2) * 3]
    assert statuses == [200] * 4 + [429] * 2  # 3 + 4 = 7 per minute


def test_a_client_that_has_its_answer_has_nothing_in_flight(procs, redis_url, engine, keys_file) -> None:
    """A key with ``max_concurrent`` 1, one request after another, alternating routers: the
    lease of a finished request is dropped before its answer's last bytes (a stream's: before
    its ``[DONE]``), so the next one, sent the moment the answer is in, is never refused as
    concurrent (it was, now and then, while the lease was dropped after the answer). What is
    proven is that order, not the bound on the wait for Redis (``quota_release_wait``, 250 ms,
    its own test below): a loaded machine may take longer, so here the bound is generous."""
    r1, r2 = routers(procs, redis_url, keys_file, LLM_ROUTER_QUOTA_RELEASE_WAIT="30")
    statuses = [chat(r, "ivy", max_tokens=1).status for r in (r1, r2) * 25]
    assert statuses == [200] * 50, statuses
    for r in (r1, r2) * 5:  # streamed: the same (``stream`` asserts a 200 and the first event)
        s = stream(r, "ivy", 2)
        assert s.events_until(lambda ev: ev.get("data") == "[DONE]")[-1]["data"] == "[DONE]"
        s.close()


def test_a_stream_that_said_done_holds_no_lease(procs, redis_url, rds, keys_file) -> None:
    """An engine whose event stream says ``[DONE]`` a while (``LATE_END``) before its HTTP body
    ends (the chunked terminator came in a read of its own): the client has its answer at
    ``[DONE]``, so the lease is dropped before ``[DONE]`` is relayed and the key's next request,
    sent while the first body is still open, is admitted (a 429 before: the lease waited for
    the body's end)."""
    raw = RawEngine("late_end")
    opened: list[SseStream] = []
    try:
        fake = FakeWorker(rds, "w1")
        fake.publish(CHAT)
        fake.instance("chat", "running", raw.url)
        (router,) = routers(procs, redis_url, keys_file, count=1, LLM_ROUTER_QUOTA_RELEASE_WAIT="30")
        for _ in range(2):
            opened.append(s := stream(router, "ivy", 2))  # the second: a 200, not a 429
            assert s.events_until(lambda ev: ev.get("data") == "[DONE]")[-1]["data"] == "[DONE]"
        assert len(raw.heads) == 2
    finally:
        for s in opened:
            s.close()
        raw.close()


def test_a_stalled_redis_does_not_hold_an_answers_last_bytes(procs, redis_url, engine, rds, keys_file) -> None:
    """The lease is dropped before the answer's last bytes, but within a bound (250 ms): with
    Redis paused for writes (``CLIENT PAUSE … WRITE``: scripts wait) the answer still ends at
    once, and the release goes on in the background (it waited the whole pause before)."""
    (router,) = routers(procs, redis_url, keys_file, count=1)
    s = stream(router, "ivy", 6)  # admitted (its lease taken) before the pause
    rds.execute_command("CLIENT", "PAUSE", "5000", "WRITE")
    try:
        began = time.monotonic()
        assert s.events_until(lambda ev: ev.get("data") == "[DONE]")[-1]["data"] == "[DONE]"
        assert time.monotonic() - began < 2.5  # 6 tokens at 50/s, plus at most the bound
    finally:
        rds.execute_command("CLIENT", "UNPAUSE")
        s.close()


def test_group_limit_is_shared_by_its_keys(procs, redis_url, engine, keys_file) -> None:
    r1, r2 = routers(procs, redis_url, keys_file)
    assert [chat(r1, "dave", max_tokens=1).status for _ in range(2)] == [200, 200]
    assert [chat(r2, "erin", max_tokens=1).status for _ in range(2)] == [200, 200]
    assert_429(chat(r1, "dave", max_tokens=1), "requests per minute", "group 'lab'")
    assert_429(chat(r2, "erin", max_tokens=1), "requests per minute", "group 'lab'")


def test_concurrency_holds_across_routers_and_leases_outlive_their_ttl(procs, redis_url, engine, keys_file) -> None:
    r1, r2 = routers(procs, redis_url, keys_file)
    first, second = stream(r1, "bob", 400), stream(r2, "bob", 400)  # 8 s each
    assert_429(chat(r1, "bob", max_tokens=1), "2 of 2 concurrent requests", "key 'bob'")
    time.sleep(3 * LEASE_TTL)  # the subject: leases are renewed while their requests run
    assert_429(chat(r2, "bob", max_tokens=1), "2 of 2 concurrent requests", "key 'bob'")
    first.close()  # the client leaves: its lease goes with its request
    wait_for(lambda: chat(r2, "bob", max_tokens=1).status == 200, timeout=5, message="bob's slot freed")
    second.close()


def test_a_killed_routers_leases_expire(procs, redis_url, engine, keys_file) -> None:
    r1, r2 = routers(procs, redis_url, keys_file)
    held = [stream(r1, "bob", 400), stream(r1, "bob", 400)]
    assert_429(chat(r2, "bob", max_tokens=1), "concurrent requests", "key 'bob'")
    r1.proc.send_signal(signal.SIGKILL)
    r1.proc.wait(5)
    killed_at = time.monotonic()
    wait_for(lambda: chat(r2, "bob", max_tokens=1).status == 200, timeout=5 * LEASE_TTL,
             message="the dead router's leases to expire")
    assert time.monotonic() - killed_at < 4 * LEASE_TTL  # the TTL, plus slack for a busy machine
    for s in held:
        s.close()


def test_tpm_counts_reported_and_estimated_tokens(procs, redis_url, engine, rds, keys_file) -> None:
    (r1, r2) = routers(procs, redis_url, keys_file)
    resp = chat(r1, "carol", max_tokens=5)
    total = resp.json()["usage"]["total_tokens"]
    wait_for(lambda: tokens_charged(rds, "key", "carol") == total, message="non-streamed usage charged")
    s = stream(r2, "carol", 5, stream_options={"include_usage": True})
    usage = [ev["data"]["usage"] for ev in s.events_until(lambda ev: ev.get("data") == "[DONE]")
             if isinstance(ev.get("data"), dict) and ev["data"].get("usage")]
    s.close()
    assert len(usage) == 1
    wait_for(lambda: tokens_charged(rds, "key", "carol") == total + usage[0]["total_tokens"],
             message="streamed usage charged")
    before = tokens_charged(rds, "key", "carol")
    body = chat_body("chat", stream=True, max_tokens=5)
    s = stream(r1, "carol", 5)  # no usage chunk: estimated
    events = 1 + len(s.events_until(lambda ev: ev.get("data") == "[DONE]"))
    s.close()
    estimate = len(json.dumps(body).encode()) // 4 + events - 1
    wait_for(lambda: tokens_charged(rds, "key", "carol") - before == estimate, message="estimate charged")
    assert tokens_charged(rds, "key", "carol") >= 40  # over carol's 40 tpm now
    assert_429(chat(r2, "carol", max_tokens=1), "tokens per minute", "key 'carol'")


def test_a_tpm_burst_is_bounded_by_reservations_then_settled_to_the_use(procs, redis_url, engine, rds,
                                                                        keys_file) -> None:
    """20 requests at once on a ``tpm = 100`` key, half through each router: each reserves
    body bytes / 4 + ``max_tokens`` at admission, so only as many as fit under 100 (plus the
    one that crosses it) run, not all 20; once over, the window holds the tokens used."""
    r1, r2 = routers(procs, redis_url, keys_file)
    results: list[object] = []
    barrier = threading.Barrier(20)

    def call(router) -> None:
        barrier.wait()
        results.append(chat(router, "tina", max_tokens=30))  # ~0.6 s each: they overlap

    threads = [threading.Thread(target=call, args=(r,)) for r in (r1, r2) * 10]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    body_bytes = len(json.dumps(chat_body("chat", max_tokens=30)).encode())
    reservation = body_bytes // 4 + 30
    admitted = [r for r in results if r.status == 200]
    assert len(results) == 20 and 1 <= len(admitted) <= 100 // reservation + 1, [r.status for r in results]
    for r in results:
        if r.status != 200:
            assert_429(r, "tokens per minute", "key 'tina'")
    used = sum(r.json()["usage"]["total_tokens"] for r in admitted)
    wait_for(lambda: tokens_charged(rds, "key", "tina") == used, message="reservations replaced by the use")


def test_keys_without_limits_cost_redis_nothing_and_plain_files_work(procs, redis_url, engine, rds,
                                                                     tmp_path) -> None:
    plain = tmp_path / "keys.txt"
    plain.write_text(f"# plain keys\n{KEYS['alice']}\n")
    structured = tmp_path / "keys.json"
    structured.write_text(json.dumps({"keys": [{"name": "frank", "key": KEYS["frank"]}]}))
    (r_plain,) = routers(procs, redis_url, plain, count=1)
    (r_json,) = routers(procs, redis_url, structured, count=1)
    assert [chat(r_plain, "alice", max_tokens=1).status for _ in range(8)] == [200] * 8  # no rpm here
    assert chat(r_plain, "bob", max_tokens=1).status == 401
    assert chat(r_json, "frank", max_tokens=1).status == 200
    assert not rds.keys("llm:quota:*")


def test_redis_down_fails_open_or_closed(procs, tmp_path, mock_engine, keys_file) -> None:
    import redis as redis_sync
    from llm_lab_router.redis_server import RedisServer

    server = RedisServer(tmp_path / "redis", extra=["--appendonly", "no"])
    server.start()
    try:
        rds = redis_sync.Redis.from_url(server.url, decode_responses=True)
        fake = FakeWorker(rds, "w1")
        fake.publish(CHAT)
        _, url = mock_engine("--quiet", model="chat")
        wait_engine(url)
        fake.instance("chat", "running", url)
        env = {"LLM_ROUTER_API_KEYS_FILE": str(keys_file), "LLM_ROUTER_READ_ACCESS": "public"}
        open_ = start_router(procs, server.url, env=env)
        closed = start_router(procs, server.url, env={**env, "LLM_ROUTER_QUOTA_REDIS_DOWN": "closed"})
        for r in (open_, closed):
            wait_routable(r, "chat")
        rds.close()
    finally:
        server.stop()
    assert chat(open_, "alice", max_tokens=1).status == 200
    resp = chat(closed, "alice", max_tokens=1)
    assert resp.status == 503 and resp.json()["error"]["code"] == "quota_unavailable", resp.body
    assert chat(closed, "frank", max_tokens=1).status == 200  # no limits: Redis is not asked
    metrics = request("GET", f"{open_.url}/metrics", headers=auth("frank")).body.decode()
    assert "llm_router_quota_redis_errors_total 1.0" in metrics


@pytest.mark.parametrize("body, message", [
    ('[[keys]]\nname = "a"\nkey = "0123456789abcdef0123"\nrpm = -1\n', "keys[0] ('a'): field 'rpm'"),
    ('[[keys]]\nname = "a"\nkey = "0123456789abcdef0123"\ngroup = "nope"\n', "keys[0] ('a'): field 'group'"),
])
def test_a_bad_keys_file_stops_the_router_with_one_line(tmp_path, body, message) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(body)
    done = subprocess.run([sys.executable, "-m", "llm_lab_router.cli", "serve", "--api-keys-file", str(path)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and str(path) in done.stderr and message in done.stderr, done.stderr


# --------------------------------------------------------------------------- fair queuing


def queue_up(router, name: str, count: int, order: list[str], threads: list[threading.Thread]) -> None:
    def call() -> None:
        resp = chat(router, name, max_tokens=1)
        assert resp.status == 200, resp.body
        order.append(name)

    for _ in range(count):
        t = threading.Thread(target=call)
        t.start()
        threads.append(t)


def waiting(router) -> float:
    text = request("GET", f"{router.url}/metrics", headers=auth("frank")).body.decode()
    line = next((ln for ln in text.splitlines() if ln.startswith('llm_router_requests_in_flight{model="chat"}')), "")
    return float(line.split()[-1]) if line else 0.0


@pytest.mark.parametrize("late, expect", [("gina", "fair"), ("prio", "first")])
def test_contended_queue_is_fair_across_keys_and_honours_priority(procs, redis_url, rds, mock_engine, keys_file,
                                                                   late, expect) -> None:
    fake = FakeWorker(rds, "w1")
    fake.publish(ONE_AT_A_TIME)
    _, url = mock_engine("--quiet", "--tokens-per-second", "50", model="chat")
    wait_engine(url)
    fake.instance("chat", "running", url)
    (router,) = routers(procs, redis_url, keys_file, count=1)
    blocker = stream(router, "frank", 10_000)  # holds the only slot until it leaves
    order: list[str] = []
    threads: list[threading.Thread] = []
    queue_up(router, "frank", 20, order, threads)
    wait_for(lambda: waiting(router) == 21, message="20 queued")
    queue_up(router, late, 5, order, threads)
    wait_for(lambda: waiting(router) == 26, message="25 queued")
    blocker.close()
    for t in threads:
        t.join(30)
    assert len(order) == 25
    positions = [i for i, name in enumerate(order) if name == late]
    if expect == "first":
        assert positions == [0, 1, 2, 3, 4], order
    else:  # alternating with frank (FIFO would serve them at 20-24)
        assert positions[-1] <= 10, order
