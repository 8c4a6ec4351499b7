"""Property tests: any TOML text or any value in any config field either parses or raises
``ConfigError`` (one line for the operator), never another exception."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from llm_lab_router.config import ConfigError, parse_config

FIELDS = ["id", "command", "aliases", "mode", "port", "env", "cwd", "health", "startup_timeout", "auto_start",
          "idle_ttl", "max_concurrency", "restart", "devices", "vram_mb", "profiles", "api_key", "owned_by"]
WORKER_FIELDS = ["id", "port_range", "heartbeat_interval", "lease_ttl", "log_maxlen", "bind_host"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                    st.text(max_size=20))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=10)
PROPS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def toml_value(value) -> str | None:
    """A TOML literal for ``value`` (None for what TOML cannot say)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return {"nan": "nan", "inf": "inf", "-inf": "-inf"}.get(repr(value), repr(value))
    if isinstance(value, (int, str)):
        return json.dumps(value)
    if isinstance(value, list):
        items = [toml_value(v) for v in value]
        return None if None in items else "[" + ", ".join(items) + "]"
    items = {k: toml_value(v) for k, v in value.items()}
    if None in items.values():
        return None
    return "{" + ", ".join(f"{json.dumps(k)} = {v}" for k, v in items.items()) + "}"


def parses_or_config_error(text: str | bytes) -> None:
    try:
        parse_config(text)
    except ConfigError:
        pass  # the one allowed failure


@PROPS
@given(st.one_of(st.text(max_size=300), st.binary(max_size=300)))
def test_any_text(text) -> None:
    parses_or_config_error(text)


@PROPS
@given(st.dictionaries(st.sampled_from(FIELDS), values, max_size=6),
       st.dictionaries(st.sampled_from(WORKER_FIELDS), values, max_size=3))
def test_any_values_in_known_fields(model: dict, worker: dict) -> None:
    model = {"id": "m", "command": ["x"], **model}
    lines = ["[worker]", *(f"{k} = {t}" for k, raw in worker.items() if (t := toml_value(raw)) is not None),
             "[[models]]", *(f"{k} = {t}" for k, raw in model.items() if (t := toml_value(raw)) is not None)]
    parses_or_config_error("\n".join(lines))
