"""The host config: a good file loads; every mistake is one line naming the file and the field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from llm_lab_router.config import ConfigError, DeviceProfile, default_config_path, expand_command, load_config

GOOD = """
[worker]
id = "gpu1"
port_range = [21000, 21010]

[[models]]
id = "qwen-7b"
aliases = ["qwen", "gpt-4o-mini"]
command = ["llama-server", "--port", "{port}", "--host", "{host}", "-m", "{config_dir}/qwen.gguf"]
idle_ttl = 600
restart = "always"

[[models.profiles]]
devices = ["cuda:0"]
vram_mb = 8000
args = ["-ngl", "99"]

[[models.profiles]]
devices = ["cpu"]
args = ["-ngl", "0"]

[[models]]
id = "bge"
mode = "embedding"
command = ["{python}", "embed.py", "--port", "{port}"]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "models.toml"
    path.write_text(text)
    return path


def problems(tmp_path: Path, text: str) -> list[str]:
    """Every problem ``load_config`` raises for ``text``, each without the file's path."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    lines = [str(p) for p in info.value.problems]
    assert "\n" not in str(info.value) and all(line.startswith(f"{path}") for line in lines)
    return [line[len(str(path)):] for line in lines]


def test_good_file(tmp_path):
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.worker_id == "gpu1"
    assert cfg.worker.port_range == [21000, 21010]
    assert [m.id for m in cfg.models] == ["qwen-7b", "bge"]
    qwen = cfg.model("gpt-4o-mini")
    assert qwen is not None and qwen.id == "qwen-7b"
    assert qwen.names == ["qwen-7b", "qwen", "gpt-4o-mini"]
    assert [p.devices for p in qwen.device_profiles()] == [["cuda:0"], ["cpu"]]
    assert qwen.catalog_entry().vram_mb == [8000, 0]
    bge = cfg.model("bge")
    assert bge.mode == "embedding" and bge.device_profiles() == [DeviceProfile(devices=["cpu"])]
    argv = expand_command(qwen, qwen.device_profiles()[0], port=21000, host="127.0.0.1", config_dir="/etc/llm")
    assert argv == ["llama-server", "--port", "21000", "--host", "127.0.0.1", "-m", "/etc/llm/qwen.gguf",
                    "-ngl", "99"]
    assert cfg.model("nope") is None
    assert qwen.catalog_entry().routing == "affinity" and qwen.catalog_entry().fallbacks == []


def test_routing_and_fallbacks_reach_the_catalog(tmp_path):
    cfg = load_config(write(tmp_path, '[[models]]\nid = "a"\ncommand = ["x"]\nrouting = "least-outstanding"\n'
                                      'fallbacks = ["b", "c-alias"]\n'))
    entry = cfg.models[0].catalog_entry()
    assert entry.routing == "least-outstanding" and entry.fallbacks == ["b", "c-alias"]


def test_example_config_is_valid():
    cfg = load_config(default_config_path())
    assert {m.id for m in cfg.models} == {"demo-chat", "demo-embed"}
    assert cfg.model("gpt-3.5-turbo").id == "demo-chat"
    assert cfg.model("text-embedding-ada-002").mode == "embedding"


M = '[[models]]\nid = "a"\ncommand = ["x"]\n'  # a valid model, lines 1-3


@pytest.mark.parametrize("text, expected", [
    ('bogus = 1\n', ":1: bogus: unknown field"),
    (M + 'colour = "red"\n', ":4: model 'a': colour: unknown field"),
    (M + 'engine_arg = ["-v"]\n', ":4: model 'a': engine_arg: unknown field (did you mean 'engine_args'?)"),
    ('[worker]\nlease_tl = 3\n', ":2: worker: lease_tl: unknown field (did you mean 'lease_ttl'?)"),
    (M + 'port = "80"\n', ":4: model 'a': port: expected `int`, got `str`"),
    ('[worker]\nheartbeat_interval = -1\n', ":2: worker: heartbeat_interval: expected `float` > 0.0"),
    ('[[models]]\nid = "a"\n', ':1: model \'a\': command: required when engine is "command" (the default); '
                               "or set engine to one of llama.cpp, vllm, sglang, tei, llama-cpp-python"),
    ('[[models]]\ncommand = ["x"]\n', ":1: models[0]: id: required"),
    (M + 'engine = "llamacpp"\n', ":4: model 'a': engine: 'llamacpp' is not valid; valid values: command, "
                                   "llama.cpp, vllm, sglang, tei, llama-cpp-python (did you mean 'llama.cpp'?)"),
    (M + 'routing = "random"\n', ":4: model 'a': routing: 'random' is not valid; valid values: affinity, "
                                  "least-outstanding"),
    (M + 'aliases = ["b"]\n[[models]]\nid = "b"\ncommand = ["x"]\n', ":6: model 'b': id: 'b' is already used "
                                                                    "by model 'a'"),
    (M + 'aliases = ["b c"]\n', ":4: model 'a': aliases: 'b c' is not a valid alias (no spaces, control "
                                 "characters, '/', '?', '#', '%' or '\\')"),
    (M + 'aliases = ["a/b"]\n', ":4: model 'a': aliases: 'a/b' is not a valid alias"),
    (M + 'devices = ["gpu0"]\n', ":4: model 'a': devices: 'gpu0' is not 'cpu', 'cuda' or 'cuda:N'"),
    (M + 'devices = ["cpu\\n"]\n', ":4: model 'a': devices: 'cpu\\n' is not 'cpu', 'cuda' or 'cuda:N'"),  # not `$`
    ('[[models]]\nid = "a\\n"\ncommand = ["x"]\n', ":2: model 'a\\n': id: expected `str` matching regex"),  # not `$`
    (M + '[[models.profiles]]\ndevices = ["cuda:x"]\n', ":5: model 'a': profiles[0].devices: 'cuda:x' is not"),
    (M + '[[models.profiles]]\ndevices = ["cpu"]\n[[models.profiles]]\nvram = 1\n',
     ":7: model 'a': profiles[1].vram: unknown field (did you mean 'vram_mb'?)"),
    (M + 'aliases = [\n  "b",\n  3,\n]\n', ":4: model 'a': aliases[1]: expected `str`, got `int`"),
    (M + 'env = { A = 1 }\n', ":4: model 'a': env.A: expected `str`, got `int`"),
    (M + '[models.env]\nB = "ok"\nA = 1\n', ":6: model 'a': env.A: expected `str`, got `int`"),
    (M + 'aliases = ["b"]\nfallbacks = ["b"]\n', ":5: model 'a': fallbacks: 'b' is not another model's id or alias"),
    ('[models]\nid = "a"\n', ":1: models: expected an array of tables: write [[models]] (two brackets) for each entry"),
    ('models = [\n  { id = "a", command = ["x"] },\n  { id = "b", command = ["x"], port = "p" },\n]\n',
     ":1: model 'b': port: expected `int`, got `str`"),  # an inline array: the line of `models =`
    ('[worker]\nport_range = [20, 10]\n', ":2: worker: port_range: [20, 10] is not [low, high] within 1..65535"),
])
def test_each_problem_is_one_line_with_its_line_model_and_field(tmp_path, text, expected):
    assert any(line.startswith(expected) for line in problems(tmp_path, text)), problems(tmp_path, text)


def test_every_problem_of_a_file_at_once(tmp_path):
    text = """
