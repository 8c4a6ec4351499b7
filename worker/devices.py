"""Device metrics of one host (NVML for GPUs, psutil for CPU/RAM).

The worker calls ``DeviceProbe.snapshot()`` every few seconds (through ``asyncio.to_thread``,
NVML calls block) and stores the result in ``llm:w:{wid}:devices``. Routers summarise the
snapshots of all live hosts in ``router.control.device_report``.

A host without the NVIDIA driver is normal (CPU-only hosts, CI): the probe must then report
``cuda.online = False`` with the reason, never raise, and not hammer ``nvmlInit`` on every
heartbeat.
"""

from __future__ import annotations

import importlib
import os
import threading
import time
from types import ModuleType
from typing import Any, Callable, Iterable

import psutil
from llm_lab_router.clock import CLOCK
from llm_lab_router.protocol import CpuInfo, CudaInfo, DeviceSnapshot, GpuInfo

MIB = 1024 * 1024
DEFAULT_RETRY_INTERVAL = 60.0  # seconds between nvmlInit attempts after one failed
# Testing hook: the module to use instead of ``pynvml`` (``tests.fake_nvml``: stand-in GPUs
# from ``LLM_ROUTER_FAKE_GPUS``), so end-to-end tests run real workers on machines without GPUs.
NVML_MODULE_ENV = "LLM_ROUTER_NVML_MODULE"


