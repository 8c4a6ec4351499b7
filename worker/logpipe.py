"""Model output to Redis streams: spooled to disk first, then shipped in batches, exactly once.

An engine writes its stdout/stderr straight into its model's spool files (``worker.spool``), so
it never waits for the worker and survives it; the worker's own event lines for a model go to
a third file. One ``LogPipe`` per worker tails every model's files (inotify on Linux, a short
poll elsewhere), reads new lines in big chunks and ships them with ``LOG_SHIP_SCRIPT``, which
appends a batch to ``llm:logs:{model}`` and records how far that file is shipped in one atomic
step. Nothing is lost across a Redis outage (the lines wait on disk, up to the model's
``log_spool_mb``; beyond that the oldest are dropped, counted and said in an event line) nor
across a worker restart (the next worker resumes from the recorded position, and a batch the
dead worker had already delivered is recognised and skipped, not sent twice).

Nothing here makes the event loop wait for Redis, and memory holds at most ``buffer_lines``
lines read ahead of what is shipped.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import redis.asyncio as aredis
import redis.exceptions
from llm_lab_router.backoff import RedisLink
from llm_lab_router.protocol import LOG_SHIP_SCRIPT, Keys, LogSource, log_ship_args
from llm_lab_router.redact import Redactor
from llm_lab_router.worker.spool import LOW_WATER, STREAMS, ModelSpool, SpoolFile

log = logging.getLogger("llm_router.worker")

READ_SIZE = 1 << 20  # bytes read from a spool file at a time
MAX_LINE = 1 << 16  # longer "lines" (a binary blob, a progress bar without newline) are split
MAX_BATCH = 2000  # lines per round trip: keeps each script call short for Redis' other clients
TAIL_FEED = 200  # lines of a chunk passed to the model's tail (``ModelProcess.log_tail``)
POLL_INOTIFY = 0.5  # seconds between two looks at the files when inotify wakes us anyway
REPLAY_KEEP = 1 << 20  # shipped bytes kept on disk per file, to ship again what a fail-over lost
POLL_PLAIN = 0.02  # ... when it does not (not Linux): this is then the print -> Redis delay


@dataclass
class _Chunk:
    """Lines read from one spool file, ``[start, end)`` of it; ``lines[i:]`` not shipped yet."""

    start: int
    end: int
    ts: str
    lines: list[bytes]
    i: int = 0
    at: int = field(init=False)  # offset of ``lines[i]``

    def __post_init__(self) -> None:
        self.at = self.start


class LogPipe:
    """Ships the spooled lines of every model of a worker to Redis.

    ``write`` (an event line) never blocks on Redis and never fails. Lines of one file reach
    the stream in order, exactly once (``LOG_SHIP_SCRIPT``); lines of one model's different
    files in the order they were read (an engine's last lines before the event saying it
    exited, for instance)."""

    def __init__(self, redis: aredis.Redis, keys: Keys, host: str, *, maxlen: int, buffer_lines: int,
                 spool_dir: Path, spool_bytes: int = 64 << 20) -> None:
        self.redis = redis
        self.keys = keys
        self.host = host  # the worker id: the ``host`` field of each line, and the position keys'
        self.maxlen = maxlen
        self.buffer_lines = buffer_lines
        self.spool_dir = Path(spool_dir)
        self.spool_bytes = spool_bytes
        self.shipped = 0  # lines that reached Redis (for operators and benchmarks)
        self.dropped = 0  # lines dropped because a spool hit its bound
        self.unwritten = 0  # event lines lost because the spool could not be written (a full disk)
        self._write_error = ""  # the current write failure, logged once until writes work again
        self._spools: dict[str, ModelSpool] = {}
        self._sinks: dict[str, Callable[[LogSource, str], None]] = {}
        self._redactors: dict[str, Redactor] = {}
        self._check_positions = False
        self._pending: dict[SpoolFile, deque[_Chunk]] = {}
        self._held = 0  # lines in ``_pending``
        self._wake = asyncio.Event()
        self._script = redis.register_script(LOG_SHIP_SCRIPT)
        self._link = RedisLink("logs")
        self._task: asyncio.Task | None = None
        self._closing = False
        self._inotify = _Inotify.create()

    # --- what models and engines call ---

    def spool(self, model: str) -> ModelSpool:
        """The spool of ``model`` (created, or found as a previous worker left it)."""
        spool = self._spools.get(model)
        if spool is None:
            spool = self._spools[model] = ModelSpool(self.spool_dir, model, self.spool_bytes)
            for f in spool.files.values():
                self._pending[f] = deque()
            if self._inotify is not None:
                self._inotify.watch(spool.dir)
            self._wake.set()  # lines a previous worker did not ship
        return spool

    def attach(self, model: str, sink: Callable[[LogSource, str], None]) -> None:
        """Give ``sink`` the model's engine lines as they are read (its log tail)."""
        self._sinks[model] = sink
        self.spool(model)

    def redact(self, model: str, redactor: Redactor) -> None:
        """Mask ``redactor``'s secrets in the model's engine lines before they are shipped."""
        self._redactors[model] = redactor

    def check_tail(self) -> None:
        """Redis was away (a fail-over, a restart): before shipping more, compare each file's
        shipped position with the one Redis holds and ship again what it lost (acknowledged
        by a master that died before replicating it)."""
        self._check_positions = True
        self._wake.set()

    def write(self, model: str, stream: LogSource, message: str) -> None:
        """Append one worker line about ``model`` (``stream`` "event") to its spool, stamped now.

        Never raises: its callers are the supervisor's state changes, and a crashed model must
        still be restarted when the disk is full (ENOSPC) or the spool unwritable. The line is
        lost then, counted in ``unwritten``, and the failure is logged once until a write works
        again."""
        try:
            self.spool(model).write_event(time.time(), message)
        except OSError as exc:
            self.unwritten += 1
            if not self._write_error:
                self._write_error = str(exc)
                log.error("cannot write worker events to the spool (%s): they are dropped until the disk has "
                          "room; models are still supervised", exc)
            return
        if self._write_error:
            log.warning("the spool is writable again (%d event lines were lost: %s)", self.unwritten,
                        self._write_error)
            self._write_error = ""

    def engine_output(self, model: str) -> tuple[int, int]:
        """Descriptors for a new engine's stdout and stderr; the caller closes them once spawned."""
        return self.spool(model).engine_output()

    def seal(self, model: str) -> None:
        """``model``'s engine exited: ship its unterminated last line too, and read what it
        wrote now, so its last lines are in the model's tail before its exit is reported."""
        self.spool(model).seal()
        self._read_all()
        self._wake.set()

    @property
    def pending(self) -> int:
        """Lines read and not shipped yet (on disk there may be more)."""
        return self._held

    def start(self) -> None:
        if self._task is None:
            if self._inotify is not None:
                asyncio.get_running_loop().add_reader(self._inotify.fd, self._on_inotify)
            self._task = asyncio.create_task(self._run(), name="log shipper")

    async def close(self, timeout: float = 2.0) -> None:
        """Ship what is spooled (for at most ``timeout`` s: Redis may be gone), then stop.
        What is left stays on disk for the next worker."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout)
            except asyncio.TimeoutError:
                pass  # wait_for cancelled it
            self._task = None
        if self._inotify is not None:
            asyncio.get_running_loop().remove_reader(self._inotify.fd)
            self._inotify.close()
            self._inotify = None
        left = sum(f.size() - f.shipped for s in self._spools.values() for f in s.files.values())
        if left:
            log.warning("%d bytes of log lines not shipped yet: they stay spooled in %s for the next worker",
                        left, self.spool_dir)
        for spool in self._spools.values():
            spool.close()

    # --- the shipper ---

    def _on_inotify(self) -> None:
        assert self._inotify is not None
        self._inotify.drain()
        self._enforce_bounds()
        self._wake.set()

    async def _run(self) -> None:
        poll = POLL_INOTIFY if self._inotify is not None else POLL_PLAIN
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), poll)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            self._enforce_bounds()
            self._read_all()
            try:
                if self._check_positions:
                    await self._rewind_to_redis()
                    self._check_positions = False
                await self._ship_all()
            except (redis.exceptions.RedisError, OSError) as exc:  # down, or refusing (OOM)
                self._check_positions = True
                self._link.failed(exc)
                self._wake.set()  # the lines are still spooled
                await self._link.pause()
                continue
            self._link.ok()
            for spool in self._spools.values():
                for f in spool.files.values():
                    f.save_position(force=False)
            if self._closing and self._held == 0 and not self._unread():
                return

    def _unread(self) -> bool:
        return any(f.size() > f.read for s in self._spools.values() for f in s.files.values())

    def _read_all(self) -> None:
        """Read new lines of every file (up to ``buffer_lines`` held), in ``STREAMS`` order
        per model, so an engine's last lines are read no later than the event after them."""
        now = f"{time.time():.6f}"
        for model, spool in list(self._spools.items()):
            sink = self._sinks.get(model)
            for stream in STREAMS:
                f = spool.files[stream]
                while self._held < self.buffer_lines:
                    data, end = f.read_chunk(READ_SIZE)
                    if not data:
                        break
                    lines = data.split(b"\n")
                    if not lines[-1]:
                        lines.pop()  # the chunk ended with a newline
                    self._pending[f].append(_Chunk(f.read, end, now, lines))
                    self._held += len(lines)
                    f.read = end
                    if sink is not None and stream != "event":
                        for line in lines[-TAIL_FEED:]:
                            sink(stream, _text(line))

    async def _ship_all(self) -> None:
        for model, spool in list(self._spools.items()):
            key = self.keys.logs(model)
            for stream in STREAMS:
                f = spool.files[stream]
                chunks = self._pending[f]
                while chunks:
                    await self._ship_batch(key, f, chunks)
                f.free_shipped(keep=REPLAY_KEEP)

    async def _rewind_to_redis(self) -> None:
        """Where Redis records less shipped than we do (its position key and the lines travel
        in one script, so they are lost together), read the file again from there. What was
        freed meanwhile (older than ``REPLAY_KEEP``) cannot come back: counted and logged."""
        files = [f for spool in self._spools.values() for f in spool.files.values() if f.shipped]
        if not files:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for f in files:
                pipe.get(self.keys.log_position(self.host, f.model, f.stream))
            positions = await pipe.execute()
        for f, raw in zip(files, positions):
            text = raw.decode() if isinstance(raw, bytes) else (raw or "")
            fid, _, offset = text.rpartition(":")
            known = int(offset) if fid == f.fid and offset.isdigit() else 0
            if known >= f.shipped:
                continue
            back_to = max(known, f.freed)
            if back_to > known:
                log.warning("%s %s: %d bytes of log lines lost with the Redis master (older than the replay window)",
                            f.model, f.stream, back_to - known)
            log.warning("%s %s: Redis lacks %d shipped bytes of log lines (a fail-over?); shipping them again",
                        f.model, f.stream, f.shipped - back_to)
            chunks = self._pending[f]
            self._held -= sum(len(c.lines) - c.i for c in chunks)
            chunks.clear()
            f.read = f.shipped = back_to

    async def _ship_batch(self, key: str, f: SpoolFile, chunks: deque[_Chunk]) -> None:
        chunk = chunks[0]
        batch = chunk.lines[chunk.i:chunk.i + MAX_BATCH]
        done = chunk.i + len(batch) == len(chunk.lines)
        last = chunk.end if done else chunk.at + sum(map(len, batch)) + len(batch)
        ts, lines = ("", batch) if f.stream == "event" else (chunk.ts, self._masked(f.model, _engine_lines(batch)))
        ahead = await self._script(keys=[key, self.keys.log_position(self.host, f.model, f.stream)],
                                   args=log_ship_args(self.maxlen, self.host, f.stream, f.fid, chunk.at, last, ts,
                                                      lines))
        if ahead is not None and int(ahead) >= 0:  # shipped already (by a worker that died since)
            self._held -= sum(len(c.lines) - c.i for c in chunks)
            chunks.clear()
            f.read = f.shipped = max(f.shipped, int(ahead))
            return
        self.shipped += len(batch)
        f.shipped = max(f.shipped, last)
        if not chunks or chunks[0] is not chunk:  # a drop discarded this chunk meanwhile
            return
        self._held -= len(batch)
        if done:
            chunks.popleft()
        else:
            chunk.i += len(batch)
            chunk.at = last

    def _masked(self, model: str, lines: list[bytes]) -> list[bytes]:
        """Engine lines with the model's secrets masked (an engine that prints its own flags)."""
        redactor = self._redactors.get(model)
        if redactor is None or not redactor.secrets:
            return lines
        blob = b"\n".join(lines)
        masked = redactor.scrub_bytes(blob)
        return lines if masked is blob else masked.split(b"\n")

    # --- the bound ---

    def _enforce_bounds(self) -> None:
        for spool in self._spools.values():
            if spool.over_bound():
                self._drop_oldest(spool)

    def _drop_oldest(self, spool: ModelSpool) -> None:
        """Bring ``spool`` down to ``LOW_WATER`` of its bound: free what is shipped, then drop
        the oldest unshipped lines of its biggest file; count them and say so."""
        for f in spool.files.values():
            f.free_shipped()
        if not spool.over_bound():
            return
        f = max(spool.files.values(), key=lambda f: f.size() - f.shipped)
        others = sum(o.size() - o.freed for o in spool.files.values() if o is not f)
        cut = f.size() - max(0, int(spool.limit * LOW_WATER) - others)
        if cut <= f.shipped:
            return
        chunks = self._pending[f]
        lines = sum(len(c.lines) - c.i for c in chunks)
        self._held -= lines
        chunks.clear()
        lines += f.drop_until(max(cut, f.read))
        self.dropped += lines
        why = f"{lines} log lines dropped: the spool of {spool.model} is over its bound " \
              f"(log_spool_mb = {spool.limit / (1 << 20):g}) while Redis is unreachable"
        log.warning("%s", why)
        spool.write_event(time.time(), why)


