"""The GPU paths that only a real GPU exercises, made ready for one: the mock engine's real GPU
memory (``--gpu-mb``, the CUDA driver API through ctypes) and ``scripts/gpu_check.sh``.

Without a GPU here, the CUDA path is checked against a stand-in driver library (a Python object
with the driver's functions, injected where ``ctypes.CDLL`` would be) and for its one-line error
where no driver is; the check script runs its whole sequence on the stand-in NVML.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import subprocess
import sys

import pytest

from conftest import ROOT

MOCK = ROOT / "scripts" / "mock_engine.py"


def mock_engine_module():
    spec = importlib.util.spec_from_file_location("mock_engine_under_test", MOCK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


class StandInDriver:
    """The driver functions ``CudaHold`` calls, writing through the ``byref`` pointers as
    libcuda does; ``fail`` makes one call return an error code."""

    def __init__(self, devices: int, fail: str = "") -> None:
        self.devices = devices
        self.fail = fail
        self.allocated: list[tuple[int, int]] = []  # (device, bytes)
        self.current = -1

    def _result(self, name: str) -> int:
        return 2 if name == self.fail else 0  # 2: CUDA_ERROR_OUT_OF_MEMORY

    def cuInit(self, flags: int) -> int:
        return self._result("cuInit")

    def cuDeviceGetCount(self, count) -> int:
        count._obj.value = self.devices
        return self._result("cuDeviceGetCount")

    def cuDeviceGet(self, device, ordinal: int) -> int:
        device._obj.value = ordinal
        return self._result("cuDeviceGet")

    def cuCtxCreate_v2(self, ctx, flags: int, device) -> int:
        ctx._obj.value = 1000 + device.value
        self.current = device.value
        return self._result("cuCtxCreate")

    def cuMemAlloc_v2(self, pointer, size) -> int:
        if self.fail == "cuMemAlloc":
            return 2
        self.allocated.append((self.current, size.value))
        pointer._obj.value = 0x7F0000000000 + len(self.allocated)
        return 0

    def cuGetErrorString(self, result: int, text) -> int:
        text._obj.value = b"out of memory" if result == 2 else b"?"
        return 0


def test_cuda_hold_allocates_the_size_on_every_visible_device():
    engine = mock_engine_module()
    driver = StandInDriver(devices=2)
    assert engine.CudaHold(driver).hold(3) == 2
    assert driver.allocated == [(0, 3 * 1024 * 1024), (1, 3 * 1024 * 1024)]


def test_cuda_hold_names_the_failed_call_and_the_driver_error():
    engine = mock_engine_module()
    with pytest.raises(engine.CudaError, match=r"cuMemAlloc of 5 MiB on device 0 failed: CUDA error 2 \(out of memory\)"):
        engine.CudaHold(StandInDriver(devices=1, fail="cuMemAlloc")).hold(5)
    with pytest.raises(engine.CudaError, match="no CUDA device is visible"):
        engine.CudaHold(StandInDriver(devices=0)).hold(5)


def test_cuda_hold_loads_the_real_library_through_ctypes(monkeypatch):
    engine = mock_engine_module()
    loaded = []
    monkeypatch.setattr(ctypes, "CDLL", lambda path: loaded.append(path) or StandInDriver(1))
    monkeypatch.setenv(engine.LIBCUDA_ENV, "/opt/driver/libcuda.so.1")
    assert isinstance(engine.CudaHold.load().lib, StandInDriver) and loaded == ["/opt/driver/libcuda.so.1"]


def test_gpu_mb_without_a_driver_exits_with_one_clear_line(tmp_path):
    env = {**os.environ, "LLM_ROUTER_LIBCUDA": str(tmp_path / "no-libcuda.so.1")}
    done = subprocess.run([sys.executable, str(MOCK), "--port", "1", "--gpu-mb", "16"], env=env,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode != 0
    assert done.stderr.splitlines() == [
        f"fatal: --gpu-mb needs the NVIDIA driver's {tmp_path / 'no-libcuda.so.1'}, which cannot be loaded "
        f"({tmp_path / 'no-libcuda.so.1'}: cannot open shared object file: No such file or directory)"]


def test_the_check_script_skips_without_a_gpu(tmp_path):
    env = {**os.environ, "PATH": str(tmp_path)}  # no nvidia-smi on it
    done = subprocess.run(["/bin/bash", str(ROOT / "scripts" / "gpu_check.sh")], env=env, capture_output=True,
                          text=True, timeout=30)
    assert (done.returncode, done.stdout) == (0, "no GPU: skipped\n")


def test_the_check_script_passes_every_check_on_the_stand_in_nvml():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--stand-in"],
                          capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and not line.startswith("| check ")]
    assert len(rows) == 8 and all("| PASS " in row for row in rows), done.stdout
    assert "8 passed, 0 failed" in done.stdout
