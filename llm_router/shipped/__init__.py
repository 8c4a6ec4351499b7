"""The files ``llm-router up`` needs, shipped as package data so a wheel works as a checkout does.

Each entry here is a symbolic link to the one copy in the repository (``redis.conf``,
``examples/redis-users.acl``, ``examples/models.toml``, ``scripts/mock_engine.py``): a
checkout keeps one copy of each, and building a wheel copies the files the links point to.
``examples/`` and ``scripts/`` keep their relative layout, so the demo config's
``{config_dir}/../scripts/mock_engine.py`` finds the mock engine in both.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

REDIS_CONF = "redis.conf"
REDIS_USERS = "redis-users.acl"
DEMO_CONFIG = "examples/models.toml"


class MissingFile(RuntimeError):
    """The installation lacks a file it ships: a broken or partial install, never ignored."""


def shipped(name: str) -> Path:
    """The path of a shipped file (a real file: redis-server and the worker open it by name)."""
    root = resources.files(__name__)
    path = Path(str(root.joinpath(name)))
    if not isinstance(root, Path) or not path.is_file():
        raise MissingFile(f"{name} is missing from the llm-router installation (looked in {root}); "
                          "reinstall it (pip install --force-reinstall llm-router)")
    return path
