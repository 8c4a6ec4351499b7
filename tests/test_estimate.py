"""VRAM estimated from a model's files before it ever ran (llm_router.estimate, issue 29).

Real files written here with known sizes: GGUF by a small writer of the format (stdlib
``struct``; the ``gguf`` package is an optional extra), safetensors by its 8-byte header length
and JSON header. Large models are sparse files: the header is real, the data a hole. The end to
end test places two never-run models on stand-in GPUs by their estimates, and publishes the
estimate's error once a run was measured.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import wait_for
from fake_nvml import FAKE_DIR_ENV, fake_gpu_env
from helpers import (
    get_json,
    model_block,
    request,
    start_router,
    start_worker,
    write_config,
)
from llm_lab_router.config import DeviceProfile
from llm_lab_router.estimate import (
    CUDA_CONTEXT_MB,
    Estimate,
    EstimateError,
    Estimator,
    estimate_error,
    estimate_files,
    estimate_gguf,
    read_gguf,
)
from llm_lab_router.protocol import CatalogEntry, Keys, from_json
from llm_lab_router.vram import effective_profiles
from test_placement import instances, uid, wait_devices

MIB = 1 << 20
F32, F16, Q8_0 = 0, 1, 8
ALIGN = 32


def _str(s: str) -> bytes:
    raw = s.encode()
    return struct.pack("<Q", len(raw)) + raw


def _kv(key: str, value: object) -> bytes:
    """One metadata pair: strings, u32 integers, f32 floats, arrays of strings or u32."""
    if isinstance(value, str):
        return _str(key) + struct.pack("<I", 8) + _str(value)
    if isinstance(value, float):
        return _str(key) + struct.pack("<If", 6, value)
    if isinstance(value, int):
        return _str(key) + struct.pack("<II", 4, value)
    items = list(value)  # type: ignore[call-overload]
    if all(isinstance(v, str) for v in items):
        return _str(key) + struct.pack("<IIQ", 9, 8, len(items)) + b"".join(_str(v) for v in items)
    return _str(key) + struct.pack("<IIQ", 9, 4, len(items)) + struct.pack(f"<{len(items)}I", *items)


def tensor_bytes(dims: tuple[int, ...], kind: int) -> int:
    n = 1
    for d in dims:
        n *= d
    return {F32: 4 * n, F16: 2 * n, Q8_0: n // 32 * 34}[kind]


def write_gguf(path: Path, metadata: dict[str, object], tensors: list[tuple[str, tuple[int, ...], int]],
               sparse: bool = False) -> int:
    """A GGUF v3 file; returns the bytes of its data section (tensors aligned to 32 bytes).
    ``sparse``: the data is a hole (a large model without writing gigabytes)."""
    infos, offset, sizes = b"", 0, []
    for name, dims, kind in tensors:
        infos += _str(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        infos += struct.pack("<IQ", kind, offset)
        size = tensor_bytes(dims, kind)
        sizes.append(size)
        offset += -(-size // ALIGN) * ALIGN
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata))
    head += b"".join(_kv(k, v) for k, v in metadata.items()) + infos
    head += b"\0" * (-len(head) % ALIGN)
    with open(path, "wb") as f:
        f.write(head)
        if sparse:
            f.truncate(len(head) + offset)
        else:
            for size in sizes:
                f.write(b"\x01" * size + b"\0" * (-size % ALIGN))
    return sum(sizes)


def llama_metadata(layers: int, embd: int, heads: int, kv_heads: int, ctx: int, vocab: int) -> dict[str, object]:
    return {"general.architecture": "llama", "general.name": "test", "llama.block_count": layers,
            "llama.context_length": ctx, "llama.embedding_length": embd, "llama.attention.head_count": heads,
            "llama.attention.head_count_kv": kv_heads, "llama.rope.freq_base": 10000.0, "llama.vocab_size": vocab,
            "tokenizer.ggml.tokens": [f"t{i}" for i in range(vocab)], "tokenizer.ggml.scores_ids": [1, 2, 3]}


def small_llama(path: Path) -> int:
    """2 layers of 256 dims (8 heads, 2 KV heads of 32), vocab 64: f32, f16 and q8_0 tensors."""
    embd = 256
    tensors = [("token_embd.weight", (embd, 64), F16), ("output_norm.weight", (embd,), F32),
               ("output.weight", (embd, 64), Q8_0)]
    for i in range(2):
        tensors += [(f"blk.{i}.attn_q.weight", (embd, embd), Q8_0), (f"blk.{i}.attn_k.weight", (embd, 64), F16),
                    (f"blk.{i}.ffn_up.weight", (embd, 512), F16), (f"blk.{i}.attn_norm.weight", (embd,), F32)]
    return write_gguf(path, llama_metadata(2, embd, 8, 2, 2048, 64), tensors)


def test_a_gguf_header_is_read_whole(tmp_path):
    data = small_llama(tmp_path / "m.gguf")
    g = read_gguf(tmp_path / "m.gguf")
    assert g.version == 3 and g.arch == "llama" and len(g.tensors) == 11
    assert g.metadata["llama.attention.head_count_kv"] == 2 and len(g.metadata["tokenizer.ggml.tokens"]) == 64
    assert g.metadata["tokenizer.ggml.scores_ids"] == [1, 2, 3] and g.metadata["llama.rope.freq_base"] == 10000.0
    assert sum(t.nbytes for t in g.tensors) == data  # the ggml block sizes give each tensor's bytes
    assert [t.dims for t in g.tensors][:2] == [(256, 64), (256,)]


def test_gguf_estimate_follows_context_cache_type_and_offload(tmp_path):
    path = tmp_path / "m.gguf"
    data = small_llama(path)
    per_layer = [t.nbytes for t in read_gguf(path).tensors if t.name.startswith("blk.1.")]
    head = 256 // 8
    full = estimate_gguf(path, ["-c", "1024"])
    assert full.source == "gguf" and full.context == 1024
    assert full.weights_mb == -(-data // MIB)
    assert full.kv_mb == -(-(2 * 1024 * 2 * head * 2 * 2) // MIB)  # K+V, f16, 2 KV heads, 2 layers
    # the compute reserve grows with the context too (the attention mask of one -ub batch)
    assert estimate_gguf(path, ["-c", "262144"]).overhead_mb - full.overhead_mb == 512 * (262144 - 1024) * 4 // MIB
    # -c 0: the model's training context; the cache doubles with it. No -c is the same, as in
    # llama-server since 2025 (it was 4096 before: a 32k model's cache was understated 8x)
    assert estimate_gguf(path, ["-c", "0"]).context == 2048
    assert estimate_gguf(path, []).context == 2048 and estimate_gguf(path, []).kv_mb == 1
    big = estimate_gguf(path, ["--ctx-size", "262144"])
    assert big.kv_mb == 262144 * 2 * head * 2 * 2 * 2 // MIB == 128
    # q8_0 K and V: 34 bytes per 32 values instead of 64
    assert estimate_gguf(path, ["-c", "262144", "-ctk", "q8_0", "--cache-type-v=q8_0"]).kv_mb == 68
    # --parallel splits -c among slots (or shares it): the cache is not multiplied
    assert estimate_gguf(path, ["-c", "262144", "--parallel", "4"]).kv_mb == 128
    # -ngl 1: the last layer only (its tensors and its share of the cache)
    one = estimate_gguf(path, ["-c", "262144", "-ngl", "1"])
    assert one.weights_mb == -(-sum(per_layer) // MIB) and one.kv_mb == 64
    # -ngl 0: nothing offloaded: only the CUDA context
    assert estimate_gguf(path, ["-ngl", "0"]) == Estimate(source="gguf", weights_mb=0, kv_mb=0,
                                                          overhead_mb=CUDA_CONTEXT_MB)


def test_the_gguf_reader_agrees_with_the_gguf_package_on_the_project_s_own_model(tmp_path):
    """Where the ``real`` extra is installed: the block sizes are ggml's, and the models of
    scripts/make_tiny_gguf.py (written by the ``gguf`` package; the tiny one and a sized one)
    read the same as its reader."""
    gguf = pytest.importorskip("gguf")
    from gguf.constants import GGML_QUANT_SIZES
    from llm_lab_router.estimate import GGML_TYPES

    known = {int(k): tuple(v) for k, v in GGML_QUANT_SIZES.items()}
    assert {k: v for k, v in known.items() if k in GGML_TYPES} == GGML_TYPES  # a newer type: counted as f32
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    from make_tiny_gguf import Shape, write

    # the tiny test model, and one of its sized kin: grouped-query attention, f16 matrices, a padded vocabulary
    gqa = Shape(dim=128, heads=8, kv_heads=2, ff=256, blocks=3, vocab=1000, f16=True)
    for name, shape in (("tiny", Shape()), ("gqa", gqa)):
        path = tmp_path / f"{name}.gguf"
        write(str(path), shape=shape)
        ref = {t.name: (int(t.n_bytes), tuple(int(d) for d in t.shape), int(t.tensor_type))
               for t in gguf.GGUFReader(path).tensors}
        assert {t.name: (t.nbytes, t.dims, t.type) for t in read_gguf(path).tensors} == ref
    # the sized model's cache: 3 layers x K and V x 2 KV heads of 16 x f16 x 2**16 tokens = 24 MiB
    est = estimate_gguf(tmp_path / "gqa.gguf", ["-c", str(2**16)])
    assert est.kv_mb == 3 * 2 * 2 * 16 * 2 * 2**16 // MIB == 24
    assert est.weights_mb == -(-sum(t.nbytes for t in read_gguf(tmp_path / "gqa.gguf").tensors) // MIB) == 2


def write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> int:
    """A safetensors file (header + data); returns the data's bytes."""
    size = {"F32": 4, "BF16": 2, "F16": 2, "I8": 1}
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, (dtype, shape) in tensors.items():
        n = size[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * offset)
    return offset


