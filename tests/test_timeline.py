"""The lab's timeline (issue 27): request series recorded by real routers in a real Redis,
merged across routers and resolutions, read back through ``/api/history`` and ``/api/events``.

The routers run with 1 s / 3 s resolutions (``LLM_ROUTER_HISTORY_RESOLUTIONS``), so a slot
closes, is flushed and rolled up within seconds; everything else is as deployed.
"""

from __future__ import annotations

import json
import math
import signal
import time
import uuid
from http.client import HTTPConnection
from urllib.parse import urlsplit

import pytest
from conftest import wait_for
from helpers import FakeWorker, SseStream, chat_body, get_json, request, start_router, wait_engine, wait_routable
from llm_lab_router.protocol import CatalogEntry, Keys
from llm_lab_router.redis_server import free_port
from llm_lab_router.timeline import (
    BOUNDS,
    NBUCKETS,
    RECORD,
    Gauges,
    TimelineEvent,
    average,
    bucket_of,
    bucket_range,
    event_fields,
    event_of,
    parse_resolutions,
    percentile,
    resolutions,
    unpack,
    vram_by_model,
)

CHAT = CatalogEntry(id="chat", aliases=["chat"], mode="chat", on_demand=False)
DEAD = CatalogEntry(id="dead", mode="chat", on_demand=False)  # its instance's port answers nothing: 502
FAST = {"LLM_ROUTER_HISTORY_RESOLUTIONS": "1s:2h,3s:1d"}


# --------------------------------------------------------------------------- units


def test_resolutions_parse_and_refuse_what_cannot_be_rolled_up() -> None:
    assert [(r.step, r.keep) for r in parse_resolutions("5m:30d,10s:24h")] == [(10, 86400), (300, 30 * 86400)]
    for bad in ("10s:24h,15s:1d", "0s:1h", "10x:1h", "10s:5s,1m:1h"):
        with pytest.raises(ValueError):
            parse_resolutions(bad)


def test_a_router_and_a_worker_refuse_bad_resolutions_in_one_line(procs, tmp_path) -> None:
    import sys

    from helpers import model_block, write_config
    bad = {"LLM_ROUTER_HISTORY_RESOLUTIONS": "10s:24h,7s:1d"}
    with pytest.raises(ValueError, match="LLM_ROUTER_HISTORY_RESOLUTIONS"):
        resolutions(bad)
    config = write_config(tmp_path / "host.toml", model_block("one"))
    for argv in (["serve", "--port", str(free_port())], ["worker", "--config", str(config)]):
        proc = procs.start([sys.executable, "-m", "llm_lab_router.cli", *argv, "--redis", "redis://127.0.0.1:1"],
                           name="refused", env=bad)
        assert proc.wait(20) == 2
        assert "LLM_ROUTER_HISTORY_RESOLUTIONS" in procs.log(proc) and "Traceback" not in procs.log(proc)


def test_percentiles_of_summed_buckets_fall_in_the_bucket_of_the_raw_percentile() -> None:
    samples = [0.003 * i for i in range(1, 400)]  # 3 ms .. 1.2 s
    a, b = [0] * NBUCKETS, [0] * NBUCKETS
    for i, s in enumerate(samples):  # two "routers"
        (a if i % 3 else b)[bucket_of(s)] += 1
    merged = [x + y for x, y in zip(a, b)]
    for q in (0.5, 0.95, 0.99):
        raw = sorted(samples)[math.ceil(q * len(samples)) - 1]
        low, high = bucket_range(raw)
        assert low <= percentile(merged, q) <= high, q
    assert percentile([0] * NBUCKETS, 0.5) is None
    assert percentile([0] * (NBUCKETS - 1) + [3], 0.5) == BOUNDS[-1]  # "more than the last bound"


def test_a_hosts_gauges_pack_into_one_small_record_and_average_by_samples() -> None:
    # engines: (model number, GPU mask, MiB per GPU); model 1 on GPUs 0 and 1, model 2 on GPU 1
    a = Gauges(samples=1, cpu_percent=10, memory_used=1000, gpus=[(8000, 50, 300, 60), (100, 0, 80, 40)],
               engines=[(1, 0b11, 4000)])
    b = Gauges(samples=3, cpu_percent=30, memory_used=2000, gpus=[(16000, 90, 700, 80), (100, 10, 100, 44)],
               engines=[(1, 0b11, 8000), (2, 0b10, 600)])
    chunk = bytearray(RECORD.size * 3)
    chunk[RECORD.size * 2:] = b.pack()
    assert RECORD.size == 118
    assert unpack(bytes(chunk), 0, 2) == Gauges()  # never written: no sample, a gap
    assert unpack(bytes(chunk), 2, 2) == b
    assert unpack(b"", 5, 2) == Gauges()
    # weighted by samples; an engine absent from a slot held nothing then (model 2: 600 × 3 / 4)
    assert average([a, Gauges(), b]) == Gauges(samples=4, cpu_percent=25, memory_used=1750,
                                                gpus=[(14000, 80, 600, 75), (100, 8, 95, 43)],
                                                engines=[(1, 0b11, 7000), (2, 0b10, 450)])
    assert vram_by_model(b.engines, 0) == {1: 8000}
    assert vram_by_model(b.engines, 1) == {1: 8000, 2: 600}
    assert vram_by_model(b.engines) == {1: 16000, 2: 600}
    # the 8 engines holding most are kept; model numbers outside 1..255 are not recorded
    many = Gauges(samples=1, engines=[(n, 1, n * 10) for n in range(1, 11)] + [(0, 1, 99999), (300, 1, 99999)])
    assert [e[0] for e in unpack(many.pack(), 0, 0).engines] == [10, 9, 8, 7, 6, 5, 4, 3]
    # a GPU that reports no power or temperature packs 0s; values past a field's range are capped
    assert unpack(Gauges(samples=1, gpus=[(5, 300)]).pack(), 0, 1).gpus == [(5, 255, 0, 0)]


