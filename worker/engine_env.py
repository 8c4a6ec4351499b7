"""The environment a model server (engine) is started with: an allow-list, not the worker's.

An engine may run third-party code (``trust_remote_code``, custom kernels, plugins), and
``/proc/<pid>/environ`` of a process is readable by that process and everything it spawns.
The worker's own environment holds what must never reach it: ``LLM_ROUTER_API_KEYS`` /
``LLM_ROUTER_ADMIN_KEYS`` (an ``up`` or a router started from the same shell), the Redis
URL with its password, cloud credentials of the operator's shell. So an engine inherits
only the variables named here (what servers, CUDA, the Hugging Face Hub and BLAS libraries
read), then gets the model's ``env`` and its device profile's ``env`` (the operator's
explicit choice, e.g. ``HF_TOKEN`` for a gated model), then the worker's markers.

Whatever the source, an engine never sees an ``LLM_ROUTER_*`` variable other than the
markers below, nor a value that is a Redis URL.
"""

from __future__ import annotations

from typing import Mapping

# Inherited by name.
ALLOWED_NAMES = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ",
    "TMPDIR", "TMP", "TEMP", "LD_LIBRARY_PATH",
    "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",
    "http_proxy", "https_proxy", "no_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY",
})
# Inherited by prefix: locale, GPU runtimes, model hubs and engines, math libraries, Python.
ALLOWED_PREFIXES = (
    "LC_", "XDG_", "SSL_CERT_",
    "CUDA_", "NVIDIA_", "NCCL_", "HIP_", "ROCR_", "HSA_",
    "HF_", "HUGGING_FACE_", "TRANSFORMERS_", "TORCH_", "PYTORCH_", "TRITON_",
    "VLLM_", "SGLANG_", "GGML_", "LLAMA_",
    "OMP_", "MKL_", "OPENBLAS_",
    "PYTHON",  # PYTHONPATH, PYTHONUNBUFFERED (log lines arrive as printed), PYTHONIOENCODING, ...
)
# Random tokens that mark a process tree for the leak sweeps of the test suite and the
# benchmark (``lifeline.processes_with_env``): not secrets, and engines must carry them.
INHERITED_MARKERS = ("LLM_ROUTER_TEST_SESSION", "LLM_ROUTER_BENCH_SESSION")
OWN_PREFIX = "LLM_ROUTER_"
REDIS_SCHEMES = ("redis://", "rediss://")


def allowed(name: str) -> bool:
    """Whether an engine may inherit the variable ``name`` from the worker."""
    if name.startswith(OWN_PREFIX):
        return name in INHERITED_MARKERS
    return name in ALLOWED_NAMES or name.startswith(ALLOWED_PREFIXES)


def engine_env(inherited: Mapping[str, str], *explicit: Mapping[str, str],
               markers: Mapping[str, str] = {}) -> dict[str, str]:
    """The engine's environment: the allowed part of ``inherited`` (the worker's), then each
    of ``explicit`` in order (model ``env``, profile ``env``, ``CUDA_VISIBLE_DEVICES``), then
    ``markers`` (``LLM_ROUTER_WORKER``, ... which orphan reaping relies on). Pure."""
    env = {k: v for k, v in inherited.items() if allowed(k)}
    for more in explicit:
        env.update(more)
    env = {k: v for k, v in env.items()
           if (not k.startswith(OWN_PREFIX) or k in INHERITED_MARKERS) and not _is_redis_url(v)}
    env.update(markers)
    return env


def _is_redis_url(value: str) -> bool:
    return value.strip().lower().startswith(REDIS_SCHEMES)
