"""The sections, one module each, each an ``async def run(bench)`` that adds its rows to
``bench.rows`` and its raw figures to ``bench.raw``; ``SECTIONS`` in the order they run."""

from __future__ import annotations

from . import affinity, chat, governance, logs, propagation, quotas, scaling, scheduling, stream, streams, swap, viewers

SECTIONS = {"chat": chat.run, "stream": stream.run, "streams": streams.run, "logs": logs.run,
            "propagation": propagation.run, "viewers": viewers.run, "quotas": quotas.run,
            "governance": governance.run, "affinity": affinity.run, "scaling": scaling.run, "scheduling": scheduling.run,
            "swap": swap.run}
