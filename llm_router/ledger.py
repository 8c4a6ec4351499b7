"""The usage ledger's layout in Redis, shared by its writers (routers: requests and tokens per
key; workers: GPU time per model) and its reader (``router.observe.ledger``).

One hash per hour, ``llm:ledger:{hour}`` (``hour``: the unix time the hour starts), of counters:

- ``{metric}|{key}|{group}|{model}`` (routers; ``metric``: ``req``, ``err`` (status >= 400 or the
  client gone), ``in``/``out`` (prompt/completion tokens, reported or estimated), ``est_in``/
  ``est_out`` (the part of them estimated: the answer reported no usage); ``key``/``group``:
  names from the keys file, ``-`` for none);
- ``load|{key}|{group}|{model}`` (routers): starts of the model for that key (a request's on
  demand, an operator's ``/start``): the model's GPU time nobody uses is charged to it;
- ``gpu|{model}|{worker}`` (workers): GPU-seconds the model was resident there (time running ×
  its GPUs).

Each writer adds only what it saw itself (``HINCRBY``/``HINCRBYFLOAT``), so sums are exact
across any number of routers and workers, with no double counting; a writer keeps what it could
not write and adds it later (a Redis outage is caught up, not lost). Each hash expires
``LLM_ROUTER_LEDGER_RETENTION_DAYS`` (default 93) after its hour: about 6 fields of ~60 bytes
per key × model × hour, ~400 bytes, and one ~50-byte field per model × host × hour.
"""

from __future__ import annotations

import os
from typing import Mapping

from llm_lab_router.config import env_int

HOUR = 3600
RETENTION_ENV = "LLM_ROUTER_LEDGER_RETENTION_DAYS"
DEFAULT_RETENTION_DAYS = 93
SEP = "|"
NONE = "-"  # a key or group without a name
METRICS = ("req", "err", "in", "out", "est_in", "est_out")
GPU = "gpu"
LOAD = "load"  # load|{key}|{group}|{model}: starts of the model by that key (its unused GPU time is theirs)


def hour_of(t: float) -> int:
    return int(t // HOUR) * HOUR


def retention_days(env: Mapping[str, str] = os.environ) -> int:
    """``LLM_ROUTER_LEDGER_RETENTION_DAYS``, else the default (a worker's setting; routers: RouterOptions)."""
    return env_int(RETENTION_ENV, DEFAULT_RETENTION_DAYS, 1, env)


def expire_at(hour: int, days: int) -> int:
    """When an hour's hash goes (unix time)."""
    return hour + HOUR + days * 86400


def usage_field(metric: str, key: str, group: str, model: str) -> str:
    return SEP.join((metric, key or NONE, group or NONE, model))


def gpu_field(model: str, worker: str) -> str:
    return SEP.join((GPU, model, worker))