def test_an_event_reads_back_as_written() -> None:
    ev = TimelineEvent(ts=1700000000.5, kind="evicted", model="big", models=["a", "b"], key="alice", host="w1",
                       detail="to make room")
    assert event_of({k.encode(): v.encode() for k, v in event_fields(ev).items()}) == ev


# --------------------------------------------------------------------------- real routers


@pytest.fixture
def two_routers(procs, redis_url, rds, mock_engine):
    wid = f"w-{uuid.uuid4().hex[:8]}"
    fake = FakeWorker(rds, wid)
    fake.publish(CHAT, DEAD)
    fake.instance("dead", "running", f"http://127.0.0.1:{free_port()}")
    # TTFT = 2 ms per prompt word: prompts of 1..60 words spread over several buckets
    _, url = mock_engine("--quiet", "--ttft-per-token", "0.002", model="chat")
    wait_engine(url)
    fake.instance("chat", "running", url)
    routers = [start_router(procs, redis_url, env=FAST) for _ in range(2)]
    for r in routers:
        wait_routable(r, "chat")
    return routers


def history(router, **query) -> dict:
    qs = "&".join(f"{k}={v}" for k, v in {"series": "model", "model": "chat", "from": "-5m", **query}.items())
    return get_json(f"{router.url}/api/history?{qs}")


def total(doc: dict, field: str = "requests") -> float:
    return sum(p[field] or 0 for p in doc["points"])


def access_ttfts(procs, routers) -> list[float]:
    out = []
    for r in routers:
        for raw in procs.log(r.proc).splitlines():
            if raw.startswith("router.access "):
                entry = json.loads(raw.split(" ", 1)[1])
                if entry.get("stream"):
                    out.append(entry["ttfb_ms"] / 1000)
    return out


def test_requests_through_two_routers_sum_to_n_and_merged_ttft_percentiles_match_raw(procs, two_routers) -> None:
    n = 30
    for i in range(n):
        router = two_routers[i % 2]
        words = " ".join(["w"] * (1 + 2 * i))
        stream = SseStream(f"{router.url}/v1/chat/completions", method="POST",
                           body=chat_body("chat", stream=True, max_tokens=2,
                                          messages=[{"role": "user", "content": words}]))
        assert stream.status == 200
        stream.events_until(lambda ev: False)  # to its end: a client leaving first counts as 499
        stream.close()
    bad = request("POST", f"{two_routers[0].url}/v1/chat/completions", chat_body("dead"))
    assert bad.status == 502

    doc = wait_for(lambda: (d := history(two_routers[1])) and total(d) == n and d, timeout=15,
                   message=f"{n} requests recorded")
    assert doc["resolution"] == 1 and doc["fields"][0] == "requests"
    assert total(doc, "errors_4xx") + total(doc, "errors_5xx") == 0
    dead = wait_for(lambda: (d := history(two_routers[1], model="dead")) and total(d) == 1 and d, timeout=15,
                    message="the failed request recorded")
    assert (total(dead, "errors_5xx"), total(dead, "errors_4xx")) == (1, 0)
    raw = wait_for(lambda: len(r := access_ttfts(procs, two_routers)) == n and r, timeout=5,
                   message="every access-log line (written in batches)")
    # one point over the whole window: the buckets of both routers and every slot, summed
    whole = history(two_routers[0], step=300)
    point = next(p for p in whole["points"] if p["requests"])
    assert point["requests"] == n
    for name, q in (("ttft_p50", 0.5), ("ttft_p95", 0.95)):
        exact = sorted(raw)[math.ceil(q * n) - 1]
        low, high = bucket_range(exact)
        assert low <= point[name] <= high, (name, exact, point[name])
    # the coarse resolution (a roll-up made by one router) holds the same count
    coarse = wait_for(lambda: (d := history(two_routers[0], **{"from": "-3h"})) and total(d) == n and d,
                      timeout=15, message="the roll-up")
    assert coarse["resolution"] == 3


