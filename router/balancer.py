"""Choosing which running instance serves a request: least outstanding requests.

Counts are kept in this process per instance URL (a request is counted from the moment it is
sent upstream until its response is fully relayed). Ties are broken round-robin, so an idle
cluster still spreads requests instead of always hitting the first instance.
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager
from typing import Iterator, Mapping, Sequence

from llm_router.protocol import Instance


def least_outstanding(urls: Sequence[str], outstanding: Mapping[str, int], turn: int) -> str | None:
    """The url with the fewest outstanding requests; among equals, the ``turn``-th (mod count)."""
    if not urls:
        return None
    fewest = min(outstanding.get(u, 0) for u in urls)
    ties = [u for u in urls if outstanding.get(u, 0) == fewest]
    return ties[turn % len(ties)]


class Balancer:
    def __init__(self) -> None:
        self._outstanding: dict[str, int] = {}
        self._turns = itertools.count()

    def pick(self, instances: Sequence[Instance], exclude: frozenset[str] | set[str] = frozenset()) -> Instance | None:
        """A running instance to send the next request to, skipping urls in ``exclude``
        (instances that already refused this request's connection)."""
        by_url = {i.url: i for i in instances if i.url and i.url not in exclude}
        url = least_outstanding(list(by_url), self._outstanding, next(self._turns))
        return by_url[url] if url else None

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
