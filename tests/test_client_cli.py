"""The client commands (``llm_router.client``): output, exit codes, and the real stack.

Two layers, both over real sockets:

* a tiny in-process Tornado fake of the router API, for what the real stack cannot produce
  on demand (a given 400, a model that fails with a given error, an exact log history) —
  it tests the client's formatting and exit codes, nothing else;
* the real thing: ``redis-server`` + ``llm-router worker`` + ``llm-router serve`` + the mock
  engine, driving ``start`` / ``models`` / ``logs`` / ``stop`` end to end.
"""

from __future__ import annotations

import asyncio
import json
import os
import pty
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import click
import pytest
import tornado.web
from click.testing import CliRunner
from conftest import ROOT, wait_for
from helpers import STACK_WORKER as WORKER
from helpers import start_stack
from llm_lab_router import client
from llm_lab_router.client import format_log, json_events
from tornado.httpserver import HTTPServer
from tornado.iostream import StreamClosedError
from tornado.netutil import bind_sockets


def cli_group() -> click.Group:
    group = click.Group("llm-router")
    client.register(group)
    return group


def run_cli(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(cli_group(), list(args), env=env, catch_exceptions=False)


# --------------------------------------------------------------------------- the fake API

T0 = 1_700_000_000.0


class Fake:
    """In-memory state of the fake router: models, their log, what requests it saw."""

    def __init__(self) -> None:
        self.models: dict[str, dict[str, Any]] = {
            "tiny": {"aliases": ["tiny", "gpt-3.5-turbo"], "mode": "chat", "status": "stopped",
                     "last_error": "", "outcome": "running"},
            "broken": {"aliases": ["broken"], "mode": "base", "status": "stopped",
                       "last_error": "", "outcome": "failed"},
        }
        self.logs: list[dict[str, Any]] = [
            {"timestamp": T0 + i, "message": f"history {i}", "host": "gpu1",
             "stream": "stderr" if i == 2 else "stdout"} for i in range(4)
        ]
        self.auth_headers: list[str] = []
        self.workers: list[str | None] = []  # the worker query parameter of each start/stop
        self.health = "healthy"

    def resolve(self, alias: str) -> str:
        for mid, m in self.models.items():
            if alias == mid or alias in m["aliases"]:
                return mid
        raise tornado.web.HTTPError(404)

    def item(self, mid: str) -> dict[str, Any]:
        m = self.models[mid]
        inst = {"worker": "w1", "state": m["status"], "url": "http://127.0.0.1:20001" if m["status"] == "running" else ""}
        return {"id": mid, "object": "model", "created": 0, "owned_by": "test", "aliases": m["aliases"],
                "status": m["status"], "mode": m["mode"], "instances": [inst]}


class FakeHandler(tornado.web.RequestHandler):
    def initialize(self, fake: Fake) -> None:
        self.fake = fake

    def prepare(self) -> None:
        self.fake.auth_headers.append(self.request.headers.get("Authorization", ""))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        self.finish({"success": False, "message": f"fake: HTTP {status_code}"})


class Health(FakeHandler):
    def get(self) -> None:
        healthy = self.fake.health == "healthy"
        self.set_status(200 if healthy else 503)
        self.write({"status": self.fake.health, "models_count": 2, "running_models": 0,
                    "redis": "ok" if healthy else "unreachable"})


class Models(FakeHandler):
    def get(self) -> None:
        self.write({"object": "list", "data": [self.fake.item(m) for m in self.fake.models]})


class Start(FakeHandler):
    async def post(self, alias: str) -> None:
        if alias == "bad name":
            self.set_status(400)
            self.finish({"success": False, "message": "invalid alias"})
            return
        mid = self.fake.resolve(alias)
        assert self.get_query_argument("wait") == "false", "the CLI must not block the start request"
        self.fake.workers.append(self.get_query_argument("worker", None))
        self.fake.models[mid]["status"] = "starting"
        asyncio.get_running_loop().call_later(1.2, self._settle, mid)
        self.set_status(202)
        self.write({"success": True, "message": f"模型 '{alias}' 正在启动", "model": mid, "state": "starting",
                    "workers": []})

    def _settle(self, mid: str) -> None:
        m = self.fake.models[mid]
        m["status"] = m["outcome"]
        m["last_error"] = "exit code 1: CUDA out of memory" if m["outcome"] == "failed" else ""


class Stop(FakeHandler):
    def post(self, alias: str) -> None:
        mid = self.fake.resolve(alias)
        worker = self.get_query_argument("worker", None)
        self.fake.workers.append(worker)
        self.fake.models[mid]["status"] = "stopped"
        self.write({"success": True, "message": f"模型 '{alias}' 停止成功", "model": mid,
                    "workers": [worker] if worker else ["w1", "w2"]})


class StopAll(FakeHandler):
    def post(self) -> None:
        self.write({"success": True, "message": "所有模型已关闭", "models": ["tiny", "broken"], "workers": ["w1"]})


class Clear(FakeHandler):
    def post(self, alias: str) -> None:
        keep = int(self.get_query_argument("keep_minutes", "0"))
        self.write({"success": True, "message": f"模型 '{alias}' 已清空全部日志，删除 1 条", "model": self.fake.resolve(alias),
                    "deleted": 1 if keep else 4, "keep_minutes": keep})


class Info(FakeHandler):
    def get(self, alias: str) -> None:
        mid = self.fake.resolve(alias)
        item = self.fake.item(mid)
        for inst in item["instances"]:
            inst.update(pid=4242, started_at=T0, restarts=0, last_error=self.fake.models[mid]["last_error"])
        self.write({"success": True, "model": item})


class LogStream(FakeHandler):
    """History, ``historical_complete``, then realtime lines every 0.2 s and ``stream_end``."""

    async def get(self, alias: str) -> None:
        mid = self.fake.resolve(alias)
        self.set_header("Content-Type", "text/event-stream")
        self.write(": keep-alive\n\n")
        for n, log in enumerate(self.fake.logs):
            self.write(f"id: {n}\ndata: {json.dumps({'type': 'historical', 'log': log})}\n\n")
        self.write('data: {"type": "historical_complete"}\n\n')
        try:
            await self.flush()
            for n in range(3):
                await asyncio.sleep(0.2)
                log = {"timestamp": T0 + 10 + n, "message": f"{mid} loading {n}", "host": "gpu1", "stream": "stdout"}
                self.write(f"data: {json.dumps({'type': 'realtime', 'log': log})}\n\n")
                await self.flush()
            self.write('data: {"type": "stream_end"}\n\n')
        except StreamClosedError:  # the client had what it wanted
            pass


class Devices(FakeHandler):
    def get(self) -> None:
        gpu = {"index": 0, "name": "NVIDIA H100", "uuid": "GPU-1", "memory_total": 81559, "memory_used": 1024,
               "memory_free": 80535, "utilization": 7}
        cpu = {"online": True, "cpu_count": 16, "cpu_percent": 3.0, "memory_total": 64000, "memory_used": 8000,
               "memory_free": 56000}
        self.write({"success": True, "devices": {}, "hosts": {
            "w1": {"host": "gpu1", "ts": T0, "cuda": {"online": True, "error": "", "driver": "550", "gpus": [gpu]},
                   "cpu": cpu},
            "w2": {"host": "cpu1", "ts": T0, "cuda": {"online": False, "error": "NVMLError_LibraryNotFound",
                                                      "driver": "", "gpus": []}, "cpu": cpu},
        }})


@pytest.fixture
def fake_api():
    """The fake served on a free port by its own IO loop in a thread; yields (url, Fake)."""
    fake = Fake()
    sockets = bind_sockets(0, "127.0.0.1")
    port = sockets[0].getsockname()[1]
    ready, loop_box = threading.Event(), {}

    async def serve() -> None:
        kw = {"fake": fake}
        app = tornado.web.Application([
            (r"/health", Health, kw), (r"/v1/models", Models, kw),
            (r"/api/models/stop-all", StopAll, kw), (r"/api/models/([^/]+)/start", Start, kw), (r"/api/models/([^/]+)/stop", Stop, kw),
            (r"/api/models/([^/]+)/info", Info, kw), (r"/api/models/([^/]+)/logs/stream", LogStream, kw),
            (r"/api/devices/info", Devices, kw),
            (r"/api/logs/([^/]+)/clear", Clear, kw),
        ])
        server = HTTPServer(app)
        server.add_sockets(sockets)
        loop_box["loop"], loop_box["stop"] = asyncio.get_running_loop(), asyncio.Event()
        ready.set()
        await loop_box["stop"].wait()
        server.stop()
        await server.close_all_connections()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    ready.wait(5)
    yield f"http://127.0.0.1:{port}", fake
    loop_box["loop"].call_soon_threadsafe(loop_box["stop"].set)
    thread.join(5)


# --------------------------------------------------------------------------- unit-level

def test_sse_parser_skips_comments_and_joins_multiline_data() -> None:
    frames = [b": keep-alive\n", b"\n", b"id: 5-0\n", b'data: {"type":\n', b'data: "x"}\n', b"\n",
              b"data: not json\n", b"\n", b'data: {"type": "y"}\r\n', b"\r\n"]
    assert list(json_events(iter(frames))) == [("5-0", {"type": "x"}), ("5-0", {"type": "y"})]


def test_models_table_is_aligned_and_lists_hosts(fake_api) -> None:
    url, _ = fake_api
    result = run_cli("models", "--url", url)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["ID", "STATUS", "MODE", "ALIASES", "HOSTS"]
    row = lines[1 + [ln.split()[0] for ln in lines[1:]].index("tiny")]
    assert row.split() == ["tiny", "stopped", "chat", "gpt-3.5-turbo", "w1:stopped"]
    assert lines[0].index("STATUS") == row.index("stopped"), "columns must line up"


def test_json_flag_prints_the_routers_document(fake_api) -> None:
    url, _ = fake_api
    result = run_cli("models", "--url", url, "--json")
    assert result.exit_code == 0
    assert {m["id"] for m in json.loads(result.output)["data"]} == {"tiny", "broken"}


def test_url_from_env_and_api_key_sent_as_bearer(fake_api) -> None:
    url, fake = fake_api
    result = run_cli("models", env={"LLM_ROUTER_URL": url, "LLM_ROUTER_API_KEY": "s3cret"})
    assert result.exit_code == 0, result.output
    assert fake.auth_headers[-1] == "Bearer s3cret"


def test_start_follows_progress_until_running(fake_api) -> None:
    url, fake = fake_api
    result = run_cli("start", "gpt-3.5-turbo", "--url", url)
    assert result.exit_code == 0, result.output
    assert fake.models["tiny"]["status"] == "running"
    assert "gpt-3.5-turbo: starting" in result.output.splitlines()
    assert "tiny is running on w1 http://127.0.0.1:20001" in result.output


def test_start_failure_exits_1_with_the_error(fake_api) -> None:
    url, _ = fake_api
    result = CliRunner().invoke(cli_group(), ["start", "broken", "--url", url])
    assert result.exit_code == 1
    assert "broken failed to start (w1: exit code 1: CUDA out of memory)" in result.output


def test_start_timeout_exits_1(fake_api) -> None:
    url, _ = fake_api
    result = CliRunner().invoke(cli_group(), ["start", "tiny", "--url", url, "--timeout", "0.3"])
    assert result.exit_code == 1
    assert "still starting after 0.3s" in result.output


def test_start_on_a_tty_updates_one_line_with_the_latest_log(fake_api) -> None:
    """On a terminal the progress is one line rewritten in place, carrying the log's latest line."""
    url, _ = fake_api
    code = "import click; from llm_router import client; g = click.Group(); client.register(g); g()"
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", code, "start", "tiny", "--url", url],
                            stdin=subprocess.DEVNULL, stdout=follower, stderr=follower, cwd=ROOT)
    os.close(follower)
    out = b""
    try:
        while True:
            ready, _, _ = select.select([leader], [], [], 10)
            if not ready:
                break
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(leader)
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
    text = out.decode()
    assert proc.returncode == 0, text
    assert "\r\x1b[2Ktiny: starting  tiny loading" in text
    assert "tiny is running on" in text
    assert text.count("\n") <= 3, "progress must rewrite one line, not scroll"


