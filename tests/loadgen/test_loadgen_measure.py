"""Percentiles, windows, stability and summaries (pure functions)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamgpu.loadgen.config import CONCURRENCY, Endpoint, LoadLevel, RunConfig
from streamgpu.loadgen.measure import (
    STAGES,
    Window,
    WindowPolicy,
    is_stable,
    merge,
    merge_consecutive,
    percentile,
    percentiles,
    summarize,
)
from streamgpu.loadgen.report import RunReport


def window(
    latencies: list[float],
    *,
    start: float = 0.0,
    end: float = 1.0,
    sent: int | None = None,
    lags: list[float] | None = None,
    statuses: dict[str, int] | None = None,
    cpu: float = 0.1,
) -> Window:
    lat = np.array(latencies, dtype=np.float64)
    return Window(
        start=start, end=end, latencies=lat, statuses=statuses or {"OK": lat.size},
        stages=np.tile(np.arange(len(STAGES), dtype=np.uint32), (lat.size, 1)), sent=lat.size if sent is None else sent,
        lags=np.array(lags or [], dtype=np.float64), cpu_s=cpu,
    )  # fmt: skip


def test_percentiles_of_1_to_100_are_the_rank() -> None:
    values = np.arange(100, 0, -1, dtype=np.float64)  # unsorted on purpose
    assert percentiles(values, [1, 50, 90, 95, 99, 100]) == [1, 50, 90, 95, 99, 100]


def test_percentiles_of_small_arrays() -> None:
    assert percentile([7.0], 50) == 7.0
    assert percentile([7.0], 99) == 7.0
    assert percentiles([1.0, 2.0], [50, 51, 100]) == [1.0, 2.0, 2.0]
    # 10 values: p90 is the 9th, p91..p100 the 10th (nearest rank, no interpolation)
    ten = [float(v) for v in range(10, 110, 10)]
    assert percentiles(ten, [10, 50, 90, 91, 99]) == [10, 50, 90, 100, 100]
    assert percentile([3.0, 1.0, 2.0], 29) == 1.0  # ceil(0.87) = 1: float noise must not push it to rank 2
    assert math.isnan(percentile([], 50))


@pytest.mark.parametrize("p", [0, -1, 100.5, float("nan")])
def test_percentile_rejects_out_of_range(p: float) -> None:
    with pytest.raises(ValueError, match="percentile"):
        percentile([1.0], p)


@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=200), st.sampled_from([1, 50, 90, 95, 99]))
def test_percentile_matches_numpy_inverted_cdf(values: list[float], p: int) -> None:
    assert percentile(values, p) == np.percentile(values, p, method="inverted_cdf")


def test_merge_concatenates_raw_latencies() -> None:
    a = window([0.001] * 90, start=0.0, end=1.0, statuses={"OK": 90, "OVERLOADED": 5})
    b = window([0.1] * 10, start=0.1, end=1.1, statuses={"OK": 10, "ERROR": 1})
    m = merge([a, b])
    assert m.ok == 100 and m.processes == 2
    assert m.statuses == {"OK": 100, "OVERLOADED": 5, "ERROR": 1}
    assert (m.start, m.end) == (0.0, 1.1)
    assert percentile(m.latencies, 90) == 0.001 and percentile(m.latencies, 91) == 0.1
    assert m.cpu_s == pytest.approx(0.2)


def test_stability_rule_and_policy() -> None:
    steady = [window([0.01] * 100) for _ in range(3)]
    assert is_stable(steady, 10)
    assert not is_stable(steady[:2], 10)
    jumpy = [*steady[:2], window([0.01] * 150)]
    assert not is_stable(jumpy, 10)
    slow = [*steady[:2], window([0.02] * 100)]
    assert not is_stable(slow, 10)
    policy = WindowPolicy(tolerance_pct=10, max_windows=4)
    assert not policy.add(window([0.01] * 100))
    assert not policy.add(window([0.01] * 300))
    assert not policy.add(window([0.01] * 100))
    assert policy.add(window([0.01] * 100))  # max windows reached, not stable
    assert not policy.stable
    assert policy.result_window().ok == 500  # the last three windows
    assert WindowPolicy(fixed=True).add(window([0.01]))


def test_all_rejected_windows_are_stable() -> None:
    empty = [window([], statuses={"OVERLOADED": 50}) for _ in range(3)]
    assert is_stable(empty, 10)


def test_summarize_figures_and_behind() -> None:
    w = window([0.002] * 99 + [0.05], end=2.0, sent=100, lags=[0.0001] * 100, cpu=0.5)
    r = summarize(w, endpoint="x:1", mode="rate", level=50, windows=1, stable=True)
    assert r.throughput == 50 and r.send_rate == 50
    assert r.latency["p50"] == 0.002 and r.latency["p99"] == 0.002 and r.latency["max"] == 0.05
    assert r.server_us["queue_us"] == 1  # each reply's stages are their index
    assert r.cpu_cores == 0.25
    assert not r.behind
    assert summarize(w, endpoint="x:1", mode="rate", level=60, windows=1, stable=True).behind  # sent 50/s of 60
    late = window([0.002] * 100, end=2.0, sent=100, lags=[0.05] * 100)
    assert summarize(late, endpoint="x:1", mode="rate", level=50, windows=1, stable=True).behind
    closed = summarize(w, endpoint="x:1", mode="concurrency", level=4, windows=1, stable=True)
    assert not closed.behind and math.isnan(closed.send_lag_p99_s)


def test_the_tail_is_attributed_to_the_stages_of_the_slowest_replies_across_merged_processes() -> None:
    # Two processes' windows: the slowest replies (one in one, two in the other) queued 900 us in the server; the
    # rest 10 us.
    def process(latencies: list[float]) -> Window:
        w = window(latencies)
        w.stages = np.zeros((len(latencies), len(STAGES)), np.uint32)
        w.stages[:, STAGES.index("queue_us")] = [900 if lat > 0.004 else 10 for lat in latencies]
        w.stages[:, STAGES.index("total_us")] = [1000 if lat > 0.004 else 100 for lat in latencies]
        return w

    merged = merge([process([0.001] * 99 + [0.005]), process([0.006, 0.007] + [0.002] * 98)])
    r = summarize(merged, endpoint="x:1", mode="concurrency", level=2, windows=1, stable=True)
    assert r.latency["p99"] == 0.005 and r.latency["tail"] == pytest.approx(0.006)  # the 3 of 200 at or above p99
    assert r.server_tail_us["queue_us"] == 900 and r.server_tail_us["total_us"] == 1000
    assert r.server_us["queue_us"] == (3 * 900 + 197 * 10) / 200
    empty = summarize(window([], statuses={"OVERLOADED": 5}), endpoint="x:1", mode="rate", level=5, windows=1,
                      stable=True)  # fmt: skip
    assert math.isnan(empty.latency["tail"]) and math.isnan(empty.server_tail_us["queue_us"])


def test_one_saturated_generator_among_idle_ones_is_warned_of() -> None:
    # The warning divided all processes' CPU by their number: one process at 100 % of a core beside three idle
    # ones read as 31 %, and nobody was told that it held the load back.
    def second(start: float, busy_cpu: float) -> Window:  # four processes' windows over one second
        return merge([window([0.001], start=start, end=start + 1, cpu=cpu) for cpu in (busy_cpu, 0.08, 0.08, 0.08)])

    idle = [window([0.001], cpu=0.08) for _ in range(3)]
    level = summarize(merge_consecutive([second(0, 0.5), second(1, 1.0)]), endpoint="x:1", mode="concurrency",
                      level=4, windows=2, stable=True)  # fmt: skip
    assert level.busiest_cpu == 1.0 and level.cpu_cores == pytest.approx(0.99)
    cfg = RunConfig(endpoints=[Endpoint("x", 1)], levels=[LoadLevel(CONCURRENCY, 4)])
    warnings = RunReport.build(cfg, [level], [], started=0.0).warnings
    assert any("busiest generator process used 100 % of a core" in w for w in warnings), warnings
    calm = summarize(merge(idle), endpoint="x:1", mode="concurrency", level=4, windows=1, stable=True)
    assert not RunReport.build(cfg, [calm], [], started=0.0).warnings
