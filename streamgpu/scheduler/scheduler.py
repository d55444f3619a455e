"""The cooperative scheduler: per-model queues and batch formation, all on the event loop.

Frames enter with ``submit``; the scheduler decides which frames of a model
form the next batch and when, and hands the batch to ``run_batch`` (the
server's launch-and-reply coroutine). Its rules:

* Admission: a model queue holds at most ``max_queue`` frames. When it is
  full, a frame from a producer holding less than its fair share
  (``max_queue`` / producers with queued frames) still enters, and the newest
  frame of the producer holding the most is answered OVERLOADED instead;
  otherwise the new frame is. A quiet producer is never refused because of a
  loud one. (Listeners bound each connection below ``max_queue``, and each
  producer's ring bytes.)
* Order: higher priority first; within a priority, producers take turns
  (round-robin), so one hot producer cannot starve the others however many
  stream ids it uses.
* Live streams: a LIVE frame supersedes every queued frame of its stream,
  LIVE or not (they are answered SUPERSEDED): a camera's stale frame is worthless.
* Deadlines: a frame whose deadline passes while queued is answered
  DEADLINE_MISSED at that moment (a timer on the loop, so it fires while the
  GPU is busy with a long batch) and never runs. A deadline is a start-by
  time: waiting for a fuller batch ends just before it, not a batch's time earlier,
  and a frame whose batch would start after it (behind the batches in flight on
  its device, by the estimates) is answered DEADLINE_MISSED then, not run late.
* Where: a model has an instance (a replica) on every device; each batch goes
  to the usable replica (see ``health``) that is estimated to finish it first;
  an idle one, unless a busy one would finish it in under half the time or
  only the busy one would meet the model's latency target (and is free before
  every queued deadline).
* When: a replica has at most ``max_inflight_batches`` batches launched (two:
  one computing while the next one's copy runs). With nothing in flight on the
  chosen replica, whatever is queued goes at once: an idle GPU never waits for
  a fuller batch. While batches are in flight, frames accumulate, and the next
  batch goes when it is full or its oldest frame has waited ``max_queue_delay_ms``.
  (``batch_policy = "fixed"`` waits like that even when idle, as a classic
  dynamic batcher does; it exists to compare against.)
* How many: without a latency target, as many as are queued (up to
  ``max_batch_size``). With one, the scheduler keeps a live estimate of each
  batch size's latency and picks, among the preferred sizes (the graph
  buckets) and the queue length, the one with the most throughput whose
  completion still meets the oldest frame's target; when none can, it drains
  with the largest and counts ``target_unmeetable``.
* Frames whose sender has gone (a closed TCP or raw connection, one of an ingest worker's, a dead
  worker, an HTTP client gone mid-request on streamgpu's own HTTP listener) are answered as it goes
  (``withdraw``, from ``Admission.leave``): queued, they would hold ring space until their turn. Others
  (an HTTP client of an application that embeds the routes without handler cancellation) are dropped
  at batch formation.
* Versions: ``swap_model`` puts a new version of a model in place between two
  batches; the queue keeps its frames and the next batch launches on the new
  version (batches in flight finish on the old one). With the model's
  ``swap_queued = "received"`` the frames queued at the swap run on the version
  that received them first. ``remove_model`` stops taking frames (UNKNOWN_MODEL)
  and returns once the queued ones have run.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from streamgpu.frame import Frame
from streamgpu.gpu.backend import DeviceModel
from streamgpu.ingest.admission import Producer
from streamgpu.models.spec import ModelSpec
from streamgpu.protocol.wire import FrameFlags, Status
from streamgpu.scheduler.health import DeviceHealth
from streamgpu.scheduler.latency import BatchLatency
from streamgpu.scheduler.metrics import ModelMetrics
from streamgpu.scheduler.queues import FairQueue

# run_batch(model, frames, expected_s): launch (the real runner does it before returning: called as the batch is
# formed), then the awaitable frees the slots once copied and finishes every frame; it gives the batch's service
# time as the device measured it (seconds), or None (failed). It must not raise: a failure is answered and None.
RunBatch = Callable[[DeviceModel, list[Frame], float], Awaitable[float | None]]

# The completion bridge may sleep until this fraction of the expected completion time: a
# batch faster than its estimate is then noticed late by at most a fifth of the estimate.
HINT_FRACTION = 0.8
# A batch that must start for a queued deadline is launched this long before it: host work between
# launch and the device starting, and timer granularity (1 ms in uvloop).
DEADLINE_MARGIN_S = 0.002


class QueueState(NamedTuple):
    """One model as ``/metrics`` and the status page read it."""

    name: str
    metrics: ModelMetrics
    queue_length: int
    in_flight_batches: int
    sms: dict[str, int]  # per device name: the SMs its instance there may use (CUDA backend only)


class Replica:
    """One instance of a model on one device: its batches in flight and its latency estimates."""

    def __init__(self, model: DeviceModel) -> None:
        self.model = model
        self.device = model.device
        self.running: collections.deque[int] = collections.deque()  # sizes of launched batches, oldest first
        self.busy_until = 0.0  # perf_counter seconds when the launched batches should be done
        self.latency = BatchLatency()

    @property
    def in_flight(self) -> int:
        return len(self.running)

    def start_at(self, now: float) -> float:
        """When a batch launched now would start on the device: after the batches ahead of it."""
        return max(now, self.busy_until)

    def finish_at(self, now: float, size: int) -> float:
        """When a batch of ``size`` launched now would be done."""
        return self.start_at(now) + self.latency.estimate(size)


class ModelQueue:
    """One model's waiting frames, replicas, deadline timers and metrics."""

    def __init__(self, replicas: Sequence[DeviceModel]) -> None:
        self.replicas = [Replica(model) for model in replicas]
        self.spec = replicas[0].spec
        self.frames = FairQueue()
        self.deadline_timers: dict[Frame, asyncio.TimerHandle] = {}
        self.latest_start = float("inf")  # perf_counter s by which a batch must start for queued deadlines
        self.wake: asyncio.Handle | None = None
        self.wake_at = 0.0  # loop time ``wake`` runs at
        self.metrics = ModelMetrics()
        # Frames queued when a new version took over that must still run on an older one (swap_queued =
        # "received"), with that version's replicas; may name frames that left the queue since (cleared
        # once none is queued).
        self.pinned: dict[Frame, list[Replica]] = {}
        self.tasks: dict[asyncio.Task[None], DeviceModel] = {}  # batches in flight and the instance they run on
        self.removed = False

    @property
    def in_flight(self) -> int:
        return len(self.tasks)  # (a version swapped out finishes its batches too: the replicas are the new one's)

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
        max_inflight_batches: int = 2,
        health: DeviceHealth | None = None,
    ) -> None:
        self._loop = loop
        self._run_batch = run_batch
        self._max_inflight = max_inflight_batches
        self.health = health or DeviceHealth(["device"])
        self._queues: dict[str, ModelQueue] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # -- models ----------------------------------------------------------------

    def add_model(self, replicas: Sequence[DeviceModel]) -> None:
        """Serve a model: its instances on each device (the same spec)."""
        self._queues[replicas[0].spec.name] = ModelQueue(replicas)

    def swap_model(self, replicas: Sequence[DeviceModel]) -> list[DeviceModel]:
        """Make ``replicas`` (a new version: its instances on each device) what the next batches of its name
        launch on; returns the old version's instances.

        Frames already queued stay queued (nothing is refused); they run on the new version, or on
        the old one when the new spec says ``swap_queued = "received"``. Latency estimates carry over.
        """
        queue = self._queues[replicas[0].spec.name]
        old = queue.replicas
        if replicas[0].spec.swap_queued == "received":
            for frame in queue.frames:
                queue.pinned.setdefault(frame, old)
        queue.replicas = [Replica(model) for model in replicas]
        # Each device's k-th instance takes over the estimates of the k-th one there before (by position, a
        # change of instances would hand one device's estimates to another) and when its batches in flight end:
        # the new version's first batch starts on the device after them (placement and the deadline check ask
        # when a replica is free; a fresh one said "now" while the old version's batches still ran). A new copy
        # starts afresh.
        known: dict[int, list[Replica]] = {}
        for previous in old:
            known.setdefault(previous.device, []).append(previous)
        for new in queue.replicas:
            if before := known.get(new.device):
                previous = before.pop(0)
                new.latency = previous.latency
                new.busy_until = previous.busy_until
        queue.spec = replicas[0].spec
        self._dispatch(queue)
        return [r.model for r in old]

    def respec_model(self, spec: ModelSpec) -> None:
        """A served model's instances took a new version's weights in place (``Backend.swap_weights``): its queue
        goes on under ``spec`` (its settings the same as before but for the source)."""
        self._queues[spec.name].spec = spec

    def uses(self, models: Sequence[DeviceModel]) -> bool:
        """Whether a batch of one of ``models`` is in flight, or a queued frame is pinned to them."""
        if not models:
            return False
        queue = self._queues.get(models[0].spec.name)
        if queue is None:
            return False
        ids = {id(m) for m in models}
        if any(id(m) in ids for m in queue.tasks.values()) or any(id(r.model) in ids for r in queue.replicas):
            return True
        return any(id(r.model) in ids for f in queue.frames for r in queue.pinned.get(f, ())) if queue.pinned else False

    async def released(self, models: Sequence[DeviceModel]) -> None:
        """Wait until no batch of ``models`` (a version swapped out) is in flight or pinned to run on them."""
        while self.uses(models):
            queue = self._queues[models[0].spec.name]
            if queue.tasks:
                await asyncio.wait(set(queue.tasks), return_when=asyncio.FIRST_COMPLETED)
            else:
                await asyncio.sleep(0.001)  # pinned frames waiting for their batch to form
        served = self._queues.get(models[0].spec.name) if models else None
        if served is not None and served.pinned:  # the pins of frames that left the queue otherwise held the version
            self._pinned_version(served)

    async def remove_model(self, name: str) -> list[DeviceModel]:
        """Stop taking frames for ``name`` (UNKNOWN_MODEL), run the queued ones, then forget it.

        Returns the instances that were serving (free them once this returns: nothing of them is in flight).
        """
        queue = self._queues[name]
        queue.removed = True
        while queue.frames or queue.tasks:
            if queue.tasks:
                await asyncio.wait(set(queue.tasks), return_when=asyncio.FIRST_COMPLETED)
            else:
                self._dispatch(queue)
                await asyncio.sleep(0.001)
        if queue.wake is not None:
            queue.wake.cancel()
        del self._queues[name]
        return [r.model for r in queue.replicas]

    # -- devices -----------------------------------------------------------------

    def device_overdue(self, device: int) -> None:
        """A batch on ``device`` passed its watchdog: place nothing more there until it ends."""
        self.health.overdue(device)
        self._refuse_unplaceable()

    def device_overdue_ended(self, device: int) -> None:
        self.health.ended(device)
        for queue in self._queues.values():
            self._dispatch(queue)

    def device_failed(self, device: int, reason: str) -> None:
        """``device`` can run nothing more (its context is lost)."""
        if self.health.failed(device, reason):
            self._refuse_unplaceable()

    def _unplaceable(self, queue: ModelQueue) -> str:
        """Why no replica of ``queue``'s model can take a batch now ("" when one can)."""
        health = self.health
        if not health.impaired or any(health.usable(r.device) for r in queue.replicas):
            return ""
        devices = list(dict.fromkeys(r.device for r in queue.replicas))  # (each once, however many instances)
        return f"model {queue.spec.name!r} has no usable device: " + health.why_unusable(devices)

    def _refuse_unplaceable(self) -> None:
        """Answer the queued frames of models that no device can run now, rather than let them wait."""
        for queue in self._queues.values():
            if why := self._unplaceable(queue):
                for frame in list(queue.frames):
                    queue.metrics.failed += 1
                    self._drop(queue, frame, Status.INTERNAL_ERROR, why)

    # -- frames ----------------------------------------------------------------

    def submit(self, frame: Frame) -> None:
        """Queue a frame for its model (which admission has checked exists), or finish it now."""
        queue = self._enqueue(frame, time.perf_counter_ns())
        if queue is not None:
            self._dispatch(queue)

    def submit_many(self, frames: list[Frame]) -> None:
        """Queue frames that arrived together (one read of an ingest channel): as ``submit`` each, then one
        dispatch per model, so a burst forms its batches once instead of re-deciding after every frame."""
        now_ns = time.perf_counter_ns()
        queues, healthy, plain = self._queues, not self.health.impaired, FrameFlags.NONE
        # The common case (no deadline, not LIVE, room in the queue, every device usable), which _enqueue
        # would decide the same way, is collected per model and queued in one call; anything else goes
        # through _enqueue, after what came before it is queued (a LIVE frame supersedes those too).
        fast: dict[ModelQueue, list[Frame]] = {}
        room: dict[ModelQueue, int] = {}
        touched: list[ModelQueue] = []
        # The current model (its queue, room left, fast list) changes only where the frame's model or frame
        # format does: a burst is mostly of one model, its frames' headers sharing these objects (an ingest
        # worker's records name a model by index), so a frame costs identity tests, not look-ups
        model: str | None = None
        shape: tuple[int, ...] = ()
        dtype_code = -1
        queue: ModelQueue | None = None
        free = 0
        joining: list[Frame] = []
        for frame in frames:
            header = frame.header
            if header.model is not model or header.shape is not shape or header.dtype_code != dtype_code:
                if queue is not None:
                    room[queue] = free
                queue = queues.get(header.model)
                # A frame admitted for an earlier model of this name (unloaded, loaded again taking other frames)
                # must not join its batches: _enqueue answers it (a new version takes the same frames)
                if (
                    queue is None
                    or header.shape != queue.spec.input_shape
                    or header.dtype_code != queue.spec.frame_dtype_code
                ):
                    model, queue = None, None
                    self._enqueue(frame, now_ns)
                    continue
                model, shape, dtype_code = header.model, header.shape, header.dtype_code
                known = room.get(queue)
                if known is None:
                    known = queue.spec.max_queue - len(queue.frames)
                    fast[queue] = []
                    touched.append(queue)
                free, joining = known, fast[queue]
            assert queue is not None
            if free > 0 and healthy and not frame.deadline_ns and header.flags is plain:
                joining.append(frame)
                free -= 1
                continue
            self._queue_fast(fast)
            if free <= 0:
                self._dispatch(queue)  # a full queue: a free replica takes a batch first, as per-frame submits
            self._enqueue(frame, now_ns)
            free = queue.spec.max_queue - len(queue.frames)
        self._queue_fast(fast)
        for queue in touched:
            self._dispatch(queue)

    @staticmethod
    def _queue_fast(fast: dict[ModelQueue, list[Frame]]) -> None:
        for queue, frames in fast.items():
            if frames:
                queue.frames.push_many(frames)
                queue.metrics.accepted += len(frames)
                frames.clear()

    def _enqueue(self, frame: Frame, now_ns: int) -> ModelQueue | None:
        """Queue ``frame`` (the queue it joined), or finish it now (None)."""
        queue = self._queues.get(frame.header.model)
        if queue is None:  # unloaded while the frame's payload arrived (admission had let its header in)
            _fail(frame, Status.UNKNOWN_MODEL, f"model {frame.header.model!r} was unloaded")
            return None
        if (why := queue.spec.check_frame(frame.header)) is not None:  # admitted before an unload and a load
            _fail(frame, Status.UNKNOWN_MODEL, f"the model admitting this frame was unloaded; now {why}")
            return None
        if why := self._unplaceable(queue):
            queue.metrics.failed += 1
            _fail(frame, Status.INTERNAL_ERROR, why)
            return None
        if frame.live:
            stale = queue.frames.stream_frames(frame.producer, frame.stream)
            for old in stale:  # out of the queue first: finishing releases slots, which wakes producers
                queue.frames.remove(old)
                queue.cancel_timer(old)
            for old in stale:
                queue.metrics.superseded += 1
                _fail(old, Status.SUPERSEDED, "superseded by a newer frame of this live stream")
        if frame.deadline_ns and frame.deadline_ns <= now_ns:
            queue.metrics.deadline_missed += 1
            _fail(frame, Status.DEADLINE_MISSED, "deadline passed before the frame was queued")
            return None
        if len(queue.frames) >= queue.spec.max_queue and not self._make_room(queue, frame):
            return None
        queue.metrics.accepted += 1
        queue.frames.push(frame)
        if frame.deadline_ns:
            delay = (frame.deadline_ns - now_ns) / 1e9
            queue.deadline_timers[frame] = self._loop.call_later(delay, self._expire, queue, frame)
            # Waiting for a fuller batch must not outlast this frame's deadline.
            queue.latest_start = min(queue.latest_start, _start_by(frame.deadline_ns))
        return queue

    def _make_room(self, queue: ModelQueue, frame: Frame) -> bool:
        """The queue is full: refuse the loudest producer's newest frame if ``frame``'s producer holds less
        than its fair share (True: there is room now), else refuse ``frame`` (False)."""
        spec, frames = queue.spec, queue.frames
        producers = frames.producers + (frames.queued_by(frame.producer) == 0)
        full = f"model {spec.name!r} queue is full ({spec.max_queue} frames)"
        queue.metrics.rejected_overloaded += 1
        loudest = frames.loudest()
        if frames.queued_by(frame.producer) * producers < spec.max_queue and loudest is not None:
            self._drop(queue, frames.newest_of(loudest), Status.OVERLOADED, f"{full}; your share is "
                       f"{spec.max_queue // producers} frames while others wait")  # fmt: skip
            return True
        _fail(frame, Status.OVERLOADED, f"{full}; your share is {spec.max_queue // producers} frames")
        return False

    def _drop(self, queue: ModelQueue, frame: Frame, status: Status, message: str) -> None:
        queue.frames.remove(frame)
        queue.cancel_timer(frame)
        _fail(frame, status, message)

    def _expire(self, queue: ModelQueue, frame: Frame) -> None:
        queue.deadline_timers.pop(frame, None)
        queue.metrics.deadline_missed += 1
        self._drop(queue, frame, Status.DEADLINE_MISSED, "deadline passed while queued")

    # -- batching ----------------------------------------------------------------

    def _dispatch(self, queue: ModelQueue) -> None:
        """Launch as many batches as policy allows now; arm a wake-up for the rest."""
        while queue.frames:
            now = time.perf_counter()
            version = self._pinned_version(queue) if queue.pinned else None
            replica = self._place(queue, now, version or queue.replicas)
            if replica is None:
                return  # every replica is full (or unusable): a batch ending dispatches again
            # (a queue being removed takes only stragglers admitted before: a fuller batch is not coming)
            waits = (replica.in_flight or queue.spec.batch_policy == "fixed") and not queue.removed
            if waits and len(queue.frames) < replica.model.spec.max_batch_size:
                oldest = queue.frames.oldest()
                assert oldest is not None
                due = oldest.complete_ns / 1e9 + queue.spec.max_queue_delay_ms / 1e3
                if queue.latest_start <= now < due:
                    # A deadline would end the wait now, unless the frames that set it have left since (answered
                    # as their batch formed, expired, superseded, withdrawn: only a launch recomputes it)
                    queue.latest_start = self._latest_start(queue)
                due = min(due, queue.latest_start)
                if now < due:
                    self._arm_wake(queue, due - now)
                    return
            batch, abandoned = self._take(queue, self._batch_size(queue, replica, now), version, replica.start_at(now))
            if batch:
                self._launch(queue, replica, batch, now)
            _abandon(queue, abandoned)  # after the launch is counted: finishing frees slots, waking producers

    def _place(self, queue: ModelQueue, now: float, replicas: list[Replica]) -> Replica | None:
        """The usable one of ``replicas`` with room for a batch: the idle one estimated to finish the queued
        frames first, unless a measured busy one would finish them in under half that time, or would meet the
        model's latency target for the oldest frame where the idle one would not (then the busy one first), and
        is free before every queued deadline."""
        size = min(len(queue.frames), queue.spec.max_batch_size)
        idle: Replica | None = None
        busy: Replica | None = None
        idle_at = busy_at = float("inf")
        for replica in replicas:
            if replica.in_flight >= self._max_inflight or not self.health.usable(replica.device):
                continue
            at = replica.finish_at(now, size)
            if replica.in_flight == 0:
                if idle is None or at < idle_at:
                    idle, idle_at = replica, at
            elif busy is None or (at, replica.in_flight) < (busy_at, busy.in_flight):
                busy, busy_at = replica, at
        if idle is None or busy is None:
            return idle or busy
        # A batch placed on a busy replica waits for it (see _dispatch). Between equal replicas (instances of a
        # model on one GPU, twin GPUs) the estimates differ by noise, and comparing them held frames behind a
        # busy instance while another sat idle (H200: 0.75 ms queued at 8 in flight with 4 instances). So a busy
        # one is preferred only when it is clearly faster (a different device, not jitter) and has measured a
        # batch (with no estimate it finishes "now"), or when only it meets the latency target.
        if not busy.latency.measured:
            return idle
        if (busy_at - now) * 2 >= idle_at - now:
            target = self._target_finish(queue, busy.model.spec.latency_target_ms)
            if not busy_at <= target < idle_at:
                return idle
        # Not when a queued deadline passes before the busy one is free: behind it that frame is answered
        # DEADLINE_MISSED as its batch forms (see _take), where the idle one starts it now
        if busy.busy_until * 1e9 > _earliest_deadline_ns(queue):
            return idle
        return busy

    @staticmethod
    def _target_finish(queue: ModelQueue, target_ms: float) -> float:
        """The perf_counter time by which the oldest queued frame must have its result for a latency target of
        ``target_ms`` (infinity for none)."""
        oldest = queue.frames.oldest()
        if not target_ms or oldest is None:
            return float("inf")
        return oldest.received_ns / 1e9 + target_ms / 1e3

    def _batch_size(self, queue: ModelQueue, replica: Replica, now: float) -> int:
        # The version the batch runs on: frames pinned to an older one (swap_queued = "received") must not be
        # batched by the new version's max_batch_size, past the buckets the old one was captured for
        spec = replica.model.spec
        n = min(len(queue.frames), spec.max_batch_size)
        if not spec.latency_target_ms:
            return n
        start = replica.start_at(now)
        limit = self._target_finish(queue, spec.latency_target_ms)
        latency = replica.latency
        sizes = {b for b in spec.buckets() if b <= n} | {n}
        meeting = [b for b in sizes if start + latency.estimate(b) <= limit]
        if not meeting:
            queue.metrics.target_unmeetable += 1
            return n  # the target is lost for the oldest frame: drain the backlog as fast as possible
        return max(meeting, key=lambda b: (b / max(latency.estimate(b), 1e-9), b))

    def _take(
        self, queue: ModelQueue, n: int, version: list[Replica] | None, start: float
    ) -> tuple[list[Frame], list[Frame]]:
        """The next ``n`` frames (those pinned to ``version`` if given), split into (to run, whose producer is
        gone). Those whose deadline comes before ``start`` (when their batch would start on the device) are
        answered DEADLINE_MISSED: a deadline is a start-by time, and they would run late. The frames queued next
        take their places."""
        batch: list[Frame] = []
        abandoned: list[Frame] = []
        frames = self._pop(queue, n, version)
        if queue.deadline_timers:
            start_ns = start * 1e9
            late: list[Frame] = []
            kept: list[Frame] = []
            while frames:
                for frame in frames:
                    queue.cancel_timer(frame)
                    (late if 0 < frame.deadline_ns < start_ns else kept).append(frame)
                # short of n only for late frames (else the queue ran out): the frames queued next take their places
                frames = self._pop(queue, n - len(kept), version) if late and len(kept) < n else []
            frames = kept
            if late:
                queue.metrics.deadline_missed += len(late)
                for frame in late:
                    _fail(frame, Status.DEADLINE_MISSED, "deadline passes before the batches ahead of it end")
        for frame in frames:
            if frame.is_abandoned():
                abandoned.append(frame)
            else:
                batch.append(frame)
        return batch, abandoned

    @staticmethod
    def _pop(queue: ModelQueue, n: int, version: list[Replica] | None) -> list[Frame]:
        """Take the next ``n`` frames (those pinned to ``version`` if given) out of the queue."""
        if version is None:
            return queue.frames.pop_batch(n)
        frames = [f for f in queue.frames if queue.pinned.get(f) is version][:n]
        for frame in frames:
            queue.frames.remove(frame)
            del queue.pinned[frame]
        return frames

    @staticmethod
    def _pinned_version(queue: ModelQueue) -> list[Replica] | None:
        """The older version the first pinned frame still queued must run on; None (and the pins
        forgotten) once no queued frame is pinned."""
        for frame in queue.frames:
            version = queue.pinned.get(frame)
            if version is not None:
                return version
        queue.pinned.clear()
        return None

    @staticmethod
    def _latest_start(queue: ModelQueue) -> float:
        """When the next batch must be launched so that no queued deadline is missed (inf: none)."""
        return _start_by(_earliest_deadline_ns(queue))

    def _arm_wake(self, queue: ModelQueue, delay: float) -> None:
        when = self._loop.time() + delay
        if queue.wake is not None:
            if queue.wake_at <= when:
                return  # one at least as early is armed: it dispatches, and re-arms if the batch is not due yet
            queue.wake.cancel()
        queue.wake = self._loop.call_at(when, self._on_wake, queue)
        queue.wake_at = when  # (uvloop's handle for a time already past has no when())

    def _on_wake(self, queue: ModelQueue) -> None:
        queue.wake = None
        self._dispatch(queue)

    def _launch(self, queue: ModelQueue, replica: Replica, batch: list[Frame], now: float) -> None:
        queue.latest_start = self._latest_start(queue)
        replica.running.append(len(batch))
        replica.busy_until = replica.finish_at(now, len(batch))
        hint = (replica.busy_until - now) * HINT_FRACTION
        running = self._run_batch(replica.model, batch, hint)  # launched now, not at the task's first step
        task = self._loop.create_task(self._run(queue, replica, batch, running))
        self._tasks.add(task)
        queue.tasks[task] = replica.model
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(queue.tasks.pop)
        # The accounting once the batch is launched: the device need not wait for it (~20 us a batch, dev VM)
        metrics = queue.metrics
        metrics.batches += 1
        metrics.batch_sizes[len(batch)] += 1
        wait_s = now - np.array([frame.complete_ns for frame in batch], np.int64) / 1e9  # one pass per batch
        metrics.queue_wait_us.extend((wait_s * 1e6).tolist())
        metrics.queue_s.observe_all(wait_s)

    async def _run(self, queue: ModelQueue, replica: Replica, batch: list[Frame],
                   running: Awaitable[float | None]) -> None:  # fmt: skip
        service: float | None = None
        try:
            service = await running
        finally:
            end = time.perf_counter()
            # Only the device's own measure of a batch trains the estimates: a host measure
            # includes how late the loop noticed completion, which depends on the hint, which
            # depends on the estimate (a feedback loop that locked in a slow first batch).
            # A failed batch (None) teaches nothing.
            if service is not None:
                replica.latency.observe(len(batch), service)
            replica.running.popleft()
            # Re-anchor on what was observed: estimates summed over many launches drift.
            replica.busy_until = end + sum(replica.latency.estimate(n) for n in replica.running)
            self._dispatch(queue)

    # -- state and shutdown --------------------------------------------------------

    @property
    def busy(self) -> bool:
        """Frames queued or batches in flight."""
        return any(q.frames or q.in_flight for q in self._queues.values())

    def metrics_for(self, name: str) -> ModelMetrics:
        return self._queues[name].metrics

    def states(self) -> list[QueueState]:
        """Each model's metrics object and live queue state (cheap: nothing is computed)."""
        return [
            QueueState(name, q.metrics, len(q.frames), q.in_flight, self._sms(q)) for name, q in self._queues.items()
        ]

    def _sms(self, queue: ModelQueue) -> dict[str, int]:
        names = self.health.names
        return {names[r.device]: r.model.sms for r in queue.replicas if r.model.sms is not None}

    def _labels(self, queue: ModelQueue) -> list[str]:
        """Each replica's name: its device's, numbered ("cuda:0 ... #2") where a device holds several instances."""
        names = self.health.names
        per_device = collections.Counter(r.device for r in queue.replicas)
        seen: collections.Counter[int] = collections.Counter()
        labels = []
        for replica in queue.replicas:
            seen[replica.device] += 1
            label = names[replica.device]
            labels.append(f"{label} #{seen[replica.device]}" if per_device[replica.device] > 1 else label)
        return labels

    def metrics(self) -> dict[str, dict[str, Any]]:
        """Per model: queue length, batch sizes, queue wait, time per stage, drops, rejects, estimates."""
        out = {}
        for name, q in self._queues.items():
            snap = q.metrics.snapshot(len(q.frames), q.in_flight)
            snap["batch_latency_ms"] = {
                label: r.latency.snapshot() for label, r in zip(self._labels(q), q.replicas, strict=True)
            }
            snap["sm_share"] = q.replicas[0].model.spec.sm_share if q.replicas else 0.0
            snap["sms"] = self._sms(q)
            out[name] = snap
        return out

    def withdraw(self, producer: Producer) -> None:
        """Answer now, rather than when their turn comes, ``producer``'s queued frames whose sender is gone
        (``Frame.is_abandoned``: a closed connection, a dead ingest worker): each holds ring space until answered,
        and behind higher priorities its turn may be long in coming. ``Admission.leave`` calls it as a
        connection of ``producer`` closes (a named token's other connections keep their frames)."""
        for queue in self._queues.values():
            gone = queue.frames.withdraw(producer, _abandoned)
            for frame in gone:  # out of the queue first: finishing releases slots, which wakes producers
                queue.cancel_timer(frame)
            _abandon(queue, gone)

    def reject_queued(self, status: Status, message: str) -> None:
        """Finish every queued (not yet launched) frame with ``status``."""
        for queue in self._queues.values():
            for frame in list(queue.frames):
                self._drop(queue, frame, status, message)
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


def _earliest_deadline_ns(queue: ModelQueue) -> float:
    """The earliest deadline of a queued frame (perf_counter ns), infinity for none."""
    return min((frame.deadline_ns for frame in queue.deadline_timers), default=float("inf"))


def _start_by(deadline_ns: float) -> float:
    """The perf_counter time by which a batch holding a frame of this deadline must be launched. A deadline bounds
    when the frame starts computing, not when its result is ready (docs/PROTOCOL.md, "Deadline"): the wait for a
    fuller batch may last until just before it."""
    return deadline_ns / 1e9 - DEADLINE_MARGIN_S


def _abandoned(frame: Frame) -> bool:
    return frame.is_abandoned()


def _abandon(queue: ModelQueue, frames: list[Frame]) -> None:
    """Answer ``frames`` (out of the queue already), whose sender is gone."""
    for frame in frames:
        queue.metrics.abandoned += 1
        _fail(frame, Status.SHUTTING_DOWN, "producer disconnected")


def _fail(frame: Frame, status: Status, message: str) -> None:
    frame.fail(status, message, time.perf_counter_ns())
