"""Prefix-affinity routing: the same conversation goes to the same instance, whose engine holds
its prefix in its KV cache (llama.cpp ``cache_prompt``, vLLM/SGLang prefix caching).

**The routing key** (``routing_key``) is, in order of precedence:

1. the ``X-Session-Id`` request header, when the client sets it;
2. the body's ``user`` field (OpenAI's end-user id);
3. the conversation's head: the messages up to and including the *first* user message (chat),
   or the leading ``PROMPT_BLOCK`` bytes of ``prompt`` (text completions).

Always together with the model id. Why the head and not "everything before the last user turn":
that prefix changes at every turn (turn 2 adds the first answer), so each turn of a conversation
would hash somewhere else and find a cold cache; the head is the same for every turn of one
conversation (a prefix of all its prompts) and differs between conversations, so they spread.
Only what is needed is decoded (msgspec: ``messages`` as raw JSON, the role of the first
messages); the raw bytes are hashed (CRC-32, then mixed), the body is never re-encoded.

**The choice** (``AffinityRing``, Mirrokni et al., "Consistent Hashing with Bounded Loads"):
each running instance (by worker id) has ``VNODES`` points on a 32-bit ring; the key's point
picks the next instance clockwise; an instance already at ``ceil(c × (outstanding + 1) / n)``
requests (this router's outstanding counts, the new request included) is skipped for the next one
on the ring. So no instance carries more than ``c`` × the mean, and a spill lands on a
deterministic second choice. The ring depends only on the set of worker ids, so two routers
with the same view agree with no communication; it is cached per model and rebuilt only when
that set changes; adding or removing one of ``n`` instances moves only ~1/n of the keys.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import zlib
from typing import Iterable, Mapping, Sequence

import msgspec

SESSION_HEADER = "x-session-id"
PROMPT_BLOCK = 1024  # bytes of a completion prompt that make its key
VNODES = 64  # points per instance on the ring
MASK32 = 0xFFFFFFFF


class _Body(msgspec.Struct):
    """The fields a routing key comes from; everything else in the body is skipped."""

    messages: list[msgspec.Raw] | None = None
    prompt: msgspec.Raw = msgspec.Raw(b"")  # empty: no prompt (Raw cannot be in a union)
    user: str | None = None


class _Role(msgspec.Struct):
    role: str = ""


_body_decoder = msgspec.json.Decoder(_Body)
_role_decoder = msgspec.json.Decoder(_Role)
_ROLE_FIRST = (b'{"role":"', b'{"role": "')  # how JSON encoders write a message (json.dumps, msgspec, JS)


def _mix(h: int) -> int:
    """MurmurHash3's 32-bit finaliser: CRC-32 is linear, this spreads it over the ring."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & MASK32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & MASK32
    return h ^ (h >> 16)


def _is_user(raw: msgspec.Raw) -> bool:
    """Whether a message is the user's: read from its first bytes when, as clients write it,
    ``role`` comes first (a quote inside a string would be escaped, so these bytes are the
    key); else the message is decoded (its content skipped)."""
    head = bytes(memoryview(raw)[:20])
    for start in _ROLE_FIRST:
        if head.startswith(start):
            return head.startswith(b'user"', len(start))
    try:
        return _role_decoder.decode(raw).role == "user"
    except msgspec.DecodeError:
        return False


def session_of(headers: Iterable[tuple[str, str]]) -> str:
    for k, v in headers:
        if len(k) == 12 and k.lower() == SESSION_HEADER:
            return v
    return ""


def routing_key(model: str, body: bytes, headers: Iterable[tuple[str, str]]) -> int | None:
    """The request's point on the ring (see the module doc), or ``None`` when it has no key
    (no session, no messages, no prompt: then least-outstanding decides)."""
    seed = zlib.crc32(model.encode())
    session = session_of(headers)
    if session:
        return _mix(zlib.crc32(session.encode(), seed ^ 0x5E55))
    try:
        doc = _body_decoder.decode(body)
    except (msgspec.DecodeError, RecursionError):
        return None
    if doc.user:
        return _mix(zlib.crc32(doc.user.encode(), seed ^ 0x05E4))
    if doc.messages:
        h = seed
        for raw in doc.messages:
            h = zlib.crc32(raw, h)
            if _is_user(raw):
                break
        return _mix(h)
    if doc.prompt:
        return _mix(zlib.crc32(memoryview(doc.prompt)[:PROMPT_BLOCK], seed))
    return None


def _point(node: str, replica: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{node}#{replica}".encode(), digest_size=4).digest(), "big")


class Ring:
    """The points of a set of nodes (worker ids), sorted; the same set gives the same ring."""

    __slots__ = ("nodes", "points", "owners")

    def __init__(self, nodes: Iterable[str], vnodes: int = VNODES) -> None:
        self.nodes = tuple(sorted(set(nodes)))
        pairs = sorted((_point(n, r), n) for n in self.nodes for r in range(vnodes))
        self.points = [p for p, _ in pairs]
        self.owners = [n for _, n in pairs]

    def walk(self, key: int) -> Iterable[str]:
        """The nodes in ring order from ``key``'s point, each once."""
        if not self.points:
            return
        start = bisect.bisect_left(self.points, key)
        seen: set[str] = set()
        count, total = len(self.nodes), len(self.owners)
        for i in range(total):
            node = self.owners[(start + i) % total]
            if node not in seen:
                yield node
                if len(seen) + 1 == count:
                    return
                seen.add(node)

    def owner(self, key: int) -> str | None:
        return next(iter(self.walk(key)), None)


def load_bound(total_outstanding: int, instances: int, factor: float) -> int:
    """The most requests one of ``instances`` may hold once the new one is placed:
    ``ceil(factor × (total + 1) / instances)``, at least 1."""
    return max(1, math.ceil(factor * (total_outstanding + 1) / instances))


class AffinityRing:
    """Rings per model, rebuilt only when the model's set of running workers changes."""

    def __init__(self, factor: float = 1.25) -> None:
        self.factor = factor
        self._rings: dict[str, Ring] = {}

    def ring(self, model: str, nodes: Sequence[str]) -> Ring:
        ring = self._rings.get(model)
        if ring is None or ring.nodes != tuple(nodes):
            if len(self._rings) > 4096:
                self._rings.clear()  # models come and go: keep the cache bounded
            ring = self._rings[model] = Ring(nodes)
        return ring

    def choose(self, model: str, key: int, workers: Sequence[str], load: Mapping[str, int]) -> tuple[str | None, bool]:
        """The worker for ``key`` among ``workers`` (sorted), given each one's outstanding
        requests (``load``: of those workers only); and whether it is the ring's first choice
        (``False``: spilled past a full one)."""
        if not workers:
            return None, False
        bound = load_bound(sum(load.values()), len(workers), self.factor)
        ring = self.ring(model, workers)
        node = ring.owners[bisect.bisect_left(ring.points, key) % len(ring.owners)]
        if load.get(node, 0) < bound:
            return node, True  # the common case, without the walk
        first = True
        for node in ring.walk(key):
            if load.get(node, 0) < bound:
                return node, first
            first = False
        return None, False
