"""Config reload: the plan (pure), then a real worker reloading on SIGHUP and on file change."""

from __future__ import annotations

import os
import signal

from conftest import wait_for
import msgspec
import pytest
from llm_lab_router.config import DeviceProfile, ModelConfig, parse_config
from llm_lab_router.protocol import CatalogEntry, from_json
from llm_lab_router.worker.idle import poll_interval
from llm_lab_router.worker.reload import LIVE_FIELDS, PROCESS_FIELDS, needs_restart, plan_reload
from worker_helpers import KEYS, alive, events, model, worker  # noqa: F401  (worker: the fixture)

BASE = """
[[models]]
id = "keep"
command = ["x"]

[[models]]
id = "gone"
command = ["x"]

[[models]]
id = "llama"
engine = "llama.cpp"
model_path = "/m.gguf"

[[models]]
id = "big"
engine = "vllm"
model_path = "org/big"
"""


def test_plan_sorts_models_by_what_a_change_means_for_their_process():
    old = parse_config(BASE).models
    new = parse_config(BASE.replace('id = "gone"\ncommand = ["x"]', 'id = "new"\ncommand = ["x"]')
                       .replace('model_path = "/m.gguf"', 'model_path = "/m.gguf"\naliases = ["l"]\nidle_ttl = 60')
                       .replace('model_path = "org/big"', 'model_path = "org/big"\naliases = ["b"]')).models
    plan = plan_reload(old, new)
    assert [m.id for m in plan.added] == ["new"]
    assert plan.removed == ["gone"]
    assert plan.unchanged == ["keep"]
    # llama-server ignores the request's model name: a new alias needs no restart ...
    assert [m.id for m in plan.updated] == ["llama"]
    # ... but vLLM is launched with every alias as a served name: it must restart.
    assert [m.id for m in plan.restarted] == ["big"]
    assert plan.summary() == "added new; removed gone; restarted big; updated llama"
    env_change = parse_config(BASE.replace('id = "keep"\ncommand = ["x"]', 'id = "keep"\ncommand = ["x"]\n'
                                                                           'env = { A = "1" }')).models
    assert [m.id for m in plan_reload(old, env_change).restarted] == ["keep"]


# One changed value per field of ModelConfig (from the defaults of ``BASE_MODEL``).
CHANGES = {
    "id": "other", "engine": "vllm", "command": ["y"], "model_path": "/other.gguf", "engine_args": ["-c", "4096"],
    "aliases": ["a"], "mode": "embedding", "port": 9999, "env": {"A": "1"}, "cwd": "/tmp", "health": "/ready",
    "startup_timeout": 5.0, "stop_grace": 1.0, "auto_start": True, "on_demand": False, "idle_ttl": 60.0,
    "max_concurrency": 4, "min_residency": 30.0, "max_wait": 60.0, "idle_release": 10.0, "restart": "always",
    "max_restarts": 9, "restart_window": 60.0, "owned_by": "lab", "created": 1, "api_key": "k",
    "devices": ["cuda"], "vram_mb": 1000, "profiles": [DeviceProfile(devices=["cuda"], vram_mb=1)],
    "routing": "least-outstanding", "fallbacks": ["b"],
}
BASE_MODEL = ModelConfig(id="m", command=["x"])


def test_every_model_field_is_classified_as_restarting_the_engine_or_not():
    fields = set(ModelConfig.__struct_fields__)
    unclassified = fields - PROCESS_FIELDS - LIVE_FIELDS
    assert not unclassified, f"classify {sorted(unclassified)} in worker/reload.py (PROCESS_FIELDS or LIVE_FIELDS)"
    assert not PROCESS_FIELDS & LIVE_FIELDS and (PROCESS_FIELDS | LIVE_FIELDS) <= fields
    assert set(CHANGES) == fields, f"give tests/test_reload.py CHANGES a value for {sorted(fields ^ set(CHANGES))}"


@pytest.mark.parametrize("field", sorted(CHANGES))
def test_a_change_restarts_the_engine_only_for_fields_of_the_process(field):
    changed = msgspec.structs.replace(BASE_MODEL, **{field: CHANGES[field]})
    assert getattr(changed, field) != getattr(BASE_MODEL, field)
    assert needs_restart(BASE_MODEL, changed) == (field in PROCESS_FIELDS)
    # what only routers read (routing, fallbacks, residency) never restarts an engine
    if field in ("routing", "fallbacks", "min_residency", "max_wait", "idle_release"):
        assert not needs_restart(BASE_MODEL, changed)


