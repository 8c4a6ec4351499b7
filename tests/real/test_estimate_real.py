"""The VRAM estimate of a GGUF (llm_router/estimate.py) against a real ``llama-server``'s own
account of its buffers: weights and KV cache to the MiB, with ``-c`` and without it (llama-server
then sizes its context to the model's training context, which the estimate must follow), and a
compute reserve on the safe side.

The engine runs on the CPU (``-ngl 0``; the tier has no GPU): its ``-lv 4`` lines give the sizes
of the buffers it would put on a GPU (``model``, ``KV``, ``compute``), which the estimate for the
same arguments with every layer offloaded is compared with. docs/BENCHMARKS.md has the larger
table (scripts/bench_estimate.py).
"""

from __future__ import annotations

import math
import sys

import pytest
from conftest import ROOT, wait_for
from llm_lab_router.estimate import CUDA_CONTEXT_MB, estimate_gguf
from llm_lab_router.redis_server import free_port

pytest.importorskip("gguf", reason="the real tier needs the `real` extra (./dev.sh test-real installs it)")
sys.path.insert(0, str(ROOT / "scripts"))
from bench_estimate import engine_buffers
from make_tiny_gguf import Shape, write
from test_llama_server import find_llama_server

# grouped-query attention, f16, a training context of 16k: small enough to load in a blink
SHAPE = Shape(dim=256, heads=8, kv_heads=2, ff=512, blocks=3, vocab=4000, ctx=16384, f16=True)


@pytest.mark.parametrize("ctx_args", [["-c", "2048"], []], ids=["c2048", "no-c"])
def test_the_estimate_matches_llama_server_s_buffers(procs, tmp_path, ctx_args):
    server = find_llama_server()
    if server is None:
        pytest.skip("no llama-server (./dev.sh test-real builds one)")
    path = tmp_path / "gqa.gguf"
    write(str(path), shape=SHAPE)
    args = ["-m", str(path), *ctx_args, "-t", "1", "--parallel", "1"]
    proc = procs.start([server, *args, "-ngl", "0", "-lv", "4", "--host", "127.0.0.1", "--port", str(free_port())],
                       name="llama-server")
    buffers = wait_for(lambda: proc.poll() is None and {"model", "KV", "compute"} <= set(
        engine_buffers(procs.log(proc))) and engine_buffers(procs.log(proc)), 60, message="llama-server's buffers")

    est = estimate_gguf(path, args)  # no -ngl: every layer offloaded, what a GPU would hold
    tokens = 2048 if ctx_args else SHAPE.ctx  # no -c: the model's training context
    assert est.context == tokens
    assert est.kv_mb == math.ceil(buffers["KV"]) == math.ceil(3 * 2 * 2 * 32 * 2 * tokens / 2**20)
    assert est.weights_mb == math.ceil(buffers["model"])
    assert est.overhead_mb - CUDA_CONTEXT_MB >= buffers["compute"]  # never less than the engine reserves
