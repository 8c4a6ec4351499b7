"""The upgrade window to per-worker Redis users (docs/deploy.md, "Upgrading to per-worker Redis
users"): while routers of an older release still run, a worker with ``legacy_keys = true``
writes each of its records under the old key names too (``LegacyKeys``), in the same
transaction, and takes commands from its old stream as well (a second ``CommandIntake`` on
``LegacyKeys``). It must then log in as a user that may write both layouts (the old shared
``worker`` user): the protection per worker begins when the window ends.
"""

from __future__ import annotations

from llm_lab_router.protocol import Keys, LegacyKeys


class LegacyMirror:
    """A pipeline for ``worker.publish``'s steps that repeats each write of a worker-owned key
    under its legacy name (the version as a field of the ``llm:versions`` hash). Only the
    commands those steps use; the caller executes the pipeline it wrapped. Results: each
    command's own first, then its mirror's, so ``pipe.execute()[0]`` is unchanged."""

    def __init__(self, pipe, keys: Keys, legacy: LegacyKeys) -> None:
        self.pipe, self.keys, self.legacy = pipe, keys, legacy

    def _old(self, key: str) -> str | None:
        found = self.legacy.of(key, self.keys)
        return found[1] if found and found[0] == "key" else None

    def hset(self, key: str, *args, **kwargs) -> None:
        self.pipe.hset(key, *args, **kwargs)
        if old := self._old(key):
            self.pipe.hset(old, *args, **kwargs)

    def pexpire(self, key: str, ms: int) -> None:
        self.pipe.pexpire(key, ms)
        if old := self._old(key):
            self.pipe.pexpire(old, ms)

    def set(self, key: str, value, **kwargs) -> None:
        self.pipe.set(key, value, **kwargs)
        found = self.legacy.of(key, self.keys)
        if found and found[0] == "version":
            self.pipe.hset(self.legacy.versions(), found[1], value)
        elif found:
            self.pipe.set(found[1], value, **kwargs)

    def delete(self, *keys: str) -> None:
        self.pipe.delete(*keys)
        if old := [o for o in map(self._old, keys) if o]:
            self.pipe.delete(*old)

    def publish(self, channel: str, message) -> None:
        self.pipe.publish(channel, message)
        if old := self._old(channel):
            self.pipe.publish(old, message)

    def sadd(self, key: str, *values: str) -> None:
        self.pipe.sadd(key, *values)  # the index of workers is new: nothing to mirror