def _text(value: Any) -> str:
    """NVML returns ``bytes`` in older bindings and ``str`` in newer ones."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _describe(exc: BaseException) -> str:
    """A readable reason; ``str()`` of an NVML error can itself fail without the library."""
    try:
        text = str(exc)
    except Exception:  # pragma: no cover - defensive: pynvml looks the text up in the library
        text = ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class DeviceProbe:
    """Reads this host's GPUs and CPU/RAM into a ``DeviceSnapshot``.

    ``nvml`` is the NVML binding module (``pynvml`` by default, imported lazily so that a
    missing package is reported as an offline GPU rather than an import error); tests pass a
    stand-in module with the same function names and an ``NVMLError`` class. ``retry_interval``
    and ``clock`` bound how often a failed ``nvmlInit`` is retried: a driver that is absent
    stays absent, but one that is loaded later (driver install, container restart) is found
    without restarting the worker.

    Thread-safe: snapshots may be taken from several threads (``asyncio.to_thread``).
    """

    def __init__(self, nvml: ModuleType | Any | None = None, *,
                 retry_interval: float = DEFAULT_RETRY_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._nvml = nvml
        self._retry_interval = retry_interval
        self._clock = clock
        self._lock = threading.Lock()
        self._initialised = False
        self._init_error = ""
        self._next_init_at: float | None = None  # None: never tried yet

    # --- public API ---

    def snapshot(self, worker_id: str, host: str) -> DeviceSnapshot:
        """Take one reading of every device; never raises for a device problem."""
        with self._lock:
            cuda = self._cuda()
        return DeviceSnapshot(worker=worker_id, host=host, ts=CLOCK.now(), cuda=cuda, cpu=self._cpu())

    def close(self) -> None:
        """Release NVML (``nvmlShutdown``) if this probe initialised it."""
        with self._lock:
            if self._initialised and self._nvml is not None:
                try:
                    self._nvml.nvmlShutdown()
                except Exception:
                    pass  # shutting down: nothing useful to do with a failure
            self._initialised = False
            self._next_init_at = None

    def compute_processes(self, gpus: Iterable[int]) -> dict[int, dict[int, int]] | None:
        """MiB per process (pid -> MiB) on each of ``gpus``: NVML's per-process accounting
        (``nvmlDeviceGetComputeRunningProcesses``, one call per GPU), or None where the driver
        does not say (not supported, containers without the host's PID namespace, no GPU)."""
        with self._lock:
            if not self._ensure_init():
                return None
            nvml = self._nvml
            try:
                out: dict[int, dict[int, int]] = {}
                for index in gpus:
                    procs = nvml.nvmlDeviceGetComputeRunningProcesses(nvml.nvmlDeviceGetHandleByIndex(index))
                    out[index] = {int(p.pid): int(p.usedGpuMemory or 0) // MIB for p in procs}
                return out
            except Exception:
                return None

    # --- CPU ---

    @staticmethod
    def _cpu() -> CpuInfo:
        """``free`` is ``available`` (what a new process can get, page cache included), and
        ``used`` is ``total - available``, so the three numbers always add up."""
        mem = psutil.virtual_memory()
        total = mem.total // MIB
        free = mem.available // MIB
        return CpuInfo(
            online=True,
            cpu_count=psutil.cpu_count(logical=True) or 1,
            cpu_percent=float(psutil.cpu_percent(interval=None)),
            memory_total=total,
            memory_used=max(0, total - free),
            memory_free=free,
        )

    # --- CUDA ---

    def _ensure_init(self) -> bool:
        """Initialise NVML once; after a failure, try again only every ``retry_interval``."""
        if self._initialised:
            return True
        now = self._clock()
        if self._next_init_at is not None and now < self._next_init_at:
            return False
        self._next_init_at = now + self._retry_interval
        try:
            if self._nvml is None:
                # lazily: the import succeeds without a driver, but not without the package
                self._nvml = importlib.import_module(os.environ.get(NVML_MODULE_ENV) or "pynvml")
            self._nvml.nvmlInit()
        except ImportError as exc:
            self._init_error = f"NVML bindings not installed (pip install nvidia-ml-py): {exc}"
            return False
        except Exception as exc:
            self._init_error = f"NVML unavailable (no NVIDIA driver or GPU?): {_describe(exc)}"
            return False
        self._initialised = True
        self._init_error = ""
        return True

    def _cuda(self) -> CudaInfo:
        if not self._ensure_init():
            return CudaInfo(online=False, error=self._init_error)
        nvml = self._nvml
        try:
            driver = _text(nvml.nvmlSystemGetDriverVersion())
        except Exception:
            driver = ""  # cosmetic: the GPUs can still be read
        try:
            count = int(nvml.nvmlDeviceGetCount())
        except Exception as exc:
            return CudaInfo(online=False, driver=driver, error=f"cannot count GPUs: {_describe(exc)}")
        if count == 0:
            return CudaInfo(online=False, driver=driver, error="NVML reports no GPU")

        gpus: list[GpuInfo] = []
        errors: list[str] = []
        for index in range(count):
            gpu, error = self._gpu(index)
            gpus.append(gpu)
            if error:
                errors.append(f"GPU {index}: {error}")
        # A GPU that could not be read is kept (with zero memory, so nothing is placed on it)
        # so that list positions keep matching CUDA indices.
        online = len(errors) < count
        return CudaInfo(online=online, error="; ".join(errors), driver=driver, gpus=gpus)

    def _gpu(self, index: int) -> tuple[GpuInfo, str]:
        """Read one GPU; returns the info and an error text ("" when all went well)."""
        nvml = self._nvml
        name = ""
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            name = _text(nvml.nvmlDeviceGetName(handle))
            try:
                uuid = _text(nvml.nvmlDeviceGetUUID(handle))
            except Exception:
                uuid = ""
            mem = nvml.nvmlDeviceGetMemoryInfo(handle)
        except Exception as exc:
            return GpuInfo(index=index, name=name), _describe(exc)
        try:
            utilization = int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except Exception:
            utilization = 0  # not supported on some GPUs (e.g. MIG); memory matters more
        power, temperature = _sensors(nvml, handle)
        return GpuInfo(
            index=index,
            name=name,
            uuid=uuid,
            memory_total=int(mem.total) // MIB,
            memory_used=int(mem.used) // MIB,
            memory_free=int(mem.free) // MIB,
            utilization=utilization,
            power=power,
            temperature=temperature,
        ), ""


def _sensors(nvml: Any, handle: Any) -> tuple[int, int]:
    """The GPU's power draw (W) and die temperature (°C); each 0 where NVML does not support it
    (MIG instances, some boards), as the timeline draws them but nothing decides on them."""
    try:
        power = int(nvml.nvmlDeviceGetPowerUsage(handle)) // 1000  # mW
    except Exception:
        power = 0
    try:
        temperature = int(nvml.nvmlDeviceGetTemperature(handle, getattr(nvml, "NVML_TEMPERATURE_GPU", 0)))
    except Exception:
        temperature = 0
    return power, temperature
