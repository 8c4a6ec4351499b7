"""Long-running background loops that outlive their own bugs, for the worker and the router alike.

A background loop (the router's usage reporter, quota settler and claims watcher; the worker's
publisher, heartbeat, device probe, idle reaper, command intake and reloads) that dies of an
unexpected exception must not die silently: a dead usage loop makes busy models look idle, so
workers unload them mid-request. ``forever`` runs one: a loop that returns is done; one that
raises is logged with its traceback, counted (``on_restart``: the router's
``llm_router_loop_restarts_total{loop}``) and run again after a back-off that doubles from
``first_delay`` to ``max_delay`` while it keeps failing, and starts over once a run has lasted
``stable_after`` seconds. Cancellation is never caught.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable

FIRST_DELAY = 1.0
MAX_DELAY = 30.0
STABLE_AFTER = 60.0


async def forever(name: str, loop_fn: Callable[[], Awaitable[None]], log: logging.Logger,
                  on_restart: Callable[[str], None] | None = None, first_delay: float = FIRST_DELAY,
                  max_delay: float = MAX_DELAY, stable_after: float = STABLE_AFTER) -> None:
    """Run ``loop_fn`` until it returns; restart it, logged and counted, whenever it raises."""
    delay = first_delay
    while True:
        began = time.monotonic()
        try:
            await loop_fn()
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            if time.monotonic() - began >= stable_after:
                delay = first_delay  # it ran well for a while: this is a new failure, not a loop of them
            log.exception("%s loop failed; restarting it in %gs", name, delay)
            if on_restart is not None:
                on_restart(name)
        await asyncio.sleep(delay)
        delay = min(delay * 2, max_delay)


def supervised(name: str, loop_fn: Callable[[], Awaitable[None]], log: logging.Logger,
               on_restart: Callable[[str], None] | None = None, **backoff: float) -> asyncio.Task:
    """``forever`` as a task named ``name``."""
    return asyncio.create_task(forever(name, loop_fn, log, on_restart, **backoff), name=name)
