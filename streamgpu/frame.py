"""What flows through the server: a received ``Frame``, and the ``Outcome`` that ends it.

Every front end (TCP, and later UDP, raw streams, HTTP, WebSocket) turns its
input into ``Frame``s and encodes ``Outcome``s its own way; the scheduler and
the batch runner only ever see these two types.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple, Protocol

import numpy as np

from streamgpu.protocol.wire import FrameFlags, FrameHeader, Status, Timings

if TYPE_CHECKING:
    from streamgpu.ingest.admission import Producer
    from streamgpu.memory import Slot


_LIVE = int(FrameFlags.LIVE)
log = logging.getLogger(__name__)

# Every output of a frame, for a model with several: a tuple, or a dict keyed by output name.
Outputs = tuple[np.ndarray, ...] | dict[str, np.ndarray]


class Outcome(NamedTuple):
    """How one frame ended: a status, a result (OK only), server timings and a message.

    ``result`` is one frame's output, without a batch dimension (the default
    model's is ``(1000,)`` float32). For a model with several outputs (a tuple
    or a dict of tensors, or a ``topk`` postprocess) ``outputs`` holds them all,
    in the model's structure, and ``result`` is the first. Arrays may be views
    of a buffer that is reused once the outcome has been delivered: a sink that
    keeps them longer copies them.
    """

    status: Status
    message: str = ""
    result: np.ndarray | None = None
    timings: Timings = Timings()
    outputs: Outputs | None = None

    @property
    def ok(self) -> bool:
        return self.status == Status.OK


# Delivers a frame's outcome to its producer (ordering and encoding are the front end's job).
OutcomeSink = Callable[["Frame", Outcome], None]


class BatchSink(Protocol):
    """A front end that takes many frames of one batch in one call (one encoding, one record, for the lot).

    A frame that names one (``Frame.batch_sink``) is still finished exactly once and has its
    producer's accounting done by this module; only the delivery is grouped. Its ``sink`` still
    takes every outcome that is not a batch's OK (errors, refusals, timeouts).
    """

    def slots_released(self, frames: list[Frame]) -> None:
        """Nothing reads the payloads of ``frames`` (whose ``slot`` is still set) any more: give them back."""

    def finished_ok(self, frames: list[Frame], rows: np.ndarray, timings: np.ndarray) -> None:
        """``frames`` (marked finished, slots possibly still set) ended OK: ``rows[i]`` is ``frames[i]``'s result,
        ``timings[i]`` its ``Timings`` as six int64 (the fields in order). Both arrays are the batch's own (its
        backend never writes them again): a sink may keep them, unchanged, until it has written them."""


@dataclass(eq=False, slots=True)
class Frame:
    """One received frame: its header, the host slot holding its payload, its clocks, its producer.

    Times are ``time.perf_counter_ns()`` values on the server. ``deadline_ns``
    is 0 when the frame has none. ``finish`` is called exactly once per frame;
    ``release_slot`` as soon as nothing reads the payload any more (after the
    copy to the device), which may be long before ``finish``.
    """

    header: FrameHeader
    slot: Slot | None
    producer: Producer
    stream: Hashable  # (connection, stream_id): the unit of reply order and of LIVE superseding
    received_ns: int  # header accepted
    complete_ns: int  # payload complete
    deadline_ns: int
    sink: OutcomeSink
    is_abandoned: Callable[[], bool] = field(default=lambda: False)  # producer gone: do not run
    finished: bool = False
    batch_sink: BatchSink | None = None  # set: a batch's OK outcomes and slot releases go to it in one call

    @property
    def live(self) -> bool:
        return bool(self.header.flags._value_ & _LIVE)  # the int, not IntFlag.__and__ (~2 us per call)

    def release_slot(self) -> None:
        """Give the payload's host memory back (idempotent); the producer owns the accounting."""
        if self.slot is not None:
            slot, self.slot = self.slot, None
            self.producer.release(slot)

    def finish(self, outcome: Outcome) -> None:
        """End the frame: free its slot if still held, and deliver ``outcome`` to its producer."""
        if self.finished:
            raise RuntimeError(f"frame {self.header.stream_id}/{self.header.sequence} finished twice")
        self.finished = True
        self.release_slot()
        self.producer.frame_finished(self.header.model, outcome.status)
        self.sink(self, outcome)

    def fail(self, status: Status, message: str, now_ns: int) -> None:
        """Finish with an error ``status`` (no result); timings say how long the frame was here."""
        self.finish(
            Outcome(
                status,
                message,
                timings=Timings(
                    receive_us=(self.complete_ns - self.received_ns) // 1000,
                    total_us=(now_ns - self.received_ns) // 1000,
                ),
            )
        )


