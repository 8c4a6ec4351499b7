"""A worker's share of the lab's timeline (``llm_router.timeline``): events told by its
instances' transitions, and its GPUs' and host's gauges (``GaugeRecorder``).

Why from transitions: every change of an instance already passes through the agent in order
(``WorkerAgent._instance_changed``), so deriving the events there catches every start, stop,
crash, restart and adoption without a hook in each code path; the publisher writes them right after the instance
changes they describe (kept and sent again while Redis is away). Causes only the worker knows (an idle
stop) are noted beforehand with ``cause`` and attached to the stop that follows.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Callable, Sequence

from llm_lab_router.protocol import DeviceSnapshot, Instance, Keys
from llm_lab_router.timeline import (
    CHUNK,
    GPU_SLOTS,
    MAX_MODELS,
    EngineUse,
    Gauges,
    Resolution,
    TimelineEvent,
    average,
    gauge_chunk,
    gauge_meta_ops,
    engine_mask,
    gauge_ops,
    model_numbers,
    unpack,
)

log = logging.getLogger("llm_router.worker")

QUEUE = 1000  # events kept while Redis is away
ROLLUP_CATCH_UP = 12  # coarse slots a starting worker averages again (what its predecessor may have left)


class InstanceEvents:
    """Turns instance changes into ``TimelineEvent``; ``take`` hands the pending ones to a write."""

    def __init__(self, wid: str, host: str, clock: Callable[[], float] = time.time) -> None:
        self.wid = wid
        self.host = host
        self.clock = clock
        self.last: dict[str, Instance] = {}
        self.began: dict[str, float] = {}  # model -> when its current start began (wall clock)
        self.causes: dict[str, str] = {}  # model -> why its next stop happens (noted by the worker)
        self.pending: deque[TimelineEvent] = deque(maxlen=QUEUE)

    def cause(self, model: str, why: str) -> None:
        """The next stop of ``model`` happens because of ``why`` (e.g. idle)."""
        self.causes[model] = why

    def note(self, kind: str, model: str = "", detail: str = "", seconds: float = 0.0) -> None:
        self.pending.append(TimelineEvent(ts=self.clock(), kind=kind, model=model, host=self.wid, detail=detail,
                                          seconds=seconds, by=f"worker:{self.wid}"))

    def changed(self, inst: Instance) -> None:
        was = self.last.get(inst.model)
        self.last[inst.model] = inst
        before = was.state if was is not None else "stopped"
        now, model = inst.state, inst.model
        if now == before:
            return
        if now == "starting":
            self.began[model] = self.clock()
            restart = was is not None and inst.restarts > was.restarts
            self.note("restart" if restart else "starting", model, f"restart {inst.restarts}" if restart else "")
        elif now == "running" and before == "starting":
            began = self.began.pop(model, 0.0)
            self.note("ready", model, f"serving on {inst.url}", seconds=self.clock() - began if began else 0.0)
        elif now == "running":
            self.note("adopted", model, f"pid {inst.pid} left running by a previous worker")
        elif now == "stopping":
            self.note("stopping", model, self.causes.pop(model, "") or inst.last_error)
        elif now == "stopped":
            self.note("stopped", model)
        elif now == "failed":
            self.note("crashed" if before == "running" else "start_failed", model, inst.last_error)

    def take(self) -> list[TimelineEvent]:
        out = list(self.pending)
        self.pending.clear()
        return out

    def put_back(self, events: list[TimelineEvent]) -> None:
        """A write failed: keep them for the next one (an event written twice is still true)."""
        self.pending.extendleft(reversed(events))


class GaugeRecorder:
    """This host's gauges in the timeline (``llm_router.timeline``: one record per slot): the fine
    record at most once per fine slot, and each coarser slot, once closed, averaged from the fine
    records read back from Redis, so a restarted worker finishes what its predecessor began, and
    writing the same average twice changes nothing (no lock: this worker is the only writer).

    Each engine's VRAM is recorded under a number its model keeps on this host (``model{n}``
    in the host's meta hash): numbers are never given to another model while records may name
    them, so a restarted worker reads them back (``load``) before it records any engine."""

    def __init__(self, keys: Keys, wid: str, resolutions: Sequence[Resolution]) -> None:
        self.keys = keys
        self.wid = wid
        self.fine = resolutions[0]
        self.coarse = tuple(resolutions[1:])
        self.keep = max(r.keep for r in resolutions)
        self.slot = -1
        self.rolled: dict[int, int] = {}  # coarse step -> the last slot averaged
        self.numbers: dict[str, int] | None = None  # model -> its number here (None: not read back yet)
        self._full_said = False

    async def load(self, redis) -> None:
        """Read back the model numbers earlier workers of this host gave (once, before recording)."""
        if self.numbers is None:
            meta = await redis.hgetall(self.keys.history_gauges(self.wid))
            self.numbers = {m: n for n, m in model_numbers(meta).items()}

    def number(self, model: str) -> int:
        """``model``'s number in this host's records; 0 where none can be given (the numbers are
        not read back yet, or all ``MAX_MODELS`` are taken: that engine counts as "other")."""
        if self.numbers is None:
            return 0
        if (n := self.numbers.get(model)) is None:
            if len(self.numbers) >= MAX_MODELS:
                if not self._full_said:
                    log.warning("timeline: %d models recorded on this host already; the VRAM of %s shows as other",
                                MAX_MODELS, model)
                    self._full_said = True
                return 0
            n = self.numbers[model] = max(self.numbers.values(), default=0) + 1
        return n

    def ops(self, pipe, snap: DeviceSnapshot, engines: Sequence[EngineUse] = ()) -> bool:
        """Add the snapshot's record (and what each engine in ``engines`` holds) to ``pipe``
        unless its fine slot has one already."""
        slot = int(snap.ts // self.fine.step)
        if slot == self.slot:
            return False
        self.slot = slot
        gpus = sorted(snap.cuda.gpus, key=lambda g: g.index)
        held = [(n, engine_mask(e.gpus), e.mib) for e in engines if e.mib > 0 and (n := self.number(e.model))]
        record = Gauges(samples=1, cpu_percent=round(snap.cpu.cpu_percent), memory_used=snap.cpu.memory_used,
                        gpus=[(g.memory_used, g.utilization, g.power, g.temperature) for g in gpus], engines=held)
        gauge_ops(pipe, self.keys, self.fine, self.wid, slot, record)
        numbers = {n: m for m, n in (self.numbers or {}).items()}
        gauge_meta_ops(pipe, self.keys, self.wid, self.keep, snap.cpu.memory_total,
                       [g.memory_total for g in gpus][:GPU_SLOTS], snap.ts, numbers)
        return True

    async def roll_up(self, redis, now: float) -> int:
        """Average every closed coarse slot not yet done (after a start: the last few); return
        how many records were written."""
        written = 0
        per_res = []
        for res in self.coarse:
            last = int((now - self.fine.step) // res.step) - 1  # its last fine slot is written by now
            first = self.rolled.get(res.step, last - ROLLUP_CATCH_UP) + 1
            per_res.append((res, range(max(first, last - ROLLUP_CATCH_UP), last + 1)))
            self.rolled[res.step] = last
        for res, slots in per_res:
            per = res.step // self.fine.step
            chunks = sorted({(c * per + i) // CHUNK for c in slots for i in range(per)})
            if not chunks:
                continue
            async with redis.pipeline(transaction=False) as pipe:
                for chunk in chunks:
                    pipe.get(gauge_chunk(self.keys, self.fine.step, self.wid, chunk * CHUNK)[0])
                data = dict(zip(chunks, [b or b"" for b in await pipe.execute()]))
            async with redis.pipeline(transaction=False) as pipe:
                for c in slots:
                    avg = average([unpack(data[s // CHUNK], s % CHUNK, GPU_SLOTS) for s in range(c * per, (c + 1) * per)])
                    if avg.samples:
                        gauge_ops(pipe, self.keys, res, self.wid, c, avg)
                        written += 1
                await pipe.execute()
        return written
