"""Redis ACL users per role, from the shipped ``examples/redis-users.acl``.

One mechanism for every Redis llm-router starts: the test suite's session Redis and the
private Redis of ``llm-router up`` both load the shipped users, only the passwords differ:

- ``default`` off; ``admin`` (operators);
- ``router``: writes only what routers own (commands, usage, the swap line, quotas, log trims);
- ``reader``: reads only, what workers own (the cluster view of every router);
- ``worker.<id>``, one per worker, from the file's ``WORKER-ID`` template line: writes only its
  own keys (``llm:w:<id>:*``), reads only its own command stream, publishes only on its own
  channel (docs/security.md says why the router needs two users on Redis 6.2).

``up`` keeps its passwords in its data directory (``PrivateUsers``), so a second ``up`` on the
same directory (and its AOF) logs in with the same ones; ``llm-router redis-user add-worker``
makes the user of a new host (``new_worker``).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Iterable, Mapping
from urllib.parse import urlsplit, urlunsplit

from llm_lab_router.protocol import valid_worker_id
from llm_lab_router.shipped import REDIS_USERS, shipped
from redis.exceptions import ResponseError

ROLES = ("admin", "router", "reader")  # the users of a lab as a whole; workers have one each
DEFAULT_PREFIX = "llm:"  # the key prefix the shipped patterns name
WORKER_ID = "WORKER-ID"  # the placeholder of the shipped file's worker template line


def worker_user(wid: str) -> str:
    """The Redis user name of worker ``wid``."""
    return f"worker.{wid}"


def _user_line(line: str, password: str | None, prefix: str) -> str:
    """One ``user <name> ...`` line of the shipped file with ``>CHANGE-ME-<name>`` replaced by
    the SHA-256 of ``password`` (the file Redis loads holds no plain password) and the ``llm:``
    key and channel patterns moved to ``prefix``."""
    tokens = line.split()
    if password is not None:
        digest = "#" + hashlib.sha256(password.encode()).hexdigest()
        tokens = [digest if t == f">CHANGE-ME-{tokens[1]}" else t for t in tokens]
    text = " ".join(tokens)
    if prefix != DEFAULT_PREFIX:
        text = text.replace(f"~{DEFAULT_PREFIX}", f"~{prefix}").replace(f"&{DEFAULT_PREFIX}", f"&{prefix}")
    return text


def _shipped_lines() -> list[str]:
    return [line for line in shipped(REDIS_USERS).read_text().splitlines() if line.strip()]


def worker_acl_line(wid: str, password: str, prefix: str = DEFAULT_PREFIX) -> str:
    """The ACL file line of worker ``wid``'s user (its rules are what ``ACL SETUSER`` takes)."""
    if not valid_worker_id(wid):
        raise ValueError(f"{wid!r} is not a valid worker id (1-64 of A-Z a-z 0-9 . _ -)")
    template = next(line for line in _shipped_lines() if WORKER_ID in line)
    return _user_line(template.replace(WORKER_ID, wid), password, prefix)


def acl_text(passwords: Mapping[str, str], prefix: str = DEFAULT_PREFIX,
             workers: Mapping[str, str] | None = None) -> str:
    """The shipped ACL file with each role's password hashed in, the worker template replaced
    by one user per entry of ``workers`` (worker id -> password; none: no worker user), and the
    ``llm:`` key and channel patterns moved to ``prefix``."""
    lines = [line for line in _shipped_lines() if WORKER_ID not in line]
    if missing := set(passwords) - {line.split()[1] for line in lines}:
        raise ValueError(f"{REDIS_USERS} has no user {sorted(missing)[0]!r}")
    lines = [_user_line(line, passwords.get(line.split()[1]), prefix) for line in lines]
    lines += [worker_acl_line(wid, pw, prefix) for wid, pw in (workers or {}).items()]
    return "\n".join(lines) + "\n"


