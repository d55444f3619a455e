"""The batch runner: what the scheduler calls to run one batch on the backend.

It launches the batch, frees the frames' slots the moment the device has
copied them (not when the reply is sent), and finishes every frame with an
``Outcome``: its result row, or INTERNAL_ERROR with the reason. It keeps the
batches in flight so that a shutdown that runs out of time can finish them.

A watchdog answers the frames of a batch that is not done after
``max(watchdog_min_s, watchdog_factor x expected)`` with INTERNAL_ERROR and
tells the scheduler, which places no batch on that device until the batch
ends. After a failed batch the backend is asked whether the device's context
is lost (a sticky CUDA error); if so the scheduler takes the device out of
service for good. Releasing the slots of an overdue batch is safe: the device
only ever reads them, and its frames are answered already.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from streamgpu.frame import Frame, Outputs, finish_ok, release_slots
from streamgpu.gpu.backend import Backend, BatchRun, DeviceModel
from streamgpu.models.outputs import BatchOutputs
from streamgpu.protocol.wire import Status
from streamgpu.scheduler.metrics import ModelMetrics
from streamgpu.scheduler.scheduler import Scheduler

log = logging.getLogger(__name__)


class BatchRunner:
    """Runs ``scheduler``'s batches on ``backend`` and finishes their frames."""

    def __init__(self, backend: Backend, scheduler: Scheduler, watchdog_factor: float = 20.0,
                 watchdog_min_s: float = 2.0) -> None:  # fmt: skip
        self._backend = backend
        self._scheduler = scheduler
        self._watchdog_factor = watchdog_factor
        self._watchdog_min_s = watchdog_min_s
        self._running: dict[int, list[Frame]] = {}  # batches launched, by id of their frame list

    def run(self, model: DeviceModel, frames: list[Frame], expected_s: float) -> Awaitable[float | None]:
        """Launch one batch now, on the loop's turn that formed it (not at the next turn: the device starts it
        without waiting for the rest of the loop's work); the awaitable frees its slots once copied, finishes
        every frame and returns the batch's device time (None: it failed)."""
        self._running[id(frames)] = frames
        limit = max(self._watchdog_min_s, self._watchdog_factor * expected_s)
        overdue: list[bool] = []
        watchdog = asyncio.get_running_loop().call_later(limit, self._overdue, model, frames, limit, overdue)
        launch_ns = time.perf_counter_ns()
        slots = [f.slot for f in frames if f.slot is not None]
        try:
            run: BatchRun | Exception = self._backend.launch(model, slots, expected_s)
        except Exception as exc:  # nothing was enqueued: nothing will read the slots (answered in the task)
            run = exc
        return self._finish(model, frames, run, launch_ns, watchdog, overdue)

    async def _finish(self, model: DeviceModel, frames: list[Frame], run: BatchRun | Exception, launch_ns: int,
                      watchdog: asyncio.TimerHandle, overdue: list[bool]) -> float | None:  # fmt: skip
        try:
            if isinstance(run, Exception):
                self._failed(model, frames, "launching", run)
                return None
            return await self._complete(model, frames, run, launch_ns)
        finally:
            watchdog.cancel()
            del self._running[id(frames)]
            if overdue:
                self._scheduler.device_overdue_ended(model.device)

    def fail_running(self, status: Status, message: str) -> None:
        """Finish every frame of every batch in flight with ``status`` (a shutdown out of time)."""
        now = time.perf_counter_ns()
        for frames in list(self._running.values()):
            for frame in frames:
                if not frame.finished:
                    frame.fail(status, message, now)

    def _overdue(self, model: DeviceModel, frames: list[Frame], limit: float, overdue: list[bool]) -> None:
        overdue.append(True)
        device = self._backend.devices[model.device]
        log.error(
            "model %s: a batch of %d on %s is not done after %.1f s; answering it INTERNAL_ERROR, and placing "
            "no batch on %s until it ends", model.spec.name, len(frames), device, limit, device,
        )  # fmt: skip
        message = f"the batch did not complete within {limit:.1f} s on {device}"
        _fail_batch(frames, self._scheduler.metrics_for(model.spec.name), message)
        self._scheduler.device_overdue(model.device)

    def _failed(self, model: DeviceModel, frames: list[Frame], what: str, exc: BaseException) -> None:
        log.exception("model %s: %s a batch of %d failed", model.spec.name, what, len(frames), exc_info=exc)
        message = f"inference failed: {type(exc).__name__}: {exc}"
        _fail_batch(frames, self._scheduler.metrics_for(model.spec.name), message)
        if (reason := self._backend.device_error(model.device)) is not None:
            self._scheduler.device_failed(model.device, reason)

    async def _complete(self, model: DeviceModel, frames: list[Frame], run: BatchRun, launch_ns: int) -> float | None:
        metrics: ModelMetrics = self._scheduler.metrics_for(model.spec.name)
        try:
            await run.copied
        except Exception as exc:
            run.done.add_done_callback(_consume)  # its error is this one's consequence
            self._failed(model, frames, "copying", exc)
            return None
        release_slots(frames)
        copied_ns = time.perf_counter_ns()
        try:
            results = await run.done
            rows, outputs = _rows(results, len(frames))
            finished = _finish_ok(frames, rows, outputs, launch_ns, copied_ns, time.perf_counter_ns(), metrics)
        except Exception as exc:
            self._failed(model, frames, "running", exc)
            return None
        metrics.completed += finished
        metrics.last_completed_ms = time.time_ns() // 1_000_000
        transfer_s, compute_s = (copied_ns - launch_ns) / 1e9, (time.perf_counter_ns() - copied_ns) / 1e9
        metrics.transfer_us.append(transfer_s * 1e6)
        metrics.compute_us.append(compute_s * 1e6)
        metrics.transfer_s.observe(transfer_s)
        metrics.compute_s.observe(compute_s)
        return run.service_s


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _fail_batch(frames: list[Frame], metrics: ModelMetrics, message: str) -> None:
    now = time.perf_counter_ns()
    for frame in frames:
        if not frame.finished:  # finished already: by its watchdog, or a shutdown that ran out of time
            metrics.failed += 1
            try:
                frame.fail(Status.INTERNAL_ERROR, message, now)
            except Exception:  # one delivery that raises must not leave the rest of the batch unanswered
                log.exception("answering frame %d/%d failed", frame.header.stream_id, frame.header.sequence)