def test_history_survives_a_router_restart_and_a_redis_outage_is_a_gap(procs, redis_url, rds, two_routers) -> None:
    first, second = two_routers
    for _ in range(5):
        assert request("POST", f"{first.url}/v1/chat/completions", chat_body("chat", max_tokens=2)).status == 200
    procs.stop(first.proc)  # SIGTERM: the current slot is flushed on the way out
    assert total(history(second)) == 5
    # Redis away for a few slots: the routers cannot write them, and they read as gaps, not zeros
    keys = Keys()
    wait_for(lambda: rds.exists(keys.history(1, "routers", int(time.time()) - 2)), timeout=5,
             message="covered slots")
    saved = rds.execute_command("ACL", "GETUSER", "router")
    rds.execute_command("ACL", "SETUSER", "router", "off")
    rds.execute_command("CLIENT", "KILL", "USER", "router")
    try:
        gone = time.time()
        time.sleep(3.5)  # the outage itself: nothing to await
    finally:
        rds.execute_command("ACL", "SETUSER", "router", "on")
        rds.execute_command("ACL", "LOG", "RESET")
    assert saved
    back = start_router(procs, redis_url, env=FAST)
    doc = wait_for(lambda: (d := history(back, **{"from": str(int(gone) - 3)})) and
                   any(p["requests"] is not None and p["t"] > gone + 4 for p in d["points"]) and d,
                   timeout=15, message="slots after the outage")
    during = [p for p in doc["points"] if gone + 0.5 < p["t"] < gone + 2.5]
    assert during and all(p["requests"] is None and p["ttft_p50"] is None for p in during)
    assert total(history(back)) == 5  # nothing lost, nothing counted twice
    outage = wait_for(lambda: (e := get_json(f"{back.url}/api/events?from=-5m&kind=redis_back")["events"]) and e,
                      timeout=10, message="the router's redis_back event")
    assert outage[0]["by"].startswith("router:") and 2 <= outage[0]["seconds"] < 15
    lost = get_json(f"{back.url}/api/events?from=-5m&kind=redis_lost")["events"]
    assert lost and abs(lost[0]["ts"] - gone) < 3


def test_events_api_and_bad_parameters(two_routers, rds) -> None:
    router = two_routers[0]
    rds.xadd(Keys().timeline(), event_fields(TimelineEvent(ts=time.time(), kind="ready", model="chat",
                                                          host="w1", seconds=12.5)))
    events = get_json(f"{router.url}/api/events?from=-1m&model=chat")["events"]
    assert [(e["kind"], e["seconds"]) for e in events] == [("ready", 12.5)]
    assert get_json(f"{router.url}/api/events?kind=evicted")["events"] == []
    for query, word in (("series=model", "model="), ("series=gpu", "host="), ("series=disk", "series"),
                        ("series=model&model=chat&from=yesterday", "from"), ("from=-1h&to=-2h&series=host&host=x", "to")):
        resp = request("GET", f"{router.url}/api/history?{query}")
        assert resp.status == 400 and resp.json()["success"] is False and word in resp.json()["message"], query
    far = request("GET", f"{router.url}/api/history?series=model&model=chat&from=0&to=999999999999")
    assert far.status == 200 and len(far.json()["points"]) <= 10_000 and far.seconds < 5  # bounded by what is kept
    listing = get_json(f"{router.url}/api/history")
    assert listing["points"] == [] and isinstance(listing["available"], list)


# --------------------------------------------------------------------------- a real worker


