"""A stand-in for ``pynvml``: GPUs described by the environment, for tests without GPUs.

A worker started with ``LLM_ROUTER_NVML_MODULE=tests.fake_nvml`` (the testing hook of
``worker.devices``) reads its GPUs from ``LLM_ROUTER_FAKE_GPUS``, a JSON list such as
``[{"name": "NVIDIA H100", "memory_total": 81920, "memory_used": 0}]`` (MiB; ``"power"`` in W
and ``"temperature"`` in °C where a test wants them, else NVML's "not supported"). By default the
readings are fixed: memory of the models started on them never shows, as with a model still
loading. With ``LLM_ROUTER_FAKE_NVML_DIR`` set, engines "use" memory: a mock engine started with
``--vram-mb N --fake-nvml-dir {dir}`` writes ``{dir}/{pid}.json`` (``{"gpus": [...], "mb": N}``) once loaded, and while
that process lives the GPUs it names show N MiB more used and list it among their compute
processes (``nvmlDeviceGetComputeRunningProcesses``), as NVML does; with
``LLM_ROUTER_FAKE_NVML_NO_PROCESSES=1`` that call is "not supported" (as in some containers),
so only the used memory shows it. The claims are read again at every call, so a test grows a
running engine by rewriting its claim (``set_claim``). Only the functions ``DeviceProbe`` calls
exist.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

FAKE_GPUS_ENV = "LLM_ROUTER_FAKE_GPUS"
FAKE_DIR_ENV = "LLM_ROUTER_FAKE_NVML_DIR"
NO_PROCESSES_ENV = "LLM_ROUTER_FAKE_NVML_NO_PROCESSES"
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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _engines(index: int) -> list[tuple[int, int]]:
    """(pid, MiB) of the live processes that claimed memory on GPU ``index``."""
    folder = os.environ.get(FAKE_DIR_ENV)
    if not folder or not os.path.isdir(folder):
        return []
    out = []
    for name in os.listdir(folder):
        if not name.endswith(".json") or not name[:-5].isdigit():
            continue
        pid = int(name[:-5])
        try:
            with open(os.path.join(folder, name)) as f:
                claim = json.load(f)
        except (OSError, ValueError):
            continue  # being written
        if index in claim.get("gpus", []) and _alive(pid):
            out.append((pid, int(claim.get("mb", 0))))
    return out


def set_claim(folder: str, pid: int, mb: int) -> None:
    """Make the engine ``pid`` (which claimed memory in ``folder``) use ``mb`` MiB per GPU now,
    as an engine that grows while it runs (written whole: a reader never sees half a file)."""
    path = os.path.join(folder, f"{pid}.json")
    with open(path) as f:
        claim = json.load(f)
    tmp = os.path.join(folder, f".{pid}.tmp")
    with open(tmp, "w") as f:
        json.dump({**claim, "mb": mb}, f)
    os.replace(tmp, path)


def nvmlDeviceGetMemoryInfo(handle: dict) -> SimpleNamespace:
    total = int(handle.get("memory_total", 0)) * MIB
    used = (int(handle.get("memory_used", 0)) + sum(mb for _, mb in _engines(handle["index"]))) * MIB
    used = min(used, total)
    return SimpleNamespace(total=total, used=used, free=total - used)


def nvmlDeviceGetComputeRunningProcesses(handle: dict) -> list[SimpleNamespace]:
    if os.environ.get(NO_PROCESSES_ENV):
        raise NVMLError("Not Supported")
    return [SimpleNamespace(pid=pid, usedGpuMemory=mb * MIB) for pid, mb in _engines(handle["index"])]


def nvmlDeviceGetUtilizationRates(handle: dict) -> SimpleNamespace:
    return SimpleNamespace(gpu=0, memory=0)


NVML_TEMPERATURE_GPU = 0


def nvmlDeviceGetPowerUsage(handle: dict) -> int:
    """mW, as NVML: ``power`` (W) of the GPU's description, else "not supported"."""
    if "power" not in handle:
        raise NVMLError("Not Supported")
    return int(handle["power"]) * 1000


def nvmlDeviceGetTemperature(handle: dict, sensor: int) -> int:
    """°C: ``temperature`` of the GPU's description, else "not supported"."""
    if sensor != NVML_TEMPERATURE_GPU or "temperature" not in handle:
        raise NVMLError("Not Supported")
    return int(handle["temperature"])


def fake_gpu_env(*free_mib: int, power: int | None = None, temperature: int | None = None) -> dict[str, str]:
    """The environment of a worker whose GPUs have ``free_mib`` MiB each, all free (and draw
    ``power`` W at ``temperature`` °C where given; else NVML answers "not supported").

    Nothing else uses them: as the readings never show what placed models use, only their
    declared VRAM counts (``llm_router.vram.free_vram``: ``total - promised``)."""
    sensors = {k: v for k, v in (("power", power), ("temperature", temperature)) if v is not None}
    gpus = [{"name": "NVIDIA H100", "memory_total": f, "memory_used": 0, **sensors} for f in free_mib]
    return {"LLM_ROUTER_NVML_MODULE": "tests.fake_nvml", FAKE_GPUS_ENV: json.dumps(gpus)}
