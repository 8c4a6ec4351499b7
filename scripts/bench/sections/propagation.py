"""Section ``propagation``: start/stop cycles through router A, watched on router B: the delay
from the worker's write of a state to B showing it."""

from __future__ import annotations

import asyncio
import json
import time

from llm_lab_router.protocol import Keys
from llm_lab_router.redis_url import async_client

from ..client import Response, now
from ..cluster import PROP
from ..context import Bench
from ..report import Row
from ..stats import pct


async def run(bench: Bench) -> None:
    if len(bench.cluster.routers) < 2:
        return
    o = bench.opts
    bench.say(f"state propagation: {o.prop_cycles} start/stop cycles via router A, watched on router B ...")
    a, b = bench.cluster.routers
    rds = async_client(bench.cluster.redis.url)  # type: ignore[union-attr]
    pubsub = rds.pubsub()
    await pubsub.psubscribe(Keys().events_pattern())
    events: list[tuple[float, dict]] = []  # (wall time received, instance)
    seen_b: list[tuple[float, str]] = []  # (wall time, status) on every change seen on B
    stop = asyncio.Event()

    async def listen() -> None:
        async for msg in pubsub.listen():
            if msg.get("type") == "pmessage":
                ev = json.loads(msg["data"])
                inst = ev.get("instance") or {}
                if inst.get("model") == PROP:
                    events.append((time.time(), inst))

    async def poll_b() -> None:
        conn = await b.connect()
        raw = b.raw("GET", "/v1/models")
        last = None
        polls = 0
        while not stop.is_set():
            resp = await conn.request(raw, Response(keep_body=True))
            polls += 1
            t = time.time()
            card = next((m for m in resp.json().get("data", []) if m["id"] == PROP), {})
            status = card.get("status")
            if status != last:
                seen_b.append((t, status))
                last = status
            if conn.closed:
                conn = await b.connect()
        conn.close()
        bench.raw["propagation_polls"] = polls

    listener = asyncio.ensure_future(listen())
    poller = asyncio.ensure_future(poll_b())
    errors = 0
    try:
        await asyncio.sleep(0.2)
        for _ in range(o.prop_cycles):
            for action, state in (("start", "running"), ("stop", "stopped")):
                resp = await a.call("POST", f"/api/models/{PROP}/{action}", timeout=60)
                if resp.status != 200:
                    errors += 1
                deadline = now() + 10
                while not (seen_b and seen_b[-1][1] == state) and now() < deadline:
                    await asyncio.sleep(0.005)
                if not (seen_b and seen_b[-1][1] == state):
                    errors += 1
                await asyncio.sleep(0.1)
    finally:
        stop.set()
        await asyncio.wait([poller], timeout=5)
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)
        await pubsub.aclose()
        await rds.aclose()
    # For each state change the worker wrote (``updated_at`` is its wall clock, on this
    # machine), when did router B first show the model in that state?
    write_to_b, event_to_b = [], []
    for t_event, inst in events:
        state, written = inst.get("state"), float(inst.get("updated_at") or 0)
        if state not in ("running", "stopped") or not written:
            continue
        vis = next((t for t, s in seen_b if s == state and t >= written - 0.001), None)
        if vis is not None:
            write_to_b.append((vis - written) * 1e3)
            event_to_b.append((vis - t_event) * 1e3)
    bench.raw["propagation_ms"] = {"write_to_b": write_to_b, "event_to_b": event_to_b}
    bench.rows.append(Row("propagation", "worker write -> B p50", {"router": pct(write_to_b, 0.5)}, "ms",
                          errors={"router": errors}))
    bench.rows.append(Row("propagation", "worker write -> B p99", {"router": pct(write_to_b, 0.99)}, "ms",
                          f"n={len(write_to_b)}"))
