"""Model output to Redis streams: read lines fast, buffer them, ship them in batches.

``pump`` turns a process's stdout or stderr into lines; ``LogPipe.write`` queues a line for
``llm:logs:{model}`` and returns at once; one flusher task per worker ships the queue.
Nothing here ever makes the event loop wait for Redis: a model that prints 100,000 lines a
second, or a Redis that is down for minutes, costs memory up to ``log_buffer`` lines (the
oldest are dropped beyond that, and counted), never a stalled worker.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Callable

import redis.asyncio as aredis
import redis.exceptions

from llm_router.backoff import RedisLink
from llm_router.protocol import LOG_APPEND_SCRIPT, Keys, LogEntry, LogSource, log_append_args
from worker.replay import ShippedTail

log = logging.getLogger("llm_router.worker")

READ_SIZE = 1 << 16
MAX_LINE = 1 << 16  # longer "lines" (a binary blob, a progress bar without newline) are split
MAX_BATCH = 2000  # lines per round trip: keeps each script call short for Redis' other clients


async def pump(reader: asyncio.StreamReader, emit: Callable[[str], None]) -> None:
    """Call ``emit`` with every line of ``reader`` until EOF, the last unterminated one included.

    Reads big chunks and splits them itself instead of ``readline()``: one await per chunk
    rather than per line is what lets a worker keep up with a very chatty engine, and no line
    length can raise ``LimitOverrunError``. Lines are decoded as UTF-8 (bad bytes replaced),
    without their line ending.
    """
    rest = b""
    while chunk := await reader.read(READ_SIZE):
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        for line in lines:
            if len(line) <= MAX_LINE:
                emit(_text(line))
            else:
                _emit_long(line, emit)
        if len(rest) > MAX_LINE:  # no end in sight: ship the full pieces now
            cut = len(rest) - len(rest) % MAX_LINE
            _emit_long(rest[:cut], emit)
            rest = rest[cut:]
    if rest:
        _emit_long(rest, emit)


def _emit_long(line: bytes, emit: Callable[[str], None]) -> None:
    for i in range(0, len(line), MAX_LINE):
        emit(_text(line[i:i + MAX_LINE]))


def _text(line: bytes) -> str:
    return line.decode("utf-8", "replace").rstrip("\r")


class LogPipe:
    """Buffers log lines of every model of a worker and ships them to Redis in batches.

    ``write`` never blocks and never fails. Lines are sent in order per model, at least once:
    a batch that fails goes back to the head of the queue and is retried with back-off (a
    batch cut off mid-way by a dropped connection may be written twice). While Redis is away
    the queue holds at most ``buffer_lines`` lines; older ones are dropped and, once lines
    flow again, one "event" line per model says how many were lost. Lines Redis acknowledged
    and then lost (a Sentinel fail-over before they were replicated) are shipped again once
    Redis answers after an outage (``check_tail``, ``worker.replay``).
    """

    def __init__(self, redis: aredis.Redis, keys: Keys, host: str, *, maxlen: int,
                 buffer_lines: int) -> None:
        self.redis = redis
        self.keys = keys
        self.host = host
        self.maxlen = maxlen
        self.buffer_lines = buffer_lines
        self.shipped = 0  # lines that reached Redis (for operators and benchmarks)
        self._queue: deque[tuple[str, LogEntry]] = deque()
        self._dropped: dict[str, int] = {}
        self._wake = asyncio.Event()
        self._script = redis.register_script(LOG_APPEND_SCRIPT)
        self._link = RedisLink("logs")
        self._task: asyncio.Task | None = None
        self._closing = False
        self._tail = ShippedTail()  # to re-ship what a new master lacks (worker.replay)
        self._check_tail = False

    def write(self, model: str, stream: LogSource, message: str) -> None:
        """Queue one line of ``model``'s log, stamped now."""
        if len(self._queue) >= self.buffer_lines:
            old_model, _ = self._queue.popleft()
            self._dropped[old_model] = self._dropped.get(old_model, 0) + 1
        self._queue.append((model, LogEntry(timestamp=time.time(), message=message, host=self.host,
                                            stream=stream)))
        self._wake.set()

    def check_tail(self) -> None:
        """Redis was away (a fail-over, a restart): before shipping more, ship again the
        last lines it acknowledged but lost."""
        self._check_tail = True
        self._wake.set()

    @property
    def pending(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="log flusher")

    async def close(self, timeout: float = 2.0) -> None:
        """Ship what is queued (for at most ``timeout`` s: Redis may be gone), then stop."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout)
            except asyncio.TimeoutError:
                pass  # wait_for cancelled it
            self._task = None
        if self._queue:
            log.warning("%d log lines not shipped: redis unreachable at shutdown", len(self._queue))

    async def _run(self) -> None:
        while not (self._closing and not self._queue):
            await self._wake.wait()
            # No timer to let a batch build up: a lone line goes out at once (print -> Redis
            # in about a round trip), and under load batches form by themselves from the
            # lines queued while the previous batch was in flight.
            await asyncio.sleep(0)  # one loop turn: lines read in the same turn ship together
            self._wake.clear()
            try:
                if self._check_tail:
                    self._requeue(await self._tail.lost(self.redis, self.keys, self.host))
                    self._check_tail = False
                await self._flush()
            except (redis.exceptions.RedisError, OSError) as exc:  # down, or refusing (OOM)
                self._check_tail = True
                self._link.failed(exc)
                self._wake.set()  # the lines are still queued
                await self._link.pause()
                continue
            outage_ended = self._link.ok()
            if self._dropped:
                self._report_dropped(outage_ended)

    async def _flush(self) -> None:
        """Ship the queue in batches, until it is empty or Redis fails (then re-raise)."""
        while self._queue:
            batch = [self._queue.popleft() for _ in range(min(MAX_BATCH, len(self._queue)))]
            by_model: dict[str, list[LogEntry]] = {}
            for model, entry in batch:
                by_model.setdefault(model, []).append(entry)
            unsent = list(by_model.items())
            try:
                while unsent:
                    model, entries = unsent[0]
                    await self._script(keys=[self.keys.logs(model)],
                                       args=log_append_args(self.maxlen, self.host, entries))
                    self.shipped += len(entries)
                    self._tail.add(model, entries)
                    unsent.pop(0)
            except BaseException:
                self._requeue(unsent)
                raise

    def _requeue(self, unsent: list[tuple[str, list[LogEntry]]]) -> None:
        """Put lines that did not reach Redis back at the head of the queue, in order."""
        lines = [(model, entry) for model, entries in unsent for entry in entries]
        self._queue.extendleft(reversed(lines))
        while len(self._queue) > self.buffer_lines:
            model, _ = self._queue.popleft()
            self._dropped[model] = self._dropped.get(model, 0) + 1

    def _report_dropped(self, outage_ended: bool) -> None:
        why = "while Redis was unreachable" if outage_ended else "(more output than the worker could ship)"
        for model, count in self._dropped.items():
            log.warning("%s: %d log lines dropped %s", model, count, why)
            self.write(model, "event", f"{count} log lines dropped {why}")
        self._dropped.clear()
