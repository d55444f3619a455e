"""The per-batch paths of the scheduling loop decide and answer exactly as the per-frame ones do.

``Scheduler.submit_many`` (a read of FRAME descriptors at once) against ``submit`` frame by frame;
``frame.finish_ok`` / ``release_slots`` with a ``BatchSink`` (the worker channel: one REPLIES record
per batch, one RELEASE record) against ``Frame.finish`` / ``release_slot`` one by one, outcome for outcome;
``Histogram.observe_all`` against ``observe``; and the loop benchmark's harness drives the real path.
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest

from streamgpu.config import Config
from streamgpu.frame import Frame, Outcome, finish_ok, release_slots
from streamgpu.gpu.backend import DeviceModel
from streamgpu.ingest import channel
from streamgpu.ingest.admission import Admission
from streamgpu.ingest.workers import WorkerFrame, WorkerListener, _Worker
from streamgpu.memory import HostSegment, Slot, SlotPool
from streamgpu.metrics import Histogram
from streamgpu.models.spec import ModelSpec
from streamgpu.protocol.wire import FrameFlags, FrameHeader, Status, Timings
from streamgpu.scheduler.scheduler import Scheduler

ROOT = Path(__file__).resolve().parents[2]


class Owner:
    """A producer: the scheduler hashes it; finishing counts frames."""

    def __init__(self) -> None:
        self.finished = 0

    def release(self, slot: object) -> None:
        pass

    def frame_finished(self, model: str = "", status: int = 0) -> None:
        self.finished += 1

    def frames_finished(self, model: str = "", status: int = 0, n: int = 1) -> None:
        self.finished += n


class Model(DeviceModel):
    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.device = 0

    @property
    def description(self) -> str:
        return "fake"


@dataclass
class Run:
    """A scheduler with one replica whose batches take 50 ms; what it ran and what it refused."""

    batches: list[list[int]] = field(default_factory=list)
    answers: dict[int, Status] = field(default_factory=dict)
    owners: dict[int, Owner] = field(default_factory=dict)

    def start(self, *specs: ModelSpec) -> Scheduler:
        self.scheduler = Scheduler(asyncio.get_running_loop(), self.run_batch, 1)
        for spec in specs:
            self.scheduler.add_model([Model(spec)])
        return self.scheduler

    async def run_batch(self, model: DeviceModel, frames: list[Frame], expected_s: float) -> float | None:
        self.batches.append([f.header.sequence for f in frames])
        await asyncio.sleep(0.05)
        for frame in frames:
            frame.finish(Outcome(Status.OK))
        return 0.05

    def sink(self, frame: Frame, outcome: Outcome) -> None:
        self.answers[frame.header.sequence] = outcome.status

    def frame(self, seq: int, producer: int, stream: int = 0, priority: int = 0, live: bool = False,
              deadline_s: float = 0.0, model: str = "m", shape: tuple[int, ...] = (1,)) -> Frame:  # fmt: skip
        now = time.perf_counter_ns()
        flags = FrameFlags.LIVE if live else FrameFlags.NONE
        header = FrameHeader(stream, seq, model, 1, shape, 1, priority=priority, flags=flags)
        owner = self.owners.setdefault(producer, Owner())
        deadline = now + int(deadline_s * 1e9) if deadline_s else 0
        return Frame(header, None, owner, (producer, stream), now, now, deadline, self.sink)  # type: ignore[arg-type]


def burst(run: Run) -> list[Frame]:
    """One read's worth of every kind: plain frames of three producers (one loud enough to overflow the
    queue), a LIVE frame superseding its stream's earlier ones (queued before and in this read), a
    deadline already past, one in the future, and a high priority."""
    frames = [run.frame(100 + i, producer=1, stream=1) for i in range(6)]
    frames += [run.frame(200, producer=2, stream=5), run.frame(201, producer=2, stream=5, live=True)]
    frames += [run.frame(300, producer=3, deadline_s=-0.001), run.frame(301, producer=3, deadline_s=30.0)]
    frames += [run.frame(400 + i, producer=1, stream=2) for i in range(4)]
    frames += [run.frame(500, producer=2, stream=6, priority=7), run.frame(202, producer=2, stream=5, live=True)]
    frames += [run.frame(600 + i, producer=3, stream=9) for i in range(3)]
    return frames


@pytest.mark.asyncio
@pytest.mark.parametrize("many", [False, True])
async def test_submit_many_decides_as_submit_frame_by_frame_does(many: bool) -> None:
    outcomes = []
    for batched in (False, True):
        run = Run()
        sched = run.start(ModelSpec(name="m", input_shape=(1,), preprocess="none", max_batch_size=4, max_queue=12,
                                    max_queue_delay_ms=1))  # fmt: skip
        sched.submit(run.frame(0, producer=9))  # the replica is busy from here on: the rest queues
        sched.submit(run.frame(199, producer=2, stream=5))  # queued before the read: superseded by 201
        await asyncio.sleep(0)
        frames = burst(run)
        if batched:
            sched.submit_many(frames if many else frames[:1])
            if not many:
                for frame in frames[1:]:
                    sched.submit_many([frame])
        else:
            for frame in frames:
                sched.submit(frame)
        await sched.idle()
        metrics = sched.metrics()["m"]
        outcomes.append((run.batches, run.answers, {k: metrics[k] for k in (
            "accepted", "superseded", "deadline_missed", "rejected_overloaded", "completed", "batches")}))  # fmt: skip
    assert outcomes[1] == outcomes[0]
    batches, answers, counts = outcomes[0]
    assert answers[199] == answers[200] == answers[201] == Status.SUPERSEDED and answers[202] == Status.OK
    assert answers[300] == Status.DEADLINE_MISSED and answers[301] == Status.OK
    assert counts["rejected_overloaded"] >= 1 and batches[1][0] == 500  # the high priority goes first


@pytest.mark.asyncio
async def test_submit_many_of_models_interleaved_decides_as_submit_frame_by_frame_does() -> None:
    """A read whose frames switch model from one to the next (each queue's room counted apart), with a model
    that is not served, one of the wrong frame shape and one in a fresh shape tuple of the right size."""
    outcomes = []
    for batched in (False, True):
        run = Run()
        specs = [ModelSpec(name=name, input_shape=(1,), preprocess="none", max_batch_size=4, max_queue=5,
                           max_queue_delay_ms=1) for name in ("m", "n")]  # fmt: skip
        sched = run.start(*specs)
        sched.submit(run.frame(0, producer=9))  # m's replica is busy from here on
        sched.submit(run.frame(1, producer=9, model="n"))  # and n's
        await asyncio.sleep(0)
        frames = [run.frame(10 + i, producer=1 + i % 3, model="mn"[i % 2]) for i in range(16)]
        frames[3:3] = [run.frame(40, producer=1, model="x"), run.frame(41, producer=2, shape=(2,))]
        frames[9:9] = [run.frame(42, producer=3, model="n", shape=tuple([1]))]  # equal, not the same object
        if batched:
            sched.submit_many(frames)
        else:
            for frame in frames:
                sched.submit(frame)
        await sched.idle()
        metrics = sched.metrics()
        outcomes.append((run.batches, run.answers, [metrics[m]["rejected_overloaded"] for m in "mn"]))
    assert outcomes[1] == outcomes[0]
    _batches, answers, overloaded = outcomes[0]
    assert answers[40] == answers[41] == Status.UNKNOWN_MODEL and answers[42] == Status.OK
    assert overloaded[0] >= 1 and overloaded[1] >= 1


# -- finishing a batch: a BatchSink gets what per-frame finishing would have sent ------------------------


async def worker_frames(n: int) -> tuple[_Worker, mock.Mock, list[WorkerFrame], HostSegment]:
    """A scheduling-side ``_Worker`` that received ``n`` FRAME descriptors (over two connections)."""
    spec = ModelSpec(input_shape=(2, 2), preprocess="none")
    cfg = Config(models=[spec], ring_bytes=1 << 20, max_payload_bytes=4096, ingest_workers=1, device="cpu")
    segment = HostSegment.create(cfg.ring_bytes)
    pool = SlotPool(segment.buffer)
    got: list[Frame] = []
    admission = Admission(cfg, pool, {spec.name: spec}, got.append)
    lent = pool.reserve(cfg.worker_ring_bytes)
    assert isinstance(lent, Slot)
    worker = _Worker(WorkerListener(cfg.listeners[0], admission, segment, 1), 0, lent)
    transport = mock.Mock()  # the channel's socket: what was written is in writelines' calls
    transport.is_closing.return_value = False
    worker.connection_made(transport)
    worker.data_received(b"".join(channel.opened(c, 0, 255, channel.OPEN_TCP, f"tcp:w0/{c}") for c in (1, 2)))
    records = [channel.UP.pack(channel.FRAME, 0, 0, 0, 0, 0, 1 + k % 2, 10 + k, lent.offset, 4, k, 0, k, 0, 1000 * k,
                               5000 + 3000 * k, 0) for k in range(n)]  # fmt: skip
    worker.data_received(b"".join(records))
    assert len(got) == n and all(isinstance(f, WorkerFrame) for f in got)
    return worker, transport, got, segment  # type: ignore[return-value]


def down_records(stream: bytes) -> list[tuple[Any, ...]]:
    """What the worker reads in ``stream``: each RELEASE's fids, each frame's (fid, status, result, timings),
    whether it came in a REPLY or a REPLIES record."""
    read: list[tuple[Any, ...]] = []
    pos = 0
    while pos < len(stream):
        n = channel.record_length(stream, pos)
        assert n is not None and pos + n <= len(stream)
        if stream[pos] == channel.RELEASE:
            read.append(("release", list(channel.released(stream, pos))))
        elif stream[pos] == channel.REPLY:
            fid, outcome = channel.decode_reply(stream, pos)
            result = outcome.result.tolist() if outcome.result is not None else None
            read.append((fid, outcome.status, result, tuple(outcome.timings)))
        else:
            assert stream[pos] == channel.REPLIES
            fids, rows, timings = channel.decode_ok(stream, pos)
            read += [(fid, Status.OK, row.tolist(), tuple(t)) for fid, row, t in zip(fids, rows, timings.tolist(),
                                                                                        strict=True)]  # fmt: skip
        pos += n
    return read


@pytest.mark.asyncio
async def test_a_batch_of_worker_frames_gets_the_replies_frame_by_frame_finishing_sends() -> None:
    rows = np.arange(5 * 3, dtype=np.float32).reshape(5, 3)
    timings = np.array([[k, 2 * k, 3, 4, 100 + k, 5] for k in range(5)], np.int64)
    streams = []
    for batched in (False, True):
        worker, transport, frames, segment = await worker_frames(5)
        frames[4].fail(Status.DEADLINE_MISSED, "late", 9000)  # finished already (e.g. by a shutdown): skipped
        if batched:
            release_slots(frames[:2])
            done = finish_ok(list(frames), rows, None, timings)
            assert done == [0, 1, 2, 3]
        else:
            for frame in frames[:2]:
                frame.release_slot()
            for i, frame in enumerate(frames[:4]):
                frame.finish(Outcome(Status.OK, result=rows[i], timings=Timings(*timings[i].tolist())))
        await asyncio.sleep(0)  # one flush per loop iteration
        assert worker.held == 0 and worker.in_server == 0
        assert all(f.producer.frames_in_server == 0 for f in frames)
        assert worker._admission.frames_in_flight == 0 and worker._admission.replies.total(Status.OK) == 4
        streams.append(b"".join(b"".join(call.args[0]) for call in transport.writelines.call_args_list))
        segment.close()
    assert down_records(streams[1]) == down_records(streams[0])
    assert down_records(streams[0])[0] == ("release", [10, 11]) and len(down_records(streams[0])) == 6
    kinds, pos = [], 0
    while pos < len(streams[1]):
        kinds.append(streams[1][pos])
        pos += channel.record_length(streams[1], pos) or len(streams[1])
    assert kinds == [channel.RELEASE, channel.REPLY, channel.REPLIES]  # the late one's, then one for the four OK


@pytest.mark.asyncio
async def test_frames_without_a_batch_sink_get_their_outcomes_one_by_one() -> None:
    run = Run()
    frames = [run.frame(k, producer=k % 2) for k in range(3)]
    got: list[tuple[int, Outcome]] = []
    for frame in frames:
        frame.sink = lambda f, o: got.append((f.header.sequence, o))
    first = np.arange(6, dtype=np.float32).reshape(3, 2)
    extra = np.arange(3, dtype=np.int64)
    timings = np.arange(18, dtype=np.int64).reshape(3, 6)
    assert finish_ok(frames, first, lambda i: (first[i], extra[i]), timings) == [0, 1, 2]
    assert [seq for seq, _ in got] == [0, 1, 2] and all(f.finished for f in frames)
    for i, (_, outcome) in enumerate(got):
        assert outcome.ok and outcome.timings == Timings(*range(6 * i, 6 * i + 6))
        assert outcome.result is not None and outcome.result.tolist() == first[i].tolist()
        assert isinstance(outcome.outputs, tuple) and outcome.outputs[1] == extra[i]
    assert run.owners[0].finished == 2 and run.owners[1].finished == 1


@pytest.mark.asyncio
async def test_a_delivery_that_raises_costs_no_other_frame_its_result(caplog: pytest.LogCaptureFixture) -> None:
    run = Run()
    frames = [run.frame(k, producer=0) for k in range(3)]
    got: list[int] = []

    def sink(frame: Frame, outcome: Outcome) -> None:
        if frame.header.sequence == 1:
            raise RuntimeError("a broken front end")
        got.append(frame.header.sequence)

    for frame in frames:
        frame.sink = sink
    timings = np.zeros((3, 6), np.int64)
    assert finish_ok(frames, np.zeros((3, 2), np.float32), None, timings) == [0, 1, 2]
    assert got == [0, 2] and "delivering the result of frame 0/1 failed" in caplog.text


@pytest.mark.asyncio
@pytest.mark.parametrize("subscribed", [False, True])
async def test_a_worker_batch_publishes_to_whoever_watches_as_each_of_its_frames_finishes(subscribed: bool) -> None:
    """The hub is asked whether anyone watches once per batch (``ResultHub.watching``), but a watcher that
    another's callback adds during the batch still gets the rest of it, and only watched ids are published."""
    worker, _transport, frames, segment = await worker_frames(5)  # stream ids 0..4
    hub = worker._admission.stream_results
    got: list[tuple[str, int]] = []

    def on_one(header: FrameHeader, outcome: Outcome) -> None:
        got.append(("one", header.stream_id))
        hub.subscribe(3, lambda h, o: got.append(("three", h.stream_id)))

    if subscribed:
        hub.subscribe(1, on_one)
    finish_ok(list(frames), np.zeros((5, 3), np.float32), None, np.zeros((5, 6), np.int64))
    assert got == ([("one", 1), ("three", 3)] if subscribed else [])
    assert hub.published == len(got)
    segment.close()


@pytest.mark.asyncio
async def test_a_batch_of_worker_frames_whose_results_cannot_be_encoded_is_answered() -> None:
    """Results the channel cannot carry answer each frame INTERNAL_ERROR saying why (the encoding raised out of
    ``finished_ok`` before: the worker never heard of those frames again, nor did their producers)."""
    worker, transport, frames, segment = await worker_frames(3)
    release_slots(frames)
    assert finish_ok(list(frames), np.zeros((3, 2), np.complex64), None, np.zeros((3, 6), np.int64)) == [0, 1, 2]
    await asyncio.sleep(0)
    stream = b"".join(b"".join(call.args[0]) for call in transport.writelines.call_args_list)
    read = [r for r in down_records(stream) if r[0] != "release"]
    assert [(fid, status) for fid, status, *_ in read] == [(10, Status.INTERNAL_ERROR), (11, Status.INTERNAL_ERROR),
                                                           (12, Status.INTERNAL_ERROR)]  # fmt: skip
    assert worker.held == 0 and worker.in_server == 0
    segment.close()


def test_observe_all_counts_as_observe_does() -> None:
    for n in (3, 50):
        values = np.random.default_rng(n).exponential(0.01, n)
        values[0] = 0.0005  # on a bound: le is inclusive
        one, many = Histogram(), Histogram()
        for v in values.tolist():
            one.observe(v)
        many.observe_all(values)
        assert many.counts == one.counts and many.sum == pytest.approx(one.sum)


# -- the benchmark that measures this path ---------------------------------------------------------------


@pytest.mark.asyncio
async def test_the_loop_benchmark_drives_every_frame_through_to_an_ok_reply() -> None:
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import bench_ingest
    finally:
        sys.path.remove(str(ROOT / "tools"))
    report = await bench_ingest.loop_path((8, 8, 3), 600, 64, 3, keep=True)
    read = down_records(b"".join(report["written"]))
    released = sum(len(r[1]) for r in read if r[0] == "release")
    outcomes = [r for r in read if r[0] != "release"]
    for _fid, status, result, timings in outcomes:
        assert status is Status.OK and np.shape(result) == (1000,) and 1 <= timings[5] <= 32
    replies = len(outcomes)
    assert replies == 600 and released > 0 and report["batches"] < 600  # frames were batched
