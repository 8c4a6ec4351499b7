"""Work done once for the whole lab, whichever router gets to it first: a roll-up of a slot,
the lab's GPU summary of a slot, one Redis memory check's events.

Each router ``HINCRBY``s a claim per period (a slot, a check) in a hash; Redis answers 1 to
exactly one of them, which does the work. Routers need no leader and no lock with a lease: a
router that dies after its claim leaves that period undone, which reads as a gap.
"""

from __future__ import annotations

from typing import Sequence

from redis.asyncio import Redis


async def claim(redis: Redis, key: str, periods: Sequence[int], keep: int, drop_before: int) -> list[int]:
    """The ``periods`` this router is the first to claim in hash ``key`` (kept ``keep`` s). A
    router that won any drops the claims of periods before ``drop_before`` (no router looks at
    them again), so the hash stays as small as the periods still looked at."""
    if not periods:
        return []
    async with redis.pipeline(transaction=False) as pipe:
        for p in periods:
            pipe.hincrby(key, str(p), 1)
        pipe.expire(key, keep)
        won = [p for p, n in zip(periods, await pipe.execute()) if n == 1]
    if won:
        old = [f for f in await redis.hgetall(key) if int(f) < drop_before]
        if old:
            await redis.hdel(key, *old)
    return won
