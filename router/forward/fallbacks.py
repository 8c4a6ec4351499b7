"""Model fallbacks: which models may serve a request its own model cannot, and the body they get.

A catalog entry's ``fallbacks`` name other models (ids or aliases, resolved on the cluster view
like a request's ``model``). The chain is depth-first: a model's fallbacks in order, each
followed by its own fallbacks; a name that resolves to nothing is skipped and a model already
in the chain is not tried twice (so ``a -> b -> a`` ends). The proxy walks the chain only while
nothing has reached the client (router/forward/proxy.py, ``Unservable``).
"""

from __future__ import annotations

from typing import Callable

import msgspec

from llm_lab_router.protocol import CatalogEntry


def fallback_chain(model: str, entry_of: Callable[[str], CatalogEntry | None],
                   resolve: Callable[[str], str | None]) -> list[str]:
    """``model`` and the models that may serve in its place, in the order they are tried."""
    chain: list[str] = []
    stack = [model]
    while stack:
        current = stack.pop()
        if current in chain:
            continue
        chain.append(current)
        entry = entry_of(current)
        names = entry.fallbacks if entry is not None else []
        stack.extend(reversed([m for n in names if (m := resolve(n)) is not None]))
    return chain


def with_model(body: bytes, model: str) -> bytes:
    """A JSON body whose ``model`` names the fallback model's id: engines that check the name
    (vLLM answers 404 to a name it does not serve) then accept it. Only a fallback pays for
    this decode and re-encode; a body that is not a JSON object passes unchanged."""
    try:
        doc = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return body
    if not isinstance(doc, dict):
        return body
    doc["model"] = model
    return msgspec.json.encode(doc)
