"""Redis ACL users per role, from the shipped ``examples/redis-users.acl``.

One mechanism for every Redis llm-router starts: the test suite's session Redis and the
private Redis of ``llm-router up`` both load the shipped users (``default`` off; ``admin``,
``worker`` and ``router`` with the least privilege of their role), only the passwords
differ. ``up`` keeps its passwords in its data directory (``PrivateUsers``), so a second
``up`` on the same directory (and its AOF) logs in with the same ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Mapping
from urllib.parse import urlsplit, urlunsplit

from llm_lab_router.shipped import REDIS_USERS, shipped

ROLES = ("admin", "worker", "router")
DEFAULT_PREFIX = "llm:"  # the key prefix the shipped patterns name


def acl_text(passwords: Mapping[str, str], prefix: str = DEFAULT_PREFIX) -> str:
    """The shipped ACL file with each ``>CHANGE-ME-<role>`` replaced by the SHA-256 of the
    role's password (the file holds no plain password), and the ``llm:`` key and channel
    patterns moved to ``prefix``."""
    text = shipped(REDIS_USERS).read_text()
    for role, password in passwords.items():
        placeholder = f">CHANGE-ME-{role}"
        if placeholder not in text:
            raise ValueError(f"{REDIS_USERS} has no user {role!r}")
        text = text.replace(placeholder, "#" + hashlib.sha256(password.encode()).hexdigest())
    if prefix != DEFAULT_PREFIX:
        text = text.replace(f"~{DEFAULT_PREFIX}*", f"~{prefix}*").replace(f"&{DEFAULT_PREFIX}events",
                                                                          f"&{prefix}events")
    return text


def with_user(url: str, user: str, password: str) -> str:
    """``url`` logged in as ``user``."""
    parts = urlsplit(url)
    host = f"[{parts.hostname}]" if parts.hostname and ":" in parts.hostname else parts.hostname
    return urlunsplit(parts._replace(netloc=f"{user}:{password}@{host}:{parts.port}"))


class PrivateUsers:
    """The users of ``up``'s private Redis, kept in its data directory, all files mode 0600:

    - ``passwords.json``: one generated password per role, reused by every later ``up``;
    - ``users.acl``: what redis-server loads (``--aclfile``), hashes only;
    - ``admin.url``, ``worker.url``, ``router.url``: each role's URL with its password, for
      another ``llm-router worker --redis-url-file .../worker.url`` (never ``--redis "$(cat
      …)"``: ``ps`` shows a command line to every local user), rewritten at each ``up`` (the
      port may change)."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory).resolve()  # redis-server chdirs to its data dir first
        self.passwords = self._load_or_create()

    def acl_file(self, prefix: str = DEFAULT_PREFIX) -> Path:
        return self._write("users.acl", acl_text(self.passwords, prefix))

    def urls(self, server_url: str) -> dict[str, str]:
        """Each role's URL of the server at ``server_url``; also written to ``<role>.url``."""
        urls = {role: with_user(server_url, role, self.passwords[role]) for role in ROLES}
        for role, url in urls.items():
            self._write(f"{role}.url", url + "\n")
        return urls

    def url_file(self, role: str) -> Path:
        return self.directory / f"{role}.url"

    def _load_or_create(self) -> dict[str, str]:
        path = self.directory / "passwords.json"
        try:
            stored = json.loads(path.read_text())
        except FileNotFoundError:
            stored = {}
        except (OSError, ValueError) as exc:
            raise RuntimeError(f"cannot read the Redis passwords in {path}: {exc}") from None
        passwords = {role: stored.get(role) or secrets.token_hex(24) for role in ROLES}
        if passwords != stored:
            self._write("passwords.json", json.dumps(passwords, indent=1) + "\n")
        else:
            path.chmod(0o600)
        return passwords

    def _write(self, name: str, text: str) -> Path:
        """Write a file only its owner may read, whatever was there before."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.directory / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(text)
        return path
