"""``/debug/stats``: what a leak check needs to see from inside the router process."""

from __future__ import annotations

import asyncio

import msgspec
import psutil


class DebugStats(msgspec.Struct):
    tasks: int  # asyncio tasks alive (the handler's own included)
    fds: int  # open file descriptors (sockets to clients, engines, Redis)
    rss_mb: float


def debug_stats() -> DebugStats:
    proc = psutil.Process()
    return DebugStats(tasks=len(asyncio.all_tasks()), fds=proc.num_fds(), rss_mb=proc.memory_info().rss / 2**20)
