"""A stand-in for ``pynvml``: GPUs described by the environment, for tests without GPUs.

A worker started with ``LLM_ROUTER_NVML_MODULE=tests.fake_nvml`` (the testing hook of
``worker.devices``) reads its GPUs from ``LLM_ROUTER_FAKE_GPUS``, a JSON list such as
``[{"name": "NVIDIA H100", "memory_total": 81920, "memory_used": 0}]`` (MiB). The readings are
fixed: memory of the models started on them never shows, as with a model still loading.
Only the functions ``DeviceProbe`` calls exist.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

FAKE_GPUS_ENV = "LLM_ROUTER_FAKE_GPUS"
MIB = 1024 * 1024


class NVMLError(Exception):
    pass


def _gpus() -> list[dict]:
    return json.loads(os.environ.get(FAKE_GPUS_ENV) or "[]")


def nvmlInit() -> None:
    if FAKE_GPUS_ENV not in os.environ:
        raise NVMLError(f"{FAKE_GPUS_ENV} is not set")


def nvmlShutdown() -> None:
    pass


def nvmlSystemGetDriverVersion() -> str:
    return "fake"


def nvmlDeviceGetCount() -> int:
    return len(_gpus())


def nvmlDeviceGetHandleByIndex(index: int) -> dict:
    return {"index": index, **_gpus()[index]}


def nvmlDeviceGetName(handle: dict) -> str:
    return handle.get("name", "Fake GPU")


def nvmlDeviceGetUUID(handle: dict) -> str:
    return f"GPU-fake-{handle['index']}"


def nvmlDeviceGetMemoryInfo(handle: dict) -> SimpleNamespace:
    total = int(handle.get("memory_total", 0)) * MIB
    used = int(handle.get("memory_used", 0)) * MIB
    return SimpleNamespace(total=total, used=used, free=total - used)


def nvmlDeviceGetUtilizationRates(handle: dict) -> SimpleNamespace:
    return SimpleNamespace(gpu=0, memory=0)


def fake_gpu_env(*free_mib: int) -> dict[str, str]:
    """The environment of a worker whose GPUs have ``free_mib`` MiB each, all free.

    Nothing else uses them: as the readings never show what placed models use, only their
    declared VRAM counts (``llm_router.vram.free_vram``: ``total - promised``)."""
    gpus = [{"name": "NVIDIA H100", "memory_total": f, "memory_used": 0} for f in free_mib]
    return {"LLM_ROUTER_NVML_MODULE": "tests.fake_nvml", FAKE_GPUS_ENV: json.dumps(gpus)}
