"""The batch runner: what the scheduler calls to run one batch on the backend.

It launches the batch, frees the frames' slots the moment the device has
copied them (not when the reply is sent), and finishes every frame with an
``Outcome``: its result row, or INTERNAL_ERROR with the reason. It keeps the
batches in flight so that a shutdown that runs out of time can finish them.

No task and no future stands between the backend and the scheduler: the
backend's ``BatchRun.finish`` calls the runner, which finishes the frames and
calls the scheduler's end of the batch (which may launch the next one), all in
the loop iteration that found the batch done. Each link of a chain of futures
cost one loop iteration, and under load an iteration is a whole round of reads.

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
from collections.abc import Callable
from typing import Any

import numpy as np

from streamgpu.frame import Frame, Outputs, finish_ok, release_slots
from streamgpu.gpu.backend import Backend, BatchRun, DeviceModel
from streamgpu.models.outputs import BatchOutputs
from streamgpu.protocol.wire import Status
from streamgpu.scheduler.metrics import ModelMetrics
from streamgpu.scheduler.scheduler import Ended, Scheduler

log = logging.getLogger(__name__)


class _Batch:
    """One launched batch's state, from its launch to its end."""

    __slots__ = ("copied_ns", "ended", "frames", "launch_ns", "model", "overdue", "run", "settled", "watchdog")

    def __init__(self, model: DeviceModel, frames: list[Frame], ended: Ended) -> None:
        self.model = model
        self.frames = frames
        self.ended = ended
        self.run: BatchRun | None = None
        self.launch_ns = time.perf_counter_ns()
        self.copied_ns = 0  # when its slots were freed (0: not yet)
        self.overdue = False
        self.settled = False  # ``ended`` called
        self.watchdog: asyncio.TimerHandle | None = None


class BatchRunner:
    """Runs ``scheduler``'s batches on ``backend`` and finishes their frames."""

    def __init__(self, backend: Backend, scheduler: Scheduler, watchdog_factor: float = 20.0,
                 watchdog_min_s: float = 2.0) -> None:  # fmt: skip
        self._backend = backend
        self._scheduler = scheduler
        self._watchdog_factor = watchdog_factor
        self._watchdog_min_s = watchdog_min_s
        self._running: dict[int, _Batch] = {}  # batches launched and not ended, by id

    def run(self, model: DeviceModel, frames: list[Frame], expected_s: float, ended: Ended) -> None:
        """Launch one batch now, on the loop's turn that formed it (not at the next turn: the device starts it
        without waiting for the rest of the loop's work). Its slots are freed once the device has copied them;
        once every frame is finished, ``ended`` is called with the batch's device time (None: it failed), from
        the call that ends the batch on the backend (``BatchRun.finish``: in the loop iteration that found it
        done), never before ``run`` returns. Never raises."""
        batch = _Batch(model, frames, ended)
        self._running[id(batch)] = batch
        loop = asyncio.get_running_loop()
        limit = max(self._watchdog_min_s, self._watchdog_factor * expected_s)
        batch.watchdog = loop.call_later(limit, self._overdue, batch, limit)
        slots = [f.slot for f in frames if f.slot is not None]
        try:
            run = batch.run = self._backend.launch(model, slots, expected_s)
        except Exception as exc:  # nothing was enqueued: nothing will read the slots
            loop.call_soon(self._launch_failed, batch, exc)
            return
        run.copied.add_done_callback(lambda _: self._copied(batch))  # frees the slots before the batch ends
        run.on_done = lambda: self._done(batch)
        if run.done.done():  # (a backend that ended it in ``launch``: told at the next turn, after ``copied``)
            run.on_done = None
            loop.call_soon(self._done, batch)

    def fail_running(self, status: Status, message: str) -> None:
        """Finish every frame of every batch in flight with ``status`` (a shutdown out of time)."""
        now = time.perf_counter_ns()
        for batch in list(self._running.values()):
            for frame in batch.frames:
                if not frame.finished:
                    frame.fail(status, message, now)

    def _launch_failed(self, batch: _Batch, exc: Exception) -> None:
        self._failed(batch, "launching", exc)

    def _copied(self, batch: _Batch) -> None:
        """The device has read the batch's slots (or failed to): they are free, whether or not it is done."""
        if batch.copied_ns or batch.settled:
            return
        assert batch.run is not None
        copied = batch.run.copied
        error = asyncio.CancelledError("the copy was cancelled") if copied.cancelled() else copied.exception()
        if error is not None:
            batch.run.done.add_done_callback(_consume)  # its error is this one's consequence
            self._failed(batch, "copying", error)
            return
        release_slots(batch.frames)
        batch.copied_ns = time.perf_counter_ns()

    def _done(self, batch: _Batch) -> None:
        """The backend ended the batch: finish its frames with its results (or its error), and end it."""
        if batch.settled:
            return
        assert batch.run is not None
        run = batch.run
        if not run.copied.done():  # failed before the copy's fate is known: hear that first
            run.copied.add_done_callback(lambda _: self._done(batch))
            return
        self._copied(batch)  # (its callback may not have run yet: resolved in this iteration)
        if batch.settled:  # the copy failed
            return
        model, frames = batch.model, batch.frames
        if run.done.cancelled():
            self._failed(batch, "running", asyncio.CancelledError("the backend was closed with it in flight"))
            return
        metrics: ModelMetrics = self._scheduler.metrics_for(model.spec.name)
        try:
            rows, outputs = _rows(run.done.result(), len(frames))
            now = time.perf_counter_ns()
            finished = _finish_ok(frames, rows, outputs, batch.launch_ns, batch.copied_ns, now, metrics)
        except Exception as exc:
            self._failed(batch, "running", exc)
            return
        metrics.completed += finished
        metrics.last_completed_ms = time.time_ns() // 1_000_000
        transfer_s, compute_s = (batch.copied_ns - batch.launch_ns) / 1e9, (now - batch.copied_ns) / 1e9
        metrics.transfer_us.append(transfer_s * 1e6)
        metrics.compute_us.append(compute_s * 1e6)
        metrics.transfer_s.observe(transfer_s)
        metrics.compute_s.observe(compute_s)
        self._end(batch, run.service_s)

    def _end(self, batch: _Batch, service_s: float | None) -> None:
        batch.settled = True
        if batch.watchdog is not None:
            batch.watchdog.cancel()
        del self._running[id(batch)]
        if batch.overdue:
            self._scheduler.device_overdue_ended(batch.model.device)
        batch.ended(service_s)

    def _overdue(self, batch: _Batch, limit: float) -> None:
        batch.overdue = True
        model, frames = batch.model, batch.frames
        device = self._backend.devices[model.device]
        log.error(
            "model %s: a batch of %d on %s is not done after %.1f s; answering it INTERNAL_ERROR, and placing "
            "no batch on %s until it ends", model.spec.name, len(frames), device, limit, device,
        )  # fmt: skip
        message = f"the batch did not complete within {limit:.1f} s on {device}"
        _fail_batch(frames, self._scheduler.metrics_for(model.spec.name), message)
        self._scheduler.device_overdue(model.device)

    def _failed(self, batch: _Batch, what: str, exc: BaseException) -> None:
        model, frames = batch.model, batch.frames
        log.exception("model %s: %s a batch of %d failed", model.spec.name, what, len(frames), exc_info=exc)
        message = f"inference failed: {type(exc).__name__}: {exc}"
        _fail_batch(frames, self._scheduler.metrics_for(model.spec.name), message)
        if (reason := self._backend.device_error(model.device)) is not None:
            self._scheduler.device_failed(model.device, reason)
        self._end(batch, None)


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
