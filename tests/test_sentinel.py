"""Redis on Sentinel: ``redis+sentinel://`` URLs everywhere, and a master SIGKILLed under load.

The bed (``tests/sentinel_bed.py``): a master, a replica and three Sentinels, real
``redis-server`` processes with the shipped ACL users; one worker and two routers on a
``redis+sentinel://`` URL. Set ``LLM_ROUTER_SENTINEL_TIMELINE=1`` and run with ``-s`` to print
the fail-over timeline (the figures of docs/deploy.md).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import pytest
import redis as redis_sync
from conftest import Processes, role_url, wait_for
from helpers import (
    DEMO_MODELS,
    chat_body,
    get_json,
    model_block,
    request,
    start_router,
    start_worker,
    wait_routable,
    write_config,
)
from llm_lab_router.protocol import Keys
from llm_lab_router.redis_server import free_port
from llm_lab_router.redis_url import async_client, describe, parse_sentinel_url, redis_nodes, sync_client
from llm_lab_router.worker.logpipe import LogPipe
from sentinel_bed import SentinelBed, wait_new_master

# What workers and routers send (writes and reads); none of it may run on a returning old master.
OUR_COMMANDS = ("hset", "pexpire", "expire", "set", "del", "xadd", "evalsha", "eval", "lpush", "xack",
                "xgroup|create", "xreadgroup", "xrevrange", "scan", "hgetall", "blpop")  # not SUBSCRIBE: Sentinel's own


@pytest.fixture(scope="module")
def bed(tmp_path_factory) -> SentinelBed:
    bed = SentinelBed(tmp_path_factory.mktemp("sentinel"))
    try:
        bed.start()
        yield bed
    finally:
        bed.stop()


@pytest.fixture
def clean(bed: SentinelBed) -> SentinelBed:
    """The bed emptied, its ACL logs reset; at the end no node may have denied a command."""
    master = bed.admin(bed.master_node())
    master.flushall()
    master.close()
    for node in bed.nodes:
        if node.ping():
            client = bed.admin(node)
            client.execute_command("ACL", "LOG", "RESET")
            client.close()
    yield bed
    for node in bed.nodes:
        if node.ping():
            client = bed.admin(node)
            denied = client.execute_command("ACL", "LOG")
            client.close()
            assert not denied, f"{node.port} denied: {denied}"


def test_sentinel_url_parts() -> None:
    spec = parse_sentinel_url("rediss+sentinel://worker:pw%40x@s1:26380,s2,[::1]:26381/llm/2"
                              "?sentinel_password=sp&ssl_cert_reqs=none")
    assert spec is not None
    assert spec.sentinels == (("s1", 26380), ("s2", 26379), ("::1", 26381))
    assert (spec.service, spec.db, spec.username, spec.password) == ("llm", 2, "worker", "pw@x")
    assert (spec.sentinel_password, spec.ssl) == ("sp", True)
    assert spec.data_kwargs()["password"] == "pw@x" and spec.sentinel_kwargs()["password"] == "sp"
    assert parse_sentinel_url("redis://h:6379/0") is None
    for bad in ("redis+sentinel://h1/", "redis+sentinel://h1/llm/x", "redis+sentinel://h1/llm?db=2",
                "redis+sentinel://h1:port/llm"):
        with pytest.raises(ValueError):
            parse_sentinel_url(bad)
    shown = describe("redis+sentinel://worker:SECRET@s1/llm/0?sentinel_password=SENTINEL")
    assert "SECRET" not in shown and "SENTINEL" not in shown and "worker" in shown


def test_clients_reach_the_master_the_sentinels_name(clean: SentinelBed) -> None:
    client = sync_client(clean.url("worker", wid="probe"))
    try:
        client.set("llm:w:probe:x", "1")
    finally:
        client.close()
    direct = clean.admin(clean.master_node())
    assert direct.get("llm:w:probe:x") == "1"
    direct.close()
    wrong = clean.url("worker", wid="probe").replace("sentinel_password=", "sentinel_password=wrong")
    refused = sync_client(wrong)
    try:
        with pytest.raises(redis_sync.ConnectionError, match="(?i)no master found"):
            refused.ping()  # the Sentinels refuse a bad Sentinel password: no master known
    finally:
        refused.close()


def test_up_on_sentinel_and_status_shows_the_master(clean: SentinelBed, procs: Processes, tmp_path: Path) -> None:
    config = write_config(tmp_path / "models.toml", *DEMO_MODELS, id=f"up-{uuid.uuid4().hex[:6]}")
    port = free_port()
    up = procs.start([sys.executable, "-m", "llm_lab_router.cli", "up", "--config", str(config),
                      "--redis", clean.url("admin"), "--port", str(port)], name="up")
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: _answers(f"{url}/health"), timeout=30, message="up's router")
    assert "using Redis at redis+sentinel://admin:***@" in procs.log(up)
    assert get_json(f"{url}/health")["status"] == "healthy"
    master = clean.master_node()
    out = subprocess.run([sys.executable, "-m", "llm_lab_router.cli", "status", "--url", url, "--redis", clean.url("admin")],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    replica = next(n for n in clean.nodes if n is not master)
    assert f"master 127.0.0.1:{master.port}  replicas: 127.0.0.1:{replica.port}" in out.stdout
    assert "(sentinel 127.0.0.1:" in out.stdout
    procs.stop(up)
    assert up.returncode == 0


def _answers(url: str) -> bool:
    try:
        return request("GET", url, timeout=1).status == 200
    except OSError:
        return False


class Load:
    """Non-streamed chat requests to each router, back to back, until stopped."""

    def __init__(self, urls: list[str], model: str) -> None:
        self.failures: list[tuple[float, str, int, bytes]] = []
        self.ok = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(u, model), daemon=True) for u in urls for _ in (0, 1)]

    def __enter__(self) -> "Load":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(20)

    def _run(self, url: str, model: str) -> None:
        while not self._stop.is_set():
            try:
                resp = request("POST", f"{url}/v1/chat/completions", chat_body(model, max_tokens=4), timeout=10)
                status, body = resp.status, resp.body[:300]
            except OSError as exc:
                status, body = 0, str(exc).encode()
            if status == 200:
                self.ok += 1
            else:
                self.failures.append((time.time(), url, status, body))
            time.sleep(0.01)


def test_master_killed_under_load(clean: SentinelBed, procs: Processes, tmp_path: Path) -> None:
    bed = clean
    wid = f"sent-{uuid.uuid4().hex[:6]}"
    config = write_config(
        tmp_path / "models.toml",
        model_block("talker", engine_args=["--chatty", "100"], auto_start=True),
        model_block("spare"),
        id=wid, heartbeat_interval=0.5, lease_ttl=5.0)  # the defaults' ratio; lease_ttl as shipped
    worker = start_worker(procs, bed.url("worker", wid=wid), config, wid)
    routers = [start_router(procs, bed.url("router"), env={"LLM_ROUTER_REDIS_READ_URL": bed.url("reader")})
               for _ in range(2)]
    for router in routers:
        wait_routable(router, "talker", timeout=30)
    old = bed.master_node()
    survivor = next(n for n in bed.nodes if n is not old)
    pids = {"worker": worker.pid, "router A": routers[0].proc.pid, "router B": routers[1].proc.pid}

    with Load([r.url for r in routers], "talker") as load:
        wait_for(lambda: load.ok > 20, timeout=20, message="requests flowing")
        inflight = ThreadPoolExecutor(1).submit(request, "POST", f"{routers[0].url}/api/models/spare/start",
                                                timeout=60)  # a command caught by the fail-over
        killed_at = time.time()
        old.kill()
        new = wait_new_master(bed, old)
        promoted_at = time.time()
        assert new is survivor
        admin = bed.admin(new)
        lease = Keys().worker(wid)
        connected: set[int] = set()

        def everyone_switched() -> bool:
            assert admin.exists(lease), "the worker's lease expired during the fail-over"
            connected.update(bed.pids_connected(new, list(pids.values())))
            return len(connected) == len(pids)

        wait_for(everyone_switched, timeout=15, interval=0.02, message="worker and routers on the new master")
        # when each process had its first command answered by the new master, by its own log (a
        # process may be connected through one client while another still waits out its back-off)
        back = {name: wait_for(lambda: _logged_at(procs.log(proc), RECONNECTED[name.split()[0]], killed_at),
                               timeout=15, interval=0.05, message=f"{name} to log its reconnection")
                for name, proc in [("worker", worker), ("router A", routers[0].proc), ("router B", routers[1].proc)]}
        # the command in flight was answered (done, or a clear error): never a silent hang
        caught = inflight.result(timeout=30)
        assert caught.status == 200 or (caught.status == 503 and "Redis is unreachable" in caught.json()["message"]), \
            (caught.status, caught.body)
        # a start sent after the fail-over works
        resp = request("POST", f"{routers[1].url}/api/models/spare/start", timeout=60)
        assert resp.status == 200, resp.body
        wait_routable(routers[0], "spare")
        # every line the engine printed across the fail-over is in the new master's stream
        settled = max(back.values()) + 1.0
        wait_for(lambda: _chatty_lines(admin, settled)[1], timeout=15, message="log lines printed after the switch")
        wait_for(lambda: load.ok > 20 + len(pids) * 10, timeout=10, message="requests still flowing")

    numbers, later = _chatty_lines(admin, settled)
    missing = sorted(set(range(min(numbers), max(numbers) + 1)) - set(numbers))
    assert later and not missing, f"log lines lost across the fail-over: {missing[:20]} ({len(missing)})"
    assert min(numbers) == 0, "the stream lost its first lines"
    assert load.failures == [], load.failures[:5]
    for router in routers:
        assert "every worker lease vanished" not in procs.log(router.proc)
        detail = get_json(f"{router.url}/api/models/talker/info")["model"]
        assert [i["worker"] for i in detail["instances"] if i["state"] == "running"] == [wid]
    admin.close()

    timeline = {
        "SIGKILL": killed_at,
        "+sdown (first Sentinel)": bed.sentinel_events("+sdown")[0],
        "+odown (quorum)": bed.sentinel_events("+odown")[0],
        "+promoted-slave": bed.sentinel_events("+promoted-slave")[0],
        "+switch-master (all 3)": bed.sentinel_events("+switch-master")[-1],
        "master seen by the test": promoted_at,
        **{f"{name}: first command answered by the new master": t for name, t in back.items()},
    }
    if os.environ.get("LLM_ROUTER_SENTINEL_TIMELINE"):
        print(f"\nfail-over timeline ({load.ok} requests ok, 0 failed; start in flight: {caught.status} "
              f"{caught.body[:160]!r}):")
        for what, at in sorted(timeline.items(), key=lambda kv: kv[1]):
            print(f"  {at - killed_at:7.3f} s  {what}")
    # everyone was back before the worker's lease (5 s, renewed every 0.5 s) could run out
    assert all(t - killed_at < 5.0 for t in back.values()), timeline

    # the old master comes back: a replica of the new one, and nothing of ours writes to it
    old.start()

    def demoted() -> bool:
        clients = bed.clients(old)
        assert not [c for c in clients if c.get("user") in ("worker", "router")], clients
        assert not bed.pids_connected(old, list(pids.values()))
        back = bed.admin(old)
        role = back.info("replication")["role"]
        if role == "master":  # not yet reconfigured: no write may have run here
            executed = {c.removeprefix("cmdstat_") for c in back.info("commandstats")}
            assert not executed & set(OUR_COMMANDS), executed
        back.close()
        return role == "slave"

    wait_for(demoted, timeout=30, interval=0.05, message="the old master to become a replica")
    back = bed.admin(old)
    assert back.info("replication")["master_port"] == new.port
    wait_for(lambda: back.exists(Keys().worker(wid)), timeout=15, message="the old master to replicate the new one")
    back.close()
    assert not [c for c in bed.clients(old) if c.get("user") in ("worker", "router")]


RECONNECTED = {"worker": "redis reachable again (heartbeat)", "router": "redis reachable: cluster view synced"}


def _logged_at(log: str, phrase: str, after: float) -> float | None:
    """The time of the first line of ``log`` with ``phrase`` logged after ``after`` (None: none yet)."""
    for line in log.splitlines():
        if phrase in line:
            at = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            if at > after:
                return at
    return None


def _chatty_lines(admin, after: float) -> tuple[list[int], bool]:
    """The numbers of the engine's ``chatty N`` lines in its log stream, and whether one was
    printed after ``after``."""
    numbers, later = [], False
    for _, fields in admin.xrange("llm:logs:talker"):
        msg = fields.get("msg", "")
        if msg.startswith("chatty "):
            numbers.append(int(msg.split(" ", 2)[1].rstrip(":")))
            later = later or float(fields.get("ts", 0)) > after
    return numbers, later


def test_log_lines_a_new_master_lacks_are_shipped_again(redis_url: str, rds, tmp_path) -> None:
    """Lines Redis acknowledged and then lost (a fail-over before they were replicated) come
    back, in order and once, when the worker learns that Redis was away. A lost write takes
    the lines and their spool position together (one script), as a new master would show."""
    keys = Keys()
    key, wid = keys.logs("m"), f"w-{uuid.uuid4().hex[:8]}"
    position = keys.log_position(wid, "m", "event")

    async def scenario() -> None:
        client = async_client(role_url(redis_url, "worker", wid))
        pipe = LogPipe(client, keys, host=wid, maxlen=10000, buffer_lines=1000, spool_dir=tmp_path)
        pipe.start()
        for i in range(7):
            pipe.write("m", "event", f"line {i}")
        await asyncio.to_thread(wait_for, lambda: rds.xlen(key) == 7, 10)
        replicated = rds.get(position)  # what the replica had when the master died
        for i in range(7, 10):
            pipe.write("m", "event", f"line {i}")
        await asyncio.to_thread(wait_for, lambda: rds.xlen(key) == 10, 10)
        for entry_id, _ in rds.xrevrange(key, count=3):  # acknowledged, never replicated
            rds.xdel(key, entry_id)
        rds.set(position, replicated)
        pipe.check_tail()  # what the worker does when its heartbeat reaches Redis again
        pipe.write("m", "event", "line 10")
        await asyncio.to_thread(wait_for, lambda: rds.xlen(key) == 11, 10)
        await pipe.close()
        await client.aclose()

    asyncio.run(scenario())
    assert [fields["msg"] for _, fields in rds.xrange(key)] == [f"line {i}" for i in range(11)]


def test_status_names_a_plain_redis_as_master(redis_server, redis_url: str) -> None:
    nodes = redis_nodes(redis_url)
    assert (nodes.master, nodes.replicas, nodes.via) == (f"127.0.0.1:{redis_server.port}", [], "direct")


