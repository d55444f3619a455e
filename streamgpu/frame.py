"""What flows through the server: a received ``Frame``, and the ``Outcome`` that ends it.

Every front end (TCP, and later UDP, raw streams, HTTP, WebSocket) turns its
input into ``Frame``s and encodes ``Outcome``s its own way; the scheduler and
the batch runner only ever see these two types.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from streamgpu.protocol.wire import FrameFlags, FrameHeader, Status, Timings

if TYPE_CHECKING:
    from streamgpu.ingest.admission import Producer
    from streamgpu.memory import Slot


_LIVE = int(FrameFlags.LIVE)

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