def test_stop_prints_english_from_the_answers_fields(fake_api) -> None:
    url, fake = fake_api
    fake.models["tiny"]["status"] = "running"
    result = run_cli("stop", "gpt-3.5-turbo", "--url", url)
    assert result.exit_code == 0
    assert result.output.strip() == "tiny stopped on w1, w2"  # not the API's message (the manual's Chinese)
    assert fake.models["tiny"]["status"] == "stopped"
    assert fake.workers == [None]


def test_start_and_stop_on_one_host_send_the_worker(fake_api) -> None:
    url, fake = fake_api
    assert run_cli("start", "tiny", "--worker", "w1", "--url", url, "--timeout", "10").exit_code == 0
    result = run_cli("stop", "tiny", "--worker", "w1", "--url", url)
    assert result.output.strip() == "tiny stopped on w1"
    assert fake.workers == ["w1", "w1"]


def test_stop_all_and_logs_clear_print_english(fake_api) -> None:
    url, _ = fake_api
    result = run_cli("stop-all", "--url", url)
    assert result.exit_code == 0 and result.output.strip() == "stopped 2 models (tiny, broken) on 1 host"
    result = run_cli("logs", "gpt-3.5-turbo", "--clear", "--url", url)
    assert result.exit_code == 0 and result.output.strip() == "deleted 4 log entries of tiny"
    result = run_cli("logs", "tiny", "--clear", "--keep-minutes", "10", "--url", url)
    assert result.output.strip() == "deleted 1 log entry of tiny, kept the last 10 minutes"
    assert json.loads(run_cli("stop-all", "--json", "--url", url).output)["message"] == "所有模型已关闭"  # raw: as is
    assert CliRunner().invoke(cli_group(), ["logs", "tiny", "--keep-minutes", "1", "--url", url]).exit_code == 2


