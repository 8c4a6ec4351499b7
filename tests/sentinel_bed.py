"""A Sentinel deployment on 127.0.0.1 for tests: a master, a replica, three Sentinels.

Real ``redis-server`` processes (the Sentinels are the same binary with ``--sentinel``), with
the shipped ACL users (``examples/redis-users.acl`` and ``redis-sentinel-users.acl``): the replica logs in to its master as
``replica``, the Sentinels log in to the data nodes as ``sentinel`` and to each other with
their own password, workers and routers as ``worker`` / ``router`` through a
``redis+sentinel://`` URL. Timings are small so that a fail-over takes a few seconds.
"""

from __future__ import annotations

import shutil
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import psutil
import redis as redis_sync
from conftest import REDIS_PASSWORDS, ROOT, acl_text, wait_for, worker_password
from llm_lab_router.redis_users import apply_worker_user, worker_acl_line, worker_user
from llm_lab_router.redis_server import RedisServer
from llm_lab_router.shipped import REDIS_CONF, shipped

HA_ACL_FILE = ROOT / "examples" / "redis-sentinel-users.acl"
SERVICE = "llm"
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 5000
PASSWORDS = {**REDIS_PASSWORDS, "replica": uuid.uuid4().hex, "sentinel": uuid.uuid4().hex}
SENTINEL_PASSWORD = uuid.uuid4().hex  # the Sentinels' own (requirepass), not a data user's


def sentinel_conf(master_port: int) -> str:
    return (f"sentinel monitor {SERVICE} 127.0.0.1 {master_port} 2\n"
            f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {SERVICE} {FAILOVER_TIMEOUT_MS}\n"
            f"sentinel parallel-syncs {SERVICE} 1\n"
            f"sentinel auth-user {SERVICE} sentinel\n"
            f"sentinel auth-pass {SERVICE} {PASSWORDS['sentinel']}\n"
            f"requirepass {SENTINEL_PASSWORD}\n"
            f"sentinel sentinel-pass {SENTINEL_PASSWORD}\n")