def unsendable(frames: Sequence[Frame], rows: np.ndarray, error: Exception) -> Outcome:
    """What a ``BatchSink`` answers ``frames`` whose OK results it cannot encode (a dtype or rank the wire does
    not carry: loading refuses such models, but for odd ones): INTERNAL_ERROR saying why, logged once a batch."""
    shape = list(rows.shape[1:])
    log.error("model %s: the results of %d frames (%s %s) cannot be sent: %s", frames[0].header.model, len(frames),
              rows.dtype, shape, error)  # fmt: skip
    return Outcome(Status.INTERNAL_ERROR, f"the result ({rows.dtype} {shape}) cannot be sent: {error}")


def release_slots(frames: Sequence[Frame]) -> None:
    """``release_slot`` of every frame of a batch; those of a ``BatchSink`` in one call per sink."""
    groups: dict[BatchSink, list[Frame]] = {}
    for frame in frames:
        sink = frame.batch_sink
        if sink is None:
            frame.release_slot()
        elif frame.slot is not None:
            group = groups.get(sink)
            if group is None:
                groups[sink] = [frame]
            else:
                group.append(frame)
    for sink, group in groups.items():
        sink.slots_released(group)


def finish_ok(frames: list[Frame], rows: np.ndarray, outputs: Callable[[int], Outputs | None] | None,
              timings: np.ndarray) -> list[int]:  # fmt: skip
    """``finish`` the frames of one batch with OK: ``rows[i]`` is frame i's result, ``outputs(i)`` all its
    outputs (None: ``rows`` is the only one), ``timings[i]`` its ``Timings`` as six int64.

    Frames finished already (a shutdown out of time) are skipped; returns the positions of those
    finished here. Per frame this only marks it finished; producer accounting is one call per
    producer, and frames of a ``BatchSink`` are delivered in one call per sink, unless the model has
    several outputs (``BatchSink.finished_ok`` takes the one): then each frame's outcome goes to its
    ``sink``, with every output.
    """
    done: list[int] = []
    grouped: dict[BatchSink, list[int]] = {}
    producers: dict[Producer, int] = {}
    for i, frame in enumerate(frames):
        if frame.finished:
            continue
        frame.finished = True
        done.append(i)
        producer = frame.producer
        producers[producer] = producers.get(producer, 0) + 1
        sink = frame.batch_sink
        if sink is not None and outputs is None:
            group = grouped.get(sink)
            if group is None:
                grouped[sink] = [i]
            else:
                group.append(i)
    if not done:
        return done
    model = frames[done[0]].header.model  # one batch: one model
    for producer, n in producers.items():
        producer.frames_finished(model, Status.OK, n)
    # Every frame is marked finished already: a delivery that raises must not cost the others theirs.
    for sink, positions in grouped.items():
        try:
            if len(positions) == len(frames):
                sink.finished_ok(frames, rows, timings)
            else:
                sink.finished_ok([frames[i] for i in positions], rows[positions], timings[positions])
        except Exception:
            log.exception("delivering the results of %d frames failed", len(positions))
    if sum(map(len, grouped.values())) == len(done):
        return done  # all delivered (the common case in worker mode)
    listed = timings.tolist()
    for i in done:
        frame = frames[i]
        if frame.batch_sink is None or outputs is not None:
            try:
                frame.release_slot()
                frame.sink(frame, Outcome(Status.OK, result=rows[i], timings=Timings(*listed[i]),
                                          outputs=outputs(i) if outputs is not None else None))  # fmt: skip
            except Exception:
                log.exception("delivering the result of frame %d/%d failed", frame.header.stream_id,
                              frame.header.sequence)  # fmt: skip
    return done
