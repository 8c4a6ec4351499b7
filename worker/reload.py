"""Config reload: on SIGHUP (or when the file changes), apply the new model list in place.

``plan_reload`` compares the models of the config in force with those of the new file (pure):

- added: a new ``ModelProcess``, started if ``auto_start``;
- removed: stopped for good, then withdrawn from the catalog and its instance hash deleted;
- changed in a way the running process depends on (command, env, cwd, port, devices,
  placement: a field of ``PROCESS_FIELDS``): stopped and replaced by a new supervisor,
  started again if it was running or starting (left stopped otherwise);
- changed in any other field (aliases, idle_ttl, timeouts, restart policy, routing, fallbacks,
  residency ...: ``LIVE_FIELDS``, read by this worker's supervisor or by the routers): the
  supervisor takes the new entry as it is; its process keeps running (same pid), and so does
  its prompt cache;
- unchanged: untouched.

Engine presets are already resolved (``parse_config``), so a new alias of a vLLM model shows
up as a new ``command`` (its ``--served-model-name`` list) and restarts it, while a new
alias of a llama.cpp model does not. ``[worker]`` settings are not reloaded: they apply when
the worker restarts. The agent owns the I/O (reading the file, publishing); ``apply_plan``
mutates its ``models`` dict.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from typing import Callable, Sequence

from llm_lab_router.config import ModelConfig
from llm_lab_router.worker.process import ModelProcess

WATCH_INTERVAL = 2.0  # seconds between two looks at the file's mtime (``watch_config``)

# Fields read by routers or by the supervisor at its next start/stop/crash, never by the
# running process: changing one needs no restart. (engine, model_path and engine_args only
# matter through the ``command`` they resolve to.)
# What the engine process is made of: its argv (engine, model_path and engine_args are resolved
# into ``command`` by parse_config), environment, directory, port, and the GPUs placement gives it
# (devices, vram_mb and profiles decide its CUDA_VISIBLE_DEVICES). An allow-list: a change to any
# other field never restarts an engine.
PROCESS_FIELDS = frozenset({"id", "command", "port", "env", "cwd", "devices", "vram_mb", "profiles"})
# Every other field, by name, so that a field added later must be classified
# (tests/test_reload.py walks ModelConfig).
LIVE_FIELDS = frozenset({
    "aliases", "mode", "owned_by", "created", "auto_start", "on_demand", "idle_ttl", "max_concurrency",
    "restart", "max_restarts", "restart_window", "health", "startup_timeout", "stop_grace",
    "engine", "model_path", "engine_args", "api_key", "routing", "fallbacks", "min_residency", "max_wait",
    "idle_release",
})


def needs_restart(old: ModelConfig, new: ModelConfig) -> bool:
    """Whether a process started from ``old`` differs from one started from ``new``."""
    return any(getattr(old, f) != getattr(new, f) for f in PROCESS_FIELDS)


@dataclass
class ReloadPlan:
    added: list[ModelConfig] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    restarted: list[ModelConfig] = field(default_factory=list)  # replaced (restarted if active)
    updated: list[ModelConfig] = field(default_factory=list)  # live fields only
    unchanged: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{name} {', '.join(ids)}" for name, ids in (
            ("added", [m.id for m in self.added]), ("removed", self.removed),
            ("restarted", [m.id for m in self.restarted]), ("updated", [m.id for m in self.updated]))
            if ids]
        return "; ".join(parts) or "no model changed"


def plan_reload(old: Sequence[ModelConfig], new: Sequence[ModelConfig]) -> ReloadPlan:
    before = {m.id: m for m in old}
    plan = ReloadPlan(removed=[mid for mid in before if mid not in {m.id for m in new}])
    for m in new:
        was = before.get(m.id)
        if was is None:
            plan.added.append(m)
        elif was == m:
            plan.unchanged.append(m.id)
        elif needs_restart(was, m):
            plan.restarted.append(m)
        else:
            plan.updated.append(m)
    return plan


async def apply_plan(plan: ReloadPlan, models: dict[str, ModelProcess],
                     supervise: Callable[[ModelConfig], ModelProcess]) -> list[ModelProcess]:
    """Carry out ``plan`` on ``models`` (id -> supervisor); return the supervisors to start.

    Old supervisors stay in ``models`` until their process is gone, so a shutdown that
    interrupts a reload still stops them, and a replacement never shares a port or a GPU
    reservation with the process it replaces."""
    for m in plan.updated:
        models[m.id].model = m
    active = {m.id: models[m.id].state in ("starting", "running") for m in plan.restarted}
    await asyncio.gather(*(models[mid].close() for mid in [*plan.removed, *active]))
    for mid in plan.removed:
        del models[mid]
    to_start = []
    for m in plan.restarted:
        models[m.id] = supervise(m)
        if active[m.id]:
            to_start.append(models[m.id])
    for m in plan.added:
        models[m.id] = supervise(m)
        if m.auto_start:
            to_start.append(models[m.id])
    return to_start


class ReloadTrigger:
    """Says when to reload: on ``request()`` (SIGHUP) or, with ``watch``, when the file's
    mtime or size changes (polled: portable, and a config changes rarely)."""

    def __init__(self, path: str, watch: bool, interval: float = WATCH_INTERVAL) -> None:
        self.path = path
        self.watch = watch
        self.interval = interval
        self._asked = asyncio.Event()
        self._stamp = self._read_stamp()

    def request(self) -> None:
        self._asked.set()

    async def wait(self) -> None:
        """Return when a reload is due."""
        while True:
            try:
                await asyncio.wait_for(self._asked.wait(), self.interval if self.watch else None)
            except asyncio.TimeoutError:
                pass
            asked = self._asked.is_set()
            self._asked.clear()
            stamp = self._read_stamp()
            changed, self._stamp = stamp != self._stamp, stamp
            if asked or (self.watch and changed):
                return

    def _read_stamp(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size
