"""Live estimates of how long a batch of each size takes, from measured completions."""

from __future__ import annotations

import bisect

_ALPHA = 0.2  # EWMA weight of a new measurement: follows drift within ~10 batches, smooths jitter


class BatchLatency:
    """Per-batch-size EWMA of batch latency (launch to results on the host), in seconds.

    Sizes never measured are interpolated linearly between measured neighbours
    (extrapolated from the nearest one, proportionally to size, above the
    largest); with no measurement at all the estimate is 0 (optimistic until
    the first batch completes).
    """

    def __init__(self) -> None:
        self._sizes: list[int] = []
        self._seconds: dict[int, float] = {}

    def observe(self, size: int, seconds: float) -> None:
        old = self._seconds.get(size)
        if old is None:
            bisect.insort(self._sizes, size)
            self._seconds[size] = seconds
        else:
            self._seconds[size] = old + _ALPHA * (seconds - old)

    @property
    def measured(self) -> bool:
        """Whether any batch has been measured (before that every estimate is 0)."""
        return bool(self._sizes)

    def estimate(self, size: int) -> float:
        if size in self._seconds:
            return self._seconds[size]
        if not self._sizes:
            return 0.0
        i = bisect.bisect_left(self._sizes, size)
        if i == 0:
            return self._seconds[self._sizes[0]]  # smaller batches are not faster than the smallest seen
        if i == len(self._sizes):
            top = self._sizes[-1]
            return self._seconds[top] * size / top
        lo, hi = self._sizes[i - 1], self._sizes[i]
        t_lo, t_hi = self._seconds[lo], self._seconds[hi]
        return t_lo + (t_hi - t_lo) * (size - lo) / (hi - lo)

    def snapshot(self) -> dict[int, float]:
        """Measured sizes -> estimated milliseconds."""
        return {size: round(self._seconds[size] * 1e3, 3) for size in self._sizes}
