"""DeviceProbe against the real host (no NVIDIA driver here) and against a stand-in NVML,
plus the pure summaries behind GET /api/devices/info."""

from __future__ import annotations

import types

import msgspec
from llm_lab_router.protocol import CpuInfo, CudaInfo, DeviceSnapshot, GpuInfo, from_json, to_json
from llm_lab_router.router.control.device_report import cpu_summary, cuda_summary, host_detail
from llm_lab_router.worker.devices import DeviceProbe

MIB = 1024 * 1024
GIB = 1024 * MIB


class FakeNVML:
    """A stand-in for ``pynvml``: same function names, an ``NVMLError`` class, call counts."""

    class NVMLError(Exception):
        pass

    def __init__(self, gpus: list[dict], *, init_error: str = "", util_error: bool = False,
                 broken: frozenset[int] = frozenset(), processes: dict[int, dict[int, int]] | None = None) -> None:
        self.gpus = gpus
        self.processes = processes  # GPU index -> {pid: bytes}; None: per-process accounting not supported
        self.process_calls: list[int] = []
        self.init_error = init_error
        self.util_error = util_error
        self.broken = broken  # indices whose memory query raises
        self.init_calls = 0
        self.shutdown_calls = 0

    def nvmlInit(self) -> None:
        self.init_calls += 1
        if self.init_error:
            raise self.NVMLError(self.init_error)

    def nvmlShutdown(self) -> None:
        self.shutdown_calls += 1

    def nvmlSystemGetDriverVersion(self) -> bytes:
        return b"550.54.15"

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetName(self, handle: int) -> bytes:
        return self.gpus[handle]["name"].encode()

    def nvmlDeviceGetUUID(self, handle: int) -> bytes:
        return f"GPU-{handle:04d}".encode()

    def nvmlDeviceGetMemoryInfo(self, handle: int):
        if handle in self.broken:
            raise self.NVMLError("GPU is lost")
        g = self.gpus[handle]
        return types.SimpleNamespace(total=g["total"], used=g["used"], free=g["total"] - g["used"])

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int):
        self.process_calls.append(handle)
        if self.processes is None:
            raise self.NVMLError("Not Supported")
        return [types.SimpleNamespace(pid=pid, usedGpuMemory=b) for pid, b in self.processes.get(handle, {}).items()]

    def nvmlDeviceGetUtilizationRates(self, handle: int):
        if self.util_error:
            raise self.NVMLError("Not Supported")
        return types.SimpleNamespace(gpu=self.gpus[handle]["util"], memory=0)

    NVML_TEMPERATURE_GPU = 0

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:
        if "mw" not in self.gpus[handle]:
            raise self.NVMLError("Not Supported")
        return self.gpus[handle]["mw"]

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> int:
        if sensor != self.NVML_TEMPERATURE_GPU or "celsius" not in self.gpus[handle]:
            raise self.NVMLError("Not Supported")
        return self.gpus[handle]["celsius"]


TWO_H100 = [
    {"name": "NVIDIA H100 80GB HBM3", "total": 80 * GIB, "used": 10 * GIB + 5 * MIB, "util": 37, "mw": 312_456,
     "celsius": 61},
    {"name": "NVIDIA H100 80GB HBM3", "total": 80 * GIB, "used": 512 * MIB, "util": 0},  # no power, no temperature
]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- the real host: no NVIDIA driver ---


def test_real_host_without_driver_is_offline_with_reason_and_plausible_cpu():
    probe = DeviceProbe()
    try:
        snap = probe.snapshot("w1", "hostA")
    finally:
        probe.close()
    assert (snap.worker, snap.host) == ("w1", "hostA")
    assert snap.ts > 0
    assert snap.cuda.online is False
    assert snap.cuda.error.strip()
    assert snap.cuda.gpus == []
    cpu = snap.cpu
    assert cpu.online is True
    assert cpu.cpu_count >= 1
    assert cpu.memory_total > 0
    assert 0 < cpu.memory_free <= cpu.memory_total
    assert 0 <= cpu.memory_used <= cpu.memory_total
    assert cpu.memory_used + cpu.memory_free <= cpu.memory_total + 1
    assert 0.0 <= cpu.cpu_percent <= 100.0
    # it crosses Redis as JSON and back unchanged
    assert from_json(to_json(snap), DeviceSnapshot) == snap


