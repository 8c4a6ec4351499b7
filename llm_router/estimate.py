"""VRAM of a model from its files, before it ever ran: for placement where nothing is learned yet.

Today a model's VRAM is known from a first run on a host (``worker.learning``) or from a
hand-written ``vram_mb``; a model never run and not declared would be placed as if it needed
nothing, and the first start on a full GPU dies of OOM. The weights' size and the KV cache are
written in the model's files and its arguments, so they are read here (stdlib only: the worker
must not need numpy or the ``gguf`` package to place a model).

- **GGUF** (llama.cpp, llama-cpp-python): the header (magic, version, tensor count, metadata,
  tensor infos) gives each tensor's type and dimensions, so its bytes (ggml block sizes), and
  the context length, layers, KV heads and head size. The KV cache is ``n_ctx`` tokens ×
  offloaded layers × (K + V) per token, in the cache type of ``-ctk``/``-ctv`` (default f16).
  ``-c`` (default ``0`` = the model's training context, as llama-server has had it since 2025;
  measured against a real one in docs/BENCHMARKS.md: an older 4096 default would have
  understated the cache eightfold for a 32k model) is the *total*
  context: llama-server splits it among its ``--parallel`` slots (or shares it, unified), so
  ``--parallel`` does not multiply the cache. ``-ngl N`` offloads the last N layers (all by
  default, ``0``: none, and then the model needs no VRAM but the CUDA context).
- **safetensors + config.json** (vLLM, SGLang, a folder): the 8-byte header length and JSON
  header of each ``*.safetensors`` give dtypes and shapes; ``config.json`` the layers, KV heads
  and head size. KV cache for one sequence of ``--max-model-len`` (default: the model's
  ``max_position_embeddings``) in ``--kv-cache-dtype`` (default: the weights' dtype). Weights
  and cache split over ``--tensor-parallel-size``. vLLM does not take what it needs but a
  fraction of the whole GPU (``--gpu-memory-utilization``, default 0.9; SGLang's
  ``--mem-fraction-static``, default 0.88): ``Estimate.need_mb`` applies that to a GPU's total.

An estimate is a guess (allocator slack, CUDA graphs, compute buffers vary by build): it is used
only where neither a declaration nor a measurement exists, and its error against the learned
figure is published once the model ran (``estimate_error``).
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import msgspec
from llm_lab_router.config import DeviceProfile, ModelConfig, expand_command

MIB = 1024 * 1024
LLAMA_DEFAULT_CTX = 0  # llama-server's -c when not given: the model's training context
UNKNOWN_TRAINED_CTX = 4096  # a GGUF that does not say its training context
CUDA_CONTEXT_MB = 300  # the CUDA context and cuBLAS workspace every GPU process holds
VLLM_FRACTION = 0.9  # vLLM's default --gpu-memory-utilization
SGLANG_FRACTION = 0.88  # SGLang's default --mem-fraction-static (for a large GPU)
MAX_HEADER = 256 * MIB  # a GGUF or safetensors header larger than this is not believed

# ggml types: (block size in elements, bytes per block), by ggml.h's ggml_type ids (the same as the
# gguf package's GGML_QUANT_SIZES: tests/test_estimate.py compares them where it is installed).
GGML_TYPES: dict[int, tuple[int, int]] = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34), 9: (32, 40),
    10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210), 15: (256, 292),
    16: (256, 66), 17: (256, 74), 18: (256, 98), 19: (256, 50), 20: (32, 18), 21: (256, 110),
    22: (256, 82), 23: (256, 136), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8),
    29: (256, 56), 30: (1, 2), 34: (256, 54), 35: (256, 66), 39: (32, 17), 40: (64, 36), 41: (128, 18),
}
# llama.cpp's -ctk/-ctv names -> (block size, bytes per block)
CACHE_TYPES: dict[str, tuple[int, int]] = {
    "f32": (1, 4), "f16": (1, 2), "bf16": (1, 2), "q8_0": (32, 34), "q4_0": (32, 18), "q4_1": (32, 20),
    "iq4_nl": (32, 18), "q5_0": (32, 22), "q5_1": (32, 24),
}
SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                     "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
TORCH_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2, "fp8": 1, "fp8_e4m3": 1,
               "fp8_e5m2": 1, "auto": 0}
GGUF_MAGIC = b"GGUF"
GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
GGUF_STRING, GGUF_ARRAY = 8, 9
BLOCK = re.compile(r"blk\.(\d+)\.")


class EstimateError(ValueError):
    """The files cannot be read as a model (not GGUF, a truncated header, no config.json)."""


class Estimate(msgspec.Struct, kw_only=True):
    """VRAM per GPU of one device profile of a model, from its files (MiB)."""

    source: str  # "gguf" or "safetensors"
    weights_mb: int  # on each GPU (after offload and tensor parallelism)
    kv_mb: int  # the KV cache on each GPU
    overhead_mb: int  # CUDA context and compute buffers
    gpu_fraction: float = 0.0  # vLLM/SGLang take this share of each GPU whatever they need (0: no)
    context: int = 0  # the context (tokens) the KV cache was sized for

    @property
    def vram_mb(self) -> int:
        """What the model needs per GPU, before any fraction of a GPU is applied."""
        return self.weights_mb + self.kv_mb + self.overhead_mb

    def need_mb(self, gpu_total_mb: int = 0) -> int:
        """MiB to reserve on a GPU of ``gpu_total_mb``: an engine that takes a fraction of the
        GPU holds that fraction (0 = GPU unknown: what it needs)."""
        return max(self.vram_mb, int(self.gpu_fraction * gpu_total_mb))

    def describe(self) -> str:
        """One line for ``config check``."""
        text = (f"~{self.vram_mb} MiB per GPU ({self.source}: weights {self.weights_mb} + KV cache {self.kv_mb} "
                f"for {self.context} tokens + overhead {self.overhead_mb})")
        if self.gpu_fraction:
            text += f"; the engine takes {self.gpu_fraction:g} of each GPU's memory"
        return text


# --- GGUF ---


class GgufTensor(msgspec.Struct, frozen=True):
    name: str
    dims: tuple[int, ...]
    type: int

    @property
    def nbytes(self) -> int:
        block, size = GGML_TYPES.get(self.type, (1, 4))  # an unknown type counts as f32: never less
        count = 1
        for d in self.dims:
            count *= d
        return -(-count // block) * size


class Gguf(msgspec.Struct, frozen=True):
    version: int
    metadata: dict[str, object]
    tensors: list[GgufTensor]

    @property
    def arch(self) -> str:
        return str(self.metadata.get("general.architecture", "llama"))

    def number(self, key: str, default: int = 0) -> int:
        """``{arch}.{key}``: an integer, or the largest of a per-layer array."""
        value = self.metadata.get(f"{self.arch}.{key}", default)
        if isinstance(value, list):
            return max((int(v) for v in value), default=default)
        return int(value)  # type: ignore[call-overload]


def _read(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise EstimateError("truncated GGUF header")
    return data


def _unpack(f: BinaryIO, fmt: str) -> object:
    return struct.unpack(fmt, _read(f, struct.calcsize(fmt)))[0]


def _string(f: BinaryIO) -> str:
    n = int(_unpack(f, "<Q"))  # type: ignore[call-overload]
    if n > MAX_HEADER:
        raise EstimateError("a GGUF string longer than the header limit")
    return _read(f, n).decode("utf-8", "replace")


def _value(f: BinaryIO, kind: int) -> object:
    if kind in GGUF_SCALARS:
        return _unpack(f, GGUF_SCALARS[kind])
    if kind == GGUF_STRING:
        return _string(f)
    if kind == GGUF_ARRAY:
        item, n = int(_unpack(f, "<I")), int(_unpack(f, "<Q"))  # type: ignore[call-overload]
        if item in GGUF_SCALARS and item != 7:  # numbers: one read (vocab scores are large)
            fmt = GGUF_SCALARS[item]
            size = struct.calcsize(fmt)
            if n * size > MAX_HEADER:
                raise EstimateError("a GGUF array larger than the header limit")
            return list(struct.unpack(f"<{n}{fmt[1]}", _read(f, n * size)))
        return [_value(f, item) for _ in range(n)]
    raise EstimateError(f"unknown GGUF value type {kind}")


def read_gguf(path: str | os.PathLike) -> Gguf:
    """The header of a GGUF file (v2 or v3): metadata and tensor infos; the data is not read."""
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise EstimateError(f"{path} is not a GGUF file")
        version = int(_unpack(f, "<I"))  # type: ignore[call-overload]
        if version not in (2, 3):
            raise EstimateError(f"GGUF version {version} is not supported (2 or 3)")
        n_tensors, n_kv = int(_unpack(f, "<Q")), int(_unpack(f, "<Q"))  # type: ignore[call-overload]
        metadata = {}
        for _ in range(n_kv):
            key = _string(f)
            metadata[key] = _value(f, int(_unpack(f, "<I")))  # type: ignore[call-overload]
        tensors = []
        for _ in range(n_tensors):
            name = _string(f)
            n_dims = int(_unpack(f, "<I"))  # type: ignore[call-overload]
            dims = struct.unpack(f"<{n_dims}Q", _read(f, 8 * n_dims))
            kind = int(_unpack(f, "<I"))  # type: ignore[call-overload]
            _unpack(f, "<Q")  # offset in the data section
            tensors.append(GgufTensor(name, tuple(dims), kind))
    return Gguf(version, metadata, tensors)


def _option(args: Sequence[str], *names: str) -> str | None:
    """The value of the last ``--name V`` or ``--name=V`` in ``args`` (None: not given)."""
    found = None
    for i, arg in enumerate(args):
        for name in names:
            if arg == name and i + 1 < len(args):
                found = args[i + 1]
            elif arg.startswith(name + "="):
                found = arg.split("=", 1)[1]
    return found


def _int_option(args: Sequence[str], default: int, *names: str) -> int:
    value = _option(args, *names)
    try:
        return int(value) if value is not None else default
    except ValueError:
        return default


def _cache_bytes(name: str | None, elements: int) -> int:
    block, size = CACHE_TYPES.get((name or "f16").lower(), (1, 2))
    return -(-elements // block) * size


def estimate_gguf(path: str | os.PathLike, args: Sequence[str] = ()) -> Estimate:
    """VRAM of llama.cpp serving the GGUF at ``path`` with ``args`` (its argv: ``-c``,
    ``-ngl``, ``-ctk``/``-ctv``)."""
    g = read_gguf(path)
    layers = g.number("block_count")
    ngl = _int_option(args, -1, "-ngl", "--gpu-layers", "--n-gpu-layers")
    offloaded = layers if ngl < 0 or ngl > layers else ngl
    if offloaded == 0:
        return Estimate(source="gguf", weights_mb=0, kv_mb=0, overhead_mb=CUDA_CONTEXT_MB)
    first = layers - offloaded  # llama.cpp offloads the last N layers
    weights = 0
    for t in g.tensors:
        block = BLOCK.match(t.name)
        if block is not None and int(block.group(1)) >= first or block is None and offloaded == layers:
            weights += t.nbytes
    ctx = _int_option(args, LLAMA_DEFAULT_CTX, "-c", "--ctx-size")
    trained = g.number("context_length", UNKNOWN_TRAINED_CTX) or UNKNOWN_TRAINED_CTX
    ctx = trained if ctx <= 0 else ctx
    heads = g.number("attention.head_count", 1) or 1
    kv_heads = g.number("attention.head_count_kv", heads) or heads
    head_k = g.number("attention.key_length", g.number("embedding_length") // heads)
    head_v = g.number("attention.value_length", head_k)
    per_layer = (_cache_bytes(_option(args, "-ctk", "--cache-type-k"), ctx * kv_heads * head_k)
                 + _cache_bytes(_option(args, "-ctv", "--cache-type-v"), ctx * kv_heads * head_v))
    vocab = g.number("vocab_size") or len(g.metadata.get("tokenizer.ggml.tokens", []) or [])  # type: ignore[arg-type]
    ubatch = _int_option(args, 512, "-ub", "--ubatch-size")
    # the logits and activations of one -ub batch, f32, and its attention mask over the whole
    # context: llama.cpp's compute buffer grows by ubatch x 2 bytes per token of -c (measured, with
    # flash attention); 4 bytes here, to stay above it
    compute = ubatch * (vocab + 4 * g.number("embedding_length")) * 4 + ubatch * ctx * 4
    return Estimate(source="gguf", weights_mb=_mib(weights), kv_mb=_mib(per_layer * offloaded),
                    overhead_mb=CUDA_CONTEXT_MB + _mib(compute), context=ctx)


# --- safetensors ---


def safetensors_header(path: str | os.PathLike) -> dict[str, dict]:
    """The JSON header of one safetensors file: tensor name -> {dtype, shape, data_offsets}."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise EstimateError(f"{path} is not a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER:
            raise EstimateError(f"{path}: a header of {n} bytes is not believed")
        try:
            header = json.loads(f.read(n))
        except ValueError as exc:
            raise EstimateError(f"{path}: the header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise EstimateError(f"{path}: the header is not a JSON object")
    header.pop("__metadata__", None)
    return header


def safetensors_bytes(folder: str | os.PathLike, dtype: str | None = None) -> int:
    """Bytes of every tensor of every ``*.safetensors`` in ``folder``; floating tensors counted
    in ``dtype`` (a torch name) when one is given."""
    cast = TORCH_BYTES.get((dtype or "auto").lower(), 0)
    total = 0
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise EstimateError(f"{folder} has no *.safetensors file")
    for file in files:
        for info in safetensors_header(file).values():
            count = 1
            for d in info.get("shape", []):
                count *= int(d)
            size = SAFETENSORS_BYTES.get(str(info.get("dtype")), 4)
            floating = str(info.get("dtype", "")).startswith(("F", "BF"))
            total += count * (cast if cast and floating else size)
    return total


def estimate_safetensors(folder: str | os.PathLike, args: Sequence[str] = (), engine: str = "vllm") -> Estimate:
    """VRAM of vLLM (or SGLang: ``engine``) serving the folder with ``args``."""
    try:
        config = json.loads(Path(folder, "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise EstimateError(f"{folder}/config.json cannot be read: {exc}") from None
    config = {**config.get("text_config", {}), **config}  # multimodal: the language model's figures
    sglang = engine == "sglang"
    dtype = _option(args, "--dtype")
    tp = max(1, _int_option(args, 1, "--tensor-parallel-size", "-tp", "--tp-size", "--tp"))
    weights = safetensors_bytes(folder, dtype)
    layers = int(config.get("num_hidden_layers", 0))
    heads = int(config.get("num_attention_heads", 1)) or 1
    kv_heads = int(config.get("num_key_value_heads", heads)) or heads
    head = int(config.get("head_dim") or int(config.get("hidden_size", 0)) // heads)
    ctx = _int_option(args, int(config.get("max_position_embeddings", 0)), "--max-model-len", "--context-length")
    kv_dtype = _option(args, "--kv-cache-dtype") or "auto"
    kv_bytes = TORCH_BYTES.get(kv_dtype.lower(), 1) or TORCH_BYTES.get(
        str(dtype or config.get("torch_dtype") or config.get("dtype") or "float16").lower(), 2) or 2
    kv = 2 * layers * max(1, kv_heads // tp) * head * kv_bytes * ctx
    fraction = _option(args, "--mem-fraction-static") if sglang else _option(args, "--gpu-memory-utilization")
    try:
        share = float(fraction) if fraction is not None else (SGLANG_FRACTION if sglang else VLLM_FRACTION)
    except ValueError:
        share = SGLANG_FRACTION if sglang else VLLM_FRACTION
    return Estimate(source="safetensors", weights_mb=_mib(weights // tp), kv_mb=_mib(kv),
                    overhead_mb=CUDA_CONTEXT_MB, gpu_fraction=share, context=ctx)


# --- a model entry ---


def weights_path(argv: Sequence[str], model_path: str = "") -> str:
    """The model file or folder a command serves: ``model_path``, else its ``-m``/``--model``/
    ``--model-path`` (vLLM: the argument after ``serve``)."""
    if model_path:
        return model_path
    found = _option(argv, "-m", "--model", "--model-path")
    if found:
        return found
    if "serve" in argv and argv.index("serve") + 1 < len(argv):
        return argv[argv.index("serve") + 1]
    return ""


def estimate_files(path: str | os.PathLike, args: Sequence[str] = (), engine: str = "") -> Estimate:
    """The estimate for ``path`` (a GGUF file, or a folder of safetensors and config.json)."""
    p = Path(path)
    if p.is_dir():
        ggufs = sorted(p.glob("*.gguf"))
        if not ggufs:
            return estimate_safetensors(p, args, engine or "vllm")
        p = ggufs[0]
    if not p.is_file():
        raise EstimateError(f"{path} does not exist on this host")
    return estimate_gguf(p, args)


def _mib(n: int) -> int:
    return -(-n // MIB)


class Estimator:
    """Estimates by (path, its size and mtime, args), so that publishing a catalog every few
    seconds reads no header twice; a failure is remembered too (and says why)."""

    KEEP = 256  # entries: the oldest go first

    def __init__(self) -> None:
        self._seen: dict[tuple, Estimate | str] = {}

    def get(self, path: str, args: Sequence[str], engine: str = "") -> Estimate | str:
        """The estimate, or why there is none (a message)."""
        try:
            st = os.stat(path)
            key = (path, st.st_size, st.st_mtime_ns, tuple(args), engine)
        except OSError as exc:
            return f"{path}: {exc.strerror}"
        if key not in self._seen:
            while len(self._seen) >= self.KEEP:  # old versions of files, args since changed
                del self._seen[next(iter(self._seen))]
            try:
                self._seen[key] = estimate_files(path, args, engine)
            except (OSError, EstimateError) as exc:
                self._seen[key] = str(exc)
        return self._seen[key]


def model_weights(model: ModelConfig, profile: DeviceProfile, config_dir: str) -> tuple[str, list[str]]:
    """The model file or folder ``model`` runs with ``profile`` ("" = its command names none),
    as a path on this host, and the argv it is served with."""
    argv = expand_command(model, profile, port=0, host="127.0.0.1", config_dir=config_dir)
    path = weights_path(argv, model.model_path.replace("{config_dir}", config_dir))
    return (str(Path(config_dir, model.cwd) / Path(path).expanduser()) if path else ""), argv


def profile_estimates(model: ModelConfig, config_dir: str, estimator: Estimator) -> list[Estimate | str | None]:
    """Per device profile of ``model``: its estimate, why there is none (a message), or None
    for a CPU-only profile (it needs no VRAM)."""
    out: list[Estimate | str | None] = []
    for profile in model.device_profiles():
        if not any(d != "cpu" for d in profile.devices):
            out.append(None)
            continue
        path, argv = model_weights(model, profile, config_dir)
        out.append(estimator.get(path, argv, model.engine) if path else "no model file in its command")
    return out


def estimated_mb(estimates: Sequence[Estimate | str | None], gpu_total_mb: int = 0) -> list[int]:
    """MiB per profile for placement and the catalog (0: no estimate, or a CPU profile)."""
    return [e.need_mb(gpu_total_mb) if isinstance(e, Estimate) else 0 for e in estimates]


def estimate_error(estimated_mb: int, measured_mb: int) -> float | None:
    """How far an estimate was from what the engine was measured to hold, as a ratio of the
    measurement (+0.25: 25 % too high); None while either is unknown."""
    if estimated_mb <= 0 or measured_mb <= 0:
        return None
    return round((estimated_mb - measured_mb) / measured_mb, 4)
