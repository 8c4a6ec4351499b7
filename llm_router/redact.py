"""Secrets out of everything that is logged or published: URLs, command lines, log lines.

Model servers take their keys on the command line (``--api-key sk-...``, ``--hf-token``),
and the worker writes ``starting: <argv>`` into the model's log stream, which every client
allowed to read logs sees; some servers print their own arguments at start-up too (vLLM's
``non-default args``). So:

- ``redact_argv`` shows a command line with the value of every secret-looking flag
  replaced by ``***`` (``--api-key X`` and ``--api-key=X``);
- ``Redactor`` knows the secret values of one model (those flags' values, its ``api_key``,
  its secret-looking ``env`` values) and replaces them in any free text: every line the
  worker publishes for the model, and its ``last_error``;
- ``redact_url`` shows a Redis URL without its password.

A flag or variable name is secret-looking when one of its words (split on ``-`` and ``_``,
case ignored) is ``token``, ``secret``, ``password``, ``passwd``, ``apikey``,
``credential(s)``, or when it has ``key`` right after ``api``, ``access`` or ``private``.
Words, not substrings: ``--max-tokens`` and ``--tokenizer`` are not secrets.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Iterable

from llm_lab_router.redis_url import describe as redact_url  # noqa: F401  (the one URL redaction, Sentinel forms too)

if TYPE_CHECKING:
    from llm_lab_router.model_config import ModelConfig

MASK = "***"
SECRET_WORDS = frozenset({"token", "secret", "password", "passwd", "apikey", "credential", "credentials"})
KEY_QUALIFIERS = frozenset({"api", "access", "private"})
MIN_SCRUB = 4  # shorter values are masked in argv but not searched for in free text


def secret_name(name: str) -> bool:
    """Whether a flag (``--hf-token``) or variable (``HF_TOKEN``) name holds a secret."""
    words = [w for w in re.split(r"[-_]+", name.lower()) if w]
    if SECRET_WORDS.intersection(words):
        return True
    return any(a in KEY_QUALIFIERS and b == "key" for a, b in zip(words, words[1:]))


def redact_argv(argv: Iterable[str]) -> list[str]:
    """``argv`` with the values of secret-looking flags replaced by ``***``. A secret-looking
    flag followed by another ``--flag`` is taken for a switch (``--use-auth-token``)."""
    out: list[str] = []
    mask_next = False
    for arg in argv:
        if mask_next and not arg.startswith("--"):
            out.append(MASK)
            mask_next = False
            continue
        flag, eq, _ = arg.partition("=")
        if arg.startswith("-") and eq and secret_name(flag):
            out.append(flag + "=" + MASK)
            mask_next = False
        else:
            out.append(arg)
            mask_next = arg.startswith("-") and secret_name(arg)
    return out


def argv_secrets(argv: Iterable[str]) -> list[str]:
    """The values ``redact_argv`` masks."""
    argv = list(argv)
    found = []
    for arg, shown in zip(argv, redact_argv(argv)):
        if shown != arg:
            found.append(arg if shown == MASK else arg.partition("=")[2])
    return found


class Redactor:
    """Replaces known secret values in free text. Built once per model start: ``scrub`` runs
    on every log line, so it does nothing but substring checks (none at all without secrets)."""

    def __init__(self, secrets: Iterable[str]) -> None:
        # Longest first, so a secret containing another is masked whole.
        self.secrets = sorted({s for s in secrets if len(s) >= MIN_SCRUB}, key=len, reverse=True)
        self._raw = [(s.encode(), MASK.encode()) for s in self.secrets]

    @classmethod
    def for_model(cls, model: ModelConfig) -> "Redactor":
        """The secrets of a ``ModelConfig``: secret flags of its command and of every device
        profile's args, its ``api_key``, secret-looking ``env`` values (model and profiles)."""
        profiles = model.device_profiles()
        flags = [*argv_secrets(model.command), *(s for p in profiles for s in argv_secrets(p.args))]
        env = [v for e in (model.env, *(p.env for p in profiles)) for k, v in e.items() if secret_name(k)]
        return cls([*flags, model.api_key, *env])

    def scrub(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        return text

    def scrub_bytes(self, data: bytes) -> bytes:
        """``scrub`` for raw engine output (a whole batch of lines at once, as the log pipe ships it)."""
        for secret, mask in self._raw:
            if secret in data:
                data = data.replace(secret, mask)
        return data

