"""tools/bench_interference.py: a short CPU run puts each kind of work in its own window after a steady one, and
the paced Python leaves the loop more than the unpaced."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
from bench_interference import bench, table


def args(**kw: object) -> argparse.Namespace:
    base: dict[str, object] = dict(
        device="cpu", model="builtin:small", precision="fp32", shape="32,32,3", max_batch=8, kinds="", share=1 / 3,
        swaps=1, connections=1, window=4, warmup_s=0.1, window_s=0.25, ingest_workers=0, run_ms=None,
        switch_interval_us=None,
    )  # fmt: skip
    base.update(kw)
    return argparse.Namespace(**base)


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
async def test_a_short_cpu_run_measures_each_kind_after_a_steady_window() -> None:
    result = await bench(args())
    windows = ("steady", "python", "steady", "python-paced", "steady", "paced-wait", "steady", "process", "steady",
               "process-paced", "steady", "reader", "steady", "swaps")  # (every kind but the cuda ones)  # fmt: skip
    assert tuple(row["window"] for row in result["windows"]) == windows
    assert result["frames_failed_or_refused"] == 0
    rows = {row["window"]: row for row in result["windows"]}
    assert all(row["frames"] > 0 for row in result["windows"] if row["window"] != "python")  # (that one may starve)
    # The unpaced Python thread takes the GIL from the loop far more than the paced one
    assert rows["python"]["frames"] < rows["python-paced"]["frames"]
    assert "python-paced |" in table(result)


@pytest.mark.asyncio(loop_factories=["asyncio"])
async def test_cuda_kinds_on_the_cpu_and_unknown_kinds_are_refused() -> None:
    with pytest.raises(SystemExit, match="need --device cuda"):
        await bench(args(kinds="gpu-graph"))
    with pytest.raises(SystemExit, match="unknown swap"):
        await bench(args(kinds="swap"))


@pytest.mark.asyncio(loop_factories=["asyncio"])
async def test_the_loader_pacing_asked_for_is_the_one_used_and_given_back() -> None:
    from streamgpu.models import manager

    before = manager.LOADING_RUN_S, manager.LOADING_SWITCH_INTERVAL_S
    result = await bench(args(kinds="python-paced", run_ms=0.25, switch_interval_us=700))
    assert (result["run_ms"], result["switch_interval_us"]) == pytest.approx((0.25, 700))
    assert before == (manager.LOADING_RUN_S, manager.LOADING_SWITCH_INTERVAL_S)
    assert "loader runs 0.25 ms at a time, switch interval 700 us" in table(result)


@pytest.mark.asyncio(loop_factories=["asyncio"])
@pytest.mark.parametrize(
    ("pacing", "message"),
    [
        # a load only ever shortens the switch interval (min with the one in force): 10 ms ran at 5 ms, reported 10
        ({"switch_interval_us": 10_000}, r"--switch-interval-us must be > 0 and at most 5000"),
        ({"switch_interval_us": 0}, r"--switch-interval-us must be > 0"),  # a ValueError in the loader thread
        ({"run_ms": 0}, r"--run-ms must be > 0"),  # a load then runs unpaced, reported as paced
    ],
)
async def test_a_loader_pacing_the_server_cannot_run_is_refused(pacing: dict[str, float], message: str) -> None:
    from streamgpu.models import manager

    before = manager.LOADING_RUN_S, manager.LOADING_SWITCH_INTERVAL_S
    with pytest.raises(SystemExit, match=message):
        await bench(args(kinds="python-paced", **pacing))
    assert before == (manager.LOADING_RUN_S, manager.LOADING_SWITCH_INTERVAL_S)
