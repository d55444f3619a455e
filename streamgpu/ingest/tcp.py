"""The framed TCP front end: one ``asyncio.BufferedProtocol`` per producer connection.

The kernel writes payload bytes straight into the frame's slot in host
memory: once a header is admitted and its slot reserved, ``get_buffer``
returns a view of the slot. Headers are read into a scratch buffer. After a
large payload the scratch read asks for exactly one header, so the next
payload's bytes are not pulled into scratch (which would cost a copy); after
a small payload it reads in bulk, so many small frames cost one system call,
and their payloads are copied from scratch into their slots.

``TcpConnection`` subclasses ``asyncio.BufferedProtocol`` (which asyncio
checks for) and not ``asyncio.Protocol`` (uvloop only takes the buffered path
for protocols that are not ``Protocol`` subclasses).

States: HELLO -> HEADER <-> PAYLOAD | DISCARD, with WAIT_SLOT (reading paused,
nothing reserved) while the frame waits for ring space, and CLOSED.

Rules that keep one producer from stalling another:

* Nothing is reserved before the bounds are checked: a connection blocked by
  its own flow control (replies it does not read, too many frames in the
  server) stops at a header boundary, holding no ring space.
* Reading is never paused in the middle of a payload, so a payload's time
  budget (``Admission.payload_budget_s``: a base plus a minimum rate) counts
  only the producer's own time. A producer that trickles is dropped when the
  budget is spent, however steadily it trickles.
* A frame waiting for ring space waits in arrival order (``SlotPool``), and
  its deadline keeps running from its header's arrival.
* Before the handshake a connection holds a HELLO-sized buffer and a place
  under ``max_connections``, for at most ``hello_timeout_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import operator
import socket
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from streamgpu.config import ListenerSpec
from streamgpu.frame import Frame, Outcome, unsendable
from streamgpu.ingest.admission import Admission, Grant, Producer, Refused, Reservation
from streamgpu.ingest.base import SocketListener, connection_ids, peer_name, write_eof_or_abort
from streamgpu.ingest.hub import Origin
from streamgpu.memory import Slot
from streamgpu.metrics import NO_MODEL
from streamgpu.protocol import wire
from streamgpu.protocol.ordering import ReplyOrder, Ticket
from streamgpu.protocol.wire import FrameHeader, ProtocolError, ReplyFlags, ReplyHeader, Status, Timings

log = logging.getLogger(__name__)
_ECHOED = operator.attrgetter("header.stream_id", "header.sequence", "header.timestamp_ns")  # what a reply echoes

HELLO_BYTES = 8 + wire.MAX_TOKEN  # the largest HELLO: all a connection gets before its handshake
SCRATCH_BYTES = 64 * 1024
BULK_READ_BELOW = 16 * 1024  # payloads smaller than this are read in bulk through scratch
HIGH_WATER = 4 * 1024 * 1024  # unsent reply bytes at which the producer's reading is paused
# Closing with unread input makes the kernel reset the connection and drop the replies not yet
# sent: so a closing connection shuts its side for writing and reads (and drops) what is still
# coming, for at most this long and this much, before it is closed for good.
LINGER_S = 2.0
LINGER_BYTES = 4 * 1024 * 1024


class _State(enum.Enum):
    HELLO = 1
    HEADER = 2
    PAYLOAD = 3
    DISCARD = 4
    WAIT_SLOT = 5
    CLOSED = 6
    DRAIN = 7  # closing: our side is shut for writing, input is read and dropped until the producer closes
    ADMITTING = 8  # the HELLO waits for the scheduling process's word (an ingest worker's, on a token's cap)


@dataclass(eq=False, slots=True)
class TcpFrame(Frame):
    """A frame received on a TCP connection: its place in its stream's reply order."""

    ticket: Ticket | None = None


