"""The unit that flows from a transport through the scheduler to a backend."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from streamgpu.memory import Slot
from streamgpu.protocol.wire import FrameFlags, FrameHeader, ReplyHeader

# Sends one reply for this frame to its producer (ordering is the sink's job).
ReplySink = Callable[["Frame", ReplyHeader, "bytes | memoryview"], None]


@dataclass(eq=False, slots=True)
class Frame:
    """One received frame: its header, the ring slot holding its payload, its clocks.

    Times are ``time.perf_counter_ns()`` values on the server. ``deadline_ns``
    is 0 when the frame has none. ``reply`` is called exactly once per frame.
    """

    header: FrameHeader
    slot: Slot | None
    received_ns: int  # header complete
    complete_ns: int  # payload complete
    deadline_ns: int
    reply_sink: ReplySink
    is_abandoned: Callable[[], bool] = field(default=lambda: False)  # producer gone: do not run
    producer: int = 0  # which connection sent it: streams are (producer, stream_id)
    replied: bool = False

    @property
    def live(self) -> bool:
        return bool(self.header.flags & FrameFlags.LIVE)

    def reply(self, header: ReplyHeader, payload: bytes | memoryview = b"") -> None:
        if self.replied:
            raise RuntimeError(f"frame {self.header.stream_id}/{self.header.sequence} replied twice")
        self.replied = True
        self.reply_sink(self, header, payload)
