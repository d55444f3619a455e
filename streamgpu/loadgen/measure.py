"""Measurement windows, percentiles, stability and merging of raw results.

Everything here is pure (no I/O, no asyncio) so it can be unit-tested and used
both inside one generator process and by the parent that merges the windows
of several generator processes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from streamgpu.protocol.wire import Timings

#: Percentiles reported for latency, as in perf_analyzer.
PERCENTILES: tuple[int, ...] = (50, 90, 95, 99)

#: Server-side stage fields of ``wire.Timings``, in its order (the columns of ``Window.stages``).
STAGES: tuple[str, ...] = Timings._fields

#: Status name under which transport failures (an exception instead of a reply) are counted.
ERROR = "ERROR"


def percentile(values: np.ndarray | Sequence[float], p: float) -> float:
    """Nearest-rank percentile: the smallest value with at least ``p`` % of values <= it.

    ``p`` is in (0, 100]; p=100 is the maximum. Returns NaN for no values.
    Equals ``numpy.percentile(values, p, method="inverted_cdf")``.
    """
    return percentiles(values, (p,))[0]


def percentiles(values: np.ndarray | Sequence[float], ps: Iterable[float]) -> list[float]:
    """Nearest-rank percentiles of ``values`` for each ``p`` in ``ps`` (one sort)."""
    ps = list(ps)
    for p in ps:
        if not 0 < p <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {p}")
    arr = np.sort(np.asarray(values, dtype=np.float64), kind="stable")
    n = arr.size
    if n == 0:
        return [math.nan] * len(ps)
    # rank = ceil(p/100 * n), 1-based; the small epsilon stops 0.29*100 = 28.999... from rounding up.
    return [float(arr[max(0, math.ceil(p * n / 100 - 1e-9) - 1)]) for p in ps]


@dataclass
class Window:
    """Raw results of one measurement window (of one process, or merged over several).

    Latencies and stage timings cover OK replies only; ``statuses`` counts
    every reply (and transport errors) by status name.
    """

    start: float  # time.monotonic() seconds, comparable between processes on one host
    end: float
    latencies: np.ndarray  # seconds, float64, OK replies completed in the window
    statuses: dict[str, int]
    stages: np.ndarray  # uint32[OK replies, len(STAGES)]: each OK reply's server stages, in the order of latencies
    sent: int  # frames sent in the window
    lags: np.ndarray  # open loop: seconds each send was late against its schedule
    cpu_s: float  # process CPU seconds used in the window, summed over processes
    processes: int = 1
    # The busiest process's CPU seconds per second (of its busiest window, once consecutive ones are merged): an
    # average over processes would hide one saturated generator among idle ones. NaN: the window's own share.
    busiest_cpu: float = math.nan
    messages: dict[str, str] = field(default_factory=dict)  # first reply message per non-OK status
    # Open-loop --count window: seconds its schedule took to send (the window runs on to the last reply)
    send_s: float | None = None

    def __post_init__(self) -> None:
        if math.isnan(self.busiest_cpu):
            self.busiest_cpu = self.cpu_s / self.duration

    @property
    def duration(self) -> float:
        return max(self.end - self.start, 1e-9)

    @property
    def ok(self) -> int:
        return int(self.latencies.size)

    @property
    def completed(self) -> int:
        return sum(self.statuses.values())

    @property
    def throughput(self) -> float:
        """OK replies per second."""
        return self.ok / self.duration

    @property
    def mean_latency(self) -> float:
        return float(self.latencies.mean()) if self.latencies.size else math.nan


def merge(windows: Sequence[Window]) -> Window:
    """Merge windows, whether of different processes at the same time or consecutive ones.

    The merged window spans from the earliest start to the latest end; raw
    latencies are concatenated so percentiles are computed over all of them.
    Consecutive windows of one process must be merged with ``processes`` kept:
    use :func:`merge_consecutive` for that.
    """
    if not windows:
        raise ValueError("nothing to merge")
    statuses: dict[str, int] = {}
    messages: dict[str, str] = {}
    for w in windows:
        for name, n in w.statuses.items():
            statuses[name] = statuses.get(name, 0) + n
        for name, text in w.messages.items():
            messages.setdefault(name, text)
    return Window(
        start=min(w.start for w in windows),
        end=max(w.end for w in windows),
        latencies=np.concatenate([w.latencies for w in windows]),
        statuses=statuses,
        stages=np.concatenate([w.stages for w in windows]),
        sent=sum(w.sent for w in windows),
        lags=np.concatenate([w.lags for w in windows]),
        cpu_s=sum(w.cpu_s for w in windows),
        processes=sum(w.processes for w in windows),
        busiest_cpu=max(w.busiest_cpu for w in windows),
        messages=messages,
        send_s=None if any(w.send_s is None for w in windows) else max(w.send_s or 0.0 for w in windows),
    )


def merge_consecutive(windows: Sequence[Window]) -> Window:
    """Merge consecutive windows of the same set of processes (keeps ``processes``)."""
    merged = merge(windows)
    merged.processes = windows[0].processes
    return merged


def is_stable(windows: Sequence[Window], tolerance_pct: float, count: int = 3, pct: float | None = None) -> bool:
    """perf_analyzer's rule: the last ``count`` windows' throughput and mean latency (the ``pct``
    percentile latency when given, as perf_analyzer's --percentile) each lie within ``tolerance_pct``
    % of their average."""
    if len(windows) < count:
        return False
    last = windows[-count:]
    latencies = [w.mean_latency if pct is None else percentile(w.latencies, pct) for w in last]
    return _within([w.throughput for w in last], tolerance_pct) and _within(latencies, tolerance_pct)


def _within(values: list[float], tolerance_pct: float) -> bool:
    if all(v == 0 or math.isnan(v) for v in values):
        return all(v == 0 for v in values) or all(math.isnan(v) for v in values)
    if any(math.isnan(v) for v in values):
        return False
    mean = sum(values) / len(values)
    return all(abs(v - mean) <= mean * tolerance_pct / 100 for v in values)


@dataclass
class WindowPolicy:
    """Decides when a load level has been measured enough.

    ``fixed`` (a --duration or --count run) takes the first window as it is;
    otherwise windows continue until the last ``stable_windows`` are stable or
    ``max_windows`` were taken.
    """

    tolerance_pct: float = 10.0
    max_windows: int = 10
    stable_windows: int = 3
    fixed: bool = False
    percentile: float | None = None  # judge latency stability by this percentile (None: the mean)
    windows: list[Window] = field(default_factory=list)

    def add(self, window: Window) -> bool:
        """Record a window; True when measuring should stop."""
        self.windows.append(window)
        return (
            self.fixed
            or len(self.windows) >= self.max_windows
            or is_stable(self.windows, self.tolerance_pct, self.stable_windows, self.percentile)
        )

    @property
    def stable(self) -> bool:
        return self.fixed or is_stable(self.windows, self.tolerance_pct, self.stable_windows, self.percentile)

    def result_window(self) -> Window:
        """The windows the figures come from: the last ``stable_windows`` ones, merged."""
        if not self.windows:
            raise ValueError("no window was measured")
        return merge_consecutive(self.windows[-self.stable_windows :])


@dataclass
class LevelResult:
    """The figures of one load level against one endpoint (latencies in seconds)."""

    endpoint: str
    mode: str  # "concurrency" or "rate"
    level: float  # frames in flight, or target frames/s
    throughput: float  # OK replies per second
    latency: dict[str, float]  # mean, min, max, p50, p90, p95, p99; tail: the mean of those at or above p99
    server_us: dict[str, float]  # mean server time per stage (STAGES), OK replies
    # The same over the slowest replies (latency at or above p99): where the tail's time went, in the server or
    # outside it (latency minus total_us: the network, the client, an ingest worker's hand-over)
    server_tail_us: dict[str, float]
    statuses: dict[str, int]
    sent: int
    completed: int
    duration_s: float
    send_rate: float
    send_lag_p99_s: float  # open loop only, NaN in closed loop
    behind: bool  # open loop: the generator could not keep its schedule
    cpu_cores: float  # generator CPU seconds per wall second, all processes
    busiest_cpu: float  # the busiest generator process's CPU seconds per second (Window.busiest_cpu)
    processes: int
    windows: int
    stable: bool
    messages: dict[str, str] = field(default_factory=dict)  # first reply message per non-OK status


def _stage_means(stages: np.ndarray) -> dict[str, float]:
    means = stages.mean(axis=0, dtype=np.float64) if len(stages) else [math.nan] * len(STAGES)
    return {name: float(m) for name, m in zip(STAGES, means, strict=True)}


def summarize(
    window: Window,
    *,
    endpoint: str,
    mode: str,
    level: float,
    windows: int,
    stable: bool,
    max_lag_s: float = 0.01,
    rate_tolerance: float = 0.05,
    extra_percentile: float | None = None,
) -> LevelResult:
    """Turn a (merged) window into a LevelResult.

    In open loop (mode "rate"), ``behind`` is set when the achieved send rate is
    more than ``rate_tolerance`` below the target (not judged over a --count
    window) or the p99 send lag exceeds ``max_lag_s``. The send rate is taken
    over the window, or over the sending of a --count window's frames.
    """
    lat = window.latencies
    qs = (*PERCENTILES, extra_percentile) if extra_percentile is not None else PERCENTILES
    p = percentiles(lat, qs)
    slowest = lat >= p[PERCENTILES.index(99)] if lat.size else np.zeros(0, bool)
    latency = {
        "mean": window.mean_latency,
        "min": float(lat.min()) if lat.size else math.nan,
        "max": float(lat.max()) if lat.size else math.nan,
        **{f"p{q:g}": v for q, v in zip(qs, p, strict=True)},
        "tail": float(lat[slowest].mean()) if lat.size else math.nan,  # the mean of the slowest (p99 and above)
    }
    send_rate = window.sent / (window.send_s or window.duration)
    lag_p99 = percentile(window.lags, 99) if mode == "rate" else math.nan
    # (a --count window's few sends span little: 1 ms of lag, within --max-lag-ms, is 5 % of 20 frames at 1000/s)
    short_of_rate = window.send_s is None and send_rate < level * (1 - rate_tolerance)
    behind = mode == "rate" and (short_of_rate or (not math.isnan(lag_p99) and lag_p99 > max_lag_s))
    return LevelResult(
        endpoint=endpoint,
        mode=mode,
        level=level,
        throughput=window.throughput,
        latency=latency,
        server_us=_stage_means(window.stages),
        server_tail_us=_stage_means(window.stages[slowest]),
        statuses=dict(sorted(window.statuses.items())),
        sent=window.sent,
        completed=window.completed,
        duration_s=window.duration,
        send_rate=send_rate,
        send_lag_p99_s=lag_p99,
        behind=behind,
        cpu_cores=window.cpu_s / window.duration,
        busiest_cpu=window.busiest_cpu,
        processes=window.processes,
        windows=windows,
        stable=stable,
        messages=dict(window.messages),
    )
