"""What will surely fail on this host, said before a start fails with a less helpful message.

A config can be valid TOML with valid fields and still name a program that is not installed, a
GGUF file that is not there, or a health path the engine does not serve (the worker would then
poll 404s for the whole start timeout). ``llm-router config check`` reports these per model;
the worker uses ``find_program`` before each spawn, so a missing binary is named together with
the PATH that was searched (``exec`` alone says "No such file or directory", and under uvloop
without even the file name).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from llm_lab_router.config import ModelConfig, expand_command
from llm_lab_router.presets import PRESETS

# Engines whose model_path is always a local file; the others also take a Hub id ("org/name").
LOCAL_FILE_ENGINES = ("llama.cpp", "llama-cpp-python")


def find_program(program: str, path: str, cwd: str) -> str | None:
    """Where ``program`` (argv[0]) would be executed from, or None if it cannot be.

    A name with a slash is a path, relative to the model's working directory ``cwd``; a bare
    name is searched on ``path`` (the model's own PATH, which may differ from the worker's)."""
    if os.sep in program:
        full = Path(cwd, program)
        return str(full) if full.is_file() and os.access(full, os.X_OK) else None
    return shutil.which(program, path=path)


def program_env_path(model: ModelConfig) -> str:
    """The PATH a model's command is looked up on: its ``env.PATH``, else the worker's own."""
    return model.env.get("PATH", os.environ.get("PATH", os.defpath))


def missing_program(program: str, path: str) -> str:
    """The message for a program that is not there."""
    return f"program {program!r} not found on PATH={path}"


def host_problems(model: ModelConfig, config_dir: str) -> list[str]:
    """What will surely fail when ``model`` starts on this host (empty: nothing found)."""
    problems = []
    cwd = str(Path(config_dir, model.cwd))
    if not Path(cwd).is_dir():
        problems.append(f"cwd: {cwd} is not a directory")
    for profile in model.device_profiles():
        path = profile.env.get("PATH", program_env_path(model))
        argv = expand_command(model, profile, port=0, host="127.0.0.1", config_dir=config_dir)
        if argv and find_program(argv[0], path, cwd) is None:
            problems.append(f"command: {missing_program(argv[0], path)}")
            break
    if model.model_path:
        weights = model.model_path.replace("{config_dir}", config_dir)
        local = model.engine in LOCAL_FILE_ENGINES or weights.startswith(("/", "./", "../", "~"))
        if local and not (Path(cwd) / Path(weights).expanduser()).exists():
            problems.append(f"model_path: {weights} does not exist on this host")
    unserved = PRESETS[model.engine].unserved
    if model.health in unserved:
        problems.append(f"health: engine {model.engine!r} does not serve GET {model.health} (it answers 404); "
                        f"the preset's default is {PRESETS[model.engine].health!r}")
    return problems
