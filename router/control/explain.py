"""Why a request waits, and for how long: one ``WaitReason`` for errors, keep-alives and info.

A request that waits for a start, a swap or a slot gets a structured reason, built here from
the same state the decision used (pure functions, no I/O):

- ``no_room``: it fits nowhere and no eviction could make it fit; ``hosts`` gives each host's
  free MiB per GPU and the MiB needed (a 503 now);
- ``starting``: its engine is loading; ``eta`` from the typical cold start its worker measured
  (``CatalogEntry.cold_start_s``: the upper quartile of its kept starts, ``worker.learning``);
- ``queued``: it waits for a swap (``position`` in the line of waiting models, ``blocked``: what
  keeps the loaded models, ``eta`` when residency ends) or for a concurrency slot (``position``
  in the router's queue).

Non-streamed 503/429 answers carry it as ``error.reason`` with ``Retry-After`` from the ETA;
streamed requests get its ``message`` in their keep-alive comments; ``/api/models/{alias}/info``
shows the reason of a model that is waiting.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping

import msgspec

from llm_lab_router.protocol import CatalogEntry, DeviceSnapshot, Instance
from llm_lab_router.router.control.host_rank import host_free, profiles_of
from llm_lab_router.router.control.scheduler import Blocked, Decision, Waiter
from llm_lab_router.router.core.errors import HostRoom, Prefetching, WaitReason

DEFAULT_RETRY = 5  # s: Retry-After when no ETA is known


def retry_after(reason: WaitReason, now: float) -> str:
    """``Retry-After`` seconds: until the ETA (at least 1), else ``DEFAULT_RETRY``."""
    if reason.eta > now:
        return str(max(1, math.ceil(reason.eta - now)))
    return str(DEFAULT_RETRY)


def needed_mb(entry: CatalogEntry) -> int:
    return next((p.vram_mb for p in profiles_of(entry) if any(d != "cpu" for d in p.devices)), 0)


def no_room_reason(model: str, entries: Mapping[str, CatalogEntry], snapshots: Mapping[str, DeviceSnapshot],
                   instances: Iterable[Instance], why: Mapping[str, str], message: str) -> WaitReason:
    instances = list(instances)
    hosts = {}
    for wid, entry in sorted(entries.items()):
        free, _ = host_free(snapshots.get(wid), [i for i in instances if i.worker == wid])
        hosts[wid] = HostRoom(free_mb={str(g): mb for g, mb in sorted(free.items())}, needed_mb=needed_mb(entry),
                              why=why.get(wid, ""))
    return WaitReason(kind="no_room", message=message, hosts=hosts)


def starting_reason(model: str, instances: Iterable[Instance], entries: Mapping[str, CatalogEntry],
                    now: float) -> WaitReason:
    """The model is loading somewhere: ETA = when it began + the cold start measured there."""
    eta = 0.0
    for inst in instances:
        if inst.model == model and inst.state == "starting":
            learned = entries.get(inst.worker, CatalogEntry(id=model)).cold_start_s
            if learned > 0:
                eta = max(now, inst.updated_at + learned)
    text = f"model '{model}' is starting" + (f", ready in about {max(0, eta - now):.0f}s" if eta else "")
    return WaitReason(kind="starting", message=text, eta=eta)


def describe_blocked(b: Blocked, now: float) -> str:
    if b.kind == "residency":
        return f"'{b.model}' stays loaded {max(0, b.until - now):.0f}s more (min_residency)"
    if b.kind == "draining":
        return f"'{b.model}' is serving {b.requests} request(s) first"
    if b.kind == "priority":
        return (f"'{b.model}' is used by a key of higher priority ({b.priority}) since it was loaded; "
                "a lower priority does not evict it")
    return f"'{b.model}' has waited longer and swaps first"


def swap_reason(model: str, decision: Decision, waiters: Iterable[Waiter], now: float,
                cold_start_s: float = 0.0) -> WaitReason:
    """A model waiting for a swap: its place in line, what blocks it, and when it may go, plus
    its learned cold start: the end of the residency that holds it, or, sooner, the moment its
    earliest request has waited its ``max_wait`` (starving, it goes first and residency no
    longer counts). Behind another model (``turn``) or a drain that bound is the only estimate:
    about, since the requests a victim has admitted, or another starving model, may come first."""
    me = next((w for w in waiters if w.model == model), None)
    starves_at = me.since + me.max_wait if me is not None and me.max_wait > 0 else 0.0
    go = min((t for t in (decision.eta, starves_at) if t), default=0.0)
    eta = max(go, now) + cold_start_s if go else 0.0
    return queued_reason(model, decision.position, decision.blocked, eta, now,
                         me.count if me else 0, me.since if me else 0.0)


def queued_reason(model: str, position: int, blocked: Iterable[Blocked], eta: float, now: float,
                  waiting: int = 0, since: float = 0.0) -> WaitReason:
    """The ``queued`` reason of a swap wait, from a decision of this router (``swap_reason``)
    or from the one another router published in ``llm:waiting`` (``router.control.pending``)."""
    blocked = list(blocked)
    why = "; ".join(describe_blocked(b, now) for b in blocked) or "waiting for room"
    return WaitReason(kind="queued", message=f"model '{model}' waits for a swap (position {position}): {why}",
                      eta=eta, position=position, waiting=waiting, since=since, blocked=blocked)


def slot_reason(model: str, position: int, limit: int) -> WaitReason:
    """A request over the model's concurrency limit (the router's own queue)."""
    return WaitReason(kind="queued", message=f"model '{model}' is at its concurrency limit; queue position "
                      f"{position} of {limit}", position=position, waiting=position)


def with_prefetch(reason: WaitReason, instances: Iterable[Instance]) -> WaitReason:
    """A queued model's reason with the prefetch of its weights on the host it will start on
    (worker.prefetch), in ``prefetching`` and in words."""
    got = {i.worker: Prefetching(i.prefetch_done, i.prefetch_total) for i in instances if i.prefetch_total}
    if reason.kind != "queued" or not got:
        return reason
    words = "; ".join(f"{'prefetched' if p.done >= p.total else 'prefetching'} its weights on '{w}' "
                      f"({p.done >> 20} of {p.total >> 20} MiB)" for w, p in sorted(got.items()))
    return msgspec.structs.replace(reason, prefetching=got, message=f"{reason.message}; {words}")