# --- a stand-in NVML ---


def test_two_gpus_reported_in_mib_with_decoded_names_utilization_power_and_temperature():
    nvml = FakeNVML(TWO_H100)
    probe = DeviceProbe(nvml)
    cuda = probe.snapshot("w1", "gpu1").cuda
    assert cuda.online is True
    assert cuda.error == ""
    assert cuda.driver == "550.54.15"
    assert cuda.gpus == [
        GpuInfo(index=0, name="NVIDIA H100 80GB HBM3", uuid="GPU-0000",
                memory_total=81920, memory_used=10245, memory_free=71675, utilization=37, power=312, temperature=61),
        GpuInfo(index=1, name="NVIDIA H100 80GB HBM3", uuid="GPU-0001",  # "not supported": 0, still reported
                memory_total=81920, memory_used=512, memory_free=81408, utilization=0),
    ]
    probe.snapshot("w1", "gpu1")
    assert nvml.init_calls == 1  # initialised once, not per snapshot
    probe.close()
    assert nvml.shutdown_calls == 1


def test_utilization_failure_still_reports_memory():
    probe = DeviceProbe(FakeNVML(TWO_H100, util_error=True))
    cuda = probe.snapshot("w1", "gpu1").cuda
    assert cuda.online is True
    assert [g.utilization for g in cuda.gpus] == [0, 0]
    assert [g.memory_total for g in cuda.gpus] == [81920, 81920]
    assert cuda.gpus[0].memory_used == 10245


def test_one_broken_gpu_is_reported_without_losing_the_others():
    probe = DeviceProbe(FakeNVML(TWO_H100, broken=frozenset({1})))
    cuda = probe.snapshot("w1", "gpu1").cuda
    assert cuda.online is True
    assert "GPU 1" in cuda.error and "GPU is lost" in cuda.error
    assert [g.index for g in cuda.gpus] == [0, 1]  # positions still match CUDA indices
    assert cuda.gpus[0].memory_free == 71675
    assert cuda.gpus[1].memory_free == 0  # nothing gets placed on a GPU we cannot read


def test_every_gpu_broken_is_offline_with_error():
    probe = DeviceProbe(FakeNVML(TWO_H100, broken=frozenset({0, 1})))
    cuda = probe.snapshot("w1", "gpu1").cuda
    assert cuda.online is False
    assert "GPU 0" in cuda.error and "GPU 1" in cuda.error


def test_no_gpu_is_offline():
    cuda = DeviceProbe(FakeNVML([])).snapshot("w1", "h").cuda
    assert cuda.online is False
    assert cuda.error


def test_failed_init_is_offline_and_retried_only_after_the_interval():
    nvml = FakeNVML(TWO_H100, init_error="Driver Not Loaded")
    clock = Clock()
    probe = DeviceProbe(nvml, retry_interval=60.0, clock=clock)

    snap = probe.snapshot("w1", "gpu1")
    assert snap.cuda.online is False
    assert "Driver Not Loaded" in snap.cuda.error
    assert snap.cpu.memory_total > 0  # CPU is reported regardless
    assert nvml.init_calls == 1

    clock.now += 59.0
    again = probe.snapshot("w1", "gpu1")
    assert nvml.init_calls == 1  # not retried yet
    assert again.cuda.online is False and "Driver Not Loaded" in again.cuda.error

    nvml.init_error = ""  # the driver got loaded meanwhile
    clock.now += 1.0
    found = probe.snapshot("w1", "gpu1")
    assert nvml.init_calls == 2
    assert found.cuda.online is True and len(found.cuda.gpus) == 2

    probe.close()
    assert nvml.shutdown_calls == 1


