"""Raw producers: each TCP connection is one stream of back-to-back frames, no header, no replies.

What ``ffmpeg -f rawvideo -pix_fmt rgb24 -s 224x224 tcp://HOST:PORT`` and
GStreamer's ``tcpclientsink`` send: every frame is exactly the listener's
model's input (shape and dtype, ``ModelSpec.frame_nbytes`` bytes), one after
the other. Results never go back on the connection: each frame's outcome is
published on the server's result hub (``admission.stream_results``) under the
listener's stream id (option ``stream_id``, by default the port number), where
WebSocket subscribers and the JSON-lines results sink (``streamgpu.results``)
take it.

Each connection is one anonymous producer (its own ring share and scheduling
turn, as a framed TCP connection without a named token) and one stream. A
frame begins when its first bytes have come (a first read of at most 4 KiB
into scratch, so that its clock starts then and no slot is held between
frames): it is admitted (``Admission.admit``) and given its ring slot, those
bytes are copied there, and the kernel writes the rest straight into the slot
(``get_buffer`` returns a view of it).

Two modes (listener option ``live``):

* live (the default; a camera wants the newest frame): every frame carries
  the LIVE flag, so the scheduler answers the stream's older queued frame
  SUPERSEDED when a newer one is complete. A raw socket is never paused: when
  no ring space is free at a frame's start (the producer's share or the ring
  is full), that frame is read into a scratch buffer and dropped (published
  OVERLOADED and counted); the camera is never blocked.
* every frame (``live = false``; a file or a test that wants every frame):
  when no ring space is free, reading pauses at the frame boundary (a few KiB
  read ahead into scratch, copied into the slot once it is granted) until
  space frees: TCP flow control slows the producer down, nothing is dropped.
  At most ``max_frames_per_connection`` frames of one connection are in the
  server; reading pauses at a frame boundary above that.

A connection that closes, or stalls (``receive_idle_timeout_s``, or a frame
past its time budget), in the middle of a frame: the partial frame is dropped,
its slot released, published (BAD_FRAME / RECEIVE_TIMEOUT) and counted.
There is no authentication on a raw port (there is nothing to carry a token):
bind it to loopback, or to a network you trust.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import socket
import time
import typing
from typing import Any

from streamgpu.config import ListenerSpec
from streamgpu.frame import Frame, Outcome
from streamgpu.ingest.admission import Admission, Grant, Producer, Refused, Reservation
from streamgpu.ingest.base import SocketListener, connection_ids, peer_name
from streamgpu.ingest.hub import Origin
from streamgpu.memory import Slot
from streamgpu.protocol.wire import FrameFlags, FrameHeader, Status, Timings

log = logging.getLogger(__name__)

SCRATCH_BYTES = 64 * 1024  # read-ahead while waiting for a slot, and the chunk size of dropped frames
FIRST_READ = 4096  # a frame's first read, into scratch: the frame begins when these bytes come


class _State(enum.Enum):
    START = 1  # between frames: the next bytes begin one
    FILL = 2  # reading the frame into its slot
    WAIT = 3  # (every-frame mode) no ring space yet: reading into scratch, paused when it is full
    DROP = 4  # no ring space (live mode) or refused: the frame's bytes are read into scratch and dropped
    CLOSED = 5


class RawConnection(asyncio.BufferedProtocol):
    """Server side of one raw producer connection."""

    def __init__(self, listener: RawListener) -> None:
        self._listener = listener
        self._admission = listener.admission
        self._nbytes = listener.frame_nbytes
        self._transport: asyncio.Transport | None = None
        self._state = _State.START
        self._scratch = bytearray(min(SCRATCH_BYTES, self._nbytes))
        self._first_read = min(FIRST_READ, self._nbytes)
        self._scratch_view = memoryview(self._scratch)
        self._have = 0  # WAIT: bytes of the frame read ahead into scratch
        self._left = 0  # DROP: bytes of the dropped frame still to come
        self._header: FrameHeader | None = None
        self._slot: Slot | None = None
        self._slot_view: memoryview | None = None
        self._filled = 0
        self._reservation: Reservation | None = None
        self._received_ns = 0
        self._deadline_ns = 0
        self._due = 0.0  # time.monotonic() by which the frame being filled must be complete
        self._last_progress = 0.0
        self._sequence = 0  # the next frame's number on this connection
        self._reading_paused = False
        self._blocked = False  # every-frame mode: too many frames in the server, paused at a boundary
        self._sink = self._on_outcome  # one bound method for every frame of the connection
        self.producer: Producer | None = None
        self.id = next(connection_ids)
        self.stream = f"raw:{listener.port}/{self.id}"
        self._origin = Origin("raw", self.stream)
        self.peer = "?"

    # -- asyncio callbacks ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = typing.cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        self._transport = transport
        self.peer = peer_name(transport)
        if not self._listener.connection_opened(self):
            max_connections = self._admission.config.max_connections
            self._admission.refused_handshake(self.peer, Status.OVERLOADED, f"too many connections ({max_connections})")
            self._state = _State.CLOSED
            transport.abort()  # there is no reply channel to say why
            return
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)  # find producers that vanished
        grant = Grant(None, self._admission.config.max_priority)
        self.producer = self._admission.producer_for(grant, self.stream)
        log.info("raw producer %s connected from %s, results on stream id %d", self.stream, self.peer,
                 self._listener.stream_id)  # fmt: skip
        if not self._admission.accepting:
            self.stop_reading()

    def get_buffer(self, sizehint: int) -> memoryview:
        state = self._state
        if state is _State.START:
            # A frame begins when its first bytes are here, not when a buffer is asked for (uvloop
            # asks right after the last read, long before a camera's next frame): a short first
            # read into scratch, copied into the slot (4 KiB); the rest goes straight into the slot.
            return self._scratch_view[: self._first_read]
        if state is _State.FILL:
            assert self._slot_view is not None
            return self._slot_view[self._filled :]
        if state is _State.DROP:
            return self._scratch_view[: min(self._left, len(self._scratch))]
        if state is _State.WAIT:
            if self._have == len(self._scratch):  # read although paused (should not happen): do not block
                self._give_up_waiting()
                return self._scratch_view[: min(self._left, len(self._scratch))]
            return self._scratch_view[self._have :]
        return self._scratch_view  # CLOSED: whatever still comes is dropped

    def buffer_updated(self, nbytes: int) -> None:
        state = self._state
        if state is _State.START:
            self._start_frame(nbytes)
        elif state is _State.FILL:
            self._filled += nbytes
            self._last_progress = time.monotonic()
            if self._filled == self._nbytes:
                self._finish_frame()
        elif state is _State.DROP:
            self._left -= nbytes
            if self._left == 0:
                self._state = _State.START
        elif state is _State.WAIT:
            self._have += nbytes
            if self._have == len(self._scratch):
                self._pause_reading()  # flow control: the producer waits for our ring space

    def eof_received(self) -> bool:
        return False  # nothing to reply: close

    def connection_lost(self, exc: Exception | None) -> None:
        self._drop_partial_frame(Status.BAD_FRAME, "connection closed mid-frame")
        self._state = _State.CLOSED
        self._transport = None
        self._listener.connection_closed(self)
        if self.producer is not None:
            self._admission.leave(self.producer)
            self.producer = None
        log.info("raw producer %s (%s) closed", self.stream, self.peer)

    # -- frames ---------------------------------------------------------------------------------

    def _start_frame(self, first: int) -> None:
        """The frame's first ``first`` bytes are at the start of scratch: admit it, find its space."""
        producer = self.producer
        assert producer is not None
        self._received_ns = now_ns = time.perf_counter_ns()
        self._header = header = self._listener.header._replace(sequence=self._sequence)
        self._sequence += 1
        try:
            self._deadline_ns = self._admission.admit(producer, header, now_ns)
        except Refused as refused:
            self._drop(refused.status, refused.message, first)
            return
        got = producer.reserve(self._nbytes, self._on_slot)
        if not isinstance(got, Reservation):
            self._use_slot(got)
            assert self._slot_view is not None
            self._slot_view[:first] = self._scratch_view[:first]
            self._filled = first
            if first == self._nbytes:
                self._finish_frame()
        elif self._listener.live:
            got.cancel()  # a camera is never blocked: this frame is dropped, the next one may find space
            self._drop(Status.OVERLOADED, "no receive buffer space for this raw stream: frame dropped", first)
        else:
            self._reservation = got
            self._have = first  # read ahead into scratch, where it already is
            self._state = _State.WAIT
            self._update_reading()

    def _use_slot(self, slot: Slot) -> None:
        self._slot = slot
        self._slot_view = self._admission.pool.view(slot)
        self._filled = 0
        self._state = _State.FILL
        self._last_progress = time.monotonic()
        self._due = self._last_progress + self._admission.payload_budget_s(self._nbytes)

    def _on_slot(self, slot: Slot) -> None:
        """Every-frame mode: ring space for the waiting frame; move what was read ahead into it."""
        self._reservation = None
        self._use_slot(slot)
        assert self._slot_view is not None
        self._slot_view[: self._have] = self._scratch_view[: self._have]
        self._filled, self._have = self._have, 0
        if self._filled == self._nbytes:
            self._finish_frame()
        self._update_reading()

    def _give_up_waiting(self) -> None:
        assert self._reservation is not None
        self._reservation.cancel()
        self._reservation = None
        have, self._have = self._have, 0
        self._drop(Status.OVERLOADED, "no receive buffer space for this raw stream: frame dropped", have)

    def _drop(self, status: Status, message: str, came: int) -> None:
        """Read the rest of the frame into scratch and throw it away (``came`` bytes of it are read)."""
        self._listener.dropped += 1
        self._publish_now(status, message)
        self._left = self._nbytes - came
        self._state = _State.DROP if self._left else _State.START

    def _finish_frame(self) -> None:
        header, slot, producer = self._header, self._slot, self.producer
        assert header is not None and slot is not None and producer is not None
        self._header = self._slot = self._slot_view = None
        self._state = _State.START
        frame = Frame(
            header=header,
            slot=slot,
            producer=producer,
            stream=self.stream,
            received_ns=self._received_ns,
            complete_ns=time.perf_counter_ns(),
            deadline_ns=self._deadline_ns,
            sink=self._sink,
        )
        self._listener.frames += 1
        self._admission.submit(frame)
        if not self._listener.live and producer.frames_in_server >= self._admission.config.max_frames_per_connection:
            self._blocked = True
            self._update_reading()

    def _on_outcome(self, frame: Frame, outcome: Outcome) -> None:
        self._admission.stream_results.publish(frame.header, outcome, self._origin)
        cap = self._admission.config.max_frames_per_connection
        if self._blocked and self.producer is not None and self.producer.frames_in_server < cap:
            self._blocked = False
            self._update_reading()

    def _publish_now(self, status: Status, message: str) -> None:
        assert self._header is not None
        self._admission.replied(self._header.model, status)
        timings = Timings(total_us=(time.perf_counter_ns() - self._received_ns) // 1000)
        self._admission.stream_results.publish(self._header, Outcome(status, message, timings=timings), self._origin)

    def _drop_partial_frame(self, status: Status, message: str) -> None:
        """Free and publish a frame begun but not complete (closed, stalled, shutting down)."""
        if self._state is _State.FILL:
            got = self._filled
            assert self._slot is not None and self.producer is not None
            self.producer.release(self._slot)
            self._slot = self._slot_view = None
        elif self._state is _State.WAIT:
            got = self._have
            assert self._reservation is not None
            self._reservation.cancel()
            self._reservation = None
        else:
            return  # between frames, or dropping one (counted when its bytes came)
        self._state = _State.START
        self._listener.partial += 1
        self._publish_now(status, f"{message} ({got} of {self._nbytes} bytes came): frame dropped")

    # -- flow control ---------------------------------------------------------------------------

    def _update_reading(self) -> None:
        if self._transport is None or self._state is _State.CLOSED:
            return
        waiting = self._state is _State.WAIT and self._have == len(self._scratch)
        if waiting or (self._blocked and self._state is _State.START):
            self._pause_reading()
        elif self._reading_paused:
            self._reading_paused = False
            self._transport.resume_reading()

    def _pause_reading(self) -> None:
        if not self._reading_paused and self._transport is not None:
            self._reading_paused = True
            self._transport.pause_reading()

    # -- what the listener calls ------------------------------------------------------------------

    def stop_reading(self) -> None:
        """Shutdown: read no more; a frame half received is dropped (published SHUTTING_DOWN)."""
        self._drop_partial_frame(Status.SHUTTING_DOWN, "server is shutting down")
        self._pause_reading()
        self._state = _State.CLOSED

    def close(self) -> None:
        self._state = _State.CLOSED
        if self._transport is not None:
            self._transport.close()

    def abort(self, status: Status, message: str) -> None:
        """Drop the connection now; the frame being received is dropped and published with ``status``."""
        log.info("aborting raw producer %s (%s): %s", self.stream, self.peer, message)
        self._drop_partial_frame(status, message)
        self._state = _State.CLOSED
        if self._transport is not None:
            self._transport.abort()

    def sweep(self, now: float) -> None:
        """A frame must keep arriving: its time budget and the idle limit, as for framed payloads."""
        if self._state is not _State.FILL:
            return
        idle = self._admission.config.receive_idle_timeout_s
        if now > self._due:
            budget = self._admission.payload_budget_s(self._nbytes)
            self.abort(Status.RECEIVE_TIMEOUT, f"frame did not arrive within {budget:.3g} s")
        elif now - self._last_progress > idle:
            self.abort(Status.RECEIVE_TIMEOUT, f"frame made no progress for {idle:g} s")


class RawListener(SocketListener[RawConnection]):
    """Raw frame streams on one TCP address (``ListenerSpec(kind="raw", options={"model": NAME})``).

    Options: ``model`` (required: the configured model every frame goes to;
    frames are its input shape and dtype), ``live`` (default true),
    ``stream_id`` (default: the port it listens on, once bound).
    """

    kind = "raw"

    def __init__(self, spec: ListenerSpec, admission: Admission) -> None:
        super().__init__(spec, admission)
        model = admission.specs[spec.options["model"]]  # the config checked that it exists
        self.live = bool(spec.options.get("live", True))
        self.frame_nbytes = model.frame_nbytes
        self.header = FrameHeader(
            stream_id=0,
            sequence=0,
            model=model.name,
            dtype_code=model.frame_dtype_code,
            shape=model.input_shape,
            payload_len=model.frame_nbytes,
            flags=FrameFlags.LIVE if self.live else FrameFlags.NONE,
        )
        self.port = spec.port
        self.frames = 0  # complete frames submitted
        self.dropped = 0  # frames read and dropped: no ring space (live mode) or refused
        self.partial = 0  # frames cut off by a close, a stall or shutdown

    def make_connection(self) -> RawConnection:
        return RawConnection(self)

    @property
    def stream_id(self) -> int:
        """The stream id every frame of this listener carries, and its results are published under."""
        return self.header.stream_id

    async def start(self) -> None:
        await super().start()
        self.port = self.addresses[0][1]  # port 0 in the config picked one
        self.header = self.header._replace(stream_id=self.spec.options.get("stream_id", self.port))

    def stats(self) -> dict[str, Any]:
        out = super().stats()
        out.update(port=self.port, model=self.header.model, stream_id=self.stream_id, live=self.live,
                   frames=self.frames, dropped_frames=self.dropped, partial_frames=self.partial)  # fmt: skip
        return out
