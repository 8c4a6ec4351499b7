"""A worker's share of the lab's timeline (``llm_router.timeline``): events told by its
instances' transitions, and its GPUs' and host's gauges.

Why from transitions: every change of an instance already passes through the agent in order
(``WorkerAgent._instance_changed``), so deriving the events there catches every start, stop,
crash, restart and adoption without a hook in each code path; the publisher writes them right after the instance
changes they describe (kept and sent again while Redis is away). Causes only the worker knows (an idle
stop) are noted beforehand with ``cause`` and attached to the stop that follows.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Callable

from llm_lab_router.protocol import DeviceSnapshot, Instance, Keys
from llm_lab_router.timeline import Resolution, TimelineEvent, gauge_ops, gpu_series, host_series

QUEUE = 1000  # events kept while Redis is away


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


def device_gauge_ops(pipe, keys: Keys, fine: Resolution, snap: DeviceSnapshot) -> None:
    """This host's GPUs (memory MiB, utilisation %) and CPU/RAM in their fine slot (for a pipeline)."""
    for gpu in snap.cuda.gpus:
        gauge_ops(pipe, keys, fine, gpu_series(snap.worker, gpu.index), snap.ts,
                  {"memory_used": gpu.memory_used, "memory_total": gpu.memory_total, "utilization": gpu.utilization})
    cpu = snap.cpu
    gauge_ops(pipe, keys, fine, host_series(snap.worker), snap.ts,
              {"cpu_percent": round(cpu.cpu_percent), "memory_used": cpu.memory_used, "memory_total": cpu.memory_total})
