"""Statistics: percentiles and medians that tolerate empty lists and NaN, and ``Run``, what
one closed-loop run against one target measured."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def median(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


@dataclass
class Run:
    """What one closed-loop run against one target measured."""

    target: str
    n: int = 0
    errors: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)  # s
    ttfts: list[float] = field(default_factory=list)  # s
    gaps: list[float] = field(default_factory=list)  # s, between token frames
    frames: int = 0
    cpu_us: float = float("nan")  # CPU of the watched process per answered request
    error_samples: list[str] = field(default_factory=list)

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(what)

    def summary(self) -> dict[str, float]:
        out = {"n": self.n, "errors": self.errors, "rps": self.n / self.seconds if self.seconds else 0.0,
               "p50_ms": pct(self.latencies, 0.5) * 1e3, "p99_ms": pct(self.latencies, 0.99) * 1e3}
        if self.ttfts:
            out.update(ttft_p50_ms=pct(self.ttfts, 0.5) * 1e3, ttft_p99_ms=pct(self.ttfts, 0.99) * 1e3)
        if self.gaps:
            out.update(gap_p50_ms=pct(self.gaps, 0.5) * 1e3, gap_p99_ms=pct(self.gaps, 0.99) * 1e3)
        if self.frames:  # every SSE frame that arrived within the window, whole streams or not
            out["chunks_per_s"] = self.frames / self.seconds if self.seconds else 0.0
        if self.cpu_us == self.cpu_us:
            out["cpu_us"] = self.cpu_us
        if self.error_samples:
            out["error_samples"] = self.error_samples
        return out