def test_an_eviction_names_both_models_and_the_key_and_gpus_are_recorded_across_a_worker_restart(
        procs, redis_url, tmp_path) -> None:
    from fake_nvml import fake_gpu_env
    from helpers import model_block, start_worker, write_config

    wid = f"w-{uuid.uuid4().hex[:8]}"
    key = f"sk-{uuid.uuid4().hex}"
    keys_file = tmp_path / "keys.toml"
    keys_file.write_text(f'[[keys]]\nname = "alice"\nkey = "{key}"\n')
    config = write_config(tmp_path / "host.toml", *(model_block(m, devices=["cuda"], vram_mb=8000,
                                                                engine_args=["--startup-delay", "0.3"])
                                                    for m in ("first", "second")))
    gpus = fake_gpu_env(10000, power=350, temperature=66)
    worker = start_worker(procs, redis_url, config, wid, env={**gpus, **FAST})  # room for one
    router = start_router(procs, redis_url, env={**FAST, "LLM_ROUTER_API_KEYS_FILE": str(keys_file)})
    auth = {"Authorization": f"Bearer {key}"}

    def api(path: str) -> dict:
        resp = request("GET", f"{router.url}{path}", headers=auth)
        assert resp.status == 200, resp.body
        return resp.json()

    wait_for(lambda: api("/api/devices/info")["hosts"].get(wid), timeout=20, message="the worker's devices")
    for model in ("first", "second"):
        resp = request("POST", f"{router.url}/v1/chat/completions", chat_body(model, max_tokens=1), headers=auth,
                       timeout=30)
        assert resp.status == 200, resp.body

    def kinds() -> list[tuple[str, str]]:
        return [(e["kind"], e.get("model", "")) for e in api("/api/events?from=-5m")["events"]]

    wanted = [("start_requested", "first"), ("starting", "first"), ("ready", "first"), ("start_requested", "second"),
              ("evicted", "second"), ("stopping", "first"), ("stopped", "first"), ("starting", "second"),
              ("ready", "second")]
    wait_for(lambda: all(w in kinds() for w in wanted), timeout=15, message=f"the events {wanted}")
    events = api("/api/events?from=-5m")["events"]
    evicted = next(e for e in events if e["kind"] == "evicted")
    assert (evicted["model"], evicted["models"], evicted["key"], evicted["host"]) == ("second", ["first"], "alice", wid)
    ready = [e for e in events if e["kind"] == "ready"]
    assert all(0.3 <= e["seconds"] < 20 and e["host"] == wid for e in ready)
    assert [e["kind"] for e in api("/api/events?from=-5m&kind=ready&model=first")["events"]] == ["ready"]
    assert api("/api/events?from=-5m&kind=worker_started")["events"][0]["host"] == wid
    gpu = wait_for(lambda: (d := api(f"/api/history?series=gpu&host={wid}&gpu=0&from=-1m")) and
                   any(p["memory_total"] for p in d["points"]) and d, timeout=10, message="a GPU sample")
    assert {p["memory_total"] for p in gpu["points"] if p["memory_total"] is not None} == {10000}
    sampled = [p for p in gpu["points"] if p["memory_total"] is not None]
    assert {(p["power"], p["temperature"]) for p in sampled} == {(350, 66)}  # NVML's W and °C
    listed = api("/api/history")["available"]
    assert f"gpu:{wid}:0" in listed and f"host:{wid}" in listed
    # the worker averages its own coarse slots (3 s here): read from the coarse resolution
    coarse = wait_for(lambda: (d := api(f"/api/history?series=gpu&host={wid}&gpu=0&from=-3h")) and
                      any(p["memory_total"] for p in d["points"]) and d, timeout=15, message="a rolled-up GPU record")
    assert coarse["resolution"] == 3
    assert {(p["power"], p["temperature"]) for p in coarse["points"] if p["memory_total"]} == {(350, 66)}
    host = api(f"/api/history?series=host&host={wid}&from=-1m")
    assert any(p["memory_total"] and p["memory_used"] for p in host["points"])

    # a worker restart (SIGTERM: its engine stays, the next worker adopts it): the history stays,
    # and the new worker's samples continue it
    before = time.time()
    procs.stop(worker, signal.SIGTERM)
    start_worker(procs, redis_url, config, wid, env={**gpus, **FAST})
    wait_for(lambda: len(api("/api/events?from=-5m&kind=worker_started")["events"]) == 2, timeout=20,
             message="the second worker started")
    kinds_now = [e["kind"] for e in api(f"/api/events?from=-5m&host={wid}")["events"]]
    assert "worker_stopped" in kinds_now and "adopted" in kinds_now, kinds_now
    wait_for(lambda: any(p["memory_total"] and p["t"] > before + 1 for p in
                         api(f"/api/history?series=gpu&host={wid}&gpu=0&from=-1m")["points"]),
             timeout=15, message="samples after the restart")
    points = api(f"/api/history?series=gpu&host={wid}&gpu=0&from=-5m")["points"]
    assert any(p["memory_total"] == 10000 and p["t"] < before - 2 for p in points), "history before the restart"