def test_logs_prints_history_and_exits_at_historical_complete(fake_api) -> None:
    url, fake = fake_api
    result = run_cli("logs", "tiny", "--url", url)
    assert result.exit_code == 0
    assert result.output.splitlines() == [format_log(log) for log in fake.logs]
    assert "loading" not in result.output, "without -f, realtime lines are not waited for"
    ts = time.strftime("%H:%M:%S", time.localtime(T0 + 2))
    assert f"{ts} gpu1 stderr history 2" in result.output


def test_logs_tail_limits_history(fake_api) -> None:
    url, fake = fake_api
    result = run_cli("logs", "tiny", "--tail", "2", "--url", url)
    assert result.output.splitlines() == [format_log(log) for log in fake.logs[-2:]]
    assert run_cli("logs", "tiny", "--tail", "0", "--url", url).output == ""


def test_logs_follow_prints_realtime_lines_until_stream_end(fake_api) -> None:
    url, _ = fake_api
    result = run_cli("logs", "tiny", "-f", "--tail", "1", "--url", url)
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert lines[0].endswith("history 3")
    assert [ln.split(" ", 3)[3].strip() for ln in lines[1:]] == ["tiny loading 0", "tiny loading 1", "tiny loading 2"]


def test_logs_json_is_one_event_per_line(fake_api) -> None:
    url, _ = fake_api
    result = run_cli("logs", "tiny", "--json", "--url", url)
    events = [json.loads(line) for line in result.output.splitlines()]
    assert [e["type"] for e in events] == ["historical"] * 4