bogus = 1
[worker]
lease_tl = 3

[[models]]
id = "a"
command = ["x"]
port = "80"
colour = "red"

[[models]]
id = "b"
engine = "ollama"
model_path = "m"

[[models]]
id = "c"
command = ["x"]
aliases = ["a"]
"""
    assert problems(tmp_path, text) == [
        ":2: bogus: unknown field",
        ":4: worker: lease_tl: unknown field (did you mean 'lease_ttl'?)",
        ":9: model 'a': port: expected `int`, got `str`",
        ":10: model 'a': colour: unknown field",
        ":14: model 'b': engine: 'ollama' is not valid; valid values: command, llama.cpp, vllm, sglang, tei, "
        "llama-cpp-python",
        ":20: model 'c': aliases: 'a' is already used by model 'a'"]


@pytest.mark.parametrize("text, expected", [
    ('[[models]]\nid = "a"\ncommand = ["x]\nport = 1\n', ":3: unterminated string"),  # tomllib: "Illegal character '\n'"
    ("[[models]]\nid = 'a\ncommand = ['x']\n", ":2: unterminated string"),  # tomllib: at the end of the document
    ('a = 1\nb = """x\n\n', ":2: unterminated string"),
    ('[[models]\n', ":1: an [[array]] header must end with ']]'"),
    ('[worker]\nid = "a"\n\nid = "b"\n', ":4: 'id' is set twice (first on line 2)"),
    ('[[models]]\nid = gpu\n', ":2: missing or invalid value after '=' (text needs quotes: \"like this\")"),
    ('[[models]]\nid = "a"\ncommand = ["x"\n', ":3: unclosed array: a ']' is missing"),
])
def test_a_toml_syntax_error_has_its_line_and_plain_words(tmp_path, text, expected):
    (line,) = problems(tmp_path, text)
    assert line.startswith(expected), line
    assert "Illegal character" not in line and "(at " not in line


