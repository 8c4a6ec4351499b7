"""The manual's workflow against a real engine: ``llm-router up`` with two models served by a
real ``llama-server`` through the ``llama.cpp`` preset, driven with curl-like requests and the
official openai SDK; crashes (``kill -9``, an exit with code 0 nobody asked for) restarted; a
cold start timed; Ctrl-C of ``up`` leaving no process behind.

The model (``scripts/make_tiny_gguf.py``) answers every prompt with ``ANSWER``, so replies are
asserted exactly. One ``up`` serves the module (starting it costs seconds); the Ctrl-C test
runs its own.

``./dev.sh test-real`` builds ``llama-server`` once (``scripts/build_llama_server.sh``, cached
outside the checkout), points ``$LLM_ROUTER_LLAMA_SERVER`` at it and runs this folder. The
default suite (``./dev.sh test``) skips the tier unless ``$LLM_ROUTER_LLAMA_SERVER`` is set or a
``llama-server`` is on ``PATH``: the build cache alone does not add its time to every run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import openai
import psutil
import pytest
from conftest import ROOT, Processes, wait_for
from helpers import SseStream, get_json, request
from llm_lab_router.redis_server import free_port

# The tier needs the ``real`` extra (numpy, gguf) to write its model; without it (the default
# suite's venv) the whole module is skipped, not an import error.
pytest.importorskip("gguf", reason="the real tier needs the `real` extra (./dev.sh test-real installs it)")
sys.path.insert(0, str(ROOT / "scripts"))
from make_tiny_gguf import ANSWER  # noqa: E402

ENGINE_ARGS = ["-c", "256", "-t", "1", "--parallel", "1"]  # small and on one core: the machine is shared


def find_llama_server() -> str | None:
    return os.environ.get("LLM_ROUTER_LLAMA_SERVER") or shutil.which("llama-server")


@pytest.fixture(scope="module")
def llama_server() -> str:
    found = find_llama_server()
    if found is None:
        pytest.skip("no llama-server (./dev.sh test-real builds one)")
    return found


@pytest.fixture(scope="module")
def tiny_gguf(llama_server, tmp_path_factory) -> Path:
    """The tiny model, written once (needs the ``real`` extra: numpy, gguf)."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        pytest.skip("the gguf package is missing (pip install -e '.[real]'; ./dev.sh test-real does it)")
    path = tmp_path_factory.mktemp("model") / "tiny.gguf"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tiny_gguf.py"), str(path)], check=True,
                   capture_output=True, timeout=60)
    return path


def lab_config(path: Path, llama_server: str, gguf: Path) -> Path:
    low = free_port() // 50 * 50 % 30000 + 30000  # two labs at once (the Ctrl-C test's) get different ranges
    env_path = f"{Path(llama_server).parent}{os.pathsep}{os.environ.get('PATH', os.defpath)}"
    common = (f'engine = "llama.cpp"\nmodel_path = {json.dumps(str(gguf))}\nengine_args = {json.dumps(ENGINE_ARGS)}\n'
              f'env = {{ PATH = {json.dumps(env_path)} }}\nstartup_timeout = 60\nstop_grace = 5\n')
    path.write_text(
        f'[worker]\nid = "real-{uuid.uuid4().hex[:8]}"\nport_range = [{low}, {low + 50}]\n'
        "heartbeat_interval = 0.5\nlease_ttl = 3.0\n\n"
        '[[models]]\nid = "tiny"\naliases = ["gpt-3.5-turbo"]\nrestart = "on-failure"\n' + common + "\n"
        '[[models]]\nid = "tiny-embed"\naliases = ["text-embedding-ada-002"]\nmode = "embedding"\n' + common)
    return path


class Lab:
    """``llm-router up`` as a user runs it: private Redis, a worker, a router."""

    def __init__(self, procs: Processes, config: Path, data_dir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.procs = procs
        self.proc = procs.start([sys.executable, "-m", "llm_lab_router.cli", "up", "--config", str(config),
                                 "--port", str(self.port), "--data-dir", str(data_dir)], name="up")
        wait_for(self.ready, timeout=60, interval=0.1, message="the router of `up` and its 2 models")

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"up exited with {self.proc.returncode}:\n{self.procs.log(self.proc)}")
        try:
            return len(get_json(f"{self.url}/v1/models")["data"]) == 2
        except (OSError, AssertionError):
            return False

    def info(self, alias: str) -> dict:
        return get_json(f"{self.url}/api/models/{alias}/info")["model"]

    def instance(self, alias: str) -> dict:
        (inst,) = self.info(alias)["instances"]
        return inst

    def running(self, alias: str, **fields) -> dict:
        def check():
            inst = self.instance(alias)
            return inst["state"] == "running" and all(inst[k] == v for k, v in fields.items()) and inst
        return wait_for(check, timeout=60, interval=0.1, message=f"{alias} running {fields}")  # type: ignore

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="sk-local", max_retries=0, timeout=60)

    def messages(self, alias: str) -> list[str]:
        stream = SseStream(f"{self.url}/api/models/{alias}/logs/stream?tail=1000", timeout=10)
        try:
            events = stream.events_until(lambda ev: isinstance(ev.get("data"), dict)
                                         and ev["data"].get("type") == "historical_complete")
        finally:
            stream.close()
        return [ev["data"]["log"]["message"] for ev in events[:-1]]