def test_devices_table_per_host_with_offline_gpu_reason(fake_api) -> None:
    url, _ = fake_api
    result = run_cli("devices", "--url", url)
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert lines[0].split() == ["HOST", "DEVICE", "USED/TOTAL", "MiB", "UTIL", "NAME"]
    assert any(ln.split()[:2] == ["w1", "(gpu1)"] and "cuda:0" in ln and "1024/81559" in ln for ln in lines)
    assert any("w2 (cpu1)" in ln and "offline: NVMLError_LibraryNotFound" in ln for ln in lines)
    assert sum("8000/64000" in ln for ln in lines) == 2


def test_status_summarises_router_models_and_hosts(fake_api) -> None:
    url, _ = fake_api
    result = run_cli("status", "--url", url)
    assert result.exit_code == 0, result.output
    assert f"router   {url}  healthy (redis: ok)" in result.output
    assert "models   2 (2 stopped)" in result.output
    assert "hosts    2" in result.output


def test_status_of_a_degraded_router_exits_1_but_still_summarises(fake_api) -> None:
    url, fake = fake_api
    fake.health = "degraded"
    result = CliRunner().invoke(cli_group(), ["status", "--url", url])
    assert result.exit_code == 1
    assert "degraded (redis: unreachable)" in result.output
    assert "models   2 (2 stopped)" in result.output
    assert result.output.strip().endswith("Error: router is degraded")


@pytest.mark.parametrize("args, code, message", [
    (["start", "nope"], 4, "fake: HTTP 404"),
    (["logs", "nope"], 4, "fake: HTTP 404"),
    (["stop", "nope"], 4, "fake: HTTP 404"),
    (["start", "bad name"], 2, "invalid alias"),
])
def test_error_statuses_map_to_exit_codes(fake_api, args: list[str], code: int, message: str) -> None:
    url, _ = fake_api
    result = CliRunner().invoke(cli_group(), [*args, "--url", url])
    assert result.exit_code == code
    assert result.output.strip() == f"Error: {message}"


def test_usage_error_exits_2() -> None:
    assert CliRunner().invoke(cli_group(), ["start"]).exit_code == 2


@pytest.mark.parametrize("command", ["models", "status", "devices", "logs x", "start x", "stop x"])
def test_unreachable_router_is_one_line_and_exit_3(command: str) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = CliRunner().invoke(cli_group(), [*command.split(), "--url", f"http://127.0.0.1:{port}"])
    assert result.exit_code == 3
    assert result.output.startswith(f"Error: cannot reach the router at http://127.0.0.1:{port}")
    assert "--url" in result.output and "LLM_ROUTER_URL" in result.output  # how to point it elsewhere
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output


