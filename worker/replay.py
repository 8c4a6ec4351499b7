"""The last log lines shipped, kept to ship again those a new Redis master lacks.

Redis replicates asynchronously: lines the master acknowledged in the moment before it died
may never have reached the replica that Sentinel promotes (and a Redis restarted from an
``appendfsync everysec`` file may miss its last second). The worker cannot tell at write
time, so it keeps the tail it shipped and, after an outage, compares it with the end of the
stream: kept lines of this host that the stream lacks are shipped again, in order, before
anything newer is. A stream holding no line of this host at all (a Redis that came back
empty) is left alone: there is nothing to align with.
"""

from __future__ import annotations

from collections import Counter, deque

import redis.asyncio as aredis

from llm_router.protocol import Keys, LogEntry, log_entry

KEEP_LINES = 2000  # about 20 s of a chatty engine at 100 lines/s; the replication lag is ms
SCAN_EXTRA = 200  # entries of other hosts that may sit between ours at the stream's end


class ShippedTail:
    """The last ``keep`` lines that reached Redis, across models, in shipping order."""

    def __init__(self, keep: int = KEEP_LINES) -> None:
        self._lines: deque[tuple[str, LogEntry]] = deque(maxlen=keep)

    def add(self, model: str, entries: list[LogEntry]) -> None:
        self._lines.extend((model, e) for e in entries)

    async def lost(self, redis: aredis.Redis, keys: Keys, host: str) -> list[tuple[str, list[LogEntry]]]:
        """The kept lines the streams lack now, per model, in order (and forget the rest:
        what is shipped again is kept again)."""
        by_model: dict[str, list[LogEntry]] = {}
        for model, entry in self._lines:
            by_model.setdefault(model, []).append(entry)
        lost = []
        for model, entries in by_model.items():
            tail = await redis.xrevrange(keys.logs(model), count=len(entries) + SCAN_EXTRA)
            ours = [e for e in (log_entry(fields) for _, fields in tail) if e.host == host]
            if missing := missing_lines(entries, ours):
                lost.append((model, missing))
        self._lines.clear()
        return lost


def missing_lines(kept: list[LogEntry], present: list[LogEntry]) -> list[LogEntry]:
    """The ``kept`` lines (in order) absent from ``present``, the end of this host's lines in
    the stream; only from the oldest line ``present`` holds on: older ones may just lie
    beyond what was read, and with no line present the stream is a new one (left alone)."""
    if not present:
        return []
    have = Counter((_stamp(e.timestamp), e.message) for e in present)
    oldest = min(_stamp(e.timestamp) for e in present)
    missing = []
    for entry in kept:
        key = (_stamp(entry.timestamp), entry.message)
        if key[0] < oldest:
            continue
        if have[key]:
            have[key] -= 1
        else:
            missing.append(entry)
    return missing


def _stamp(timestamp: float) -> str:
    return f"{timestamp:.6f}"  # as LOG_APPEND_SCRIPT stores it (compared as text: equal widths)
