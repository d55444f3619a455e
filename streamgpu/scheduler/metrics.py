"""Per-model counters and recent-latency samples, read programmatically (and later over HTTP)."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from streamgpu.metrics import Histogram

_SAMPLES = 4096  # recent samples kept per series: enough for stable p99, bounded memory


def percentiles(
    samples: collections.deque[float] | list[float], qs: tuple[float, ...] = (50, 90, 99)
) -> dict[str, float]:
    """``{"p50": ..., ...}`` over the samples (empty dict when there are none)."""
    if not samples:
        return {}
    values = np.percentile(np.fromiter(samples, dtype=np.float64), qs)
    return {f"p{q:g}": float(v) for q, v in zip(qs, values, strict=True)}


@dataclass
class ModelMetrics:
    """What happened to one model's frames. Times are in microseconds."""

    accepted: int = 0
    completed: int = 0
    failed: int = 0
    rejected_overloaded: int = 0
    deadline_missed: int = 0
    superseded: int = 0
    abandoned: int = 0  # producer disconnected before its frame ran
    batches: int = 0
    batch_sizes: collections.Counter[int] = field(default_factory=collections.Counter)
    queue_wait_us: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=_SAMPLES))
    transfer_us: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=_SAMPLES))
    compute_us: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=_SAMPLES))
    total_us: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=_SAMPLES))  # OK frames
    # Cumulative histograms for /metrics (seconds): end to end and queue per OK frame, transfer and compute per batch.
    e2e_s: Histogram = field(default_factory=Histogram)
    queue_s: Histogram = field(default_factory=Histogram)
    transfer_s: Histogram = field(default_factory=Histogram)
    compute_s: Histogram = field(default_factory=Histogram)
    target_unmeetable: int = 0  # dispatches where no batch size could meet the latency target
    last_completed_ms: int = 0  # wall clock (ms since the epoch) of the last batch that completed; 0: none yet

    def snapshot(self, queue_length: int, in_flight_batches: int) -> dict[str, Any]:
        return {
            "queue_length": queue_length,
            "in_flight_batches": in_flight_batches,
            "accepted": self.accepted,
            "completed": self.completed,
            "failed": self.failed,
            "rejected_overloaded": self.rejected_overloaded,
            "deadline_missed": self.deadline_missed,
            "superseded": self.superseded,
            "abandoned": self.abandoned,
            "batches": self.batches,
            "batch_sizes": dict(sorted(self.batch_sizes.items())),
            "target_unmeetable": self.target_unmeetable,
            "queue_wait_us": percentiles(self.queue_wait_us),
            "transfer_us": percentiles(self.transfer_us),
            "compute_us": percentiles(self.compute_us),
            "total_us": percentiles(self.total_us),
        }