def test_bytes_that_are_not_utf8(tmp_path):
    path = tmp_path / "models.toml"
    path.write_bytes(b'[worker]\nid = "\xff"\n')
    with pytest.raises(ConfigError, match=r"models\.toml:2: not UTF-8 text$"):
        load_config(path)


def test_unreadable_file(tmp_path):
    with pytest.raises(ConfigError, match=r"missing\.toml: cannot read: No such file or directory$"):
        load_config(tmp_path / "missing.toml")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llm_lab_router.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=30)


def test_config_check_cli(tmp_path):
    ok = run_cli("config", "check", "--portable", str(write(tmp_path, GOOD)))  # llama-server is not here
    assert ok.returncode == 0, ok.stderr
    assert "qwen-7b" in ok.stdout and "ok (2 models)" in ok.stdout

    bad = run_cli("config-check", str(write(tmp_path, '[[models]]\nid = "a"\ncommand = ["x"]\nport = "80"\n')))
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr
    assert bad.stderr.splitlines() == [f"error: {tmp_path / 'models.toml'}:4: model 'a': port: expected `int`, got `str`"]
    assert bad.stdout == f"{tmp_path / 'models.toml'}: not valid (1 problem)\n"


def test_config_check_cli_lists_every_problem_of_every_file(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text(GOOD)
    bad = tmp_path / "bad.toml"
    bad.write_text('[[models]]\nid = "a"\ncommand = ["x"]\nidle_tl = 5\n\n[[models]]\nid = "b"\nengine = "vlm"\n')
    done = run_cli("config", "check", "--portable", str(bad), str(good))
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"error: {bad}:4: model 'a': idle_tl: unknown field (did you mean 'idle_ttl'?)",
        f"error: {bad}:8: model 'b': engine: 'vlm' is not valid; valid values: command, llama.cpp, vllm, sglang, tei, "
        "llama-cpp-python (did you mean 'vllm'?)"]
    assert f"{bad}: not valid (2 problems)" in done.stdout and f"{good}: ok (2 models)" in done.stdout


def test_worker_refuses_a_bad_file_with_every_problem(tmp_path):
    path = write(tmp_path, '[worker]\nid = 3\n[[models]]\nid = "a"\ncommand = ["x"]\nmode = "chatt"\n')
    done = run_cli("worker", "--config", str(path), "--redis", "redis://127.0.0.1:1/0")
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"error: {path}:2: worker: id: expected `str`, got `int`",
        f"error: {path}:6: model 'a': mode: 'chatt' is not valid; valid values: chat, base, embedding "
        "(did you mean 'chat'?)"]
