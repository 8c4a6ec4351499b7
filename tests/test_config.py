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


def config_error(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    return message


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


@pytest.mark.parametrize("text, expected", [
    ('bogus = 1\n', "unknown field `bogus`"),
    ('[[models]]\nid = "a"\ncommand = ["x"]\ncolour = "red"\n', "unknown field `colour` - at `$.models[0]`"),
    ('[[models]]\nid = "a"\ncommand = ["x"]\nport = "80"\n', "Expected `int`, got `str` - at `$.models[0].port`"),
    ('[worker]\nheartbeat_interval = -1\n', "`$.worker.heartbeat_interval`"),
    ('[[models]]\nid = "a"\n', 'models[0].command: required when engine is "command"'),
    ('[[models]]\nid = "a"\ncommand = ["x"]\naliases = ["b"]\n[[models]]\nid = "b"\ncommand = ["x"]\n',
     "models[1].aliases: 'b' is already used by model 'a'"),
    ('[[models]]\nid = "a"\ncommand = ["x"]\naliases = ["b c"]\n', "models[0].aliases: 'b c' is not a valid alias"),
    ('[[models]]\nid = "a"\ncommand = ["x"]\naliases = ["a/b"]\n', "models[0].aliases: 'a/b' is not a valid alias"),
    ('[[models]]\nid = "a"\ncommand = ["x"]\ndevices = ["gpu0"]\n', "models[0].devices: 'gpu0' is not"),
    ('[[models]]\nid = "a"\ncommand = ["x"]\ndevices = ["cpu\\n"]\n', "models[0].devices: 'cpu\\n' is not"),
    ('[[models]]\nid = "a\\n"\ncommand = ["x"]\n', "`$.models[0].id`"),  # `$` would take the newline
    ('[[models]]\nid = "a"\ncommand = ["x"]\n[[models.profiles]]\ndevices = ["cuda:x"]\n',
     "models[0].profiles[0].devices: 'cuda:x' is not"),
    ('[[models]\n', "Expected ']]' at the end of an array declaration"),
    ('[[models]]\nid = "a"\ncommand = ["x"]\nrouting = "random"\n',
     "Invalid enum value 'random' - at `$.models[0].routing`"),
    ('[[models]]\nid = "a"\ncommand = ["x"]\naliases = ["b"]\nfallbacks = ["b"]\n',
     "models[0].fallbacks: 'b' is not another model's id or alias"),
])
def test_bad_file_is_one_line_naming_the_field(tmp_path, text, expected):
    assert expected in config_error(tmp_path, text)


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
    assert bad.stdout == ""
    lines = bad.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in bad.stderr
    assert lines[0].startswith("error: ") and "$.models[0].port" in lines[0]
