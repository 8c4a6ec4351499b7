"""What real engines do on day one, through a real worker: an engine that exits 0 when it
crashes (vLLM), a program that is not installed, a server without ``/health``
(llama-cpp-python), a failure quoting the log of an earlier attempt; and ``config check``
catching the first three before any start. Mock engines stand in (``--exit-code``,
``--no-health``)."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT
from helpers import chat_body, request
from llm_lab_router.config import parse_config
from llm_lab_router.hostcheck import find_program, host_problems
from worker_helpers import model, processes_of, worker  # noqa: F401  (the fixture)


def test_an_engine_exiting_0_unasked_is_restarted(worker):  # noqa: F811
    """vLLM's API server exits 0 when its engine core dies: that is a crash, not a stop."""
    worker.start([model("m1", "--crash-after", "1", "--exit-code", "0", restart="on-failure")])
    first = worker.command("start", "m1").ok and worker.instance("m1")
    try:
        request("POST", first.url + "/v1/chat/completions", chat_body("m1"), timeout=5)
    except OSError:
        pass  # the engine may die before the response is complete
    assert worker.wait_state("m1", "failed").last_error == "exited with code 0"
    again = worker.wait_state("m1", "running", timeout=15, restarts=1)
    assert again.pid != first.pid


def test_a_missing_program_is_named_with_the_path_searched(worker, tmp_path):  # noqa: F811
    empty = tmp_path / "bin"
    empty.mkdir()
    worker.start([{"id": "nobin", "command": ["no-such-engine", "--port", "{port}"], "env": {"PATH": str(empty)},
                   "restart": "no"}])
    reply = worker.command("start", "nobin")
    assert not reply.ok
    assert reply.message == f"cannot start: program 'no-such-engine' not found on PATH={empty}"
    assert worker.instance("nobin").last_error == reply.message


def test_a_health_path_answering_404_is_named_in_the_failure(worker):  # noqa: F811
    worker.start([model("nohealth", "--no-health", startup_timeout=1.5)])
    reply = worker.command("start", "nohealth")
    assert not reply.ok
    assert reply.message == ("did not become healthy within 1.5s (GET /health answered 404: the server has no such "
                             "route; set `health` to a path it serves)")
    assert processes_of(worker.wid) == []


def test_a_failure_quotes_only_the_lines_of_its_own_attempt(worker):  # noqa: F811
    worker.start([{"id": "dies", "restart": "no",
                   "command": ["{python}", "-c", "import os, sys; print('attempt', os.getpid()); sys.exit(3)"]}])
    first = worker.command("start", "dies")
    second = worker.command("start", "dies")
    assert not first.ok and not second.ok
    attempts = [[line for line in reply.log_tail if line.startswith("attempt ")] for reply in (first, second)]
    assert len(attempts[0]) == 1 and len(attempts[1]) == 1 and attempts[0] != attempts[1], attempts
    assert sum(line.startswith("starting: ") for line in second.log_tail) == 1


# --- config check: what will surely fail on this host ---


def test_host_problems_name_the_program_the_file_and_the_health_path(tmp_path):
    (tmp_path / "here.gguf").write_bytes(b"GGUF")
    cfg = parse_config(f"""
[[models]]
id = "ok"
engine = "llama.cpp"
model_path = "{{config_dir}}/here.gguf"
env = {{ PATH = "{ROOT / 'scripts'}" }}
command = ["{{python}}", "-c", "pass"]

[[models]]
id = "bad"
engine = "llama-cpp-python"
model_path = "{{config_dir}}/gone.gguf"
health = "/health"
env = {{ PATH = "{tmp_path}" }}

[[models]]
id = "hub"
engine = "vllm"
model_path = "org/model"
env = {{ PATH = "{tmp_path}" }}
""")
    ok, bad, hub = (host_problems(m, str(tmp_path)) for m in cfg.models)
    assert ok == []
    assert bad == [f"command: program 'python3' not found on PATH={tmp_path}",
                   f"model_path: {tmp_path}/gone.gguf does not exist on this host",
                   "health: engine 'llama-cpp-python' does not serve GET /health (it answers 404); "
                   "the preset's default is '/v1/models'"]
    assert hub == [f"command: program 'vllm' not found on PATH={tmp_path}"]  # a Hub id is not a path


