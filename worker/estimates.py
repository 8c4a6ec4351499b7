"""This host's estimates of its models' VRAM from their files (``llm_router.estimate``).

A model never run here and declared without ``vram_mb`` is placed with its estimate, and the
catalog publishes it (``CatalogEntry.estimated_vram_mb``) so routers rank hosts with the same
figure. Engines that take a fraction of the GPU (vLLM, SGLang) need that fraction of this host's
GPU: the largest GPU of the last device reading stands in for "a GPU of this host" in the catalog
(placement uses the reading it places with).
"""

from __future__ import annotations

import msgspec
from llm_lab_router.config import ModelConfig
from llm_lab_router.estimate import Estimate, Estimator, estimated_mb, profile_estimates
from llm_lab_router.protocol import CatalogEntry, DeviceSnapshot


def largest_gpu_mb(snapshot: DeviceSnapshot | None) -> int:
    """The memory of this host's largest GPU (MiB; 0 without GPU information)."""
    if snapshot is None or not snapshot.cuda.online:
        return 0
    return max((g.memory_total for g in snapshot.cuda.gpus), default=0)


class FileEstimates:
    """Estimates of one worker's models (cached: a header is read once per file version)."""

    def __init__(self, config_dir: str) -> None:
        self.config_dir = config_dir
        self.estimator = Estimator()
        self.gpu_mb = 0  # the largest GPU of the last reading (``observe``)

    def of(self, model: ModelConfig) -> list[Estimate | str | None]:
        """Per device profile: the estimate, why there is none, or None (CPU profile)."""
        return profile_estimates(model, self.config_dir, self.estimator)

    def mb(self, model: ModelConfig, snapshot: DeviceSnapshot | None = None) -> list[int]:
        """MiB per profile on a GPU of ``snapshot`` (else of the last reading); 0 = none."""
        gpu = largest_gpu_mb(snapshot) if snapshot is not None else self.gpu_mb
        return estimated_mb(self.of(model), gpu)

    def observe(self, snapshot: DeviceSnapshot) -> bool:
        """Remember this host's largest GPU; True when it changed (the catalog is outdated)."""
        gpu = largest_gpu_mb(snapshot)
        changed, self.gpu_mb = gpu != self.gpu_mb, gpu
        return changed

    def annotate(self, entry: CatalogEntry, model: ModelConfig) -> CatalogEntry:
        """``entry`` with the estimate of each profile."""
        return msgspec.structs.replace(entry, estimated_vram_mb=self.mb(model))