def catalog(rds, wid: str) -> dict[str, CatalogEntry]:
    return {k: from_json(v, CatalogEntry) for k, v in rds.hgetall(KEYS.catalog(wid)).items()}


def test_sighup_applies_the_new_file_and_leaves_unchanged_models_alone(worker, rds):
    keep, changed, gone = (model(m, auto_start=True) for m in ("keep", "changed", "gone"))
    live = model("live", auto_start=True, aliases=["old-name"])
    worker.start([keep, changed, gone, live])
    pids = {m: worker.wait_state(m, "running").pid for m in ("keep", "changed", "gone", "live")}

    # A bad file: one line in the worker's log, the config in force stays.
    worker.config.write_text(worker.config.read_text() + "\n[[models]]\nid = 'x'\nport = 'eighty'\n")
    os.kill(worker.proc.pid, signal.SIGHUP)
    wait_for(lambda: "config reload failed" in worker.log(), message="the reload error in the log")
    failures = [line for line in worker.log().splitlines() if "config reload failed" in line]
    assert len(failures) == 1 and "model 'x': port: expected `int`, got `str`" in failures[0]
    assert set(catalog(rds, worker.wid)) == {"keep", "changed", "gone", "live"}

    pubsub = rds.pubsub()
    pubsub.subscribe(KEYS.events(worker.wid))
    wait_for(lambda: pubsub.get_message(timeout=0.1), message="the subscription")
    worker.write_config([keep, {**changed, "command": [*changed["command"], "--max-tokens", "5"]},
                         {**live, "aliases": ["new-name"], "idle_ttl": 600.0}, model("added")])
    os.kill(worker.proc.pid, signal.SIGHUP)
    events(pubsub, lambda e: e.kind == "catalog" and e.worker == worker.wid)
    pubsub.close()

    wait_for(lambda: set(catalog(rds, worker.wid)) == {"keep", "changed", "live", "added"},
             message="the new catalog")
    entries = catalog(rds, worker.wid)
    assert entries["live"].aliases == ["live", "new-name"] and entries["live"].idle_ttl == 600.0
    wait_for(lambda: not rds.exists(KEYS.instance("gone", worker.wid)), message="gone's instance withdrawn")
    assert not alive(pids["gone"])
    restarted = worker.wait_state("changed", "running")
    assert restarted.pid != pids["changed"] and not alive(pids["changed"])
    assert worker.instance("added").state == "stopped"  # no auto_start: listed, not started
    for same in ("keep", "live"):  # untouched, and an alias change needs no restart
        inst = worker.instance(same)
        assert inst.state == "running" and inst.pid == pids[same] and alive(pids[same])
    assert worker.command("start", "added").ok  # the new model can be started
    assert worker.command("start", "gone").message == "unknown model 'gone'"
    assert worker.proc.poll() is None


def test_watch_config_reloads_when_the_file_changes(worker, rds):
    worker.start([model("first")], watch_config=True)
    wait_for(lambda: set(catalog(rds, worker.wid)) == {"first"}, message="the first catalog")
    worker.write_config([model("first"), model("second")], watch_config=True)
    wait_for(lambda: set(catalog(rds, worker.wid)) == {"first", "second"}, timeout=15,
             message="the catalog after the file changed")



def test_idle_ttl_added_by_a_reload_unloads_the_model(worker):
    """The host had no idle_ttl at start (the idle reaper used to return for good then); a
    reload sets one: the model, which no router uses, is stopped once it has been idle that long."""
    worker.start([model("lazy", auto_start=True)])
    pid = worker.wait_state("lazy", "running").pid
    worker.write_config([model("lazy", auto_start=True, idle_ttl=0.5)])
    os.kill(worker.proc.pid, signal.SIGHUP)
    wait_for(lambda: "config reloaded" in worker.log(), message="the reload")
    worker.wait_state("lazy", "stopped", timeout=15)
    assert "lazy: unused for 0.5s (idle_ttl): stopping" in worker.log()
    assert not alive(pid)


def test_the_reaper_polls_at_half_the_shortest_idle_ttl_in_force():
    """Read again every round (``IdleReaper.interval``), so a reload's idle_ttl applies."""
    assert poll_interval([]) == 1.0  # nothing unloads: a cheap round a second, reload-ready
    assert poll_interval([0.0, 600.0]) == 1.0
    assert poll_interval([0.0, 0.6, 1.0]) == 0.3
    assert poll_interval([0.6], cap=0.2) == 0.2
