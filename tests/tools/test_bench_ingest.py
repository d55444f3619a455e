"""tools/bench_ingest.py's in-process paths (what ``tools/loop_instructions.py`` counts) run on the current
code: a change to a record or a front end that they drive the old way fails here, not on the GPU machine."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
from bench_ingest import loop_path, micro_tcp, micro_worker_process, micro_workers

SHAPE = (32, 32, 3)


def test_the_one_process_tcp_path_runs() -> None:
    assert micro_tcp(SHAPE, 256, 32) > 0


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
async def test_the_worker_paths_run() -> None:
    assert await micro_workers(SHAPE, 256, 32) > 0
    assert await micro_worker_process(SHAPE, 256, 32) > 0


@pytest.mark.asyncio(loop_factories=["asyncio"])
async def test_the_scheduling_loop_path_answers_every_frame() -> None:
    report = await loop_path(SHAPE, 512, 64, 4, max_batch=32)
    assert report["us_per_frame"] > 0 and report["batches"] > 0