def _rows(results: BatchOutputs, n: int) -> tuple[np.ndarray, Callable[[int], Outputs | None] | None]:
    """A batch's first output (one row per frame: each frame's ``result``), and frame i's every output
    (None for a model with one), from its outputs (one array, or a tuple or dict of them)."""
    if isinstance(results, np.ndarray):
        arrays = [results]
    else:
        arrays = list(results.values()) if isinstance(results, dict) else list(results)
    for array in arrays:
        if len(array) != n:
            raise RuntimeError(f"model returned {len(array)} results for a batch of {n} frames")
    if isinstance(results, np.ndarray):
        return results, None
    if isinstance(results, dict):
        names = list(results)
        return arrays[0], lambda i: {name: array[i] for name, array in zip(names, arrays, strict=True)}
    return arrays[0], lambda i: tuple(array[i] for array in arrays)


def _finish_ok(frames: list[Frame], rows: np.ndarray, outputs: Callable[[int], Outputs | None] | None,
               launch_ns: int, copied_ns: int, done_ns: int, metrics: ModelMetrics) -> int:  # fmt: skip
    """Finish each frame with its result; returns how many were finished here (not by a shutdown).

    Per batch, not per frame: the timings are numpy columns, the metrics take them in one call each.
    """
    n = len(frames)
    now = time.perf_counter_ns()
    received = np.array([f.received_ns for f in frames], np.int64)
    complete = np.array([f.complete_ns for f in frames], np.int64)
    timings = np.empty((n, 6), np.int64)
    timings[:, 0] = (complete - received) // 1000  # receive_us
    timings[:, 1] = (launch_ns - complete) // 1000  # queue_us
    timings[:, 2] = (copied_ns - launch_ns) // 1000  # transfer_us
    timings[:, 3] = (done_ns - copied_ns) // 1000  # compute_us
    timings[:, 4] = (now - received) // 1000  # total_us
    timings[:, 5] = n  # batch_size
    done = finish_ok(frames, rows, outputs, timings)
    total_us = timings[:, 4] if len(done) == n else timings[done, 4]
    metrics.total_us.extend(total_us.tolist())
    metrics.e2e_s.observe_all(total_us / 1e6)
    return len(done)
