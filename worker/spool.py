"""The log spool: per-model files in the worker's state directory that engines write into.

Why files: an engine must outlive its worker (an upgrade, a crash, ``kill -9``). A pipe dies
with its reader (the engine gets SIGPIPE) or fills up while nobody reads it (the engine blocks
on its next ``print``); a file does neither. So an engine's stdout and stderr are files opened
``O_APPEND``, and the worker's own "event" lines for a model go to a third one. ``LogPipe``
tails them and ships their lines to Redis; the byte offset shipped so far is kept in memory,
in Redis (atomically with the lines, see ``LOG_APPEND_SCRIPT``) and, as a fallback for a Redis
that lost its data, in a small ``.pos`` file next to the log (rewritten at most every
``POS_INTERVAL`` s, never fsynced: Redis holds the authoritative position).

Layout: ``{state_dir}/spool/{model}/{stream}.log`` and ``{stream}.pos`` (``"<file id> <offset>"``),
stream = stdout, stderr, event. The file id is new for every file created, and is part of
the position recorded in Redis, so an offset is never applied to another file. Directories
are 0700 and files 0600 (``worker.private``): unshipped output is the engine user's alone.

Bounded: shipped bytes are freed at once with ``fallocate(PUNCH_HOLE)`` (offsets stay valid,
the disk blocks go); when what is not shipped yet (Redis away for long) exceeds the model's
``log_spool_mb``, its oldest lines are dropped (freed and skipped) and counted. Where hole
punching is not supported (not Linux, or a file system without it) a file is only reclaimed
when it is fully shipped and its engine is gone: the bound is then not enforced on disk.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import sys
import time
from pathlib import Path
from typing import Literal

from llm_lab_router.worker.private import open_private, private_dir, write_private

log = logging.getLogger("llm_router.worker")

Stream = Literal["stdout", "stderr", "event"]
STREAMS: tuple[Stream, ...] = ("stdout", "stderr", "event")  # also the read order of one pass
POS_INTERVAL = 0.5  # seconds between two rewrites of a .pos file
COUNT_CHUNK = 1 << 20  # bytes read at a time to count the lines of a dropped range
HIGH_WATER = 0.9  # drop when the model's spool exceeds this share of its bound ...
LOW_WATER = 0.5  # ... down to this share

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Free the disk blocks of ``[offset, offset + length)`` (reads give zeros). False if the
    platform or file system cannot."""
    if _libc is None or length <= 0:
        return False
    ret = _libc.fallocate(ctypes.c_int(fd), ctypes.c_int(_FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE),
                          ctypes.c_longlong(offset), ctypes.c_longlong(length))
    if ret != 0:
        err = ctypes.get_errno()
        if err not in (errno.EOPNOTSUPP, errno.ENOSYS):
            log.warning("fallocate(PUNCH_HOLE) failed: %s", os.strerror(err))
        return False
    return True


