"""tools/bench_swap.py's ``--attribute-stalls``: the loader's long calls are recorded with their pauses left out,
attributed the loop lag they overlap, and a short CPU run records the loads it swaps in; ``--time-loop-calls``
times the calling thread's calls only, and puts them in the windows they started in."""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
from bench_swap import LoopCallTimer, PhaseRecorder, StallRecorder, attribute, bench, table


def busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def step() -> None:
    busy(0.005)


def test_long_calls_are_recorded_with_the_pacing_pauses_left_out() -> None:
    recorder = StallRecorder()

    def pacing(frame: FrameType, event: str, arg: Any) -> None:  # a stand-in for manager._yielding's hook
        if event == "call" and frame.f_code.co_name == "busy":
            time.sleep(0.05)

    def loader() -> None:
        sys.setprofile(pacing)
        with recorder.recording():
            time.sleep(0.003)
            step()
        assert sys.getprofile() is pacing  # the chained hook is back
        sys.setprofile(None)

    thread = threading.Thread(target=loader)
    thread.start()
    thread.join()
    calls = {name: (running, caller) for _, _, running, name, caller in recorder.calls}
    assert {"time.sleep [C]", "test_bench_swap.step", "test_bench_swap.busy"} <= set(calls)
    assert len(recorder.calls) < 10  # not busy's thousand short calls (only one that waited for the GIL, if any)
    assert calls["time.sleep [C]"][1].endswith(f"test_bench_swap.py:{loader.__code__.co_firstlineno + 3}")
    assert calls["test_bench_swap.step"][0] < 0.05  # the 50 ms pause inside it is left out
    assert sum(b - a >= 0.05 for a, b in recorder.pauses) == 1  # (and any wait for the GIL over PAUSED_S)


def test_the_loop_calls_timed_are_the_calling_threads_by_the_window_they_started_in() -> None:
    from streamgpu.memory.pool import SlotPool

    pool = SlotPool(np.zeros(1 << 16, np.uint8))
    timer = LoopCallTimer()
    with timer.installed():
        first = time.monotonic()
        pool.release(pool.reserve(256))  # type: ignore[arg-type]
        between = time.monotonic()
        for _ in range(3):
            pool.release(pool.reserve(256))  # type: ignore[arg-type]
        other = threading.Thread(target=lambda: pool.release(pool.reserve(256)))  # type: ignore[arg-type]
        other.start()
        other.join()
    pool.release(pool.reserve(256))  # type: ignore[arg-type]  # (not timed: uninstalled)
    assert len(timer.calls["SlotPool.release"]) == 4
    summary = timer.summary([(first, between)])["SlotPool.release"]
    assert summary["calls"] == 1 and 0 < summary["p50_us"] < 1e5 and summary["over_1ms_ms"] == 0
    assert timer.summary([(between, time.monotonic())])["SlotPool.release"]["calls"] == 3


def test_loop_lag_is_put_on_the_calls_it_overlaps_less_the_pauses() -> None:
    recorder = StallRecorder()
    recorder.offset = 0.0
    recorder.calls = [
        (10.0, 20.0, 8.0, "outer", "a.py:1"),
        (11.0, 19.0, 6.0, "outer", "b.py:2"),  # recursive: counted in the outer call's time and lag
        (12.0, 14.0, 2.0, "c_call", "b.py:3"),
    ]
    recorder.pauses = [(15.0, 17.0)]
    report = attribute(recorder, [(9.0, 13.0, 0.0), (14.0, 18.0, 2.0), (30.0, 31.0, 1.5)])
    rows = {r["name"]: r for r in report["rows"]}
    assert [r["name"] for r in report["rows"]] == ["outer", "c_call"]
    assert rows["outer"]["count"] == 2 and rows["outer"]["total_ms"] == 8e3 and rows["outer"]["max_ms"] == 8e3
    assert rows["outer"]["lag_ms"] == pytest.approx(5e3)  # 10-13, 14-15 and 17-18 (15-17 paused)
    assert rows["c_call"]["lag_ms"] == pytest.approx(1e3)
    assert rows["outer"]["callers"] == [("a.py:1", 1), ("b.py:2", 1)]
    assert report["events"] == 3 and report["lag_ms"] == pytest.approx(9e3) and report["loop_ran_ms"] == 3e3
    assert report["in_long_calls_ms"] == pytest.approx(5e3)
    assert report["in_pauses_ms"] == pytest.approx(2e3) and report["in_neither_ms"] == pytest.approx(2e3)


