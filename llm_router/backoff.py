"""Living with a Redis that comes and goes: which errors mean "not reachable", one back-off
schedule, and a link tracker that logs each outage once.

Every loop that talks to Redis (the worker's publisher, heartbeat, commands, log pipe, idle
reaper; a router's cluster view and usage reporter) must neither crash nor spam the log when
Redis restarts or the network drops, and must not hammer it while it is away. They share this
module so that they all do it the same way:

- ``Backoff``: the delays between tries, ``first`` doubling up to ``cap``, back to ``first``
  after a success;
- ``RedisLink``: ``failed(exc)`` on a connection error (one log line per outage), ``ok()``
  after a success (one "reachable again" line; True so the caller can re-publish what Redis
  may have lost), ``pause()`` to sleep the back-off.
"""

from __future__ import annotations

import asyncio
import logging

import redis.exceptions

# What a lost or refused connection looks like through redis-py (OSError: DNS, socket setup).
REDIS_ERRORS: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    OSError,
)


class Backoff:
    """Retry delays: ``first`` seconds, doubling after each failure up to ``cap``."""

    def __init__(self, cap: float = 5.0, first: float = 0.1) -> None:
        self.cap, self.first = cap, first
        self.delay = first

    def grow(self) -> None:
        """After a failure: the next wait doubles (up to ``cap``)."""
        self.delay = min(self.cap, self.delay * 2)

    def reset(self) -> None:
        """After a success: the next failure waits ``first`` again."""
        self.delay = self.first

    async def sleep(self) -> None:
        """Wait the current delay, then grow it."""
        await asyncio.sleep(self.delay)
        self.grow()


class RedisLink:
    """The view one loop has of Redis: up or down, and how long to wait before trying again.

    ``log``: where the outage lines go (the component's own logger)."""

    def __init__(self, name: str, first_delay: float = 0.1, max_delay: float = 5.0,
                 log: logging.Logger = logging.getLogger("llm_router.worker")) -> None:
        self.name = name
        self.log = log
        self.backoff = Backoff(max_delay, first_delay)
        self.down = False

    def failed(self, exc: BaseException) -> None:
        """Record a failed Redis call; logs only the first failure of an outage."""
        if not self.down:
            self.down = True
            self.log.warning("redis unreachable (%s): %s; retrying", self.name, _describe(exc))

    def ok(self) -> bool:
        """Record a successful Redis call; True when this ends an outage."""
        self.backoff.reset()
        if self.down:
            self.down = False
            self.log.info("redis reachable again (%s)", self.name)
            return True
        return False

    async def pause(self) -> None:
        """Sleep before the next try: 0.1 s, doubling up to 5 s (by default)."""
        await self.backoff.sleep()


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