def dead_url() -> str:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_the_url_is_the_flag_then_the_env_then_the_running_ups_then_the_default(fake_api, tmp_path: Path,
                                                                                monkeypatch) -> None:
    from llm_lab_router import up_url

    url, _ = fake_api
    monkeypatch.setenv("LLM_ROUTER_STATE_DIR", str(tmp_path))
    monkeypatch.delenv("LLM_ROUTER_URL", raising=False)
    assert client.router_url(None) == client.DEFAULT_URL  # no up recorded: the default

    up_url.record(url, "w1")  # as a running `up --port N` does (this process stands for it: it is alive)
    assert run_cli("models").exit_code == 0  # found through the record
    elsewhere = dead_url()
    result = CliRunner().invoke(cli_group(), ["models"], env={"LLM_ROUTER_URL": elsewhere})
    assert result.exit_code == 3 and elsewhere in result.output  # the environment wins over the record
    assert run_cli("models", "--url", url, env={"LLM_ROUTER_URL": elsewhere}).exit_code == 0  # --url wins

    stale = tmp_path / "up" / "999999999.json"  # an up that was killed: its record is ignored and removed
    stale.write_text(json.dumps({"url": elsewhere, "pid": 999999999, "worker_id": "old", "started_at": 2e9}))
    assert run_cli("models").exit_code == 0 and not stale.exists()


# --------------------------------------------------------------------------- the real stack

STACK_TOML = """
[worker]
port_range = [%(port)d, %(port_end)d]
heartbeat_interval = 0.5
devices_interval = 0.5

[[models]]
id = "tiny"
aliases = ["tiny-chat"]
command = ["{python}", "%(engine)s", "--port", "{port}", "--model", "{id}", "--startup-delay", "0.5"]
startup_timeout = 20

[[models]]
id = "doomed"
command = ["{python}", "-c", "import sys; print('booting'); sys.stderr.write('fatal: no weights\\\\n'); sys.exit(3)"]
restart = "no"
startup_timeout = 20
"""


def test_real_stack_start_models_logs_stop(procs, redis_url: str, tmp_path: Path) -> None:
    url = start_stack(procs, redis_url, tmp_path, STACK_TOML)

    result = run_cli("models", "--url", url)
    assert result.exit_code == 0, result.output
    rows = {ln.split()[0]: ln.split() for ln in result.output.splitlines()[1:]}
    assert rows["tiny"][1:] == ["stopped", "chat", "tiny-chat", f"{WORKER}:stopped"]

    result = run_cli("start", "tiny-chat", "--url", url, "--timeout", "30")
    assert result.exit_code == 0, result.output
    assert f"tiny is running on {WORKER} http://" in result.output

    result = run_cli("models", "--url", url)
    assert f"{WORKER}:running" in result.output

    result = run_cli("logs", "tiny", "--url", url)  # history only: returns by itself
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines and all(ln[2] == ":" and ln.split()[1] == WORKER for ln in lines), lines
    assert "stdout" in {ln.split()[2] for ln in lines}

    # The host's device snapshot lives a few of the config's 0.5 s intervals: on a loaded
    # machine it may be between two writes, and `status`/`devices` then list no host.
    def host_listed() -> bool:
        try:
            with urllib.request.urlopen(f"{url}/api/devices/info", timeout=5) as resp:
                return WORKER in json.loads(resp.read()).get("hosts", {})
        except urllib.error.HTTPError:  # 503 while no host has a snapshot
            return False

    wait_for(host_listed, timeout=10, message="the host's device snapshot")
    result = run_cli("status", "--url", url)
    assert result.exit_code == 0, result.output
    assert "healthy" in result.output.splitlines()[0]
    assert "running: tiny" in result.output

    result = run_cli("devices", "--url", url)
    assert result.exit_code == 0 and result.output.splitlines()[1].startswith(WORKER)

    result = run_cli("stop", "tiny", "--url", url)
    assert result.exit_code == 0, result.output
    listed = json.loads(run_cli("models", "--json", "--url", url).output)["data"]
    assert {m["id"]: m["status"] for m in listed}["tiny"] == "stopped"


def test_real_stack_failed_start_and_unknown_model(procs, redis_url: str, tmp_path: Path) -> None:
    url = start_stack(procs, redis_url, tmp_path, STACK_TOML)
    result = CliRunner().invoke(cli_group(), ["start", "doomed", "--url", url, "--timeout", "30"])
    assert result.exit_code == 1, result.output
    assert "doomed failed to start" in result.output
    result = run_cli("logs", "doomed", "--url", url)
    assert "stderr fatal: no weights" in result.output
    assert CliRunner().invoke(cli_group(), ["start", "no-such-model", "--url", url]).exit_code == 4