class TcpConnection(asyncio.BufferedProtocol):
    """Server side of one producer connection.

    It is its frames' ``BatchSink``: a batch's OK results for its frames are encoded in one array
    (``wire.encode_ok_replies``), each frame's reply a slice of it, where one by one each cost an
    ``Outcome``, a ``ReplyHeader`` and a ``struct`` pack.
    """

    def __init__(self, listener: TcpListener) -> None:
        self._listener = listener
        self._admission = listener.admission
        self._transport: asyncio.Transport | None = None
        self._out: list[bytes | memoryview] = []  # replies ready to write, flushed once per loop iteration
        self._state = _State.HELLO
        self._scratch = bytearray(HELLO_BYTES)  # grows to SCRATCH_BYTES after the handshake
        self._scratch_view = memoryview(self._scratch)
        self._have = 0  # bytes of scratch holding unparsed input
        self._bulk = True  # read headers in bulk (last payload was small)
        self.version = wire.VERSION  # the protocol version the HELLO chose
        self.producer: Producer | None = None
        # the frame being received
        self._header: FrameHeader | None = None
        self._slot: Slot | None = None
        self._slot_view: memoryview | None = None
        self._filled = 0
        self._received_ns = 0
        self._deadline_ns = 0
        self._ticket: Ticket | None = None
        self._reservation: Reservation | None = None
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._discard_left = 0
        self._order = ReplyOrder()  # one ticket per frame whose reply has not been written yet
        self._last_progress = 0.0  # time.monotonic() of the payload's last bytes (or of its slot)
        self._linger: asyncio.TimerHandle | None = None
        self._due = 0.0  # time.monotonic() by which the HELLO (state HELLO) or the payload (PAYLOAD) must be in
        self._blocked: set[str] = set()  # why no new frame may start; reading pauses at the next frame boundary
        self._reading_paused = False
        self._parsing = False  # inside _process_scratch (which an outcome delivered synchronously may re-enter)
        self.id = next(connection_ids)
        self.origin = listener.origin(self.id)  # how its frames' outcomes are published
        self._sink = self._on_outcome  # one bound method for every frame of the connection
        self.peer: str = "?"
        self._frames = 0  # frames received (for the close line)
        self._close_reason = "closed by the producer"

    # -- asyncio callbacks ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = typing.cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        self._transport = transport
        self.peer = peer_name(transport)
        if not self._listener.connection_opened(self):
            self._welcome(Status.OVERLOADED, f"too many connections ({self._admission.config.max_connections})", 1)
            self._close()
            return
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # replies are small: send now
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)  # find producers that vanished
        transport.set_write_buffer_limits(high=HIGH_WATER)
        self._due = time.monotonic() + self._admission.config.hello_timeout_s
        if not self._admission.accepting:
            self.stop_reading()

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._state is _State.PAYLOAD:
            assert self._slot_view is not None
            return self._slot_view[self._filled :]
        if self._state is _State.DISCARD:
            return self._scratch_view[: min(self._discard_left, len(self._scratch))]
        if self._state is _State.DRAIN:
            return self._scratch_view
        # HELLO / HEADER / WAIT_SLOT read into scratch after what is buffered
        room = len(self._scratch) - self._have
        if self._state is _State.HEADER and not self._bulk:
            need = wire.frame_header_length(self._scratch_view[: self._have])
            want = (need if need is not None else wire.FRAME_HEADER_SIZE) - self._have
            room = min(room, max(want, 1))
        return self._scratch_view[self._have : self._have + room]

    def buffer_updated(self, nbytes: int) -> None:
        try:
            if self._state is _State.PAYLOAD:
                self._filled += nbytes
                self._last_progress = time.monotonic()
                assert self._header is not None
                if self._filled == self._header.payload_len:
                    self._finish_payload()
                    self._process_scratch()
            elif self._state is _State.DISCARD:
                self._discard_left -= nbytes
                if self._discard_left == 0:
                    self._state = _State.HEADER
                    self._process_scratch()
            elif self._state is _State.DRAIN:
                self._discard_left -= nbytes
                if self._discard_left <= 0 and self._transport is not None:
                    self._transport.abort()  # lingered long enough
                return
            else:
                self._have += nbytes
                self._process_scratch()
        except ProtocolError as exc:
            self._fail(exc.status, str(exc))
            return
        if self._blocked or self._state is _State.WAIT_SLOT:  # flow control takes effect at this boundary
            self._update_reading()

    def eof_received(self) -> bool:
        return False  # close our side too; replies of a half-closed producer cannot be delivered reliably

    def connection_lost(self, exc: Exception | None) -> None:
        if self._linger is not None:
            self._linger.cancel()
        self._drop_partial_frame()
        self._state = _State.CLOSED
        self._transport = None
        self._listener.connection_closed(self)
        if self.producer is not None:
            log.info("connection %d from %s closed after %d frames: %s", self.id, self.peer, self._frames,
                     self._close_reason, extra={"event": "connection_closed", "connection": self.id,
                     "peer": self.peer, "frames": self._frames, "reason": self._close_reason})  # fmt: skip
            self._admission.leave(self.producer, queued=self.frames_outstanding > 0)
            self.producer = None

    @property
    def frames_outstanding(self) -> int:
        """Frames of this connection not answered yet (in the server, or their replies held back for order)."""
        return len(self._order)

    def pause_writing(self) -> None:
        self._block("write")  # the producer does not read its replies: take no new frames from it

    def resume_writing(self) -> None:
        self._unblock("write")

    # -- parsing ------------------------------------------------------------------------------

    def _process_scratch(self) -> None:
        """Consume everything complete in scratch; leave a partial header (or a blocked one) at its start."""
        if self._parsing:
            # Re-entered: a frame submitted by the running parse was answered at once (deadline passed,
            # queue full, superseded), which unblocked this connection. The running parse re-checks
            # the blocks before each header and goes on; a second parse would read the same bytes again.
            return
        self._parsing = True
        try:
            self._parse_scratch()
        finally:
            self._parsing = False

    def _parse_scratch(self) -> None:
        pos = 0
        view = self._scratch_view
        while pos < self._have:
            state = self._state
            if state is _State.PAYLOAD:  # payload bytes that arrived with the header: copy into the slot
                assert self._slot_view is not None and self._header is not None
                take = min(self._have - pos, self._header.payload_len - self._filled)
                self._slot_view[self._filled : self._filled + take] = view[pos : pos + take]
                self._filled += take
                pos += take
                if self._filled == self._header.payload_len:
                    self._finish_payload()
            elif state is _State.DISCARD:
                take = min(self._have - pos, self._discard_left)
                self._discard_left -= take
                pos += take
                if self._discard_left == 0:
                    self._state = _State.HEADER
            elif state is _State.HEADER:
                if self._blocked:  # checked before anything is reserved for the next frame
                    break
                parsed = wire.decode_frame_header(view[pos : self._have])
                if parsed is None:
                    break
                header, used = parsed
                pos += used
                self._on_header(header)
            elif state is _State.HELLO:
                parsed_hello = wire.decode_hello(view[pos : self._have])
                if parsed_hello is None:  # the HELLO buffer holds the longest valid HELLO
                    break
                hello, used = parsed_hello
                pos += used
                self._on_hello(hello)
            else:  # WAIT_SLOT resumes from here once the slot is granted; CLOSED drops the rest
                break
        if pos:
            rest = self._have - pos
            self._scratch[:rest] = self._scratch[pos : self._have]  # overlapping move: slice copies first
            self._have = rest

    def _on_hello(self, hello: wire.Hello) -> None:
        admission = self._admission
        if hello.version not in wire.SUPPORTED_VERSIONS:
            supported = " or ".join(map(str, wire.SUPPORTED_VERSIONS))
            self._welcome(
                Status.UNSUPPORTED_VERSION, f"protocol version {hello.version} is not supported; use {supported}", 1
            )
            self._close()
            return
        self.version = hello.version
        if not admission.accepting:
            self._welcome(Status.SHUTTING_DOWN, "server is shutting down", hello.version)
            self._close()
            return
        grant = admission.authenticate(hello.token)
        if grant is None:
            self._welcome(Status.UNAUTHORIZED, "bad auth token", hello.version)
            self._close()
            return
        if self._listener.admission_pending(self, grant, lambda refused: self._on_admission(grant, refused)):
            self._state = _State.ADMITTING  # parsing stops here, reading pauses, until the answer
            self._pause_reading()
            return
        self._open(grant, None)

    def _on_admission(self, grant: Grant, refused: Refused | None) -> None:
        """The answer to an asked HELLO (``TcpListener.admission_pending``)."""
        if self._state is not _State.ADMITTING or self._transport is None:
            return  # closed meanwhile (a shutdown, or a close on the worker's side)
        if not self._admission.accepting:
            refused = Refused(Status.SHUTTING_DOWN, "server is shutting down")
        self._open(grant, refused)
        if self._state is _State.HEADER:
            self._continue()  # what came after the HELLO

    def _open(self, grant: Grant, refused: Refused | None) -> None:
        """Answer the HELLO: WELCOME OK and the connection's producer, or the refusal and close."""
        if refused is None:
            try:
                self.producer = self._admission.producer_for(grant, self.peer)
            except Refused as exc:  # its token has its max_connections open
                refused = exc
        if refused is not None:
            self._welcome(refused.status, refused.message, self.version)
            self._close()
            return
        assert self.producer is not None
        log.info("connection %d from %s opened: producer %s, protocol v%d", self.id, self.peer, self.producer.name,
                 self.version, extra={"event": "connection_opened", "connection": self.id, "peer": self.peer,
                 "producer": self.producer.name})  # fmt: skip
        self._welcome(Status.OK, "", self.version)
        self._state = _State.HEADER
        # The handshake is done: now the connection gets its full scratch buffer.
        scratch = bytearray(SCRATCH_BYTES)
        scratch[: self._have] = self._scratch[: self._have]
        self._scratch, self._scratch_view = scratch, memoryview(scratch)

    def _on_header(self, header: FrameHeader) -> None:
        """Decide a frame's fate from its header: admit and reserve its slot, or answer it now and skip."""
        assert self.producer is not None
        self._received_ns = time.perf_counter_ns()
        self._header = header
        self._filled = 0
        self._ticket = self._order.expect(header.stream_id)
        self._bulk = header.payload_len < BULK_READ_BELOW
        try:
            self._deadline_ns = self._admission.admit(self.producer, header, self._received_ns)
        except Refused as refused:
            self._answer_now(header, self._ticket, refused.status, refused.message)
            self._skip(header.payload_len)
        else:
            got = self.producer.reserve(header.payload_len, self._on_slot)
            if isinstance(got, Reservation):
                self._wait_for_slot(got)
            else:
                self._on_slot(got)
        if len(self._order) >= self._admission.config.max_frames_per_connection:
            # Frames in the server plus answers held behind an older frame of their stream:
            # take no new frame until replies go out.
            self._block("frames")

    def _wait_for_slot(self, reservation: Reservation) -> None:
        self._state = _State.WAIT_SLOT
        self._reservation = reservation
        self._update_reading()
        if self._deadline_ns:
            delay = max(0.0, (self._deadline_ns - time.perf_counter_ns()) / 1e9)
            loop = asyncio.get_running_loop()
            self._deadline_timer = loop.call_later(delay, self._on_wait_deadline)

    def _on_slot(self, slot: Slot) -> None:
        """The frame's slot: immediately, or later on the loop after waiting for ring space."""
        waited = self._state is _State.WAIT_SLOT
        if waited:
            self._reservation = None
            self._cancel_deadline_timer()
        assert self._header is not None
        self._slot = slot
        self._slot_view = self._admission.pool.view(slot)
        self._state = _State.PAYLOAD
        self._last_progress = time.monotonic()
        self._due = self._last_progress + self._admission.payload_budget_s(self._header.payload_len)
        if self._header.payload_len == 0:
            self._finish_payload()
        if waited:
            self._continue()

    def _on_wait_deadline(self) -> None:
        """The frame's deadline passed while it waited for ring space: answer it, skip its payload."""
        self._deadline_timer = None
        if self._state is not _State.WAIT_SLOT or self._reservation is None:
            return
        self._reservation.cancel()
        self._reservation = None
        header, ticket = self._header, self._ticket
        assert header is not None and ticket is not None
        self._answer_now(
            header, ticket, Status.DEADLINE_MISSED, "deadline passed while waiting for receive buffer space"
        )
        self._skip(header.payload_len)
        self._continue()

    def _continue(self) -> None:
        """Resume after a wait that paused reading: parse what is buffered, read again if nothing blocks."""
        try:
            self._process_scratch()
        except ProtocolError as exc:
            self._fail(exc.status, str(exc))
            return
        self._update_reading()

    def _skip(self, nbytes: int) -> None:
        self._header = self._ticket = None
        if nbytes:
            self._state = _State.DISCARD
            self._discard_left = nbytes
        else:
            self._state = _State.HEADER

    def _finish_payload(self) -> None:
        header, slot, ticket = self._header, self._slot, self._ticket
        assert header is not None and slot is not None and ticket is not None and self.producer is not None
        self._header = self._slot = self._slot_view = self._ticket = None
        self._state = _State.HEADER
        self._frames += 1
        frame = TcpFrame(
            header=header,
            slot=slot,
            producer=self.producer,
            stream=(self.id, header.stream_id),
            received_ns=self._received_ns,
            complete_ns=time.perf_counter_ns(),
            deadline_ns=self._deadline_ns,
            sink=self._sink,
            is_abandoned=self._is_closed,
            batch_sink=self,
            ticket=ticket,
        )
        self._admission.submit(frame)
        if self._blocked or self._reading_paused:
            self._update_reading()  # flow control noted during the payload takes effect here

    # -- replies --------------------------------------------------------------------------------

    def _on_outcome(self, frame: Frame, outcome: Outcome) -> None:
        self._admission.stream_results.publish(frame.header, outcome, self.origin)  # subscribers, results sink
        reply, payload = wire.reply_to(frame.header, *outcome, version=self.version)
        self._send(typing.cast(TcpFrame, frame).ticket, wire.encode_reply(reply, payload, self.version))

    def slots_released(self, frames: list[Frame]) -> None:
        """``BatchSink``: the payloads of ``frames`` were copied to the device."""
        for frame in frames:
            frame.release_slot()

    def finished_ok(self, frames: list[Frame], rows: np.ndarray, timings: np.ndarray) -> None:
        """``BatchSink``: ``frames`` (this connection's, of one batch) ended OK with ``rows``."""
        try:
            replies = wire.encode_ok_replies(np.array(list(map(_ECHOED, frames)), np.uint64), rows, timings)
        except Exception as exc:  # results the wire cannot carry (load refuses most): answered, not left hanging
            failed = unsendable(frames, rows, exc)
            for frame in frames:
                frame.release_slot()
                self._on_outcome(frame, failed)
            return
        hub = self._admission.stream_results
        watching = hub.watching  # (nobody, mostly: then no Outcome is built)
        for i, frame in enumerate(frames):
            frame.release_slot()
            if watching and hub.watched(frame.header.stream_id):
                hub.publish(frame.header, Outcome(Status.OK, result=rows[i], timings=Timings(*timings[i].tolist())),
                            self.origin)  # fmt: skip
        size = len(replies) // len(frames)
        complete, ready = self._order.complete, []
        for i, frame in enumerate(frames):
            ready += complete(frame.ticket, [replies[i * size : (i + 1) * size]])  # type: ignore[attr-defined]
        self._write_ready(ready)

    def _answer_now(self, header: FrameHeader, ticket: Ticket, status: Status, message: str) -> None:
        self._admission.replied(header.model, status)
        timings = Timings(total_us=(time.perf_counter_ns() - self._received_ns) // 1000)
        self._admission.stream_results.publish(header, Outcome(status, message, timings=timings), self.origin)
        reply = ReplyHeader(
            stream_id=header.stream_id,
            sequence=header.sequence,
            status=status,
            timestamp_ns=header.timestamp_ns,
            timings=timings,
            message=message,
        )
        self._send(ticket, wire.encode_reply(reply, b"", self.version))

    def _send(self, ticket: Ticket | None, parts: list[bytes | memoryview]) -> None:
        assert ticket is not None
        self._write_ready(self._order.complete(ticket, parts))

    def _write_ready(self, ready: list[bytes | memoryview]) -> None:
        """Queue replies now in order (``ReplyOrder.complete``'s) for this loop iteration's write."""
        if ready and self._transport is not None:
            # One write per connection per loop iteration, not one per reply: a batch finishing
            # many frames of this connection costs one system call.
            first = not self._out
            self._out += ready
            if first:
                self._listener.defer(self._flush)
        if "frames" in self._blocked and len(self._order) < self._admission.config.max_frames_per_connection:
            self._unblock("frames")

    def _flush(self) -> None:
        out, self._out = self._out, []
        if out and self._transport is not None and not self._transport.is_closing() and self._state is not _State.DRAIN:
            self._transport.writelines(out)
            self._admission.busy_poll.poke()  # the producer's next frames follow its replies

    # -- flow control ---------------------------------------------------------------------------

    def _block(self, reason: str) -> None:
        self._blocked.add(reason)
        self._update_reading()

    def _unblock(self, reason: str) -> None:
        if reason in self._blocked:
            self._blocked.discard(reason)
            if not self._blocked and self._state is _State.HEADER:
                self._continue()  # headers already buffered may go now
            else:
                self._update_reading()

    def _update_reading(self) -> None:
        """Read while a payload is due (pausing mid-payload would count the server's time against
        the producer's payload budget); pause at a frame boundary while blocked, and while waiting
        for a slot once scratch is full. Shutdown pauses for good."""
        if self._state in (_State.CLOSED, _State.DRAIN) or self._transport is None:
            return
        at_boundary = self._state in (_State.HEADER, _State.HELLO)
        # While waiting for a slot, reading goes on into scratch until it is full: it costs no ring
        # space, and a producer that leaves meanwhile is noticed (its place in the queue freed).
        waiting = self._state is _State.WAIT_SLOT and self._have == len(self._scratch)
        admitting = self._state is _State.ADMITTING  # (what follows the HELLO waits in the kernel)
        if "shutdown" in self._blocked or waiting or admitting or (self._blocked and at_boundary):
            self._pause_reading()
        elif self._reading_paused:
            self._reading_paused = False
            self._transport.resume_reading()

    def _pause_reading(self) -> None:
        if not self._reading_paused and self._transport is not None:
            self._reading_paused = True
            self._transport.pause_reading()

    # -- errors, closing --------------------------------------------------------------------------

    def _welcome(self, status: Status, message: str, version: int) -> None:
        if self._transport is None:
            return
        if status != Status.OK:
            self._admission.refused_handshake(self.peer, status, message)
        self._flush()
        limits = None
        if status == Status.OK and self.producer is not None:
            limits = self._admission.limits(self.producer)
        max_payload = self._admission.config.max_payload_bytes
        welcome = wire.Welcome(status, max_payload, self._admission.pool.capacity, message, version, limits)
        self._transport.write(wire.encode_welcome(welcome))

    def _connection_reply(self, status: Status, message: str) -> None:
        """A reply about the connection itself (flag CONNECTION), the last thing it is sent."""
        self._flush()  # the replies before it go first
        transport = self._transport
        if transport is not None and not transport.is_closing() and self._state is not _State.DRAIN:
            self._admission.replied(NO_MODEL, status)
            reply = ReplyHeader(0, 0, status, message=message, flags=ReplyFlags.CONNECTION)
            transport.writelines(wire.encode_reply(reply, b"", self.version))

    def _say_why(self, status: Status, message: str) -> None:
        """The last thing a connection is told: a WELCOME before the handshake, else a connection reply."""
        if self._state is _State.HELLO:
            self._welcome(status, message, 1)
        elif self._state is _State.ADMITTING:
            self._welcome(status, message, self.version)
        else:
            self._connection_reply(status, message)

    def _fail(self, status: Status, message: str) -> None:
        """Framing is lost: say why and close the connection (queued replies are flushed first)."""
        self._close_reason = f"{status.name}: {message}"
        self._say_why(status, message)
        self._close()

    def _close(self) -> None:
        """Close after the replies already written: shut our side, drop input until the producer closes."""
        self._flush()
        self._drop_partial_frame()
        transport = self._transport
        if transport is None or self._state in (_State.CLOSED, _State.DRAIN):
            return
        self._listener.connection_closing(self)
        if not transport.can_write_eof():
            self._state = _State.CLOSED
            transport.close()  # flushes queued replies first
            return
        self._state = _State.DRAIN
        self._discard_left = LINGER_BYTES
        if not write_eof_or_abort(transport):  # (after the queued replies; aborted if the producer reset it)
            self._state = _State.CLOSED
            return
        self._linger = asyncio.get_running_loop().call_later(LINGER_S, transport.abort)
        if self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()

    def _drop_partial_frame(self) -> None:
        """Free whatever a frame still being received holds (nobody will answer it here)."""
        self._cancel_deadline_timer()
        if self._reservation is not None:
            self._reservation.cancel()
            self._reservation = None
        if self._slot is not None:
            assert self.producer is not None
            self.producer.release(self._slot)
            self._slot = self._slot_view = None

    def _cancel_deadline_timer(self) -> None:
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None

    def _is_closed(self) -> bool:
        return self._transport is None or self._transport.is_closing() or self._state is _State.DRAIN

    # -- what the listener calls ------------------------------------------------------------------

    def stop_reading(self) -> None:
        """Shutdown: take no more input. A frame half received is answered SHUTTING_DOWN, and so
        is every frame whose header is already in the scratch buffer (admission refuses them now)."""
        if self._state in (_State.CLOSED, _State.DRAIN):
            return
        self._block("shutdown")
        self._pause_reading()
        if self._state in (_State.PAYLOAD, _State.WAIT_SLOT) and self._header is not None:
            header, ticket = self._header, self._ticket
            assert ticket is not None
            self._answer_now(header, ticket, Status.SHUTTING_DOWN, "server is shutting down")
            left = header.payload_len - self._filled
            self._drop_partial_frame()
            self._skip(left)  # the rest of its payload, part of which may be in scratch
        if self._state is _State.CLOSED:
            return
        self._blocked.discard("shutdown")  # let buffered headers be parsed: each is answered SHUTTING_DOWN
        with contextlib.suppress(ProtocolError):  # the connection closes at the end of shutdown anyway
            self._process_scratch()
        self._blocked.add("shutdown")
        self._pause_reading()

    def sweep(self, now: float) -> None:
        """Enforce the handshake and payload time limits."""
        if now <= self._due:
            self._sweep_idle(now)
            return
        if self._state is _State.HELLO and self._transport is not None:
            timeout = self._admission.config.hello_timeout_s
            self._welcome(Status.BAD_FRAME, f"no HELLO within {timeout:g} s", 1)
            self._close()
        elif self._state is _State.PAYLOAD and self._header is not None:
            budget = self._admission.payload_budget_s(self._header.payload_len)
            self.abort(
                Status.RECEIVE_TIMEOUT,
                f"frame payload of {self._header.payload_len} bytes did not arrive within {budget:.3g} s"
                f" ({self._filled} bytes came)",
            )

    def _sweep_idle(self, now: float) -> None:
        idle = self._admission.config.receive_idle_timeout_s
        if self._state is _State.PAYLOAD and self._header is not None and now - self._last_progress > idle:
            self.abort(
                Status.RECEIVE_TIMEOUT,
                f"frame payload made no progress for {idle:g} s ({self._filled} of {self._header.payload_len}"
                " bytes came)",
            )

    def abort(self, status: Status, message: str) -> None:
        """Drop the connection now (no flush): say why if possible, free the frame being received."""
        self._close_reason = f"aborted, {status.name}: {message}"
        self._say_why(status, message)
        self._drop_partial_frame()
        self._state = _State.CLOSED
        if self._transport is not None:
            self._transport.abort()

    def close(self) -> None:
        self._close()


class TcpListener(SocketListener[TcpConnection]):
    """Accepts producer connections on one TCP address (``ListenerSpec(kind="tcp", host, port)``)."""

    kind = "tcp"

    def __init__(self, spec: ListenerSpec, admission: Admission, handed_over: bool = False) -> None:
        super().__init__(spec, admission, handed_over)
        # Runs reply flushes; the loop's call_soon once started (unstarted, e.g. driven by tests: at once).
        self.defer: Callable[[Callable[[], None]], object] = _call_now

    def make_connection(self) -> TcpConnection:
        return TcpConnection(self)

    def origin(self, conn_id: int) -> Origin:
        """How connection ``conn_id``'s frames' outcomes are published (``ResultHub.publish``)."""
        return Origin("tcp", f"tcp:{conn_id}")

    def connection_closing(self, conn: TcpConnection) -> None:
        """``conn`` takes no more frames and its replies go nowhere (it lingers until the producer closes):
        its frames still queued are abandoned (``Frame.is_abandoned`` says so here)."""

    def admission_pending(self, conn: TcpConnection, grant: Grant, answer: Callable[[Refused | None], None]) -> bool:
        """Whether ``conn``'s HELLO waits for another process's word before it is answered (an ingest worker asks
        the scheduling process, which counts a named token's connections); then ``answer`` is called with None
        (admitted) or the refusal, unless the connection is gone by then. Here: no, ``producer_for`` decides."""
        return False

    async def start(self) -> None:
        self.defer = asyncio.get_running_loop().call_soon
        await super().start()


def _call_now(callback: Callable[[], None]) -> None:
    callback()