def short_cpu_run(**settings: object) -> argparse.Namespace:
    """bench_swap's arguments for a run of a second or two on the CPU backend (``settings`` over them)."""
    args = argparse.Namespace(
        device="cpu", model="builtin:small", precision="fp32", shape="32,32,3", max_batch=8, compile="off", swaps=2,
        connections=1, window=4, warmup_s=0.1, steady_s=0.3, between_s=0.1, ingest_workers=0, loader_share=None,
        attribute_stalls=False, time_loop_calls=False, attribute_phases=False, swap_arch=None, weights_in_place="off",
        loop_cpu=-1, offset_ms=20.0,
    )  # fmt: skip
    vars(args).update(settings)
    return args


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
async def test_a_short_cpu_run_attributes_the_swaps_lag() -> None:
    args = short_cpu_run(precision="fp16", between_s=0.15, attribute_stalls=True, time_loop_calls=True,
                         attribute_phases=True)  # fmt: skip
    result = await bench(args)
    assert result["swaps_in_place"] == 0
    phases = result["phases"]
    assert phases["build module (CPU only)"]["seconds"] > 0  # the CPU backend's loads build their module too
    assert {"none", "collector, generation 2"} <= phases.keys()
    stalls = result["stalls"]
    assert 0 < result["p50_steady_ms"] <= result["p99_steady_ms"]
    assert "p50 during swaps vs steady" in table(result)
    # Frames sent between the swaps, from 50 ms after each to the next (between_s 0.15: 0.1 s after each)
    assert result["frames_between_swaps"] > 0 and "p99 during swaps vs between them" in table(result)
    # Every frame sent during a swap is in one bin of when it was sent from the swap's start
    assert sum(row["frames"] for row in result["by_offset"]) == result["frames_during_swaps"]
    assert [row["from_ms"] for row in result["by_offset"]] == sorted(row["from_ms"] for row in result["by_offset"])
    assert result["loop_calls"]["steady"]["SlotPool.release"]["calls"] > 0  # (the CPU backend makes no driver calls)
    assert stalls["slow_loop_calls"]["events"] == 0
    names = {r["name"] for r in stalls["swaps"]["rows"]}
    assert "streamgpu.models.loader.load_module" in names  # the paced load was recorded, through _yielding
    for phase in ("loading", "switch_to_freed"):
        p = stalls[phase]
        assert p["in_long_calls_ms"] + p["in_pauses_ms"] + p["in_neither_ms"] == pytest.approx(p["lag_ms"])


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
async def test_swaps_by_weights_in_place_are_told_apart_by_the_weights_each_batch_ran_on() -> None:
    """An in-place swap keeps the serving instances: the idle gap at each swap is found from the weights each
    traced batch was launched on (with instances alone, no swap had an old and a new version to compare)."""
    result = await bench(short_cpu_run(swaps=3, weights_in_place="on"))
    assert result["swaps_in_place"] == 3 and result["frames_failed_or_refused"] == 0
    assert len(result["swap_gap_us"]["all"]) == 3
    assert "3 of 3" in table(result)


def test_frames_are_attributed_to_every_load_phase_their_time_in_the_server_overlapped() -> None:
    recorder = PhaseRecorder()
    recorder.spans = [(10.0, 11.0, "eager warm-up"), (11.0, 12.0, "graph capture")]
    recorder.collections = [(10.5, 10.503, 2), (1.0, 1.2, 2)]  # the second one outside the swaps
    records = [
        (10.2, 0.1, 0),  # in the warm-up
        (10.9, 0.2, 0),  # across both
        (12.5, 0.01, 0),  # in the swap, in no phase
        (11.5, 0.05, 1),  # failed: not counted
        (5.0, 0.01, 0),  # outside the swaps
    ]
    lags = [(10.9, 0.4, 0.0), (11.9, 0.002, 0.0)]  # ticks (monotonic s, seconds late, CPU s)
    summary = recorder.summary(records, [(10.0, 13.0)], lags)
    assert summary["eager warm-up"]["frames"] == 2 and summary["graph capture"]["frames"] == 1
    assert summary["none"]["frames"] == 1 and summary["none"]["p99_ms"] == pytest.approx(10.0)
    assert summary["eager warm-up"]["loop_lag_max_ms"] == pytest.approx(400.0)  # late from 10.5 s to 10.9 s
    assert summary["graph capture"]["loop_lag_max_ms"] == pytest.approx(2.0)
    assert summary["collector, generation 2"]["frames"] == 1  # (its runs: one in the swaps)
    assert summary["collector, generation 2"]["loop_lag_max_ms"] == pytest.approx(3.0)
