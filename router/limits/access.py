"""What a key may use, start and administer: the ``models``, ``start`` and ``admin`` fields of
a structured keys file (docs/security.md, "Permissions per key and group").

Permissions are local: the keys file is read once at start, so they hold with Redis down, and
a key with none of these fields has no ``Access`` at all (``KeyProfile.access is None``): its
requests pay one attribute test, nothing more.

Patterns are model ids, aliases or shell globs (``fnmatch``, case-sensitive, as ids are). A
pattern matches a model when it matches its id, any of its aliases, or the name the request
used, so a lab can list what its users type as well as the ids it deploys.
"""

from __future__ import annotations

import re
from fnmatch import translate
from typing import Iterable, Literal

from llm_lab_router.router.core.errors import ApiError

StartRule = Literal["any", "listed", "none"]


def _matcher(patterns: Iterable[str]) -> re.Pattern[str]:
    """One compiled alternation of ``patterns`` (globs): a single regex test per name."""
    return re.compile("|".join(f"(?:{translate(p)})" for p in patterns) or r"(?!)")


class Scope:
    """A set of model patterns (ids, aliases, globs)."""

    __slots__ = ("patterns", "_regex")

    def __init__(self, patterns: Iterable[str]) -> None:
        self.patterns = tuple(patterns)
        self._regex = _matcher(self.patterns)

    def matches(self, names: Iterable[str]) -> bool:
        """Whether any of ``names`` (a model's id, aliases, the name a request used) is in scope."""
        match = self._regex.match
        return any(match(n) for n in names)

    def __repr__(self) -> str:
        return f"Scope({list(self.patterns)!r})"


class Access:
    """One key's permissions, resolved from its entry and its group (the key's own field wins).

    ``models``: what it may use (``None``: everything); ``start``: which models its requests
    may start on demand; ``admin``: the models it may start, stop and clear the logs of through
    the admin API (``None``: no scope of its own, so an admin-file key keeps the whole lab)."""

    __slots__ = ("key", "models", "start", "admin")

    def __init__(self, key: str, models: Scope | None = None, start: StartRule = "any",
                 admin: Scope | None = None) -> None:
        self.key = key
        self.models = models
        self.start = start
        self.admin = admin

    def may_use(self, names: Iterable[str]) -> bool:
        return self.models is None or self.models.matches(names)

    def may_start(self, names: Iterable[str]) -> bool:
        """Whether this key's requests may start the model on demand."""
        if self.start == "none":
            return False
        return self.start == "any" or self.may_use(names)

    def may_administer(self, names: Iterable[str]) -> bool:
        return self.admin is None or self.admin.matches(names)

    # --- the refusals, worded for the caller ---

    def check_use(self, name: str, names: Iterable[str]) -> None:
        """403 unless the key may use the model a request named ``name``."""
        if not self.may_use(names):
            raise ApiError(403, f"key '{self.key}' may not use model '{name}'", "model_not_allowed")

    def check_start(self, name: str, names: Iterable[str]) -> None:
        """403 unless the key may start the model (called only when it is not running)."""
        if not self.may_start(names):
            raise ApiError(403, f"model '{name}' is not running, and key '{self.key}' may not start it",
                           "model_start_not_allowed")

    def check_admin(self, name: str, names: Iterable[str]) -> None:
        """403 unless the model is within the key's admin scope."""
        if not self.may_administer(names):
            raise ApiError(403, f"model '{name}' is outside the admin scope of key '{self.key}'",
                           "model_outside_admin_scope")

    def __repr__(self) -> str:
        return f"Access({self.key!r}, models={self.models!r}, start={self.start!r}, admin={self.admin!r})"


def access_of(key: str, models: Iterable[str] | None, start: StartRule | None,
              admin: Iterable[str] | None) -> Access | None:
    """The ``Access`` of a key whose entry (merged with its group's) has these fields; ``None``
    when it has none of them: such a key may do what it did before (everything its role lets it)."""
    if models is None and start is None and admin is None:
        return None
    return Access(key, Scope(models) if models is not None else None, start or "any",
                  Scope(admin) if admin is not None else None)


def names_of(name: str, model: str, aliases: Iterable[str]) -> tuple[str, ...]:
    """The names a model goes by in a request: as asked, its id, its aliases."""
    return (name, model, *aliases)