def test_per_process_memory_is_read_once_for_each_gpu_asked_only():
    nvml = FakeNVML(TWO_H100, processes={0: {10: 3 * GIB, 11: None}, 1: {12: 7 * GIB}})
    probe = DeviceProbe(nvml)
    assert probe.compute_processes([1]) == {1: {12: 7168}}
    assert probe.compute_processes([]) == {}
    assert probe.compute_processes([0, 1]) == {0: {10: 3072, 11: 0}, 1: {12: 7168}}  # None: not available
    assert nvml.process_calls == [1, 0, 1]
    unsupported = FakeNVML(TWO_H100)
    assert DeviceProbe(unsupported).compute_processes([0, 1]) is None
    assert unsupported.process_calls == [0]  # the first refusal ends the reading


def test_close_without_successful_init_does_not_shutdown():
    nvml = FakeNVML(TWO_H100, init_error="Driver Not Loaded")
    probe = DeviceProbe(nvml)
    probe.snapshot("w1", "h")
    probe.close()
    assert nvml.shutdown_calls == 0


# --- summaries for GET /api/devices/info ---


def _snap(wid: str, cuda: CudaInfo, cpus: int, total: int, used: int) -> DeviceSnapshot:
    return DeviceSnapshot(worker=wid, host=wid, ts=1.5, cuda=cuda,
                          cpu=CpuInfo(cpu_count=cpus, memory_total=total, memory_used=used,
                                      memory_free=total - used))


def _two_hosts() -> list[DeviceSnapshot]:
    gpu_host = _snap("gpu1", DeviceProbe(FakeNVML(TWO_H100)).snapshot("gpu1", "gpu1").cuda, 32, 256_000, 56_000)
    cpu_host = _snap("cpu1", CudaInfo(online=False, error="NVML unavailable"), 8, 16_000, 4_000)
    return [gpu_host, cpu_host]


def test_summaries_over_two_hosts_have_the_manual_shape_and_sums():
    snaps = _two_hosts()
    assert cuda_summary(snaps) == {
        "online": True,
        "info": {
            "device_count": 2,
            "device_name": "NVIDIA H100 80GB HBM3",
            "memory_total": 2 * 81920,
            "memory_used": 10245 + 512,
            "memory_free": 71675 + 81408,
        },
    }
    assert cpu_summary(snaps) == {
        "online": True,
        "info": {"cpu_count": 40, "memory_total": 272_000, "memory_used": 60_000, "memory_free": 212_000},
    }


def test_distinct_gpu_names_are_joined():
    a = _snap("a", CudaInfo(online=True, gpus=[GpuInfo(index=0, name="NVIDIA A100", memory_total=40)]), 1, 1, 0)
    b = _snap("b", CudaInfo(online=True, gpus=[GpuInfo(index=0, name="NVIDIA H100", memory_total=80),
                                                GpuInfo(index=1, name="NVIDIA A100", memory_total=40)]), 1, 1, 0)
    info = cuda_summary([a, b])["info"]
    assert info["device_name"] == "NVIDIA A100, NVIDIA H100"
    assert info["device_count"] == 3
    assert info["memory_total"] == 160


def test_only_offline_hosts_give_cuda_offline():
    snaps = [_two_hosts()[1]]
    assert cuda_summary(snaps)["online"] is False
    assert cuda_summary(snaps)["info"]["device_count"] == 0
    assert cpu_summary(snaps)["online"] is True


def test_zero_snapshots_are_offline():
    assert cuda_summary([]) == {
        "online": False,
        "info": {"device_count": 0, "device_name": "", "memory_total": 0, "memory_used": 0, "memory_free": 0},
    }
    assert cpu_summary([]) == {
        "online": False,
        "info": {"cpu_count": 0, "memory_total": 0, "memory_used": 0, "memory_free": 0},
    }


def test_host_detail_breaks_down_one_host_as_json_ready_builtins():
    detail = host_detail(_two_hosts()[0])
    assert detail["host"] == "gpu1" and detail["ts"] == 1.5
    assert detail["cuda"]["online"] is True
    assert detail["cuda"]["driver"] == "550.54.15"
    assert [g["memory_total"] for g in detail["cuda"]["gpus"]] == [81920, 81920]
    assert detail["cuda"]["gpus"][0]["name"] == "NVIDIA H100 80GB HBM3"
    assert detail["cpu"]["cpu_count"] == 32
    msgspec.json.encode(detail)  # plain builtins: the handler can write it as is
