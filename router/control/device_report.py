"""The ``GET /api/devices/info`` body: the device snapshots of all live hosts
(``llm:w:{wid}:devices``, written by each worker's ``DeviceProbe``) summed for the cluster and
broken down per host. Pure functions: only routers use them.
"""

from __future__ import annotations

from typing import Iterable

import msgspec

from llm_lab_router.protocol import DeviceSnapshot


def cuda_summary(snapshots: Iterable[DeviceSnapshot]) -> dict:
    """The manual's ``devices.cuda``: every readable GPU of every host with NVML online,
    memory summed in MiB, distinct names joined with ", "."""
    online = False
    names: list[str] = []
    count = total = used = free = 0
    for snap in snapshots:
        if not snap.cuda.online:
            continue
        online = True
        for gpu in snap.cuda.gpus:
            count += 1
            total += gpu.memory_total
            used += gpu.memory_used
            free += gpu.memory_free
            if gpu.name and gpu.name not in names:
                names.append(gpu.name)
    return {
        "online": online,
        "info": {
            "device_count": count,
            "device_name": ", ".join(names),
            "memory_total": total,
            "memory_used": used,
            "memory_free": free,
        },
    }


def cpu_summary(snapshots: Iterable[DeviceSnapshot]) -> dict:
    """The manual's ``devices.cpu``: cores and RAM (MiB) summed over the hosts; offline when
    no host reported."""
    online = False
    cpus = total = used = free = 0
    for snap in snapshots:
        if not snap.cpu.online:
            continue
        online = True
        cpus += snap.cpu.cpu_count
        total += snap.cpu.memory_total
        used += snap.cpu.memory_used
        free += snap.cpu.memory_free
    return {
        "online": online,
        "info": {"cpu_count": cpus, "memory_total": total, "memory_used": used, "memory_free": free},
    }


def host_detail(snapshot: DeviceSnapshot) -> dict:
    """One host's entry under ``hosts`` in ``/api/devices/info``: the snapshot, per GPU."""
    return {
        "host": snapshot.host,
        "ts": snapshot.ts,
        "cuda": msgspec.to_builtins(snapshot.cuda),
        "cpu": msgspec.to_builtins(snapshot.cpu),
    }