def test_each_engines_vram_is_recorded_per_gpu_and_summed_over_the_lab(procs, redis_url, rds, tmp_path) -> None:
    """Per GPU: the VRAM of each model's engine (NVML per process) and the rest as ``other`` (a
    foreign process); the ``gpus`` series sums every host; a worker restart keeps the model
    numbers its records use (the same model reads back under its name, not another's)."""
    import json as json_

    from fake_nvml import FAKE_DIR_ENV, FAKE_GPUS_ENV, fake_gpu_env, set_claim
    from helpers import model_block, start_worker, write_config

    wid = f"w-{uuid.uuid4().hex[:8]}"
    claims = tmp_path / "nvml"
    claims.mkdir()
    nvml = {"--fake-nvml-dir": str(claims)}
    config = write_config(tmp_path / "host.toml",
                          model_block("big", devices=["cuda:0"], vram_mb=4000,
                                      engine_args=["--vram-mb", "3000", *[x for kv in nvml.items() for x in kv]]),
                          model_block("small", devices=["cuda:1"], vram_mb=2000,
                                      engine_args=["--vram-mb", "1000", *[x for kv in nvml.items() for x in kv]]),
                          devices_interval=0.2)
    env = fake_gpu_env(10000, 10000)
    gpus = json_.loads(env[FAKE_GPUS_ENV])
    gpus[0]["memory_used"] = 500  # another user's process on GPU 0: no engine of ours
    env = {**env, FAKE_GPUS_ENV: json_.dumps(gpus), FAKE_DIR_ENV: str(claims), **FAST}
    worker = start_worker(procs, redis_url, config, wid, env=env)
    router = start_router(procs, redis_url, env=FAST)
    wait_for(lambda: {"big", "small"} <= {m["id"] for m in get_json(f"{router.url}/v1/models")["data"]},
             timeout=15, message="the worker's models in the router's view")
    for model in ("big", "small"):
        resp = request("POST", f"{router.url}/api/models/{model}/start", timeout=30)
        assert resp.status == 200, resp.body

    def last(series: str, **query) -> dict:
        """The newest point of ``series`` that has a sample."""
        qs = "&".join(f"{k}={v}" for k, v in {"series": series, "from": "-1m", **query}.items())
        points = [p for p in get_json(f"{router.url}/api/history?{qs}")["points"] if p.get("memory_used") is not None]
        return points[-1] if points else {}

    gpu0 = wait_for(lambda: (p := last("gpu", host=wid, gpu=0)).get("vram:big") == 3000 and p, timeout=15,
                    message="big's 3000 MiB on GPU 0")
    assert (gpu0["memory_used"], gpu0["other"]) == (3500, 500)
    assert "vram:small" not in gpu0 or gpu0["vram:small"] == 0  # small runs on GPU 1
    gpu1 = wait_for(lambda: (p := last("gpu", host=wid, gpu=1)).get("vram:small") == 1000 and p, timeout=15,
                    message="small's 1000 MiB on GPU 1")
    assert (gpu1["memory_used"], gpu1["other"]) == (1000, 0)
    doc = get_json(f"{router.url}/api/history?series=gpu&host={wid}&gpu=1&from=-1m")
    assert doc["fields"][-2:] == ["vram:small", "other"]  # a field per model seen on this GPU, then the rest

    lab = wait_for(lambda: (p := last("gpus")).get("vram:small") == 1000 and p.get("vram:big") == 3000 and p,
                   timeout=15, message="the lab's summary")
    assert (lab["hosts"], lab["gpus"], lab["memory_total"], lab["memory_used"], lab["other"]) == (1, 2, 20000, 4500, 500)
    assert "gpus" in get_json(f"{router.url}/api/history")["available"]
    from click.testing import CliRunner
    from llm_lab_router.cli import main as cli_main

    for args, column in ((["--gpu", f"{wid}:0"], "VRAM:BIG"), (["--gpus"], "VRAM:SMALL")):
        out = CliRunner().invoke(cli_main, ["history", *args, "--from", "-1m", "--url", router.url])
        assert out.exit_code == 0 and column in out.output.splitlines()[0].split(), out.output

    numbers = rds.hgetall(Keys().history_gauges(wid))
    named = {k: v for k, v in numbers.items() if k.startswith("model")}
    assert sorted(named.values()) == ["big", "small"]

    # a worker restart: the engines are adopted, the numbers read back, the records go on under the same names
    procs.stop(worker, signal.SIGTERM)
    start_worker(procs, redis_url, config, wid, env=env)
    pid = int(rds.hget(Keys().instance("big", wid), "pid"))
    set_claim(str(claims), pid, 5000)  # and big grows while it runs
    wait_for(lambda: last("gpu", host=wid, gpu=0).get("vram:big") == 5000, timeout=20,
             message="big's 5000 MiB recorded by the new worker")
    assert {k: v for k, v in rds.hgetall(Keys().history_gauges(wid)).items() if k.startswith("model")} == named