def test_find_program_searches_the_given_path_and_resolves_paths_from_cwd(tmp_path):
    tool = tmp_path / "tool"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    assert find_program("tool", str(tmp_path), "/") == str(tool)
    assert find_program("tool", "/nonexistent", "/") is None
    assert find_program("./tool", "", str(tmp_path)) == str(tool)
    assert find_program(sys.executable, "", "/") == sys.executable


def test_config_check_fails_on_what_will_surely_fail_here(tmp_path):
    path = tmp_path / "host.toml"
    path.write_text('[[models]]\nid = "m"\nengine = "llama.cpp"\nmodel_path = "/no/such.gguf"\n'
                    f'env = {{ PATH = "{tmp_path}" }}\n')
    run = [sys.executable, "-m", "llm_lab_router.cli", "config", "check"]
    done = subprocess.run([*run, str(path)], capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"error: {path}:3: model 'm': command: program 'llama-server' not found on PATH={tmp_path}",
        f"error: {path}:4: model 'm': model_path: /no/such.gguf does not exist on this host"]
    assert f"{path}: 2 problems on this host (1 models)" in done.stdout
    portable = subprocess.run([*run, "--portable", str(path)], capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert portable.returncode == 0 and f"{path}: ok (1 models)" in portable.stdout


def test_a_python_module_engine_is_checked_by_its_own_interpreter(tmp_path):
    """SGLang and llama-cpp-python start as ``python3 -m MODULE``: python3 being on PATH says
    nothing about the module. The interpreter the model would run (here a ``python3`` on the
    model's PATH) is asked, with the model's environment (its ``PYTHONPATH``)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(sys.executable)
    engine = tmp_path / "lib" / "fakeengine"
    engine.mkdir(parents=True)
    (engine / "__init__.py").write_text("raise SystemExit('the package is not imported by the check')\n")
    (engine / "server.py").write_text("")
    cfg = parse_config(f"""
[[models]]
id = "sglang"
engine = "sglang"
model_path = "org/model"
env = {{ PATH = "{bin_dir}" }}

[[models]]
id = "here"
command = ["python3", "-u", "-m", "fakeengine.server", "--port", "{{port}}"]
env = {{ PATH = "{bin_dir}", PYTHONPATH = "{tmp_path / 'lib'}" }}

[[models]]
id = "no-sub"
command = ["python3", "-m", "fakeengine.launch"]
env = {{ PATH = "{bin_dir}", PYTHONPATH = "{tmp_path / 'lib'}" }}

[[models]]
id = "script"
command = ["python3", "serve.py", "-m", "not.a.module"]
env = {{ PATH = "{bin_dir}" }}
""")
    sglang, here, no_sub, script = (host_problems(m, str(tmp_path)) for m in cfg.models)
    python3 = str(bin_dir / "python3")
    assert sglang == [f"command: Python module 'sglang.launch_server' is not installed for {python3} (install it "
                      "there, or set env.PATH to the environment that has it)"]
    assert here == [] and script == []
    assert no_sub == [f"command: Python module 'fakeengine.launch' is not installed for {python3} (install it "
                      "there, or set env.PATH to the environment that has it)"]


def test_config_check_reports_a_missing_module_for_the_model(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(sys.executable)
    path = tmp_path / "host.toml"
    path.write_text(f'[[models]]\nid = "lcp"\nengine = "llama-cpp-python"\nmodel_path = "{{config_dir}}/m.gguf"\n'
                    f'env = {{ PATH = "{bin_dir}" }}\n')
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    done = subprocess.run([sys.executable, "-m", "llm_lab_router.cli", "config", "check", str(path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"error: {path}:3: model 'lcp': command: Python module 'llama_cpp.server' is not installed for "
        f"{bin_dir / 'python3'} (install it there, or set env.PATH to the environment that has it)"]