def _text(line: bytes) -> str:
    return line.decode("utf-8", "replace").rstrip("\r")


def _engine_lines(batch: list[bytes]) -> list[bytes]:
    """The messages of raw engine lines: without a trailing CR, cut in ``MAX_LINE`` pieces.
    The common case (neither) costs two C-level passes, not a Python step per line."""
    joined = b"\n".join(batch)
    if b"\r\n" not in joined and not joined.endswith(b"\r") and max(map(len, batch)) <= MAX_LINE:
        return batch
    out: list[bytes] = []
    for line in batch:
        line = line.rstrip(b"\r")
        out += [line[i:i + MAX_LINE] for i in range(0, len(line), MAX_LINE)] or [b""]
    return out


class _Inotify:
    """Linux inotify through ctypes: wakes the shipper when a spool file is written."""

    IN_MODIFY = 0x00000002
    IN_NONBLOCK = 0o4000
    IN_CLOEXEC = 0o2000000

    def __init__(self, libc, fd: int) -> None:
        self.libc = libc
        self.fd = fd

    @classmethod
    def create(cls) -> "_Inotify | None":
        if not sys.platform.startswith("linux"):
            return None
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.inotify_init1(cls.IN_NONBLOCK | cls.IN_CLOEXEC)
        except (OSError, AttributeError):
            return None
        return cls(libc, fd) if fd >= 0 else None

    def watch(self, directory: Path) -> None:
        if self.libc.inotify_add_watch(self.fd, os.fsencode(directory), self.IN_MODIFY) < 0:
            log.warning("inotify_add_watch(%s) failed: %s; polling it", directory, os.strerror(ctypes.get_errno()))

    def drain(self) -> None:
        try:
            while os.read(self.fd, 1 << 16):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        os.close(self.fd)
