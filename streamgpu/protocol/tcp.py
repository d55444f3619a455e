"""TCP ingest: one ``asyncio.BufferedProtocol`` per producer connection.

The kernel writes payload bytes straight into the frame's pinned ring slot:
once a header says "N payload bytes", ``get_buffer`` returns a view of the
reserved slot. Headers are read into a small scratch buffer. After a large
payload the scratch read asks for exactly one header, so the next payload's
bytes are not pulled into scratch (which would cost a copy); after a small
payload it reads in bulk, so many small frames cost one system call, and
their payloads are copied from scratch into their slots.

It subclasses ``asyncio.BufferedProtocol`` (which asyncio checks for) and not
``asyncio.Protocol`` (uvloop only takes the buffered path for protocols that
are not ``Protocol`` subclasses).

The states: HELLO -> HEADER <-> PAYLOAD | DISCARD, with WAIT_SLOT (reading
paused) when the ring is full, and CLOSED.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import hmac
import itertools
import logging
import socket
import time
import typing
from typing import Protocol

from streamgpu.frame import Frame
from streamgpu.memory import PinnedRing, Slot
from streamgpu.models.spec import ModelSpec
from streamgpu.protocol import wire
from streamgpu.protocol.ordering import ReplyOrder, Ticket
from streamgpu.protocol.wire import FrameHeader, ProtocolError, ReplyHeader, Status, Timings

log = logging.getLogger(__name__)

SCRATCH_BYTES = 64 * 1024
BULK_READ_BELOW = 16 * 1024  # payloads smaller than this are read in bulk through scratch
HIGH_WATER = 4 * 1024 * 1024  # unsent reply bytes at which the producer's reading is paused
_connection_ids = itertools.count(1)


class Router(Protocol):
    """What a connection needs from the server that owns it."""

    ring: PinnedRing
    max_payload: int
    token: str
    accepting: bool  # False once shutdown began: new frames get SHUTTING_DOWN
    max_frames_per_connection: int  # frames in the server at once; past it, OVERLOADED at once

    def model_spec(self, name: str) -> ModelSpec | None: ...
    def submit(self, frame: Frame) -> None: ...
    def frame_done(self) -> None: ...
    def connection_opened(self, conn: TcpIngest) -> None: ...
    def connection_closed(self, conn: TcpIngest) -> None: ...


class _State(enum.Enum):
    HELLO = 1
    HEADER = 2
    PAYLOAD = 3
    DISCARD = 4
    WAIT_SLOT = 5
    CLOSED = 6


class TcpIngest(asyncio.BufferedProtocol):
    """Server side of one producer connection (an ``asyncio.BufferedProtocol``)."""

    def __init__(self, router: Router) -> None:
        self._router = router
        self._ring = router.ring
        self._transport: asyncio.Transport | None = None
        self._state = _State.HELLO
        self._scratch = bytearray(SCRATCH_BYTES)
        self._scratch_view = memoryview(self._scratch)
        self._have = 0  # bytes of scratch holding unparsed input
        self._bulk = True  # read headers in bulk (last payload was small)
        # the frame being received
        self._header: FrameHeader | None = None
        self._slot: Slot | None = None
        self._slot_view: memoryview | None = None
        self._filled = 0
        self._received_ns = 0
        self._ticket: Ticket | None = None
        self._discard_left = 0
        self._order = ReplyOrder()
        self._last_progress = 0.0  # time.monotonic() of the last payload bytes, while in PAYLOAD
        self._in_server = 0  # frames submitted to the router and not yet answered
        self._pause_reasons: set[str] = set()
        self.id = next(_connection_ids)
        self.peer: str = "?"

    # -- asyncio callbacks ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = typing.cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        self._transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # replies are small: send now
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)  # find producers that vanished
        transport.set_write_buffer_limits(high=HIGH_WATER)
        self._router.connection_opened(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._state is _State.PAYLOAD:
            assert self._slot_view is not None
            return self._slot_view[self._filled :]
        if self._state is _State.DISCARD:
            return self._scratch_view[: min(self._discard_left, SCRATCH_BYTES)]
        # HELLO / HEADER / WAIT_SLOT read into scratch after what is buffered
        room = SCRATCH_BYTES - self._have
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
            else:
                self._have += nbytes
                self._process_scratch()
        except ProtocolError as exc:
            self._fail(exc.status, str(exc))

    def eof_received(self) -> bool:
        return False  # close our side too; replies of a half-closed producer cannot be delivered reliably

    def connection_lost(self, exc: Exception | None) -> None:
        prior = self._state
        self._state = _State.CLOSED
        if prior is _State.WAIT_SLOT:
            self._ring.cancel_wait(self._on_ring_space)
        if self._slot is not None:  # a truncated frame: nobody to answer, free its slot
            self._ring.release(self._slot)
            self._slot = None
            self._slot_view = None
        self._transport = None
        self._router.connection_closed(self)

    def pause_writing(self) -> None:
        self._pause("write")  # the producer does not read its replies: stop taking its frames

    def resume_writing(self) -> None:
        self._resume("write")

    # -- state machine ------------------------------------------------------------

    def _process_scratch(self) -> None:
        """Consume everything complete in scratch; leave a partial header at its start."""
        pos = 0
        view = self._scratch_view
        while pos < self._have:
            state = self._state
            if state is _State.PAYLOAD:  # payload bytes that arrived with the header: copy into the slot
                assert self._slot_view is not None
                take = min(self._have - pos, self._payload_len() - self._filled)
                self._slot_view[self._filled : self._filled + take] = view[pos : pos + take]
                self._filled += take
                pos += take
                if self._filled == self._payload_len():
                    self._finish_payload()
            elif state is _State.DISCARD:
                take = min(self._have - pos, self._discard_left)
                self._discard_left -= take
                pos += take
                if self._discard_left == 0:
                    self._state = _State.HEADER
            elif state is _State.HEADER:
                parsed = wire.decode_frame_header(view[pos : self._have])
                if parsed is None:
                    break
                header, used = parsed
                pos += used
                self._on_header(header)
            elif state is _State.HELLO:
                parsed_hello = wire.decode_hello(view[pos : self._have])
                if parsed_hello is None:
                    break
                hello, used = parsed_hello
                pos += used
                self._on_hello(hello)
            else:  # WAIT_SLOT resumes from here once the ring has room; CLOSED drops the rest
                break
        if pos:
            rest = self._have - pos
            self._scratch[:rest] = self._scratch[pos : self._have]  # overlapping move: slice copies first
            self._have = rest

    def _payload_len(self) -> int:
        assert self._header is not None
        return self._header.payload_len

    def _on_hello(self, hello: wire.Hello) -> None:
        router = self._router
        if hello.version != wire.VERSION:
            self._welcome(Status.UNSUPPORTED_VERSION, f"protocol version {hello.version} is not supported; use 1")
            self._close()
        elif router.token and not hmac.compare_digest(hello.token.encode(), router.token.encode()):
            self._welcome(Status.UNAUTHORIZED, "bad auth token")
            self._close()
        else:
            self._welcome(Status.OK, "")
            self._state = _State.HEADER

    def _on_header(self, header: FrameHeader) -> None:
        """Decide a frame's fate from its header: slot, or an immediate error and skip."""
        self._received_ns = time.perf_counter_ns()
        self._header = header
        self._filled = 0
        self._ticket = self._order.expect(header.stream_id)
        self._bulk = header.payload_len < BULK_READ_BELOW
        router = self._router
        spec = router.model_spec(header.model)
        problem: tuple[Status, str] | None = None
        if header.payload_len > router.max_payload:
            problem = (Status.TOO_LARGE, f"payload of {header.payload_len} bytes exceeds {router.max_payload}")
        elif (why := header.check_tensor()) is not None:
            problem = (Status.BAD_FRAME, why)
        elif spec is None:
            problem = (Status.UNKNOWN_MODEL, f"no model named {header.model!r}")
        elif (why := spec.check_frame(header)) is not None:
            problem = (Status.BAD_FRAME, why)
        elif not router.accepting:
            problem = (Status.SHUTTING_DOWN, "server is shutting down")
        elif self._in_server >= router.max_frames_per_connection:
            problem = (Status.OVERLOADED, f"more than {router.max_frames_per_connection} frames in flight")
        if problem is not None:
            self._answer_now(header, self._ticket, *problem)
            self._skip(header.payload_len)
        else:
            self._take_slot()
        if len(self._order) >= 2 * router.max_frames_per_connection:
            # Answers held back behind an older frame of their stream: stop reading until they
            # can leave, so a producer cannot grow them without bound.
            self._pause("held")

    def _take_slot(self) -> None:
        assert self._header is not None
        slot = self._ring.reserve(self._header.payload_len)
        if slot is None:
            self._state = _State.WAIT_SLOT
            self._pause("ring")
            self._ring.when_space(self._on_ring_space)
            return
        self._slot = slot
        self._slot_view = self._ring.view(slot)
        self._state = _State.PAYLOAD
        self._last_progress = time.monotonic()
        if self._header.payload_len == 0:
            self._finish_payload()

    def _on_ring_space(self) -> None:
        if self._state is not _State.WAIT_SLOT:
            return
        self._take_slot()
        if self._state is not _State.WAIT_SLOT:
            self._resume("ring")
            try:
                self._process_scratch()
            except ProtocolError as exc:
                self._fail(exc.status, str(exc))

    def _skip(self, nbytes: int) -> None:
        self._header = None
        if nbytes:
            self._state = _State.DISCARD
            self._discard_left = nbytes
        else:
            self._state = _State.HEADER

    def _finish_payload(self) -> None:
        header, slot, ticket = self._header, self._slot, self._ticket
        assert header is not None and slot is not None and ticket is not None
        self._header = self._slot = self._slot_view = self._ticket = None
        self._state = _State.HEADER
        now = time.perf_counter_ns()
        frame = Frame(
            header=header,
            slot=slot,
            received_ns=self._received_ns,
            complete_ns=now,
            deadline_ns=self._received_ns + header.deadline_us * 1000 if header.deadline_us else 0,
            reply_sink=functools.partial(self._on_reply, ticket),
            is_abandoned=self._is_closed,
            producer=self.id,
        )
        self._in_server += 1
        self._router.submit(frame)

    # -- replies ------------------------------------------------------------------

    def _on_reply(self, ticket: Ticket, frame: Frame, header: ReplyHeader, payload: bytes | memoryview) -> None:
        self._in_server -= 1
        self._send(ticket, wire.encode_reply(header, payload))
        self._router.frame_done()

    def _answer_now(self, header: FrameHeader, ticket: Ticket, status: Status, message: str) -> None:
        reply = ReplyHeader(
            stream_id=header.stream_id,
            sequence=header.sequence,
            status=status,
            timestamp_ns=header.timestamp_ns,
            timings=Timings(total_us=(time.perf_counter_ns() - self._received_ns) // 1000),
            message=message,
        )
        self._send(ticket, wire.encode_reply(reply))

    def _send(self, ticket: Ticket, parts: list[bytes | memoryview]) -> None:
        ready = self._order.complete(ticket, parts)
        if ready and self._transport is not None and not self._transport.is_closing():
            self._transport.writelines(ready)
        if "held" in self._pause_reasons and len(self._order) < self._router.max_frames_per_connection:
            self._resume("held")

    # -- errors, pausing, closing -----------------------------------------------------

    def _welcome(self, status: Status, message: str) -> None:
        if self._transport is not None:
            self._transport.write(
                wire.encode_welcome(wire.Welcome(status, self._router.max_payload, self._ring.capacity, message))
            )

    def _fail(self, status: Status, message: str) -> None:
        """Framing is lost: say why (stream 0, sequence 0) and close the connection."""
        log.info("closing connection from %s: %s", self.peer, message)
        if self._state is _State.HELLO:
            self._welcome(status, message)
        elif self._transport is not None and not self._transport.is_closing():
            self._transport.writelines(wire.encode_reply(ReplyHeader(0, 0, status, message=message)))
        self._close()

    def _close(self) -> None:
        if self._state is _State.WAIT_SLOT:
            self._ring.cancel_wait(self._on_ring_space)
        self._state = _State.CLOSED
        if self._transport is not None:
            self._transport.close()  # flushes queued replies first

    def _pause(self, reason: str) -> None:
        if not self._pause_reasons and self._transport is not None:
            self._transport.pause_reading()
        self._pause_reasons.add(reason)

    def _resume(self, reason: str) -> None:
        self._pause_reasons.discard(reason)
        if not self._pause_reasons and self._transport is not None and self._state is not _State.CLOSED:
            self._transport.resume_reading()

    def _is_closed(self) -> bool:
        return self._transport is None or self._transport.is_closing()

    # -- shutdown -----------------------------------------------------------------------

    def stop_reading(self) -> None:
        """Shutdown: take no more input. A frame half received is answered SHUTTING_DOWN, and so
        is every frame whose header is already in the scratch buffer (the router is no longer
        accepting, so parsing them answers them)."""
        self._pause("shutdown")
        state = self._state
        if state is _State.WAIT_SLOT:
            self._ring.cancel_wait(self._on_ring_space)
        if state in (_State.PAYLOAD, _State.WAIT_SLOT) and self._header is not None:
            assert self._ticket is not None
            self._answer_now(self._header, self._ticket, Status.SHUTTING_DOWN, "server is shutting down")
            if self._slot is not None:
                self._ring.release(self._slot)
            left = self._header.payload_len - self._filled
            self._slot = self._slot_view = self._header = self._ticket = None
            self._skip(left)  # the rest of its payload, part of which may be in scratch
        if self._state is not _State.CLOSED:
            with contextlib.suppress(ProtocolError):  # the connection closes at the end of shutdown anyway
                self._process_scratch()

    def stalled(self, now: float, timeout: float) -> bool:
        """Whether a frame's payload has made no progress for ``timeout`` seconds (it holds a slot)."""
        return self._state is _State.PAYLOAD and now - self._last_progress > timeout

    def abort(self, message: str) -> None:
        """Drop the connection now (no flush): say why if possible, free the frame being received."""
        log.info("aborting connection from %s: %s", self.peer, message)
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.writelines(wire.encode_reply(ReplyHeader(0, 0, Status.BAD_FRAME, message=message)))
        if self._slot is not None:
            self._ring.release(self._slot)
            self._slot = self._slot_view = None
        if self._state is _State.WAIT_SLOT:
            self._ring.cancel_wait(self._on_ring_space)
        self._state = _State.CLOSED
        if transport is not None:
            transport.abort()

    def close(self) -> None:
        self._close()
