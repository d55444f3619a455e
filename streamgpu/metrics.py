"""Cumulative counters for ``/metrics``: histograms with fixed buckets and replies by model and status.

Pure Python with no locks and no allocation per observation: everything runs on the one
loop thread, and ``/metrics`` reads the numbers at scrape time (``streamgpu.web.metrics``
turns them into Prometheus metric families). Each fact has one owner: a model's times and
batch sizes live in its ``scheduler.metrics.ModelMetrics``; replies by status in the
``Admission``'s ``ReplyCounts``.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator

import numpy as np

from streamgpu.protocol.wire import Status

# Seconds: 100 us .. 10 s, roughly 1-2.5-5 per decade (Prometheus' defaults start at 5 ms: too coarse here).
LATENCY_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                     2.5, 5.0, 10.0)  # fmt: skip
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Replies that happen before a model is known (handshakes, broken framing) or name no served model.
NO_MODEL = ""


class Histogram:
    """Counts of observations per bucket (``le`` upper bounds, then +Inf), and their sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS_S) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def observe_many(self, value: float, n: int) -> None:
        """``n`` observations of ``value``."""
        self.counts[bisect.bisect_left(self.bounds, value)] += n
        self.sum += value * n

    def observe_all(self, values: np.ndarray) -> None:
        """One observation per element of ``values`` (a batch's frames: one call instead of one per frame)."""
        if len(values) < 8:  # numpy's fixed cost is more than a few bisects
            for value in values.tolist():
                self.observe(value)
            return
        where = np.bincount(np.searchsorted(self.bounds, values, "left"), minlength=len(self.counts))
        for i, n in enumerate(where.tolist()):
            if n:
                self.counts[i] += n
        self.sum += float(values.sum())

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, int]]:
        """``[(le, observations <= le), ..., ("+Inf", all)]``, as Prometheus exposes a histogram."""
        out, total = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += n
            out.append(("+Inf" if bound == float("inf") else f"{bound:g}", total))
        return out


class ReplyCounts:
    """Every reply the server sent, by model and status (frames, refusals, handshake and connection replies).

    A reply for a name no model serves (or before any model is known) counts under ``NO_MODEL``,
    so a producer sending random model names cannot grow the label set.
    """

    def __init__(self, models: Iterable[str]) -> None:
        self._by_model: dict[str, list[int]] = {}
        self.add((*models, NO_MODEL))
        self._none = self._by_model[NO_MODEL]

    def add(self, models: Iterable[str]) -> None:
        """Count replies for ``models`` under their own names from now on (models loaded while serving)."""
        for name in models:
            self._by_model.setdefault(name, [0] * (max(Status) + 1))

    def count(self, model: str, status: int, n: int = 1) -> None:
        self._by_model.get(model, self._none)[status] += n

    def items(self) -> Iterator[tuple[str, Status, int]]:
        """(model, status, count) for every count above zero."""
        for model, counts in self._by_model.items():
            for status in Status:
                if counts[status]:
                    yield model, status, counts[status]

    def total(self, status: Status) -> int:
        return sum(counts[status] for counts in self._by_model.values())
