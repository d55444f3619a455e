"""The cooperative scheduler: per-model queues and batch formation, all on the event loop.

Frames enter with ``submit``; the scheduler decides which frames of a model
form the next batch and when, and hands the batch to ``run_batch`` (the
server's launch-and-reply coroutine). Its rules:

* A model has at most ``max_inflight_batches`` batches launched at once (two:
  one computing while the next one's copy runs).
* When the model has nothing in flight, whatever is queued goes at once: an
  idle GPU never waits for a fuller batch. While batches are in flight,
  frames accumulate, and the next batch goes when it is full or its oldest
  frame has waited ``max_queue_delay_ms``.
* Queues are bounded: past ``max_queue`` a frame is answered OVERLOADED at once.
* A frame whose deadline passes while queued is answered DEADLINE_MISSED at
  that moment (a timer, so it fires while the GPU is busy) and never runs.
* Frames whose producer has gone are dropped at batch formation.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable, Callable
from typing import Any

from streamgpu.frame import Frame
from streamgpu.gpu.backend import DeviceModel
from streamgpu.protocol.wire import Status
from streamgpu.scheduler.metrics import ModelMetrics

RunBatch = Callable[[DeviceModel, list[Frame]], Awaitable[None]]
Reject = Callable[[Frame, Status, str], None]


class ModelQueue:
    """One model's waiting frames and in-flight batches."""

    def __init__(self, model: DeviceModel) -> None:
        self.model = model
        self.spec = model.spec
        self.frames: collections.deque[Frame] = collections.deque()
        self.deadline_timers: dict[Frame, asyncio.TimerHandle] = {}
        self.in_flight = 0
        self.wake: asyncio.TimerHandle | None = None
        self.metrics = ModelMetrics()

    def remove(self, frame: Frame) -> None:
        self.frames.remove(frame)
        self.cancel_timer(frame)

    def cancel_timer(self, frame: Frame) -> None:
        timer = self.deadline_timers.pop(frame, None)
        if timer is not None:
            timer.cancel()


class Scheduler:
    """Per-model queues and batch formation; every method runs on the loop thread."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        run_batch: RunBatch,
        reject: Reject,
        max_inflight_batches: int = 2,
    ) -> None:
        self._loop = loop
        self._run_batch = run_batch
        self._reject = reject
        self._max_inflight = max_inflight_batches
        self._queues: dict[str, ModelQueue] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # -- models ----------------------------------------------------------------

    def add_model(self, model: DeviceModel) -> None:
        self._queues[model.spec.name] = ModelQueue(model)

    def model(self, name: str) -> DeviceModel | None:
        queue = self._queues.get(name)
        return queue.model if queue else None

    @property
    def model_names(self) -> list[str]:
        return list(self._queues)

    # -- frames ----------------------------------------------------------------

    def submit(self, frame: Frame) -> None:
        """Queue a frame for its model (which the caller has checked exists)."""
        queue = self._queues[frame.header.model]
        spec = queue.spec
        if len(queue.frames) >= spec.max_queue:
            queue.metrics.rejected_overloaded += 1
            self._reject(frame, Status.OVERLOADED, f"model {spec.name!r} queue is full ({spec.max_queue} frames)")
            return
        if not frame.deadline_ns and spec.default_deadline_ms:
            frame.deadline_ns = frame.received_ns + int(spec.default_deadline_ms * 1e6)
        if frame.deadline_ns and frame.deadline_ns <= time.perf_counter_ns():
            queue.metrics.deadline_missed += 1
            self._reject(frame, Status.DEADLINE_MISSED, "deadline passed before the frame was queued")
            return
        queue.metrics.accepted += 1
        queue.frames.append(frame)
        if frame.deadline_ns:
            delay = (frame.deadline_ns - time.perf_counter_ns()) / 1e9
            queue.deadline_timers[frame] = self._loop.call_later(delay, self._expire, queue, frame)
        self._dispatch(queue)

    def _expire(self, queue: ModelQueue, frame: Frame) -> None:
        queue.deadline_timers.pop(frame, None)
        queue.frames.remove(frame)
        queue.metrics.deadline_missed += 1
        self._reject(frame, Status.DEADLINE_MISSED, "deadline passed while queued")

    # -- batching ----------------------------------------------------------------

    def _dispatch(self, queue: ModelQueue) -> None:
        """Launch as many batches as policy allows now; arm a wake-up for the rest."""
        while queue.frames and queue.in_flight < self._max_inflight:
            batch = self._next_batch(queue)
            if batch is None:
                return
            if batch:
                self._launch(queue, batch)

    def _next_batch(self, queue: ModelQueue) -> list[Frame] | None:
        """Frames for the next batch; [] if none were runnable; None to wait (wake-up armed)."""
        spec = queue.spec
        now = time.perf_counter_ns()
        if queue.in_flight and len(queue.frames) < spec.max_batch_size:
            due = queue.frames[0].complete_ns + int(spec.max_queue_delay_ms * 1e6)
            if now < due:
                self._arm_wake(queue, due)
                return None
        batch: list[Frame] = []
        while queue.frames and len(batch) < spec.max_batch_size:
            frame = queue.frames.popleft()
            queue.cancel_timer(frame)
            if frame.is_abandoned():
                queue.metrics.abandoned += 1
                self._reject(frame, Status.SHUTTING_DOWN, "producer disconnected")
                continue
            batch.append(frame)
        return batch

    def _arm_wake(self, queue: ModelQueue, due_ns: int) -> None:
        if queue.wake is not None:
            queue.wake.cancel()
        delay = max(0.0, (due_ns - time.perf_counter_ns()) / 1e9)
        queue.wake = self._loop.call_later(delay, self._on_wake, queue)

    def _on_wake(self, queue: ModelQueue) -> None:
        queue.wake = None
        self._dispatch(queue)

    def _launch(self, queue: ModelQueue, batch: list[Frame]) -> None:
        queue.in_flight += 1
        queue.metrics.batches += 1
        queue.metrics.batch_sizes[len(batch)] += 1
        now = time.perf_counter_ns()
        for frame in batch:
            queue.metrics.queue_wait_us.append((now - frame.complete_ns) / 1e3)
        task = self._loop.create_task(self._run(queue, batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, queue: ModelQueue, batch: list[Frame]) -> None:
        try:
            await self._run_batch(queue.model, batch)
        finally:
            queue.in_flight -= 1
            self._dispatch(queue)

    # -- state and shutdown --------------------------------------------------------

    @property
    def queued(self) -> int:
        return sum(len(q.frames) for q in self._queues.values())

    @property
    def busy(self) -> bool:
        """Frames queued or batches in flight."""
        return any(q.frames or q.in_flight for q in self._queues.values())

    def metrics_for(self, name: str) -> ModelMetrics:
        return self._queues[name].metrics

    def metrics(self) -> dict[str, dict[str, Any]]:
        """Per-model snapshot: queue length, batch sizes, queue wait, drops, rejects."""
        return {name: q.metrics.snapshot(len(q.frames), q.in_flight) for name, q in self._queues.items()}

    def reject_queued(self, status: Status, message: str) -> None:
        """Answer every queued (not yet launched) frame with ``status``."""
        for queue in self._queues.values():
            while queue.frames:
                frame = queue.frames.popleft()
                queue.cancel_timer(frame)
                self._reject(frame, status, message)
            if queue.wake is not None:
                queue.wake.cancel()
                queue.wake = None

    async def idle(self) -> None:
        """Wait until nothing is queued and no batch is in flight."""
        while self.busy:
            if self._tasks:
                await asyncio.wait(set(self._tasks))
            else:
                await asyncio.sleep(0.001)