class SpoolFile:
    """One stream's file of one model: written by an engine (or the worker), read by LogPipe.

    ``read``: bytes consumed into memory; ``shipped``: bytes known to be in Redis (≤ read);
    ``freed``: bytes whose disk blocks were released (≤ shipped)."""

    def __init__(self, directory: Path, model: str, stream: Stream) -> None:
        self.model = model
        self.stream = stream
        self.path = directory / f"{stream}.log"
        self.pos_path = directory / f"{stream}.pos"
        self.fid, self.shipped = self._load_position()
        self.fd = open_private(self.path, os.O_RDWR)  # RDWR: fallocate needs it
        size = os.fstat(self.fd).st_size
        if self.shipped > size:  # the file was replaced behind our back: start it over
            self.fid, self.shipped = _new_id(), 0
            self.save_position()
        self.read = self.shipped
        self.freed = 0
        self.partial_ok = False  # ship an unterminated last line (its writer has exited)
        self._saved = self.shipped
        self._saved_at = 0.0
        self.free_shipped()

    def _load_position(self) -> tuple[str, int]:
        try:
            fid, offset = self.pos_path.read_text().split()
            return fid, int(offset)
        except (OSError, ValueError):
            fid = _new_id()
            if self.path.exists():  # a log without its position: ship it from the start
                log.warning("%s: no shipped position (%s); shipping it from the start", self.path, self.pos_path)
            _write_atomic(self.pos_path, f"{fid} 0\n")
            return fid, 0

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    @property
    def position(self) -> str:
        """The shipped position as Redis records it: ``"<file id>:<offset>"``."""
        return f"{self.fid}:{self.shipped}"

    def open_for_writing(self) -> int:
        """An ``O_APPEND`` descriptor for a writer (an engine's stdout or stderr, or events).

        A file that is fully shipped and no longer written is started afresh (new id), so
        files do not grow forever across engine restarts; one with lines still to ship is
        appended to."""
        size = self.size()
        if size > 0 and self.shipped >= size:
            self._restart_file()
        self.partial_ok = False
        return open_private(self.path, os.O_WRONLY | os.O_APPEND)

    def _restart_file(self) -> None:
        os.close(self.fd)
        os.unlink(self.path)
        self.fid, self.shipped, self.read, self.freed = _new_id(), 0, 0, 0
        self.save_position()
        self.fd = open_private(self.path, os.O_RDWR)  # RDWR: fallocate needs it

    def read_chunk(self, limit: int) -> tuple[bytes, int]:
        """Up to ``limit`` new bytes ending at a line end (or the whole unterminated rest when
        ``partial_ok``); returns them and the offset they end at."""
        data = os.pread(self.fd, limit, self.read)
        end = data.rfind(b"\n") + 1
        if self.partial_ok and len(data) < limit:
            end = len(data)  # the writer is gone: its unterminated last line too
        elif end == 0 and len(data) == limit:
            end = len(data)  # one line longer than a whole chunk: ship it in pieces
        return data[:end], self.read + end

    def save_position(self, force: bool = True) -> None:
        """Write the .pos file if it changed (at most every ``POS_INTERVAL`` s unless ``force``)."""
        now = time.monotonic()
        if self.shipped == self._saved and not force:
            return
        if not force and now - self._saved_at < POS_INTERVAL:
            return
        _write_atomic(self.pos_path, f"{self.fid} {self.shipped}\n")
        self._saved, self._saved_at = self.shipped, now

    def free_shipped(self, keep: int = 0) -> None:
        """Release the disk blocks of what is shipped (whole blocks only), but the last ``keep``
        bytes: what Redis acknowledged may still be lost in a fail-over and shipped again."""
        block = 4096
        upto = max(0, self.shipped - keep)
        upto -= upto % block
        if upto > self.freed and punch_hole(self.fd, self.freed, upto - self.freed):
            self.freed = upto

    def drop_until(self, cut: int) -> int:
        """Skip and free ``[read, cut')`` where ``cut'`` is the line end at or after ``cut``;
        return how many lines that was (the caller drops its unshipped lines in memory)."""
        tail = os.pread(self.fd, 1 << 16, cut)
        nl = tail.find(b"\n")
        end = cut + nl + 1 if nl >= 0 else cut + len(tail)
        lines, at = 0, self.read
        while at < end:
            chunk = os.pread(self.fd, min(COUNT_CHUNK, end - at), at)
            if not chunk:
                break
            lines += chunk.count(b"\n")
            at += len(chunk)
        self.read = self.shipped = end
        self.free_shipped()
        return lines

    def close(self) -> None:
        self.save_position()
        os.close(self.fd)


class ModelSpool:
    """The three files of one model, and the bound on what they hold."""

    def __init__(self, root: Path, model: str, limit_bytes: int) -> None:
        self.model = model
        self.dir = root / model
        private_dir(self.dir)
        self.limit = limit_bytes
        self.files: dict[Stream, SpoolFile] = {s: SpoolFile(self.dir, model, s) for s in STREAMS}
        self._event_fd = -1

    def engine_output(self) -> tuple[int, int]:
        """Descriptors for a new engine's stdout and stderr (the caller closes them after spawning)."""
        return self.files["stdout"].open_for_writing(), self.files["stderr"].open_for_writing()

    def seal(self) -> None:
        """The engine exited: its last, unterminated lines may be shipped as they are."""
        self.files["stdout"].partial_ok = self.files["stderr"].partial_ok = True

    def write_event(self, ts: float, message: str) -> None:
        """Append one event line (``"<ts> <message>"``), as one ``write`` (atomic on O_APPEND)."""
        if self._event_fd < 0:
            self._event_fd = self.files["event"].open_for_writing()
        line = f"{ts:.6f} {message.replace(chr(10), ' ')}\n".encode("utf-8", "replace")
        os.write(self._event_fd, line)

    def over_bound(self) -> bool:
        return sum(f.size() - f.freed for f in self.files.values()) > self.limit * HIGH_WATER

    def close(self) -> None:
        if self._event_fd >= 0:
            os.close(self._event_fd)
            self._event_fd = -1
        for f in self.files.values():
            f.close()


def _new_id() -> str:
    return f"{time.time_ns():x}{os.getpid():x}"


def _write_atomic(path: Path, text: str) -> None:
    write_private(path, text.encode())
