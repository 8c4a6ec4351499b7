"""A multi-host test bed on one machine: each "host" (worker or router) gets its own address.

With root and ``ip`` available, every node is a network namespace of its own, joined by a veth
pair to one bridge in the root namespace::

    root namespace: bridge lr<tok>br 10.77.N.1/24   (Redis listens here and on 127.0.0.1)
        ├── veth lr<tok>0 ── netns lr<tok>-h1: eth0 10.77.N.11
        ├── veth lr<tok>1 ── netns lr<tok>-h2: eth0 10.77.N.12
        └── …

so a node only reaches the others over the bridge, exactly as hosts of a lab reach each other
over the network, and a node can be cut off (``set_link(node, up=False)``) to play a network
partition. ``N`` is a /24 no interface of this machine uses yet, so two test sessions running
at once do not collide.

Without namespaces (not root, no ``ip``, a container without CAP_SYS_ADMIN, or
``LLM_ROUTER_NETBED=loopback``) each node gets a distinct loopback address 127.0.N.x
instead: every process still binds and is reached at its own address, but nothing can be cut
off (``partitions`` is False).

Only what the bed created is touched, and ``close()`` removes all of it (namespaces, bridge,
veths; processes still inside a namespace are SIGKILLed first), also after a failed setup.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import uuid
from dataclasses import dataclass

ENV_MODE = "LLM_ROUTER_NETBED"  # "loopback" forces the fallback
SUBNET = "10.77"


@dataclass(frozen=True)
class Node:
    """One simulated host: where its processes bind, and how to run a command there."""

    name: str
    addr: str
    netns: str = ""  # "" in loopback mode
    veth: str = ""  # the root-namespace end of its link

    def argv(self, command: list[str]) -> list[str]:
        """``command`` run inside this node (``ip netns exec`` execs it: same pid)."""
        return ["ip", "netns", "exec", self.netns, *command] if self.netns else list(command)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=10)


def namespaces_available() -> bool:
    """Root, ``ip`` on the PATH, and the kernel lets us make a namespace (tried, then removed)."""
    if os.environ.get(ENV_MODE) == "loopback" or os.geteuid() != 0 or not shutil.which("ip"):
        return False
    probe = f"lrprobe{uuid.uuid4().hex[:6]}"
    if _ip("netns", "add", probe, check=False).returncode != 0:
        return False
    _ip("netns", "del", probe, check=False)
    return True


def _used_subnets() -> set[str]:
    out = _ip("-o", "-4", "addr", check=False).stdout if shutil.which("ip") else ""
    return {".".join(word.split(".")[:3]) for word in out.split() if word.startswith(f"{SUBNET}.")}


class NetBed:
    """Nodes with distinct addresses; ``gateway`` is the root namespace's address on their
    network (bind shared servers such as Redis there). Use as a context manager."""

    def __init__(self, names: list[str], *, use_netns: bool | None = None) -> None:
        self.names = names
        self.use_netns = namespaces_available() if use_netns is None else use_netns
        self.token = uuid.uuid4().hex[:5]
        self.bridge = f"lr{self.token}br"
        self.nodes: dict[str, Node] = {}
        self.gateway = "127.0.0.1"
        self._made_bridge = False

    @property
    def partitions(self) -> bool:
        """Whether ``set_link`` can cut a node off (namespaces only)."""
        return self.use_netns

    def __getitem__(self, name: str) -> Node:
        return self.nodes[name]

    def start(self) -> "NetBed":
        try:
            self._start_netns() if self.use_netns else self._start_loopback()
        except BaseException:
            self.close()
            raise
        return self

    def _start_loopback(self) -> None:
        third = random.randint(1, 250)  # 127.0.0.0/8 is all ours; a random /24 avoids other beds
        self.nodes = {n: Node(n, f"127.{third}.0.{11 + i}") for i, n in enumerate(self.names)}

    def _start_netns(self) -> None:
        free = sorted(set(range(1, 251)) - {int(s.split(".")[2]) for s in _used_subnets()})
        net = f"{SUBNET}.{random.choice(free)}"
        self.gateway = f"{net}.1"
        _ip("link", "add", self.bridge, "type", "bridge")
        self._made_bridge = True
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i, name in enumerate(self.names):
            node = Node(name, f"{net}.{11 + i}", netns=f"lr{self.token}-{name}", veth=f"lr{self.token}{i}")
            _ip("netns", "add", node.netns)
            self.nodes[name] = node  # from here on, close() removes it
            peer = f"{node.veth}p"
            _ip("link", "add", node.veth, "type", "veth", "peer", "name", peer)
            _ip("link", "set", peer, "netns", node.netns)
            _ip("link", "set", node.veth, "master", self.bridge)
            _ip("link", "set", node.veth, "up")
            _ip("-n", node.netns, "link", "set", peer, "name", "eth0")
            _ip("-n", node.netns, "addr", "add", f"{node.addr}/24", "dev", "eth0")
            _ip("-n", node.netns, "link", "set", "eth0", "up")
            _ip("-n", node.netns, "link", "set", "lo", "up")

    def set_link(self, name: str, up: bool) -> None:
        """Cut a node off the network (or reconnect it): its processes keep running."""
        if not self.partitions:
            raise RuntimeError("network partitions need namespaces (root and `ip`)")
        _ip("link", "set", self.nodes[name].veth, "up" if up else "down")

    def close(self) -> None:
        """Remove everything the bed made; never raises (it runs after failures)."""
        for node in self.nodes.values():
            if not node.netns:
                continue
            for pid in _ip("netns", "pids", node.netns, check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            _ip("netns", "del", node.netns, check=False)  # takes its veth pair along
            _ip("link", "del", node.veth, check=False)  # in case the pair was made but not moved
        if self._made_bridge:
            _ip("link", "del", self.bridge, check=False)
        self.nodes = {}
        self._made_bridge = False

    def leftovers(self) -> list[str]:
        """Namespaces and links of this bed that still exist (empty after ``close``)."""
        if not shutil.which("ip"):
            return []
        found = [ns.split()[0] for ns in _ip("netns", "list", check=False).stdout.splitlines()
                 if ns.startswith(f"lr{self.token}")]
        found += [word.rstrip(":").split("@")[0] for word in _ip("-o", "link", check=False).stdout.split()
                  if word.startswith(f"lr{self.token}")]
        return sorted(set(found))

    def __enter__(self) -> "NetBed":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