def test_the_cli_prints_history_and_events_as_tables_and_json(two_routers, rds) -> None:
    from click.testing import CliRunner
    from llm_lab_router.cli import main

    router = two_routers[0]
    for _ in range(3):
        assert request("POST", f"{router.url}/v1/chat/completions", chat_body("chat", max_tokens=2)).status == 200
    rds.xadd(Keys().timeline(), event_fields(TimelineEvent(ts=time.time(), kind="evicted", model="chat", models=["old"],
                                                          host="w1", key="alice")))
    wait_for(lambda: total(history(router)) == 3, timeout=10, message="3 requests recorded")

    def cli(*args: str):
        result = CliRunner().invoke(main, [*args, "--url", router.url], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    text = cli("history", "chat", "--from", "-5m", "--step", "300")
    assert text.splitlines()[0].split()[:4] == ["TIME", "REQUESTS", "REQ/S", "ERRORS"]
    assert any(line.split()[2] == "3" for line in text.splitlines()[1:-1]), text
    assert json.loads(cli("history", "chat", "--from", "-5m", "--json"))["series"] == "model:chat"
    assert "model:chat" in cli("history").split()
    events = cli("events", "--from", "-5m", "--kind", "evicted")
    assert "evicted old" in events and "alice" in events
    assert json.loads(cli("events", "--json"))["events"][0]["models"] == ["old"]
    bad = CliRunner().invoke(main, ["history", "chat", "--from", "yesterday", "--url", router.url])
    assert bad.exit_code != 0 and "from" in bad.output


def test_requests_in_flight_show_in_model_info_and_the_timeline_before_they_end(two_routers) -> None:
    """A request still waiting for its first token shows in the other router's model info and
    in the timeline. The request is sent without waiting for its answer's head: the router
    relays the head with the engine's first bytes, so waiting for it (as an ``SseStream`` does)
    checked only after the request had ended, and passed while the other router still read
    the first's last report of it (``llm:used``, rewritten within a second)."""
    first, second = two_routers
    slow = " ".join(["w"] * 30000)  # 2 ms per prompt word: 60 s before the first token, far past the checks
    conn = HTTPConnection("127.0.0.1", urlsplit(first.url).port, timeout=15)
    conn.request("POST", "/v1/chat/completions", headers={"Content-Type": "application/json"},
                 body=json.dumps(chat_body("chat", stream=True, max_tokens=1,
                                           messages=[{"role": "user", "content": slow}])))

    def inflight(router) -> dict:
        return get_json(f"{router.url}/api/models/chat/info")["model"]
    try:
        info = wait_for(lambda: (m := inflight(second)) and m["inflight"] == 1 and m, timeout=10,
                        message="the other router's request in flight")
        assert info["queued"] == 0
        # and the timeline records it, though no request has ended yet
        wait_for(lambda: any((p["inflight"] or 0) >= 1 for p in history(second, **{"from": "-1m"})["points"]),
                 timeout=10, message="the request in flight in the timeline")
        assert inflight(first)["inflight"] == 1  # its own count: it is still in flight now
        assert total(history(second, **{"from": "-1m"})) == 0  # and no request has ended
    finally:
        conn.close()  # the client goes away: the router cancels the request
    wait_for(lambda: inflight(first)["inflight"] == 0, timeout=10, message="nothing in flight")


# --------------------------------------------------------------------------- the dashboard, in Chromium


def test_the_dashboard_timeline_draws_the_recorded_series_and_events(procs, two_routers, rds, tmp_path) -> None:
    import asyncio

    from test_dashboard import CHROMIUM, launch_chromium
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    from llm_lab_router.timeline import Gauges, gauge_meta_ops, gauge_ops, parse_resolutions

    router = two_routers[0]
    for i in range(6):
        stream = SseStream(f"{router.url}/v1/chat/completions", method="POST",
                           body=chat_body("chat", stream=True, max_tokens=2,
                                          messages=[{"role": "user", "content": " ".join(["w"] * (5 + 10 * i))}]))
        stream.events_until(lambda ev: False)
        stream.close()
    fine = parse_resolutions(FAST["LLM_ROUTER_HISTORY_RESOLUTIONS"])[0]
    with rds.pipeline(transaction=False) as pipe:  # a GPU sample, as the host's worker writes it
        gauge_ops(pipe, Keys(), fine, "gpuhost", int(time.time()), Gauges(samples=1, gpus=[(30000, 70, 450, 71)],
                                                                             engines=[(1, 0b1, 20000)]))
        gauge_meta_ops(pipe, Keys(), "gpuhost", 3600, 64000, [81920], time.time(), {1: "chat"})
        pipe.execute()
    rds.xadd(Keys().timeline(), event_fields(TimelineEvent(ts=time.time(), kind="evicted", model="chat",
                                                          models=["old-model"], host="gpuhost", key="alice")))
    wait_for(lambda: total(history(router)) == 6, timeout=10, message="6 requests recorded")
    devtools_port = launch_chromium(procs, tmp_path)
    asyncio.run(drive_timeline(router.url, devtools_port))


async def drive_timeline(url: str, devtools_port: int) -> None:
    import aiohttp
    from test_dashboard import SCREENSHOT, open_page, text_of

    async with aiohttp.ClientSession() as session:
        page = await open_page(devtools_port, session)
        try:
            await page.send("Page.navigate", url=f"{url}/ui/")
            points = ("(id) => Number(document.querySelector(`[data-testid=\"tl-${id}\"]`)?.dataset.points || 0)")
            await page.wait(f"({points})('rate') > 0 && ({points})('ttft') > 0 && ({points})('gpu-mem-0') > 0",
                            message="the rate, TTFT and GPU charts with points")
            # GPU 0's memory stacked by model: chat's engine, the rest (other), the total
            labels = "document.querySelector('[data-testid=tl-gpu-mem-0]').dataset.labels"
            assert await page.js(labels) == "other|chat|total"
            assert await page.js("document.querySelector('[data-testid=tl-host]').value") == "gpuhost"
            # the lab's summary, written once per slot by one of the two routers
            await page.wait(f"({points})('lab-mem') > 0", message="the lab's memory chart")
            assert await page.js("document.querySelector('[data-testid=tl-lab-mem]').dataset.labels") == \
                "other|chat|total"
            assert await page.js("document.querySelectorAll('[data-testid=tl-charts] canvas').length") >= 12
            for chart in ("gpu-power", "gpu-temp"):  # the sample's 450 W and 71 °C
                assert await page.js(f"({points})('{chart}')") > 0, chart
            assert await page.js("document.querySelector('[data-testid=tl-rate]').dataset.series") == "1"  # chat
            events = await page.wait(f"{text_of('tl-events')}.includes('evicted') && {text_of('tl-events')}",
                                     message="the eviction in the event list")
            assert "old-model" in events and "alice" in events
            await page.click("tl-range-15m")
            await page.wait("document.querySelector('[data-testid=tl-range-15m]').classList.contains('on')",
                            message="the 15 min range chosen")
            await page.wait("document.querySelector('[data-testid=tl-charts]').dataset.span === '900' && "
                            f"({points})('rate') > 0", message="the charts redrawn for 15 min")
            await page.js("document.querySelector('[data-testid=timeline]').scrollIntoView(); true")
            await page.screenshot(SCREENSHOT.with_name("timeline.png"))
            assert page.errors == [], page.errors
        except BaseException:
            await page.screenshot(SCREENSHOT.with_name("timeline-failure.png"))
            raise
        finally:
            await page.close()


def test_a_config_reload_and_a_failed_one_are_events(procs, redis_url, rds, tmp_path) -> None:
    import os

    from helpers import model_block, start_worker, write_config

    wid = f"w-{uuid.uuid4().hex[:8]}"
    config = write_config(tmp_path / "host.toml", model_block("one"))
    worker = start_worker(procs, redis_url, config, wid)
    keys = Keys()

    def kinds() -> list[str]:
        return [event_of(f).kind for _, f in rds.xrange(keys.timeline()) if event_of(f).host == wid]

    wait_for(lambda: "worker_started" in kinds(), timeout=15, message="the worker's start")
    config.write_text(config.read_text() + model_block("two"))
    os.kill(worker.pid, signal.SIGHUP)
    wait_for(lambda: "reload" in kinds(), timeout=10, message="the reload event")
    config.write_text("[[models]]\nid = 'broken'\n")  # no command: refused, the config in force stays
    os.kill(worker.pid, signal.SIGHUP)
    wait_for(lambda: "reload_failed" in kinds(), timeout=10, message="the failed reload")
    failed = next(event_of(f) for _, f in rds.xrange(keys.timeline()) if event_of(f).kind == "reload_failed")
    assert "broken" in failed.detail or "command" in failed.detail, failed
    ok = next(event_of(f) for _, f in rds.xrange(keys.timeline()) if event_of(f).kind == "reload")
    assert "two" in ok.detail, ok


def test_a_swap_wait_is_an_event_with_its_reason(procs, redis_url, rds, tmp_path) -> None:
    from test_scheduling import b_waits_for_a

    def events(query: str) -> list[dict]:
        return get_json(f"{router.url}/api/events?from=-5m&{query}")["events"]

    with b_waits_for_a(procs, redis_url, tmp_path) as (a, b, (router,)):
        # the router writes its events as they come, from its history loop: awaited, not assumed
        waits = wait_for(lambda: events("kind=swap_wait"), timeout=10, message="the swap_wait event")
        assert [e["model"] for e in waits] == [b] and "min_residency" in waits[0]["detail"], waits
    wait_for(lambda: events(f"kind=stop_requested&model={a}"), timeout=10, message="the stop that ended the wait")


# 30 days of a simulated lab, written as its workers and routers' roll-ups would (5 min and 1 h slots)
SIM_HOSTS, SIM_GPUS, SIM_MODELS, SIM_DAYS = 500, 4, 10, 30
PERIOD = 100  # distinct gauge records cycled through


def write_simulated_month(rds, now: float) -> None:
    """``SIM_HOSTS`` hosts × ``SIM_GPUS`` GPUs and ``SIM_MODELS`` models, every coarse slot of
    ``SIM_DAYS`` days: the hosts' gauge records (whole chunks of ``Gauges.pack`` records, as
    ``gauge_ops`` leaves them) and the models' rolled-up request hashes (as ``ROLLUP_SCRIPT``
    leaves them), pipelined."""
    from llm_lab_router.timeline import (
        CHUNK,
        COVERAGE,
        GPUS_SERIES,
        SLOTS,
        gauge_chunk,
        gauge_meta_ops,
        model_series,
        resolutions,
    )

    keys, keep = Keys(), SIM_DAYS * 86400
    with rds.pipeline(transaction=False) as pipe:
        for res in resolutions({})[1:]:
            last = int(now // res.step)
            slots = range(last - keep // res.step, last + 1)
            per = res.step // 10  # fine slots summed in a coarse one
            # slot s of host h holds record (s + h) % PERIOD: varied data without packing millions of records
            records = [Gauges(samples=min(per, 255), cpu_percent=20 + i % 50, memory_used=100_000,
                              gpus=[(20_000 + 1000 * ((i + g) % 40), (i + g) % 100, 200 + (i + g) % 400, 40 + (i + g) % 40)
                                    for g in range(SIM_GPUS)],
                              engines=[(m + 1, 1 << (m % SIM_GPUS), 8000 + 100 * ((i + m) % 50))
                                       for m in range(SIM_GPUS)]).pack()
                       for i in range(PERIOD)]
            cycle = b"".join(records * (CHUNK // PERIOD + 2))
            for h in range(SIM_HOSTS):
                for chunk in range(slots[0] // CHUNK, slots[-1] // CHUNK + 1):
                    at = (chunk * CHUNK + h) % PERIOD * RECORD.size
                    pipe.set(gauge_chunk(keys, res.step, f"sim{h:03d}", chunk * CHUNK)[0],
                             cycle[at:at + CHUNK * RECORD.size], ex=keep)
                if h % 50 == 49:
                    pipe.execute()
            for s in slots:
                pipe.hset(keys.history(res.step, COVERAGE, s), mapping={SLOTS: per, "flushes": 2 * per})
                gpus = SIM_HOSTS * SIM_GPUS  # the lab's summary (router.observe.gpu_summary), summed over the slots
                pipe.hset(keys.history(res.step, GPUS_SERIES, s), mapping={
                    "hosts": SIM_HOSTS * per, "gpus": gpus * per, "memory_used": gpus * (38_000 + s % 9000) * per,
                    "memory_total": gpus * 81_920 * per, "utilization": gpus * (s % 100) * per,
                    "power": gpus * (300 + s % 300) * per, SLOTS: per,
                    **{f"vram:sim-model-{m}": SIM_HOSTS * (8000 + 100 * (s % 50)) * per for m in range(SIM_GPUS)}})
                for m in range(SIM_MODELS):
                    n = per // 10
                    pipe.hset(keys.history(res.step, model_series(f"sim-model-{m}"), s),
                              mapping={"requests": 30 * n + m, "errors_4xx": n, "tokens_in": 3000 * n,
                                       "tokens_out": 900 * n, "ttft:3": 5 * n, "ttft:4": 15 * n, "ttft:6": 10 * n + m,
                                       "latency:7": 10 * n, "latency:8": 20 * n + m, "latency:9": n,
                                       "wait:0": 29 * n + m, "wait:9": n, "inflight": 40 * n, "queued": 3 * n,
                                       SLOTS: per})
                if s % 500 == 0:
                    pipe.execute()
        for h in range(SIM_HOSTS):
            gauge_meta_ops(pipe, keys, f"sim{h:03d}", keep, 512_000, [81_920] * SIM_GPUS, now,
                           {m + 1: f"sim-model-{m}" for m in range(SIM_GPUS)})
        pipe.hset(keys.history_series(), mapping={**{model_series(f"sim-model-{m}"): int(now) for m in range(SIM_MODELS)},
                                                  GPUS_SERIES: int(now)})
        pipe.execute()


def test_the_dashboard_draws_30_days_of_500_hosts_in_under_2_s(procs, redis_url, rds, tmp_path) -> None:
    """The 30 d range of a 500-host lab: every chart drawn with data within 2 s of the request
    (measured in the page: ``tl-charts``' ``data-render-ms``, from the first fetch to the last draw)."""
    import asyncio

    from test_dashboard import CHROMIUM, launch_chromium
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    started = time.monotonic()
    write_simulated_month(rds, time.time())
    written = time.monotonic() - started
    router = start_router(procs, redis_url)
    listing = get_json(f"{router.url}/api/history")["available"]
    assert sum(s.startswith("gpu:") for s in listing) == SIM_HOSTS * SIM_GPUS
    devtools_port = launch_chromium(procs, tmp_path)
    render_ms = asyncio.run(drive_month(router.url, devtools_port))
    print(f"30 d of {SIM_HOSTS} hosts × {SIM_GPUS} GPUs × {SIM_MODELS} models: written in {written:.1f} s, "
          f"drawn in {render_ms} ms")
    assert render_ms < 2000


async def drive_month(url: str, devtools_port: int) -> int:
    """Open the timeline, choose 30 d, wait for its draw; return the page's render time (ms)."""
    import aiohttp
    from test_dashboard import SCREENSHOT, open_page

    async with aiohttp.ClientSession() as session:
        page = await open_page(devtools_port, session)
        try:
            await page.send("Page.navigate", url=f"{url}/ui/#timeline")
            charts = "document.querySelector('[data-testid=tl-charts]')"
            await page.wait(f"{charts}?.dataset.renderMs", message="the first draw")
            await page.js(f"delete {charts}.dataset.renderMs; true")
            await page.click("tl-range-30d")
            span = str(SIM_DAYS * 86400)
            await page.wait(f"{charts}.dataset.span === '{span}' && {charts}.dataset.renderMs", timeout=30,
                            message="the 30 d range drawn")
            points = "(id) => Number(document.querySelector(`[data-testid=\"tl-${id}\"]`).dataset.points)"
            for chart in ("rate", "ttft", "latency", "lab-mem", "lab-util", "lab-power", "gpu-mem-0", "gpu-mem-3",
                          "gpu-util", "gpu-power", "gpu-temp"):
                assert await page.js(f"({points})('{chart}')") > 300, chart  # 360 points of 2 h per series
            assert await page.js("document.querySelector('[data-testid=tl-rate]').dataset.series") == str(SIM_MODELS)
            await page.screenshot(SCREENSHOT.with_name("timeline-30d.png"))
            assert page.errors == [], page.errors
            return int(await page.js(f"{charts}.dataset.renderMs"))
        finally:
            await page.close()


def test_the_labs_summary_sums_the_hosts_that_recorded_and_names_their_models() -> None:
    from llm_lab_router.router.observe.gpu_summary import HostMeta, sum_records

    a = Gauges(samples=1, gpus=[(5000, 50, 300, 60), (1000, 10, 100, 40)], engines=[(1, 0b11, 2000)]).pack()
    b = Gauges(samples=1, gpus=[(9000, 90, 400, 70)], engines=[(1, 0b1, 8000), (2, 0b1, 500)]).pack()
    summed = sum_records({"a": a, "b": b, "quiet": b""},  # "quiet" recorded nothing in this slot: not counted
                         {"a": HostMeta(models={1: "chat"}, gpus=2, totals={0: 10000, 1: 10000}),
                          "b": HostMeta(models={1: "embed", 2: "chat"}, gpus=1, totals={0: 20000})})  # own numbers
    assert summed == {"hosts": 2, "gpus": 3, "memory_used": 15000, "memory_total": 40000, "utilization": 150,
                      "power": 800, "vram:chat": 4500, "vram:embed": 8000}