@dataclass
class SentinelBed:
    root: Path
    nodes: list[RedisServer] = field(default_factory=list)  # data nodes: [first master, first replica]
    sentinels: list[RedisServer] = field(default_factory=list)

    def start(self) -> "SentinelBed":
        ha_users = HA_ACL_FILE.read_text()  # appended to the shipped users on every data node
        for role in ("replica", "sentinel"):
            ha_users = ha_users.replace(f">CHANGE-ME-{role}", f">{PASSWORDS[role]}")
        (self.root / "users.acl").write_text(acl_text(REDIS_PASSWORDS) + ha_users)
        master = self._node("node0")
        master.start()
        replica = self._node("node1", "--replicaof", "127.0.0.1", str(master.port))
        replica.start()
        for n in range(3):
            conf = self.root / f"sentinel{n}.conf"  # Sentinel rewrites its file: one each
            conf.write_text(sentinel_conf(master.port))
            sentinel = RedisServer(self.root / f"sentinel{n}", conf=conf, extra=["--sentinel"])
            self.sentinels.append(sentinel.start())
        wait_for(self.settled, timeout=20, interval=0.1,
                 message="the Sentinels to see the replica and each other")
        return self

    def _node(self, name: str, *extra: str) -> RedisServer:
        # Sentinel rewrites a reconfigured node's config file (CONFIG REWRITE): each node gets
        # its own copy of the shipped file, which must never be touched.
        conf = self.root / f"{name}.conf"
        shutil.copyfile(shipped(REDIS_CONF), conf)
        node = RedisServer(self.root / name, conf=conf, extra=[
            "--appendonly", "no", "--aclfile", str(self.root / "users.acl"),
            "--masteruser", "replica", "--masterauth", PASSWORDS["replica"], *extra])
        self.nodes.append(node)
        return node

    def stop(self) -> None:
        for server in [*self.sentinels, *self.nodes]:
            server.stop()

    # --- URLs and clients ---

    def url(self, role: str, db: int = 0, wid: str = "") -> str:
        """The ``redis+sentinel://`` URL a process of ``role`` is given (a worker's: ``wid``'s own
        user, made on every data node: ``ACL SETUSER`` is not replicated)."""
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        user, password = role, PASSWORDS.get(role, "")
        if role == "worker":
            user, password = worker_user(wid), worker_password(wid)
            for node in self.nodes:
                admin = self.admin(node)
                apply_worker_user(admin, wid, worker_acl_line(wid, password))
                admin.close()
        return (f"redis+sentinel://{user}:{password}@{hosts}/{SERVICE}/{db}"
                f"?sentinel_password={SENTINEL_PASSWORD}")

    def admin(self, node: RedisServer) -> redis_sync.Redis:
        """The admin's direct connection to one data node (closed by the caller)."""
        return redis_sync.Redis(host="127.0.0.1", port=node.port, username="admin", password=PASSWORDS["admin"],
                                decode_responses=True, socket_timeout=2)

    def sentinel_client(self, n: int = 0) -> redis_sync.Redis:
        return redis_sync.Redis(host="127.0.0.1", port=self.sentinels[n].port, password=SENTINEL_PASSWORD,
                                decode_responses=True, socket_timeout=2)

    # --- topology ---

    def master_info(self, n: int = 0) -> dict:
        client = self.sentinel_client(n)
        try:
            return client.sentinel_master(SERVICE)
        finally:
            client.close()

    def master_node(self) -> RedisServer:
        """The data node every Sentinel agrees is master now."""
        ports = {self.master_info(n)["port"] for n in range(len(self.sentinels))}
        assert len(ports) == 1, f"the Sentinels disagree on the master: {ports}"
        return self._by_port(ports.pop())

    def _by_port(self, port: int) -> RedisServer:
        return next(node for node in self.nodes if node.port == int(port))

    def settled(self) -> bool:
        """Every Sentinel sees a healthy master with one replica and the two other Sentinels."""
        try:
            infos = [self.master_info(n) for n in range(len(self.sentinels))]
        except redis_sync.RedisError:
            return False
        return all(i["num-slaves"] == 1 and i["num-other-sentinels"] == 2 and i["flags"] == "master"
                   and not i.get("is_odown") for i in infos)

    def role(self, node: RedisServer) -> str:
        client = self.admin(node)
        try:
            return client.info("replication")["role"]
        finally:
            client.close()

    def clients(self, node: RedisServer) -> list[dict]:
        """``CLIENT LIST`` of a node (user, addr, cmd …)."""
        client = self.admin(node)
        try:
            return client.client_list()
        finally:
            client.close()

    def pids_connected(self, node: RedisServer, pids: list[int]) -> set[int]:
        """Which of ``pids`` hold a connection to ``node`` (CLIENT LIST addresses matched to
        the processes' sockets)."""
        addrs = {c["addr"] for c in self.clients(node)}
        found = set()
        for pid in pids:
            try:
                conns = psutil.Process(pid).net_connections(kind="tcp")
            except psutil.Error:
                continue
            if any(c.raddr and c.raddr.port == node.port and f"{c.laddr.ip}:{c.laddr.port}" in addrs
                   for c in conns):
                found.add(pid)
        return found

    def sentinel_events(self, event: str) -> list[float]:
        """Unix times at which the Sentinels logged ``event`` (``+sdown``, ``+odown``,
        ``+promoted-slave``, ``+switch-master`` …), from their log files, earliest first."""
        times = []
        for sentinel in self.sentinels:
            for line in (sentinel.data_dir / "redis.log").read_text(errors="replace").splitlines():
                # "12345:X 29 Nov 2026 16:20:01.123 # +sdown master llm 127.0.0.1 6379"
                words = line.split(" ")
                if len(words) > 7 and event in words[6:8]:
                    stamp = datetime.strptime(" ".join(words[1:5]), "%d %b %Y %H:%M:%S.%f")
                    times.append(stamp.timestamp())
        return sorted(times)


def wait_new_master(bed: SentinelBed, old: RedisServer, timeout: float = 20) -> RedisServer:
    """The node the Sentinels promoted instead of ``old``."""
    def promoted():
        try:
            node = bed.master_node()
        except (AssertionError, redis_sync.RedisError):
            return None
        return node if node is not old else None
    return wait_for(promoted, timeout=timeout, interval=0.02, message="a new master")  # type: ignore[return-value]
