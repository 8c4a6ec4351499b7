"""Choosing which running instance serves a request: prefix affinity with bounded loads
(router/forward/affinity.py) when the request has a routing key, else least outstanding requests.

Counts are kept in this process per instance URL (a request is counted from the moment it is
sent upstream until its response is fully relayed). Ties are broken round-robin, so an idle
cluster still spreads requests instead of always hitting the first instance.
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager
from typing import Iterator, Mapping, Sequence

from llm_lab_router.protocol import Instance
from llm_lab_router.router.forward.affinity import AffinityRing

# How a request's instance was chosen (access log ``route``, llm_router_routing_decisions_total):
AFFINITY = "affinity"  # the ring's first choice for the request's key
SPILL = "spill"  # the first choice was full (bounded load): the next one on the ring
LEAST = "least"  # least outstanding: no key, routing = "least-outstanding", or a retry after a refusal


def least_outstanding(urls: Sequence[str], outstanding: Mapping[str, int], turn: int) -> str | None:
    """The url with the fewest outstanding requests; among equals, the ``turn``-th (mod count)."""
    if not urls:
        return None
    fewest = min(outstanding.get(u, 0) for u in urls)
    ties = [u for u in urls if outstanding.get(u, 0) == fewest]
    return ties[turn % len(ties)]


class Balancer:
    def __init__(self, load_factor: float = 1.25) -> None:
        self._outstanding: dict[str, int] = {}
        self._turns = itertools.count()
        self.affinity = AffinityRing(load_factor)

    def pick(self, instances: Sequence[Instance], exclude: frozenset[str] | set[str] = frozenset()) -> Instance | None:
        """A running instance to send the next request to, skipping urls in ``exclude``
        (instances that already refused this request's connection)."""
        by_url = {i.url: i for i in instances if i.url and i.url not in exclude}
        url = least_outstanding(list(by_url), self._outstanding, next(self._turns))
        return by_url[url] if url else None

    def choose(self, model: str, instances: Sequence[Instance], key: int | None,
               exclude: frozenset[str] | set[str] = frozenset()) -> tuple[Instance | None, str]:
        """The instance for a request and how it was chosen. With a ``key`` and more than one
        instance: the ring's choice under the load bound; once an instance refused this request
        (``exclude``) or without a key: least outstanding. The decision is ``""`` when there
        was nothing to choose (one instance)."""
        if key is not None and not exclude and len(instances) > 1:
            by_worker = {i.worker: i for i in instances if i.url}
            out = self._outstanding
            load = {w: out.get(i.url, 0) for w, i in by_worker.items()}
            worker, first = self.affinity.choose(model, key, list(by_worker), load)
            if worker is not None:
                return by_worker[worker], AFFINITY if first else SPILL
        return self.pick(instances, exclude), LEAST if len(instances) > 1 else ""

    @contextmanager
    def track(self, url: str) -> Iterator[None]:
        """Count one outstanding request on ``url`` for the duration of the block."""
        self._outstanding[url] = self._outstanding.get(url, 0) + 1
        try:
            yield
        finally:
            left = self._outstanding[url] - 1
            if left:
                self._outstanding[url] = left
            else:
                del self._outstanding[url]  # instances come and go: keep no dead urls

    def outstanding(self, url: str) -> int:
        return self._outstanding.get(url, 0)
