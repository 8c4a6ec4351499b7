"""Living with a Redis that comes and goes: which errors mean "not reachable", and a link
tracker that logs each outage once and backs off while it lasts.

Every worker loop talks to Redis; none of them may crash or spam the log when Redis restarts
or the network drops. They all use ``RedisLink``: ``failed(exc)`` on a connection error (one
log line per outage, then exponential back-off via ``pause()``), ``ok()`` after a success
(one "reachable again" line; returns True so the caller can re-publish what Redis may have lost).
"""

from __future__ import annotations

import asyncio
import logging

import redis.exceptions

log = logging.getLogger("llm_router.worker")

# What a lost or refused connection looks like through redis-py (OSError: DNS, socket setup).
REDIS_ERRORS: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    OSError,
)


class RedisLink:
    """The view one loop has of Redis: up or down, and how long to wait before trying again."""

    def __init__(self, name: str, first_delay: float = 0.1, max_delay: float = 5.0) -> None:
        self.name = name
        self.first_delay = first_delay
        self.max_delay = max_delay
        self.delay = first_delay
        self.down = False

    def failed(self, exc: BaseException) -> None:
        """Record a failed Redis call; logs only the first failure of an outage."""
        if not self.down:
            self.down = True
            log.warning("redis unreachable (%s): %s; retrying", self.name, _describe(exc))

    def ok(self) -> bool:
        """Record a successful Redis call; True when this ends an outage."""
        self.delay = self.first_delay
        if self.down:
            self.down = False
            log.info("redis reachable again (%s)", self.name)
            return True
        return False

    async def pause(self) -> None:
        """Sleep before the next try: 0.1 s, doubling up to 5 s."""
        await asyncio.sleep(self.delay)
        self.delay = min(self.max_delay, self.delay * 2)


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def stop_if_cancelled() -> None:
    """Raise ``CancelledError`` if someone called ``cancel()`` on the running task.

    Python 3.11's ``asyncio.wait_for`` (redis-py sends every command through it) drops a
    ``cancel()`` that arrives just as the command completes (CPython gh-86296): the command
    returns normally and a ``while True`` loop carries on until its owner gives up waiting (a
    3 s shutdown timeout). So every loop checks once per turn; the cancel stays recorded in
    ``Task.cancelling()`` even when its ``CancelledError`` was lost."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