def test_safetensors_estimate_weights_kv_cache_tensor_parallel_and_gpu_share(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    data = write_safetensors(folder / "model-00001-of-00002.safetensors",
                             {"embed": ("BF16", [1024, 2048]), "norm": ("F32", [2048])})
    data += write_safetensors(folder / "model-00002-of-00002.safetensors", {"layers.0.q": ("BF16", [2048, 2048])})
    (folder / "config.json").write_text(json.dumps({
        "num_hidden_layers": 4, "num_attention_heads": 16, "num_key_value_heads": 4, "hidden_size": 2048,
        "max_position_embeddings": 32768, "torch_dtype": "bfloat16"}))
    est = estimate_files(folder, ["vllm", "serve", str(folder), "--max-model-len", "8192"], "vllm")
    assert est.source == "safetensors" and est.weights_mb == -(-data // MIB) == 13
    assert est.kv_mb == 2 * 4 * 4 * 128 * 2 * 8192 // MIB == 64 and est.context == 8192
    # vLLM holds 0.9 of the GPU, whatever it needs; --gpu-memory-utilization changes the share
    assert est.gpu_fraction == 0.9 and est.need_mb(80000) == 72000 and est.need_mb(0) == est.vram_mb
    assert estimate_files(folder, ["--gpu-memory-utilization", "0.5"], "vllm").need_mb(80000) == 40000
    assert estimate_files(folder, [], "sglang").gpu_fraction == 0.88
    # no --max-model-len: the model's own context; fp8 cache: one byte per value
    assert estimate_files(folder, ["--kv-cache-dtype", "fp8"], "vllm").kv_mb == 2 * 4 * 4 * 128 * 32768 // MIB
    # two GPUs: weights and KV heads split
    tp = estimate_files(folder, ["--max-model-len", "8192", "--tensor-parallel-size", "2"], "vllm")
    assert tp.weights_mb == -(-(data // 2) // MIB) and tp.kv_mb == 32


def test_files_that_are_not_a_model_give_a_reason_not_a_crash(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"GGML" + b"\0" * 40)
    with pytest.raises(EstimateError, match="not a GGUF"):
        estimate_files(tmp_path / "x.gguf")
    whole = tmp_path / "m.gguf"
    small_llama(whole)
    (tmp_path / "cut.gguf").write_bytes(whole.read_bytes()[:300])
    with pytest.raises(EstimateError, match="truncated"):
        read_gguf(tmp_path / "cut.gguf")
    (tmp_path / "hf").mkdir()
    assert "config.json" in Estimator().get(str(tmp_path / "hf"), [], "vllm")
    assert "No such file" in str(Estimator().get(str(tmp_path / "none.gguf"), []))


def test_an_estimate_counts_only_where_nothing_is_declared_or_measured():
    profiles = [DeviceProfile(devices=["cuda"], vram_mb=0), DeviceProfile(devices=["cuda"], vram_mb=3000),
                DeviceProfile(devices=["cuda"], vram_mb=0)]
    got = effective_profiles(profiles, measured=[0, 0, 7000], estimated=[5000, 5000, 5000])
    assert [p.vram_mb for p in got] == [5000, 3000, 7000]
    assert estimate_error(5000, 4000) == 0.25 and estimate_error(5000, 0) is None


def big_llama(path: Path) -> int:
    """A never-run model of about 4.7 GiB per GPU (sparse: nothing written but the header)."""
    tensors = [("token_embd.weight", (4096, 32000), F16)]
    tensors += [(f"blk.{i}.ffn_up.weight", (4096, 262144), F16) for i in range(2)]
    write_gguf(path, llama_metadata(2, 4096, 32, 8, 8192, 32000), tensors, sparse=True)
    return estimate_gguf(path).vram_mb


def test_config_check_shows_each_gpu_profile_s_estimate(tmp_path):
    expected = big_llama(tmp_path / "big.gguf")
    block = model_block("big", model_path="big.gguf", devices=["cuda"])
    block += model_block("declared", model_path="missing.gguf", devices=["cuda"], vram_mb=2000)
    config = write_config(tmp_path / "w.toml", block)
    done = subprocess.run([sys.executable, "-m", "llm_lab_router.cli", "config", "check", str(config)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert f"vram: [cuda] not declared; estimated ~{expected} MiB per GPU (gguf: weights 4346" in done.stdout
    assert "vram: [cuda] declared 2000 MiB; no estimate: " in done.stdout and "missing.gguf" in done.stdout


def test_never_run_models_are_placed_by_their_estimate_and_its_error_is_published(procs, redis_url, rds, tmp_path):
    """Two GPUs of 8000 MiB; two models without ``vram_mb`` whose files say ~4.7 GiB each: the
    second goes to the other GPU (placed as needing nothing, both would share GPU 0). The first
    engine then holds 6000 MiB (stand-in NVML): /info and /metrics give the estimate's error."""
    expected = big_llama(tmp_path / "big.gguf")
    assert 4000 < expected < 5000
    claims = tmp_path / "nvml"
    claims.mkdir()
    wid, a, b = uid("w"), uid("a"), uid("b")
    blocks = [model_block(a, model_path="big.gguf", devices=["cuda"],
                          engine_args=["--vram-mb", "6000", "--fake-nvml-dir", str(claims)]),
              model_block(b, model_path="big.gguf", devices=["cuda"])]
    config = write_config(tmp_path / "w.toml", *blocks)
    start_worker(procs, redis_url, config, wid, env={**fake_gpu_env(8000, 8000), FAKE_DIR_ENV: str(claims)})
    router = start_router(procs, redis_url)
    wait_devices(router, wid)

    def catalog(model: str) -> CatalogEntry:
        return from_json(rds.hget(Keys().catalog(wid), model), CatalogEntry)
    assert catalog(a).estimated_vram_mb == [expected] and catalog(a).measured_vram_mb == []
    assert request("POST", f"{router.url}/api/models/{a}/start", timeout=30).status == 200
    assert request("POST", f"{router.url}/api/models/{b}/start", timeout=30).status == 200
    assert instances(router, a)[wid]["gpus"] == "0" and instances(router, b)[wid]["gpus"] == "1"
    assert rds.hget(Keys().instance(b, wid), "vram_mb") == str(expected)

    wait_for(lambda: catalog(a).measured_vram_mb == [6000], timeout=10, message="the measurement in the catalog")
    error = round((expected - 6000) / 6000, 4)

    def vram_rows() -> list[dict]:
        return get_json(f"{router.url}/api/models/{a}/info")["model"]["vram"]
    wait_for(lambda: vram_rows() and vram_rows()[0]["measured_mb"] == 6000, timeout=10, message="/info's figures")
    assert vram_rows() == [{"worker": wid, "profile": 0, "devices": ["cuda"], "declared_mb": 0,
                            "estimated_mb": expected, "measured_mb": 6000, "estimate_error": error}]
    metrics = request("GET", f"{router.url}/metrics").body.decode()
    assert f'llm_router_vram_estimate_error_ratio{{model="{a}",worker="{wid}",profile="0"}} {float(error)!r}' in metrics
