"""The batch runner: what the scheduler calls to run one batch on the backend.

It launches the batch, frees the frames' slots the moment the device has
copied them (not when the reply is sent), and finishes every frame with an
``Outcome``: its result row, or INTERNAL_ERROR with the reason. It keeps the
batches in flight so that a shutdown that runs out of time can finish them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import numpy as np

from streamgpu.frame import Frame, Outcome
from streamgpu.gpu.backend import Backend, DeviceModel
from streamgpu.protocol.wire import Status, Timings
from streamgpu.scheduler.metrics import ModelMetrics

log = logging.getLogger(__name__)


class BatchRunner:
    """Runs batches on ``backend`` and finishes their frames; ``metrics_for`` gives a model's counters."""

    def __init__(self, backend: Backend, metrics_for: Any) -> None:
        self._backend = backend
        self._metrics_for = metrics_for
        self._running: dict[int, list[Frame]] = {}  # batches launched, by id of their frame list

    async def run(self, model: DeviceModel, frames: list[Frame], expected_s: float) -> float | None:
        """Launch one batch, free its slots once copied, finish every frame; returns its device time."""
        self._running[id(frames)] = frames
        try:
            return await self._run(model, frames, expected_s)
        finally:
            del self._running[id(frames)]

    def fail_running(self, status: Status, message: str) -> None:
        """Finish every frame of every batch in flight with ``status`` (a shutdown out of time)."""
        now = time.perf_counter_ns()
        for frames in list(self._running.values()):
            for frame in frames:
                if not frame.finished:
                    frame.fail(status, message, now)

    async def _run(self, model: DeviceModel, frames: list[Frame], expected_s: float) -> float | None:
        metrics: ModelMetrics = self._metrics_for(model.spec.name)
        launch_ns = time.perf_counter_ns()
        slots = [f.slot for f in frames if f.slot is not None]
        try:
            run = self._backend.launch(model, slots, expected_s)
        except Exception as exc:  # nothing was enqueued: nothing will read the slots
            log.exception("model %s: batch of %d failed to launch", model.spec.name, len(frames))
            _fail_batch(frames, metrics, exc)
            return None
        try:
            await run.copied
        except Exception as exc:
            log.exception("model %s: copying a batch of %d failed", model.spec.name, len(frames))
            run.done.add_done_callback(_consume)  # its error is this one's consequence
            _fail_batch(frames, metrics, exc)
            return None
        for frame in frames:
            frame.release_slot()
        copied_ns = time.perf_counter_ns()
        try:
            results = await run.done
            if len(results) != len(frames):
                raise RuntimeError(f"model returned {len(results)} results for a batch of {len(frames)} frames")
            finished = _finish_ok(frames, results, launch_ns, copied_ns, time.perf_counter_ns(), metrics)
        except Exception as exc:
            log.exception("model %s: batch of %d failed", model.spec.name, len(frames))
            _fail_batch(frames, metrics, exc)
            return None
        metrics.completed += finished
        transfer_s, compute_s = (copied_ns - launch_ns) / 1e9, (time.perf_counter_ns() - copied_ns) / 1e9
        metrics.transfer_us.append(transfer_s * 1e6)
        metrics.compute_us.append(compute_s * 1e6)
        metrics.transfer_s.observe(transfer_s)
        metrics.compute_s.observe(compute_s)
        return run.service_s


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _fail_batch(frames: list[Frame], metrics: ModelMetrics, exc: BaseException) -> None:
    metrics.failed += len(frames)
    now = time.perf_counter_ns()
    for frame in frames:
        if not frame.finished:  # finished already: by a shutdown that ran out of time
            frame.fail(Status.INTERNAL_ERROR, f"inference failed: {type(exc).__name__}: {exc}", now)


def _finish_ok(
    frames: list[Frame], results: np.ndarray, launch_ns: int, copied_ns: int, done_ns: int, metrics: ModelMetrics
) -> int:
    """Finish each frame with its result; returns how many were finished here (not by a shutdown)."""
    finished = 0
    transfer_us, compute_us, n = (copied_ns - launch_ns) // 1000, (done_ns - copied_ns) // 1000, len(frames)
    now = time.perf_counter_ns()
    for frame, result in zip(frames, results, strict=True):
        if frame.finished:  # finished already: by a shutdown that ran out of time
            continue
        timings = Timings(
            receive_us=(frame.complete_ns - frame.received_ns) // 1000,
            queue_us=(launch_ns - frame.complete_ns) // 1000,
            transfer_us=transfer_us,
            compute_us=compute_us,
            total_us=(now - frame.received_ns) // 1000,
            batch_size=n,
        )
        frame.finish(Outcome(Status.OK, result=result, timings=timings))
        metrics.total_us.append(timings.total_us)
        metrics.e2e_s.observe(timings.total_us / 1e6)
        finished += 1
    return finished
