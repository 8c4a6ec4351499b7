"""What will surely fail on this host, said before a start fails with a less helpful message.

A config can be valid TOML with valid fields and still name a program that is not installed, a
Python module its interpreter cannot import (``python3 -m sglang.launch_server`` with SGLang in
another virtualenv), a GGUF file that is not there, or a health path the engine does not serve (the worker would then
poll 404s for the whole start timeout). ``llm-router config check`` reports these per model;
the worker uses ``find_program`` before each spawn, so a missing binary is named together with
the PATH that was searched (``exec`` alone says "No such file or directory", and under uvloop
without even the file name).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from llm_lab_router.config import ModelConfig, expand_command
from llm_lab_router.estimate import Estimate, Estimator, profile_estimates
from llm_lab_router.presets import PRESETS

# Engines whose model_path is always a local file; the others also take a Hub id ("org/name").
LOCAL_FILE_ENGINES = ("llama.cpp", "llama-cpp-python")
PYTHON = re.compile(r"python(\d+(\.\d+)*)?")  # the name of an interpreter: python, python3, python3.11
# Run by the model's own interpreter: exit 0 if it can import the module argv[1], 3 if not.
# Only the top-level package is looked up by importlib.util.find_spec; its submodules are found
# on the package's path without importing the package (sglang's __init__ would import torch).
FIND_MODULE = """import importlib.machinery, importlib.util, sys
parts = sys.argv[1].split(".")
spec = importlib.util.find_spec(parts[0])
for n in range(2, len(parts) + 1):
    places = spec and spec.submodule_search_locations
    spec = places and importlib.machinery.PathFinder.find_spec(".".join(parts[:n]), places)
sys.exit(0 if spec else 3)
"""


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


def python_module(argv: list[str]) -> str | None:
    """The module of a ``python3 [options] -m MODULE ...`` command (SGLang, llama-cpp-python), else None."""
    if not argv or not PYTHON.fullmatch(Path(argv[0]).name):
        return None
    args = iter(argv[1:])
    for arg in args:
        if arg == "-m":
            return next(args, None)
        if arg in ("-X", "-W"):
            next(args, None)  # the option's value
        elif not arg.startswith("-"):
            return None  # a script
    return None


def missing_module(interpreter: str, module: str, env: dict[str, str], cwd: str) -> str | None:
    """Why ``interpreter`` (the model's, with the model's environment) cannot run ``-m module``,
    or None if it can. Asked of that interpreter: the worker's own may have other packages."""
    try:
        done = subprocess.run([interpreter, "-c", FIND_MODULE, module], env=env, cwd=cwd, capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot ask {interpreter} for module {module!r}: {exc}"
    if done.returncode == 3:
        return (f"Python module {module!r} is not installed for {interpreter} (install it there, or set "
                "env.PATH to the environment that has it)")
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return f"cannot ask {interpreter} for module {module!r}: exit status {done.returncode}: {last}"
    return None


def host_problems(model: ModelConfig, config_dir: str) -> list[str]:
    """What will surely fail when ``model`` starts on this host (empty: nothing found)."""
    problems: list[str] = []
    asked: list[tuple] = []
    cwd = str(Path(config_dir, model.cwd))
    if not Path(cwd).is_dir():
        problems.append(f"cwd: {cwd} is not a directory")
    for profile in model.device_profiles():
        path = profile.env.get("PATH", program_env_path(model))
        argv = expand_command(model, profile, port=0, host="127.0.0.1", config_dir=config_dir)
        program = find_program(argv[0], path, cwd) if argv else ""
        if program is None:
            problems.append(f"command: {missing_program(argv[0], path)}")
            break
        module = python_module(argv)
        question = (program, module, path, sorted(profile.env.items()))
        if program and module and Path(cwd).is_dir() and question not in asked:  # profiles differing in args: once
            asked.append(question)
            if why := missing_module(program, module, {**os.environ, **model.env, **profile.env, "PATH": path}, cwd):
                problems.append(f"command: {why}")
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


def vram_lines(model: ModelConfig, config_dir: str, estimator: Estimator) -> list[str]:
    """What ``config check`` says of each GPU profile's VRAM: declared, and estimated from the
    model's files (what placement uses while nothing is declared or measured)."""
    lines = []
    profiles = model.device_profiles()
    for n, (profile, est) in enumerate(zip(profiles, profile_estimates(model, config_dir, estimator)), 1):
        if est is None:
            continue  # a CPU profile
        which = f"profile {n} " if len(profiles) > 1 else ""
        declared = f"declared {profile.vram_mb} MiB" if profile.vram_mb else "not declared"
        guess = f"estimated {est.describe()}" if isinstance(est, Estimate) else f"no estimate: {est}"
        lines.append(f"vram: {which}[{', '.join(profile.devices)}] {declared}; {guess}")
    return lines
