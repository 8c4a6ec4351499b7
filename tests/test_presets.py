"""Engine presets: what each engine resolves to, what the file overrides, the examples, and a
preset-launched model running for real (a ``llama-server`` stand-in on PATH)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MOCK_ENGINE, ROOT, wait_for
from helpers import get_json
from llm_lab_router.config import ConfigError, parse_config
from llm_lab_router.presets import warnings
from worker_helpers import worker  # noqa: F401  (the fixture)


def one(text: str):
    return parse_config("[[models]]\nid = \"m\"\n" + text).models[0]


@pytest.mark.parametrize("engine, command, mode, startup, grace", [
    ("llama.cpp", ["llama-server", "-m", "/w/m.gguf", "--host", "{host}", "--port", "{port}", "--alias", "m"],
     "chat", 300.0, 10.0),
    ("vllm", ["vllm", "serve", "/w/m.gguf", "--host", "{host}", "--port", "{port}", "--served-model-name", "m",
              "a", "b"], "chat", 600.0, 30.0),
    ("sglang", ["python3", "-m", "sglang.launch_server", "--model-path", "/w/m.gguf", "--host", "{host}",
                "--port", "{port}", "--served-model-name", "m"], "chat", 600.0, 30.0),
    ("tei", ["text-embeddings-router", "--model-id", "/w/m.gguf", "--hostname", "{host}", "--port", "{port}"],
     "embedding", 300.0, 10.0),
    ("llama-cpp-python", ["python3", "-m", "llama_cpp.server", "--model", "/w/m.gguf", "--host", "{host}", "--port",
                          "{port}", "--model_alias", "m", "--interrupt_requests", "false"], "chat", 300.0, 10.0),
])
def test_each_engine_resolves_to_a_complete_entry(engine, command, mode, startup, grace):
    m = one(f'engine = "{engine}"\nmodel_path = "/w/m.gguf"\naliases = ["a", "b"]\nengine_args = ["--x", "1"]\n')
    assert m.command == [*command, "--x", "1"]
    health = "/v1/models" if engine == "llama-cpp-python" else "/health"  # it has no /health
    assert (m.mode, m.health, m.startup_timeout, m.stop_grace) == (mode, health, startup, grace)


def test_llama_cpp_python_embedding_mode_turns_embeddings_on():
    m = one('engine = "llama-cpp-python"\nmodel_path = "e.gguf"\nmode = "embedding"\n')
    assert m.command[-2:] == ["--embedding", "true"]


def test_fields_written_in_the_file_override_the_preset():
    m = one('engine = "vllm"\nmodel_path = "org/m"\nstartup_timeout = 120.0\nstop_grace = 10\n'
            'health = "/v1/models"\nmode = "embedding"\ncommand = ["my-vllm", "{port}"]\nengine_args = ["-v"]\n')
    assert m.command == ["my-vllm", "{port}", "-v"]
    assert (m.mode, m.health, m.startup_timeout, m.stop_grace) == ("embedding", "/v1/models", 120.0, 10.0)
    assert one('engine = "llama.cpp"\nmodel_path = "e.gguf"\nmode = "embedding"\n').command[-1] == "--embedding"
    plain = one('command = ["srv"]\nengine_args = ["--fast"]\n')  # engine = "command": today's behaviour
    assert (plain.engine, plain.command, plain.startup_timeout, plain.stop_grace) == (
        "command", ["srv", "--fast"], 120.0, 10.0)


@pytest.mark.parametrize("text, expected", [
    ('engine = "ollama"\nmodel_path = "x"\n', "host.toml:3: model 'm': engine: 'ollama' is not valid; valid values: "
                                             "command, llama.cpp, vllm, sglang, tei, llama-cpp-python"),
    ('engine = "vllm"\n', "host.toml:3: model 'm': model_path: required by engine 'vllm'"),  # at its engine line
    ('engine = "tei"\nmodel_path = 3\n', "host.toml:4: model 'm': model_path: expected `str`, got `int`"),
    ('engine = "sglang"\nmodel_path = "x"\nengine_args = "--tp 2"\n',
     "host.toml:5: model 'm': engine_args: expected `array`, got `str`"),
])
def test_a_bad_engine_entry_is_one_line_naming_the_field(text, expected):
    with pytest.raises(ConfigError) as info:
        parse_config('[[models]]\nid = "m"\n' + text, "host.toml")
    assert "\n" not in str(info.value) and str(info.value).startswith(expected)


def test_sglang_aliases_are_warned_about():
    assert warnings(one('engine = "sglang"\nmodel_path = "x"\n')) == []
    assert "refused by the server" in warnings(one('engine = "sglang"\nmodel_path = "x"\naliases = ["a"]\n'))[0]
    assert warnings(one('engine = "vllm"\nmodel_path = "x"\naliases = ["a"]\n')) == []


def test_every_example_passes_config_check():
    examples = sorted(str(p) for p in (ROOT / "examples").glob("*.toml"))
    assert {Path(p).name for p in examples} >= {"llama-cpp.toml", "vllm.toml", "sglang.toml", "tei.toml",
                                                "llama-cpp-python.toml"}
    done = subprocess.run([sys.executable, "-m", "llm_lab_router.cli", "config", "check", "--portable", *examples],
                          capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert done.returncode == 0, done.stderr
    for path in examples:
        assert f"{path}: ok" in done.stdout
    assert "vllm serve meta-llama/Llama-3.1-8B-Instruct --host {host} --port {port} --served-model-name " \
           "llama-3.1-8b-instruct llama3 gpt-4o" in done.stdout
    for engine in ("llama.cpp", "vllm", "sglang", "tei", "llama-cpp-python"):
        assert f" {engine} " in done.stdout


LLAMA_SERVER = f"""#!{sys.executable}
# Stands in for llama.cpp's llama-server: takes its flags, runs the mock engine.
import argparse, os, sys
p = argparse.ArgumentParser()
for flag in ("-m", "--host", "--port", "--alias"):
    p.add_argument(flag, required=True)
args, rest = p.parse_known_args()
assert os.path.exists(args.m), args.m
os.execv(sys.executable, [sys.executable, {str(MOCK_ENGINE)!r}, "--host", args.host, "--port", args.port,
                          "--model", args.alias, "--quiet", *rest])
"""


def test_a_llama_cpp_preset_model_runs(worker, tmp_path):  # noqa: F811
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "llama-server"
    shim.write_text(LLAMA_SERVER)
    shim.chmod(0o755)
    (tmp_path / "tiny.gguf").write_bytes(b"GGUF")
    entry = {"id": "tiny", "engine": "llama.cpp", "model_path": "{config_dir}/tiny.gguf", "auto_start": True,
             "engine_args": ["--max-tokens", "3"], "env": {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}}
    worker.start([entry])
    inst = worker.wait_state("tiny", "running", timeout=20)
    assert [m["id"] for m in get_json(f"{inst.url}/v1/models")["data"]] == ["tiny"]  # --alias reached it
    started = next(line for line in worker.messages("tiny", "event") if line.startswith("starting: "))
    assert f"llama-server -m {tmp_path}/tiny.gguf --host 127.0.0.1 --port " in started