def new_worker(wid: str, prefix: str = DEFAULT_PREFIX) -> tuple[str, str]:
    """A new worker user: (its generated password, its ACL file line)."""
    password = secrets.token_hex(24)
    return password, worker_acl_line(wid, password, prefix)


def write_secret(path: str | os.PathLike, text: str) -> Path:
    """Create a file only its owner may read; never replace one (that would lock out the host
    whose password it holds)."""
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


def apply_worker_user(admin_client, wid: str, acl_line: str) -> bool:
    """Create (or replace) the user of ``acl_line`` in a running Redis as its admin (``ACL
    SETUSER``, ``reset`` first so nothing of an older user of that name remains), then save it
    to the server's ACL file; returns whether it was saved (False: the server has no ACL file,
    add the line to its config yourself)."""
    admin_client.execute_command("ACL", "SETUSER", worker_user(wid), "reset", *acl_line.split()[2:])
    try:
        admin_client.execute_command("ACL", "SAVE")
    except ResponseError as exc:  # "This Redis instance is not configured to use an ACL file"
        if "ACL file" not in str(exc):
            raise
        return False
    return True


def with_user(url: str, user: str, password: str) -> str:
    """``url`` logged in as ``user``."""
    parts = urlsplit(url)
    host = f"[{parts.hostname}]" if parts.hostname and ":" in parts.hostname else parts.hostname
    return urlunsplit(parts._replace(netloc=f"{user}:{password}@{host}:{parts.port}"))


class PrivateUsers:
    """The users of ``up``'s private Redis, kept in its data directory, all files mode 0600:

    - ``passwords.json``: one generated password per role and per worker user
      (``worker.<id>``), reused by every later ``up`` (any other entry, such as the shared
      ``worker`` user of older releases, is dropped: its user is gone at the next start);
    - ``users.acl``: what redis-server loads (``--aclfile``), hashes only;
    - ``<user>.url`` (``admin.url``, ``router.url``, ``reader.url``, ``worker.<id>.url``): each
      user's URL with its password, for another ``llm-router worker --redis-url-file
      .../worker.<id>.url`` (never ``--redis "$(cat …)"``: ``ps`` shows a command line to every
      local user), rewritten at each ``up`` (the port may change)."""

    def __init__(self, directory: str | os.PathLike, workers: Iterable[str] = ()) -> None:
        self.directory = Path(directory).resolve()  # redis-server chdirs to its data dir first
        self.workers = list(dict.fromkeys(workers))
        self.passwords = self._load_or_create()

    @property
    def users(self) -> list[str]:
        return [*ROLES, *map(worker_user, self.workers)]

    def acl_file(self, prefix: str = DEFAULT_PREFIX) -> Path:
        roles = {role: self.passwords[role] for role in ROLES}
        workers = {wid: self.passwords[worker_user(wid)] for wid in self.workers}
        return self._write("users.acl", acl_text(roles, prefix, workers))

    def urls(self, server_url: str) -> dict[str, str]:
        """Each user's URL of the server at ``server_url``; also written to ``<user>.url``."""
        urls = {user: with_user(server_url, user, self.passwords[user]) for user in self.users}
        for user, url in urls.items():
            self._write(f"{user}.url", url + "\n")
        for stale in set(self.directory.glob("*.url")) - {self.url_file(user) for user in urls}:
            stale.unlink()  # a user this Redis no longer has (the shared ``worker`` of older releases)
        return urls

    def url_file(self, user: str) -> Path:
        return self.directory / f"{user}.url"

    def _load_or_create(self) -> dict[str, str]:
        path = self.directory / "passwords.json"
        try:
            stored = json.loads(path.read_text())
        except FileNotFoundError:
            stored = {}
        except (OSError, ValueError) as exc:
            raise RuntimeError(f"cannot read the Redis passwords in {path}: {exc}") from None
        passwords = {user: stored.get(user) or secrets.token_hex(24) for user in self.users}
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