@pytest.fixture(scope="module")
def lab(llama_server, tiny_gguf, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lab")
    procs = Processes(tmp)
    try:
        yield Lab(procs, lab_config(tmp / "models.toml", llama_server, tiny_gguf), tmp / "data")
    finally:
        procs.stop_all()


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def chat_answer(lab: Lab, model: str = "gpt-3.5-turbo") -> str:
    with lab.client() as client:
        reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi there"}])
    return reply.choices[0].message.content


def test_the_manual_workflow_through_the_llama_cpp_preset(lab):
    assert request("GET", f"{lab.url}/health").status == 200
    models = {m["id"]: m for m in get_json(f"{lab.url}/v1/models")["data"]}
    assert set(models) == {"tiny", "tiny-embed"} and "gpt-3.5-turbo" in models["tiny"]["aliases"]

    started = request("POST", f"{lab.url}/api/models/gpt-3.5-turbo/start", timeout=90)
    assert started.status == 200, started.body
    inst = lab.running("tiny")
    assert alive(inst["pid"]) and "llama-server" in " ".join(psutil.Process(inst["pid"]).cmdline())
    lines = lab.messages("tiny")
    assert any(line.startswith("starting: ") and " -m " in line and "--alias tiny" in line for line in lines)
    assert any("llama" in line and not line.startswith(("starting", "running")) for line in lines), lines[-20:]

    with lab.client() as client:
        reply = client.chat.completions.create(model="gpt-3.5-turbo", messages=[{"role": "user", "content": "你好"}])
        assert reply.choices[0].message.content == ANSWER and reply.choices[0].finish_reason == "stop"
        assert reply.usage.completion_tokens > 0
        chunks = list(client.chat.completions.create(model="tiny", stream=True,
                                                     messages=[{"role": "user", "content": "Hello"}]))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ANSWER
        short = client.chat.completions.create(model="tiny", max_tokens=2, messages=[{"role": "user", "content": "x"}])
        assert short.choices[0].finish_reason == "length"

        # Embeddings: started on demand by the first request.
        vectors = client.embeddings.create(model="text-embedding-ada-002", input=["Hello world", "other text"])
        first, second = (d.embedding for d in vectors.data)
        assert len(first) == len(second) == 64 and first != second

    cleared = request("POST", f"{lab.url}/api/logs/tiny/clear?keep_minutes=0")
    assert cleared.status == 200 and cleared.json()["success"] is True
    stopped = request("POST", f"{lab.url}/api/models/tiny/stop", timeout=30)
    assert stopped.status == 200 and lab.instance("tiny")["state"] == "stopped"
    wait_for(lambda: not alive(inst["pid"]), message="llama-server gone after stop")


def test_kill_9_of_the_engine_is_restarted(lab):
    request("POST", f"{lab.url}/api/models/tiny/start", timeout=90)
    before = lab.running("tiny")
    os.kill(before["pid"], signal.SIGKILL)
    after = lab.running("tiny", restarts=before["restarts"] + 1)
    assert after["pid"] != before["pid"] and not alive(before["pid"])
    assert any(line == "killed by SIGKILL" for line in lab.messages("tiny"))
    assert chat_answer(lab) == ANSWER


def test_an_engine_exiting_0_unasked_is_restarted(lab):
    """llama-server exits 0 on a SIGTERM it gets from anyone: not a stop the worker asked for."""
    request("POST", f"{lab.url}/api/models/tiny/start", timeout=90)
    before = lab.running("tiny")
    os.kill(before["pid"], signal.SIGTERM)
    after = lab.running("tiny", restarts=before["restarts"] + 1)
    assert after["pid"] != before["pid"]
    assert "exited with code 0" in lab.messages("tiny")
    assert chat_answer(lab) == ANSWER


def test_cold_start_timed(lab, capsys):
    """A stopped model started by a request: how long the first answer takes, all included."""
    assert request("POST", f"{lab.url}/api/models/tiny/stop", timeout=30).status == 200
    began = time.monotonic()
    assert chat_answer(lab, "tiny") == ANSWER
    cold = time.monotonic() - began
    began = time.monotonic()
    assert chat_answer(lab, "tiny") == ANSWER
    warm = time.monotonic() - began
    with capsys.disabled():
        print(f"\nreal tier: cold start to first answer {cold:.2f} s, next answer {warm * 1000:.0f} ms")
    assert cold < 30 and warm < cold


def test_ctrl_c_of_up_leaves_nothing_behind(llama_server, tiny_gguf, tmp_path):
    procs = Processes(tmp_path)
    try:
        own = Lab(procs, lab_config(tmp_path / "models.toml", llama_server, tiny_gguf), tmp_path / "data")
        assert request("POST", f"{own.url}/api/models/tiny/start", timeout=90).status == 200
        engine = own.running("tiny")["pid"]
        family = psutil.Process(own.proc.pid).children(recursive=True)  # Redis, worker, router, engine
        assert engine in {p.pid for p in family} and len(family) >= 4
        own.proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert own.proc.wait(60) == 0
        left = [p for p in family if alive(p.pid)]
        assert left == [], [p.cmdline() for p in left]
        assert "llm-router up: stopped" in procs.log(own.proc)
    finally:
        procs.stop_all()
