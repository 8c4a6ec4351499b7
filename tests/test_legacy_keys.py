"""The upgrade window to per-worker Redis users (docs/deploy.md): a worker with
``legacy_keys = true`` is seen and commanded by routers of either release. Routers of older
releases read the old key names and the ``llm:events`` channel, and send commands to
``llm:commands:{wid}``: the test plays such a router through Redis itself, and runs a router
of this release beside it."""

from __future__ import annotations

import signal
import uuid

from conftest import wait_for
from helpers import DEMO_MODELS, chat_body, request, start_router, start_worker, wait_models, write_config
from llm_lab_router.protocol import (
    Command, Event, Keys, LegacyKeys, Reply, command_fields, from_json,
)

KEYS, OLD = Keys(), LegacyKeys()


def test_a_worker_in_the_upgrade_window_writes_both_layouts_and_takes_both_commands(procs, redis_url, rds,
                                                                                        tmp_path) -> None:
    wid = f"w-{uuid.uuid4().hex[:8]}"
    config = write_config(tmp_path / "models.toml", *DEMO_MODELS, legacy_keys=True)
    old_events = rds.pubsub()
    old_events.subscribe(OLD.events())
    # The old shared `worker` user may write both layouts; the suite's admin stands for it here
    # (process_url keeps the admin's URL for an explicit prefix, the default one).
    worker = start_worker(procs, redis_url, config, wid, prefix="llm:")
    wait_for(lambda: rds.exists(OLD.worker(wid)) and rds.exists(KEYS.worker(wid)), message="both leases")
    assert rds.hget(OLD.worker(wid), "id") == rds.hget(KEYS.worker(wid), "id") == wid
    assert set(rds.hkeys(OLD.catalog(wid))) == set(rds.hkeys(KEYS.catalog(wid))) == {"demo-chat", "demo-embed"}
    assert rds.hget(OLD.catalog(wid), "demo-chat") == rds.hget(KEYS.catalog(wid), "demo-chat")

    # An old router's start: its command stream, its reply key, its event channel.
    cmd = Command(op="start", model="demo-chat")
    rds.xadd(OLD.commands(wid), command_fields(cmd))
    got = rds.blpop([OLD.reply(wid, cmd.id)], 30)
    assert got is not None and from_json(got[1], Reply).ok, got
    assert rds.hget(OLD.instance("demo-chat", wid), "state") == rds.hget(KEYS.instance("demo-chat", wid),
                                                                          "state") == "running"
    assert rds.hget(OLD.versions(), wid) == rds.get(KEYS.version(wid))  # the same change counter

    def running_event() -> bool:
        msg = old_events.get_message(ignore_subscribe_messages=True, timeout=0.1)
        if not msg:
            return False
        event = from_json(msg["data"], Event)
        return event.instance is not None and event.instance.state == "running" and event.worker == wid
    wait_for(running_event, timeout=10, message="the running instance on the old channel")
    old_events.close()

    # A router of this release sees the same worker through the new layout.
    router = start_router(procs, redis_url)
    wait_models(router, 2)
    assert request("POST", f"{router.url}/v1/chat/completions", chat_body("demo-chat")).status == 200

    # Goodbye withdraws both leases.
    assert procs.stop(worker, signal.SIGINT) == 0
    assert not rds.exists(OLD.worker(wid)) and not rds.exists(KEYS.worker(wid))
    assert rds.hget(OLD.instance("demo-chat", wid), "state") == "stopped"
