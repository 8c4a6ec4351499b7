"""The mock engine is a real process speaking the real protocol; these tests hold it to that.

Everything else (router, worker, benchmarks) trusts it to behave like llama-server / vLLM, so
each test checks something a stand-in could silently get wrong: pacing, SSE framing, the exact
float32 numbers behind base64 embeddings, noticing a client that went away, crashing on cue.
"""

from __future__ import annotations

import base64
import http.client
import json
import signal
import socket
import struct
import subprocess
import time
from typing import Any
from urllib.parse import urlsplit

import pytest

from conftest import wait_for

CHAT = "/v1/chat/completions"


def _conn(base: str, timeout: float = 5) -> http.client.HTTPConnection:
    url = urlsplit(base)
    return http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)


def call(base: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """One request; the body is JSON-encoded unless already bytes; returns (status, json)."""
    conn = _conn(base)
    try:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, json.loads(raw) if raw else None
    finally:
        conn.close()


def healthy(base: str) -> bool:
    try:
        return call(base, "GET", "/health")[0] == 200
    except OSError:
        return False


def stats(base: str) -> dict[str, int]:
    return call(base, "GET", "/debug/stats")[1]


def sse(base: str, path: str, body: dict[str, Any]) -> list[tuple[float, str]]:
    """Stream a request; every SSE payload with the monotonic time it arrived."""
    conn = _conn(base)
    try:
        conn.request("POST", path, body=json.dumps({**body, "stream": True}).encode(),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.getheader("Content-Type", "").startswith("text/event-stream")
        events = []
        while line := resp.readline():
            if line.startswith(b"data: "):
                events.append((time.monotonic(), line[6:].strip().decode()))
            else:
                assert line == b"\n", line  # frames are exactly "data: ...\n\n"
        return events
    finally:
        conn.close()


def raw_stream(base: str, body: dict[str, Any]) -> socket.socket:
    """Start a streamed chat request on a bare socket, so the test decides when to hang up."""
    url = urlsplit(base)
    sock = socket.create_connection((url.hostname, url.port), timeout=5)
    payload = json.dumps({**body, "stream": True}).encode()
    sock.sendall(b"POST " + CHAT.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
    return sock


def read_frames(sock: socket.socket, count: int) -> bytes:
    received = b""
    while received.count(b"data: ") < count:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {received!r}"
        received += chunk
    return received


def start(mock_engine, *args: str, **kw: Any) -> tuple[subprocess.Popen, str]:
    proc, base = mock_engine(*args, **kw)
    wait_for(lambda: healthy(base) or proc.poll() is not None, message="engine health")
    assert proc.poll() is None, "engine exited during startup"
    return proc, base


def messages(text: str = "hello there engine") -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


# --------------------------------------------------------------------------- lifecycle

def test_health_models_and_request_log(mock_engine, procs):
    proc, base = start(mock_engine, model="tiny")
    assert call(base, "GET", "/health") == (200, {"status": "ok"})
    status, models = call(base, "GET", "/v1/models")
    assert status == 200 and models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["tiny"]
    assert stats(base) == {"requests": 0, "completed_requests": 0, "cancelled_requests": 0,
                           "active_streams": 0, "cancelled_streams": 0, "completed_streams": 0,
                           "prompt_tokens_cached": 0, "prompt_tokens_computed": 0}
    log = procs.log(proc)
    assert "mock engine tiny loading" in log
    assert f"listening on {base}" in log
    assert "GET /v1/models 200" in log
    # a plain SIGTERM stops it promptly and cleanly
    assert procs.stop(proc, timeout=5) == 0
    assert "shutting down" in procs.log(proc)


def test_fail_health_answers_503_while_serving(mock_engine, procs):
    proc, base = mock_engine("--fail-health")
    wait_for(lambda: "listening on" in procs.log(proc), message="engine listening")
    assert call(base, "GET", "/health")[0] == 503
    assert call(base, "GET", "/v1/models")[0] == 200


def test_no_health_has_no_health_route(mock_engine, procs):
    proc, base = mock_engine("--no-health")
    wait_for(lambda: "listening on" in procs.log(proc), message="engine listening")
    assert call(base, "GET", "/health")[0] == 404
    assert call(base, "GET", "/v1/models")[0] == 200


def test_startup_delay_binds_port_only_when_loaded(mock_engine, procs):
    proc, base = mock_engine("--startup-delay", "1.0")
    wait_for(lambda: "loading model" in procs.log(proc), message="loading lines")
    began = time.monotonic()
    url = urlsplit(base)
    with socket.socket() as sock:
        assert sock.connect_ex((url.hostname, url.port)) != 0, "port bound while still loading"
    wait_for(lambda: healthy(base), message="engine health after delay")
    assert time.monotonic() - began > 0.3
    log = procs.log(proc)
    assert log.index("loading model") < log.index("listening on")


def test_sigterm_during_startup_delay_exits_promptly(mock_engine, procs):
    proc, _ = mock_engine("--startup-delay", "30")
    wait_for(lambda: "loading model" in procs.log(proc), message="loading lines")
    assert procs.stop(proc, timeout=5) == 0  # exited on SIGTERM: not killed 5 s later (-9)


def test_ignore_sigterm_survives_sigterm(mock_engine, procs):
    proc, base = start(mock_engine, "--ignore-sigterm")
    proc.send_signal(signal.SIGTERM)
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(0.5)  # absence of an exit cannot be polled for; a bounded wait is the check
    assert healthy(base)
    assert "shutting down" not in procs.log(proc)
    assert procs.stop(proc, signal.SIGKILL) == -signal.SIGKILL


# --------------------------------------------------------------------------- generation

def test_chat_json_with_usage(mock_engine):
    _, base = start(mock_engine, "--response", "alpha beta gamma")
    status, body = call(base, "POST", CHAT, {"model": "alias-x", "messages": messages(), "max_tokens": 5})
    assert status == 200
    assert body["object"] == "chat.completion"
    assert body["model"] == "alias-x"
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "alpha beta gamma alpha beta"}
    assert choice["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
    # max_completion_tokens is honoured too, and the output is deterministic
    again = call(base, "POST", CHAT, {"messages": messages(), "max_completion_tokens": 5})[1]
    assert again["choices"][0]["message"]["content"] == "alpha beta gamma alpha beta"
    assert again["model"] == "mock"
    assert stats(base)["requests"] == 2 and stats(base)["completed_requests"] == 2


def test_chat_stream_framing_and_usage(mock_engine):
    _, base = start(mock_engine, "--response", "one two three", "--max-tokens", "4")
    events = sse(base, CHAT, {"messages": messages(), "stream_options": {"include_usage": True}})
    assert events[-1][1] == "[DONE]"
    chunks = [json.loads(data) for _, data in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "one two three one"  # --max-tokens default applies
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert len({c["id"] for c in chunks}) == 1
    st = stats(base)
    assert st["completed_streams"] == 1 and st["active_streams"] == 0


def test_tokens_per_second_paces_streamed_and_plain(mock_engine):
    _, base = start(mock_engine, "--tokens-per-second", "20")
    events = sse(base, CHAT, {"messages": messages(), "max_tokens": 5})
    contents = [t for t, data in events[:-1] if json.loads(data)["choices"][0]["delta"].get("content")]
    assert len(contents) == 5
    # 5 tokens at 20/s: one every 50 ms, each flushed as produced, not in one burst at the end
    assert events[-1][0] - events[0][0] >= 0.15
    assert contents[-1] - contents[0] >= 0.15
    began = time.monotonic()
    assert call(base, "POST", CHAT, {"messages": messages(), "max_tokens": 5})[0] == 200
    assert time.monotonic() - began >= 0.2


def test_completions_json_and_stream(mock_engine):
    _, base = start(mock_engine, "--response", "x y")
    status, body = call(base, "POST", "/v1/completions", {"prompt": "four words of prompt", "max_tokens": 3})
    assert status == 200 and body["object"] == "text_completion"
    assert body["choices"][0]["text"] == "x y x"
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}
    events = sse(base, "/v1/completions", {"prompt": "p", "max_tokens": 3})
    assert events[-1][1] == "[DONE]"
    chunks = [json.loads(data) for _, data in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == "x y x"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_embeddings_float_base64_deterministic(mock_engine):
    _, base = start(mock_engine, "--embedding-dim", "8")
    texts = ["first text", "second"]
    status, plain = call(base, "POST", "/v1/embeddings", {"input": texts, "model": "emb"})
    assert status == 200 and plain["object"] == "list" and plain["model"] == "emb"
    vectors = [d["embedding"] for d in plain["data"]]
    assert [d["index"] for d in plain["data"]] == [0, 1]
    assert all(len(v) == 8 for v in vectors)
    assert vectors[0] != vectors[1]
    assert all(abs(sum(x * x for x in v) - 1) < 1e-5 for v in vectors)
    assert plain["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    packed = call(base, "POST", "/v1/embeddings", {"input": texts, "encoding_format": "base64"})[1]
    decoded = [list(struct.unpack("<8f", base64.b64decode(d["embedding"]))) for d in packed["data"]]
    assert decoded == vectors
    single = call(base, "POST", "/v1/embeddings", {"input": "second"})[1]
    assert single["data"][0]["embedding"] == vectors[1]
    tokens = call(base, "POST", "/v1/embeddings", {"input": [[1, 2, 3], [4]]})[1]
    assert len(tokens["data"]) == 2 and tokens["usage"]["prompt_tokens"] == 4


def test_openai_client_understands_it(mock_engine):
    openai = pytest.importorskip("openai")
    _, base = start(mock_engine, "--response", "hi from mock")
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(model="m", messages=messages(), max_tokens=3)
    assert reply.choices[0].message.content == "hi from mock"
    stream = client.chat.completions.create(model="m", messages=messages(), max_tokens=3, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "hi from mock"
    emb = client.embeddings.create(model="m", input="abc")  # the client asks for base64
    raw = call(base, "POST", "/v1/embeddings", {"input": "abc"})[1]["data"][0]["embedding"]
    assert emb.data[0].embedding == pytest.approx(raw, abs=1e-7)


def test_errors_have_openai_shape(mock_engine):
    _, base = start(mock_engine)
    status, body = call(base, "POST", CHAT, b'{"messages": [')
    assert status == 400
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["code"] is None
    assert body["error"]["message"]
    status, body = call(base, "POST", CHAT, {"messages": messages(), "max_tokens": "many"})
    assert status == 400 and "max_tokens" in body["error"]["message"]
    assert call(base, "POST", "/v1/embeddings", {"input": 3})[0] == 400
    status, body = call(base, "GET", "/v1/nothing")
    assert status == 404 and body["error"]["type"] == "invalid_request_error"


# --------------------------------------------------------------------------- failure switches

def test_client_disconnect_cancels_stream(mock_engine):
    _, base = start(mock_engine, "--tokens-per-second", "50")
    sock = raw_stream(base, {"messages": messages(), "max_tokens": 10000})
    read_frames(sock, 2)
    assert stats(base)["active_streams"] == 1
    sock.close()
    wait_for(lambda: stats(base)["cancelled_streams"] == 1, timeout=5, message="stream cancelled")
    st = stats(base)
    assert st["active_streams"] == 0 and st["completed_streams"] == 0


def test_client_disconnect_cancels_paced_plain_request(mock_engine, procs):
    proc, base = start(mock_engine, "--tokens-per-second", "10")
    url = urlsplit(base)
    sock = socket.create_connection((url.hostname, url.port), timeout=5)
    payload = json.dumps({"messages": messages(), "max_tokens": 1000}).encode()  # due in 100 s
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: "
                 + str(len(payload)).encode() + b"\r\n\r\n" + payload)
    wait_for(lambda: stats(base)["requests"] == 1, message="request received")
    sock.close()
    wait_for(lambda: stats(base)["cancelled_requests"] == 1, timeout=5, message="request cancelled")
    assert "POST /v1/chat/completions 499" in procs.log(proc)


def test_crash_after_n_requests(mock_engine, procs):
    proc, base = start(mock_engine, "--crash-after", "2")
    for _ in range(2):
        assert call(base, "POST", CHAT, {"messages": messages()})[0] == 200
    assert proc.wait(5) == 1
    assert "fatal: simulated crash after 2 requests" in procs.log(proc)


def test_crash_with_exit_code_zero(mock_engine, procs):
    proc, base = start(mock_engine, "--crash-after", "1", "--exit-code", "0")
    assert call(base, "POST", CHAT, {"messages": messages()})[0] == 200
    assert proc.wait(5) == 0
    assert "fatal: simulated crash after 1 requests" in procs.log(proc)


def test_crash_mid_stream(mock_engine, procs):
    proc, base = start(mock_engine, "--crash-mid-stream")
    sock = raw_stream(base, {"messages": messages(), "max_tokens": 50})
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    sock.close()
    assert received.count(b"data: ") == 2 and b"[DONE]" not in received
    assert proc.wait(5) == 1
    assert "fatal: simulated crash in the middle of a stream" in procs.log(proc)


def test_hang_mid_stream(mock_engine):
    proc, base = start(mock_engine, "--hang-mid-stream")
    sock = raw_stream(base, {"messages": messages(), "max_tokens": 50})
    received = read_frames(sock, 2)
    sock.settimeout(0.5)
    with pytest.raises(socket.timeout):
        received += sock.recv(65536)  # nothing more comes, yet the connection stays open
    assert received.count(b"data: ") == 2
    assert proc.poll() is None and healthy(base)
    assert stats(base)["active_streams"] == 1
    sock.close()
    # even while hung it notices the client leaving, and stops
    wait_for(lambda: stats(base)["cancelled_streams"] == 1, timeout=5, message="hung stream cancelled")
    assert stats(base)["active_streams"] == 0


def test_chatty_prints_numbered_lines_and_quiet_drops_access_log(mock_engine, procs):
    # The rate it reaches is a figure for scripts/bench.py (--log-rate), not for a test on a
    # loaded host: here, that the lines come, numbered, none lost.
    proc, base = start(mock_engine, "--chatty", "50000", "--quiet")
    wait_for(lambda: procs.log(proc).count("chatty ") >= 5000, interval=0.1, message="5000 chatty lines")
    whole = procs.log(proc).rsplit("\n", 1)[0]  # the last line may be half written
    numbers = [int(line.split()[1].rstrip(":")) for line in whole.splitlines() if line.startswith("chatty ")]
    assert numbers == list(range(len(numbers)))
    assert "GET /health" not in procs.log(proc)


# --------------------------------------------------------------------------- prefix cache model


def turn(n: int, system_words: int = 200) -> list[dict[str, str]]:
    """Turn ``n`` (from 1) of a conversation: a long system prompt, user and assistant messages of 10 and 5 words."""
    msgs = [{"role": "system", "content": "rule " * system_words}]
    for t in range(n):
        msgs.append({"role": "user", "content": f"question {t} " + "word " * 8})
        if t < n - 1:
            msgs.append({"role": "assistant", "content": "answer " * 5})
    return msgs


def ttft(base: str, msgs: list[dict[str, str]]) -> float:
    started = time.monotonic()
    events = sse(base, CHAT, {"messages": msgs, "max_tokens": 1})
    return events[0][0] - started


def test_prefix_cache_charges_only_the_uncached_prompt_tokens(mock_engine):
    _, base = start(mock_engine, "--prefix-cache", "100", "--ttft-base", "0.01", "--ttft-per-token", "0.002")
    first = ttft(base, turn(1))
    assert stats(base)["prompt_tokens_computed"] == 210 and stats(base)["prompt_tokens_cached"] == 0
    second = ttft(base, turn(2))  # the first turn's prompt is cached: its answer and the question are not
    assert stats(base)["prompt_tokens_computed"] == 210 + 15 and stats(base)["prompt_tokens_cached"] == 210
    assert first >= 0.01 + 210 * 0.002 and 0.01 + 15 * 0.002 <= second < first / 3, (first, second)
    other = [{"role": "system", "content": "rule " * 200}, {"role": "user", "content": "something else"}]
    call(base, "POST", CHAT, {"messages": other, "max_tokens": 1})  # the shared system prompt is cached
    assert stats(base)["prompt_tokens_cached"] == 410 and stats(base)["prompt_tokens_computed"] == 227


def test_prefix_cache_is_an_lru_of_its_capacity_and_off_by_default(mock_engine):
    _, base = start(mock_engine, "--prefix-cache", "2", "--quiet")
    call(base, "POST", CHAT, {"messages": turn(1, 20), "max_tokens": 1})  # 2 prefixes cached
    call(base, "POST", CHAT, {"messages": [{"role": "user", "content": "other conversation"}], "max_tokens": 1})
    call(base, "POST", CHAT, {"messages": [{"role": "user", "content": "a third one"}], "max_tokens": 1})
    before = stats(base)["prompt_tokens_cached"]
    call(base, "POST", CHAT, {"messages": turn(1, 20), "max_tokens": 1})  # its system prompt was evicted
    assert stats(base)["prompt_tokens_cached"] == before == 0
    call(base, "POST", CHAT, {"messages": turn(1, 20), "max_tokens": 1})  # now it is back
    assert stats(base)["prompt_tokens_cached"] == 30
    # completions: the leading blocks of 32 words are cached
    prompt = " ".join(f"w{i}" for i in range(70))
    call(base, "POST", "/v1/completions", {"prompt": prompt, "max_tokens": 1})
    call(base, "POST", "/v1/completions", {"prompt": prompt + " more words", "max_tokens": 1})
    assert stats(base)["prompt_tokens_cached"] == 30 + 64
    _, plain = start(mock_engine, "--quiet")
    call(plain, "POST", CHAT, {"messages": turn(1), "max_tokens": 1})
    assert stats(plain)["prompt_tokens_cached"] == stats(plain)["prompt_tokens_computed"] == 0
