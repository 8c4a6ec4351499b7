"""The models waiting for a swap, shared by every router: ``llm:waiting``.

Each router writes one field ``{model}@{rid}`` per model it has requests waiting for (a JSON
``WaitEntry``: since when, how many, when written) and deletes it once they are served or
gave up. While they wait the entry is rewritten every ``WAIT_REFRESH`` s; readers ignore
entries older than ``USAGE_STALE`` s, so a router that died stops holding the line within
seconds. Every router reads the whole hash (one ``HGETALL``) before it decides a swap
(``router.control.scheduler``), so all of them see the same line and agree whose turn it is.
Every stamp (``since``, ``at``, ``eta``) is on Redis's clock (``llm_lab_router.clock``): the
line is ordered by several routers' stamps, which their own wall clocks would misorder. Only a
router with a start that must wait for a swap touches it: requests for running models never do.
"""

from __future__ import annotations

import logging
import msgspec
from redis.asyncio import Redis

from llm_lab_router.clock import CLOCK
from llm_lab_router.protocol import USAGE_STALE, Blocked, Keys, WaitEntry, from_json, to_json

log = logging.getLogger("router.waiting")

WAIT_REFRESH = 2.0  # s between rewrites of a waiting entry (well under USAGE_STALE)
FORGET_AFTER = 60 * USAGE_STALE  # a reader deletes entries this old (a dead router's leftovers)


class WaitBoard:
    def __init__(self, redis: Redis, keys: Keys, router_id: str) -> None:
        self.redis = redis
        self.keys = keys
        self.router_id = router_id
        # model -> (when, (count, claims, blocked, worker)) last written
        self._written: dict[str, tuple[float, tuple[int, list[str], list[Blocked], str]]] = {}

    def _field(self, model: str) -> str:
        return f"{model}@{self.router_id}"

    async def put(self, model: str, since: float, count: int, claims: list[str] | None = None,
                  blocked: list[Blocked] | None = None, eta: float = 0.0, worker: str = "") -> None:
        """Say that ``count`` requests of this router wait for ``model`` since ``since``, held
        by ``blocked`` until ``eta``, to start on ``worker`` (written when the count, the claims,
        what blocks it or the host changed, else every ``WAIT_REFRESH`` s: an ETA alone moves with the clock once the
        model is overdue, and is not worth a write per decision)."""
        now = CLOCK.now()
        last = self._written.get(model)
        what = (count, claims or [], blocked or [], worker)
        if last is not None and last[1] == what and now - last[0] < WAIT_REFRESH:
            return
        entry = WaitEntry(model=model, router=self.router_id, since=since, count=count, at=now, claims=what[1],
                          blocked=what[2], eta=eta, worker=worker)
        data = to_json(entry)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(self.keys.waiting(), self._field(model), data)
            if last is not None and last[1][3] and last[1][3] != worker:
                pipe.hdel(self.keys.hint(last[1][3]), self._field(model))  # no longer to start there
            if worker:  # that host's prefetcher reads its copy (``Keys.hint``)
                pipe.hset(self.keys.hint(worker), self._field(model), data)
                pipe.expire(self.keys.hint(worker), int(FORGET_AFTER))
            await pipe.execute()
        self._written[model] = (now, what)

    async def remove(self, model: str) -> None:
        last = self._written.pop(model, None)
        if last is not None:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hdel(self.keys.waiting(), self._field(model))
                if last[1][3]:
                    pipe.hdel(self.keys.hint(last[1][3]), self._field(model))
                await pipe.execute()

    async def read(self) -> list[WaitEntry]:
        """Every router's entries (stale ones included: ``merge_waiters`` drops them); very
        old ones are deleted on the way."""
        rows = await self.redis.hgetall(self.keys.waiting())
        now = CLOCK.now()
        entries, dead = [], []
        for field, value in rows.items():
            try:
                entry = from_json(value, WaitEntry)
            except (msgspec.DecodeError, msgspec.ValidationError):
                dead.append(field)
                continue
            if now - entry.at > FORGET_AFTER:
                dead.append(field)
            else:
                entries.append(entry)
        if dead:
            await self.redis.hdel(self.keys.waiting(), *dead)
        return entries
