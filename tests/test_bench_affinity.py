"""The affinity benchmark's verdict on real engines: the TTFT row is checked only when a cached
prefix measurably shortens the engine's TTFT (issue 28 item 12: the tiny GGUF's prefix costs
almost no prefill, and a FAIL there was expected, not found). The probe that measures it runs
here against mock engines with and without a prefill cost (real processes, real sockets)."""

from __future__ import annotations

import asyncio

import pytest
from conftest import wait_for
from helpers import request

from scripts.bench.sections.affinity import PrefixCost, Workload, prefix_cost, ttft_target


def test_mock_engines_keep_the_one_third_target():
    target, check = ttft_target(None)
    assert target == "affinity <= 1/3 x least"
    assert check(0.30) and not check(0.40)


@pytest.mark.parametrize("cold, warm", [
    (12.0, 10.0),  # the tiny GGUF: thousands of tokens in milliseconds
    (75.0, 45.0),  # saves 30 ms, but not half the TTFT: queueing noise hides it
    (0.0, 0.0),
])
def test_a_prefix_too_cheap_to_measure_makes_the_row_informational(cold, warm):
    target, check = ttft_target(PrefixCost(cold, warm))
    assert check is None and target.startswith("info: cached prefix saves")


def test_a_measurable_prefix_is_checked_against_half_its_possible_gain():
    target, check = ttft_target(PrefixCost(264.0, 80.0))  # a real llama-server, ~4k-token prefix (issue 28)
    assert target == "affinity <= 0.65 x least"
    assert check(0.30) and not check(0.90)


def probe(mock_engine, *cost_args: str) -> PrefixCost:
    _, url = mock_engine("--prefix-cache", "4096", *cost_args, model="m")
    wait_for(lambda: _healthy(url), timeout=15, message="mock engine up")
    w = Workload(1, 1, 100, 600, 10, 1)
    return asyncio.run(prefix_cost(url, "m", w))


def _healthy(url: str) -> bool:
    try:
        return request("GET", f"{url}/health", timeout=1).status == 200
    except OSError:
        return False


def test_the_probe_measures_what_the_engine_cache_saves(mock_engine):
    costly = probe(mock_engine, "--ttft-per-token", "0.0001")  # ~700 words: ~70 ms of prefill, then cached
    assert costly.saving_ms > 40 and costly.warm_ms < costly.cold_ms / 2, costly
    assert ttft_target(costly)[1] is not None
    free = probe(mock_engine)  # no prefill cost: nothing to gain
    assert ttft_target(free)[1] is None, free
