"""Producer library: stream tensor frames to a streamgpu server over TCP (or UDP: :func:`connect_udp`).

Async first (``streamgpu serve`` as shipped listens on 127.0.0.1:7878 and
serves the model ``default``, which takes 224x224x3 uint8 frames)::

    async with await connect("127.0.0.1", 7878) as conn:
        reply = await conn.infer(frame, stream_id=3, model="default", deadline=0.050)
        if reply.ok:
            use(reply.result)  # one frame's result, no batch dimension: (1000,) float32 for `default`

Many frames can be in flight on one connection: :meth:`Connection.submit` is a
plain (non-async) method that queues the frame (written at the end of the
loop iteration, with the others submitted in it) and returns a future resolved
when the matching reply arrives. Replies are matched to requests by
``(stream_id, sequence)``; replies of one stream arrive in order, different
streams interleave freely.

The client speaks protocol version 2 by default (``protocol_version=1`` for
a server that only knows v1). In v2 the server announces its per-connection
limits (:attr:`Connection.limits`); :meth:`Connection.wait_for_room` keeps a
producer within ``max_frames_in_flight``. The server applies flow control
anyway (it stops reading a connection past its limits), so staying within
them is about latency, not correctness.

Over UDP (:func:`connect_udp`), :meth:`UdpConnection.send` is the fire-and-forget
form for cameras and sensors that do not read replies: the frame carries the
SUBSCRIBERS flag and its result goes to the server's subscribers of its stream
id (the ``/v1/stream`` WebSocket, the results port) instead of back here.

For simple scripts there is a blocking wrapper with the same shape
(:func:`connect_sync`, :class:`SyncConnection`; :func:`connect_udp_sync`,
:class:`SyncUdpConnection`) that runs a private event loop in one daemon thread.

The wire format is described in docs/PROTOCOL.md and implemented in
:mod:`streamgpu.protocol.wire`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import math
import operator
import socket
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from streamgpu import mmsg
from streamgpu.loops import new_event_loop
from streamgpu.protocol import udp, wire

if TYPE_CHECKING:
    from streamgpu.frame import Outputs

__all__ = [
    "Connection",
    "ConnectionClosedError",
    "HandshakeError",
    "Reply",
    "ReplyError",
    "SyncConnection",
    "SyncUdpConnection",
    "UdpConnection",
    "connect",
    "connect_sync",
    "connect_udp",
    "connect_udp_sync",
]

log = logging.getLogger(__name__)

_U32_MAX = 0xFFFFFFFF
_U64_MAX = 0xFFFFFFFFFFFFFFFF
_COMPACT_AT = 1 << 16  # compact the receive buffer once this many consumed bytes lead it
MAX_DEADLINE_S = _U32_MAX / 1e6  # the longest deadline a frame header carries (a u32 of microseconds)
# Frames held back for one write per loop iteration, up to this many bytes (larger frames gain nothing from it)
_CORK_BYTES = 1 << 16


class HandshakeError(ConnectionError):
    """The server refused the connection in its WELCOME (bad token, version, ...)."""

    def __init__(self, status: wire.Status, message: str) -> None:
        detail = f"{status.name}: {message}" if message else status.name
        super().__init__(f"server refused the connection: {detail}")
        self.status = status
        self.message = message


class ConnectionClosedError(ConnectionError):
    """The connection ended while requests were in flight (or was used after it ended).

    ``status`` and ``server_message`` are set when the server explained itself
    before closing: with a reply flagged CONNECTION (framing lost,
    RECEIVE_TIMEOUT, SHUTTING_DOWN; every current server sets the flag), or,
    from servers that predate the flag, with an error reply for stream 0,
    sequence 0 that matched no request. Otherwise they are ``None``.
    """

    def __init__(self, reason: str, status: wire.Status | None = None, server_message: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.server_message = server_message


class ReplyError(RuntimeError):
    """A frame was answered with an error status (raised by :meth:`Reply.unwrap`)."""

    def __init__(self, stream_id: int, sequence: int, status: wire.Status, message: str) -> None:
        super().__init__(f"frame {stream_id}/{sequence}: {status.name}" + (f": {message}" if message else ""))
        self.status = status
        self.message = message


def deadline_to_us(deadline: float | None) -> int:
    """A frame's ``deadline`` in seconds as the header's ``deadline_us`` (0: none); ValueError when out of range."""
    if deadline is None:
        return 0
    if not (deadline > 0 and math.isfinite(deadline)):
        raise ValueError(f"deadline must be a positive number of seconds or None, got {deadline!r}")
    deadline_us = max(1, round(deadline * 1e6))  # 0 would mean "no deadline"
    if deadline_us > _U32_MAX:
        raise ValueError(f"deadline must be at most {MAX_DEADLINE_S:.6f} s, got {deadline!r}")
    return deadline_us


def as_wire_array(frame: np.ndarray) -> np.ndarray:
    """``frame`` little-endian and C-contiguous, as its payload goes on the wire (a copy only when needed)."""
    wire_dtype = frame.dtype.newbyteorder("<")
    if frame.dtype != wire_dtype or not frame.flags.c_contiguous:
        frame = np.ascontiguousarray(frame, dtype=wire_dtype)  # the one copy, only when needed
    return frame


@dataclass(frozen=True, eq=False, slots=True)
class Reply:
    """The server's answer to one frame.

    ``result`` is an owned, writable array (``None`` when the reply carries no
    result, e.g. for error statuses). For a model with several outputs (a
    tuple or dict of tensors, or a ``topk`` postprocess) ``outputs`` holds
    them all, as a tuple or a dict by name as the model returns them, and
    ``result`` is the first (``outputs`` is None otherwise; protocol v2 only:
    a v1 connection receives only the first). ``timings`` are the server's per-stage
    times; ``sent_ns`` and ``received_ns`` are ``time.perf_counter_ns()`` at
    submit and when the reply was parsed.
    """

    stream_id: int
    sequence: int
    status: wire.Status
    result: np.ndarray | None
    timings: wire.Timings
    message: str
    sent_ns: int
    received_ns: int
    outputs: tuple[np.ndarray, ...] | dict[str, np.ndarray] | None = None

    @property
    def ok(self) -> bool:
        """True when the server produced a result (status OK)."""
        return self.status == wire.Status.OK

    @property
    def latency_s(self) -> float:
        """Seconds from submit to reply, as seen by this client."""
        return (self.received_ns - self.sent_ns) / 1e9

    def unwrap(self) -> np.ndarray:
        """The result array; raises :class:`ReplyError` (status and server message) if there is none."""
        if self.result is None or not self.ok:
            raise ReplyError(self.stream_id, self.sequence, self.status, self.message)
        return self.result


def reply_contents(header: wire.ReplyHeader, payload: memoryview) -> tuple[np.ndarray | None, Outputs | None]:
    """A REPLY's result and, for an outputs block, every output (copies: ``payload`` may be a reused buffer's).
    ``wire.ProtocolError`` when its payload does not match its header."""
    if header.flags & wire.ReplyFlags.OUTPUTS:
        named = wire.decode_outputs(payload)
        outputs = dict(named) if any(name for name, _ in named) else tuple(a for _, a in named)
        return (named[0][1] if named else None), outputs
    return _decode_result(header, payload), None


def _decode_result(header: wire.ReplyHeader, payload: memoryview) -> np.ndarray | None:
    if header.dtype_code == 0 and header.payload_len == 0 and not header.shape:
        return None
    dt = wire.DTYPES.get(header.dtype_code)
    if dt is None:
        raise wire.ProtocolError(wire.Status.BAD_FRAME, f"reply has unknown result dtype code {header.dtype_code}")
    if dt.itemsize * math.prod(header.shape) != header.payload_len:
        raise wire.ProtocolError(
            wire.Status.BAD_FRAME,
            f"reply result shape {list(header.shape)} of {dt.name} does not match its {header.payload_len} bytes",
        )
    if header.payload_len == 0:
        return np.empty(header.shape, dtype=dt)
    # Copy out: the payload view points into the receive buffer, which is reused.
    return np.frombuffer(payload, dtype=dt).reshape(header.shape).copy()


def _int_in(name: str, value: object, hi: int) -> int:
    """``value`` as an int in 0..hi (numpy integers accepted), else ValueError."""
    try:
        v = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{name} must be an integer in 0..{hi}, got {value!r}") from None
    if isinstance(value, bool) or not 0 <= v <= hi:
        raise ValueError(f"{name} must be an integer in 0..{hi}, got {value!r}")
    return v


class _Protocol(asyncio.Protocol):
    """Transport glue: parses WELCOME then REPLY messages, resolves futures."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.welcome: asyncio.Future[wire.Welcome] = loop.create_future()
        self.lost: asyncio.Future[None] = loop.create_future()
        # (stream_id, sequence) -> (future, perf_counter_ns at submit)
        self.pending: dict[tuple[int, int], tuple[asyncio.Future[Reply], int]] = {}
        self.error: ConnectionClosedError | None = None  # set once the connection is unusable
        self.server_error: tuple[wire.Status, str] | None = None  # from an unmatched stream 0 / seq 0 reply
        self.protocol_error: str | None = None
        self.closing_by_client = False
        self.unmatched_replies = 0
        self.write_paused = False
        self.drain_waiters: list[asyncio.Future[None]] = []
        self.room_waiters: list[asyncio.Future[None]] = []  # Connection.wait_for_room
        self._buf = bytearray()
        self._pos = 0  # bytes of _buf already consumed

    # --- asyncio.Protocol -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop transports do not subclass asyncio.Transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self.error is not None:
            return
        buf = self._buf
        try:
            if self._pos == len(buf):
                # Nothing partial is pending: parse straight from the chunk, keep only its tail.
                used = self._parse(memoryview(data))
                if buf:
                    buf.clear()
                    self._pos = 0
                if used < len(data):
                    buf += memoryview(data)[used:]
            else:
                buf += data
                self._pos += self._parse(memoryview(buf)[self._pos :])
                if self._pos == len(buf):
                    buf.clear()
                    self._pos = 0
                elif self._pos >= _COMPACT_AT and 2 * self._pos >= len(buf):
                    del buf[: self._pos]  # amortised O(1): only when the consumed part dominates
                    self._pos = 0
        except wire.ProtocolError as e:
            self.protocol_error = f"undecodable data from the server ({e.status.name}): {e}"
            self._set_error(ConnectionClosedError(self.protocol_error))
            assert self.transport is not None
            self.transport.abort()

    def eof_received(self) -> bool | None:
        return None  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        if self.error is None:
            if self.closing_by_client:
                err = ConnectionClosedError("connection closed by the client")
            elif self.server_error is not None:
                status, message = self.server_error
                err = ConnectionClosedError(
                    f"server closed the connection after {status.name}: {message}", status, message
                )
            elif exc is not None:
                err = ConnectionClosedError(f"connection lost: {exc!r}")
            else:
                err = ConnectionClosedError("server closed the connection")
            self._set_error(err)
        if not self.welcome.done():
            assert self.error is not None
            self.welcome.set_exception(ConnectionClosedError(f"during the handshake: {self.error.reason}"))
            self.welcome.exception()  # internal future: connect() reports it, or nobody waits any more
        if not self.lost.done():
            self.lost.set_result(None)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        waiters, self.drain_waiters = self.drain_waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    # --- internals --------------------------------------------------------

    def _set_error(self, err: ConnectionClosedError) -> None:
        """Mark the connection dead and fail everything that waits on it."""
        if self.error is not None:
            return
        self.error = err
        pending, self.pending = self.pending, {}
        for fut, _ in pending.values():
            if not fut.done():
                fut.set_exception(ConnectionClosedError(err.reason, err.status, err.server_message))
        waiters = self.drain_waiters + self.room_waiters
        self.drain_waiters, self.room_waiters = [], []
        for w in waiters:
            if not w.done():
                w.set_exception(ConnectionClosedError(err.reason, err.status, err.server_message))

    def _wake_room_waiters(self) -> None:
        waiters, self.room_waiters = self.room_waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)  # each re-checks whether there is room

    def _parse(self, view: memoryview) -> int:
        """Consume whole messages from ``view``; returns bytes consumed."""
        pos = 0
        end = len(view)
        if not self.welcome.done():
            got = wire.decode_welcome(view)
            if got is None:
                return 0
            welcome, pos = got
            self.welcome.set_result(welcome)
            if welcome.status != wire.Status.OK:
                return end  # the server closes after a refusal; ignore anything else
        while pos < end:
            got_reply = wire.decode_reply(view[pos:])
            if got_reply is None:
                break
            header, payload, used = got_reply
            pos += used
            self._on_reply(header, payload)
            if self.error is not None:
                return end  # the server's last word: nothing after it counts
        return pos

    def _on_reply(self, header: wire.ReplyHeader, payload: memoryview) -> None:
        if header.flags & wire.ReplyFlags.CONNECTION:
            # About the connection, not a frame: the server is ending it for this reason.
            self.server_error = (header.status, header.message)
            self._set_error(
                ConnectionClosedError(
                    f"server closed the connection after {header.status.name}: {header.message}",
                    header.status,
                    header.message,
                )
            )
            assert self.transport is not None
            self.transport.close()
            return
        key = (header.stream_id, header.sequence)
        entry = self.pending.pop(key, None)
        if self.room_waiters:
            self._wake_room_waiters()
        if entry is None:
            if key == (0, 0) and header.status != wire.Status.OK:
                # A server without the CONNECTION flag: its last word before it closes on a framing error.
                self.server_error = (header.status, header.message)
            else:
                self.unmatched_replies += 1
                log.debug("reply for unknown request %s (%s)", key, header.status.name)
            return
        fut, sent_ns = entry
        if fut.done():  # cancelled by the caller
            return
        received_ns = time.perf_counter_ns()
        try:
            result, outputs = reply_contents(header, payload)
        except wire.ProtocolError as e:
            fut.set_exception(e)
            return
        h = header
        fut.set_result(
            Reply(h.stream_id, h.sequence, h.status, result, h.timings, h.message, sent_ns, received_ns, outputs)
        )


class Connection:
    """One TCP connection to a streamgpu server, many frames in flight.

    Create it with :func:`connect`. All methods must be called from the event
    loop the connection was made on.
    """

    def __init__(self, protocol: _Protocol, transport: asyncio.Transport, welcome: wire.Welcome) -> None:
        self._protocol = protocol
        self._transport = transport
        self._welcome = welcome
        self._next_seq: dict[int, int] = {}
        # Small frames submitted in one loop iteration, written together at its end (``_write``)
        self._corked: list[bytes | memoryview] = []
        self._corked_bytes = 0

    # --- properties -------------------------------------------------------

    @property
    def max_payload(self) -> int:
        """Largest payload (bytes) the server accepts per frame, from its WELCOME."""
        return self._welcome.max_payload

    @property
    def ring_bytes(self) -> int:
        """Size of the server's receive ring, from its WELCOME (a hint for how much to keep in flight)."""
        return self._welcome.ring_bytes

    @property
    def welcome(self) -> wire.Welcome:
        """The server's WELCOME message."""
        return self._welcome

    @property
    def protocol_version(self) -> int:
        """The protocol version of this connection (the one the HELLO asked for and the WELCOME confirmed)."""
        return self._welcome.version

    @property
    def limits(self) -> wire.Limits | None:
        """What the server allows this connection (v2 WELCOME); ``None`` in v1 or when the server did not say."""
        return self._welcome.limits

    @property
    def in_flight(self) -> int:
        """Frames submitted whose reply has not arrived yet (cancelled ones included)."""
        return len(self._protocol.pending)

    @property
    def unmatched_replies(self) -> int:
        """Replies that matched no frame waiting here: a duplicate, one for a cancelled frame, or one whose
        stream id or sequence number was never sent."""
        return self._protocol.unmatched_replies

    @property
    def closed(self) -> bool:
        """True once the connection can no longer be used."""
        return self._protocol.error is not None or self._protocol.closing_by_client

    @property
    def write_paused(self) -> bool:
        """True while the transport's write buffer is above its high-water mark."""
        return self._protocol.write_paused

    # --- sending ----------------------------------------------------------

    def submit(
        self,
        frame: np.ndarray,
        *,
        stream_id: int = 0,
        model: str = "default",
        deadline: float | None = None,
        priority: int = 0,
        live: bool = False,
        sequence: int | None = None,
    ) -> asyncio.Future[Reply]:
        """Send one frame; return a future for its :class:`Reply`.

        Not a coroutine: the frame is handed to the transport at the end of
        the loop iteration this is called in (the frames submitted in one
        iteration go in one write; a frame of 64 KiB or more goes at once,
        with those held before it, and :meth:`drain` and :meth:`close` write
        what is held first; over UDP it goes at once). It is queued, not
        dropped, while writing is paused: await :meth:`drain` to wait for
        room in the write buffer and :meth:`wait_for_room` to stay within the
        server's ``max_frames_in_flight``. The array's buffer is written without
        copying when it is C-contiguous and little-endian, so do not modify it
        until its reply arrives.

        Args:
            frame: the tensor; its dtype must be one of the wire dtypes
                (u1 i1 u2 i2 i4 i8 f2 f4 f8) with at most 8 dimensions.
            stream_id: u32 stream the frame belongs to.
            model: name of the model to run (1..255 UTF-8 bytes).
            deadline: seconds the server may take, counted from when it
                receives the frame header; ``None`` for no deadline.
            priority: 0..255, higher is more urgent; above the connection's
                ``limits.max_priority`` the server answers UNAUTHORIZED.
            live: live-stream mode: this frame supersedes every older queued
                frame of its stream (LIVE or not), which is answered SUPERSEDED.
            sequence: u64 sequence number; by default the next one of the
                stream (0, 1, 2, ...; after an explicit sequence the automatic
                one continues above it).

        Raises:
            ValueError: an argument is out of range, or ``(stream_id, sequence)``
                is already in flight.
            TypeError: ``frame`` is not a numpy array.
            ConnectionError: the connection is closed.
        """
        proto = self._protocol
        header, encoded = self._prepare(frame, stream_id, model, deadline, priority, live, sequence,
                                        wire.FrameFlags.NONE)  # fmt: skip
        fut: asyncio.Future[Reply] = proto.loop.create_future()
        proto.pending[(header.stream_id, header.sequence)] = (fut, time.perf_counter_ns())
        self._sent(header)
        self._write(encoded)
        return fut

    def _prepare(self, frame: np.ndarray, stream_id: int, model: str, deadline: float | None, priority: int,
                 live: bool, sequence: int | None, flags: wire.FrameFlags) -> tuple[wire.FrameHeader, Any]:  # fmt: skip
        """Check a frame and its arguments (as :meth:`submit` documents) and encode it; registers nothing."""
        proto = self._protocol
        if proto.error is not None:
            raise ConnectionClosedError(proto.error.reason, proto.error.status, proto.error.server_message)
        if proto.closing_by_client:
            raise ConnectionClosedError("connection closed by the client")
        if not isinstance(frame, np.ndarray):
            raise TypeError(f"frame must be a numpy array, got {type(frame).__name__}")
        stream_id = _int_in("stream_id", stream_id, _U32_MAX)
        priority = _int_in("priority", priority, 255)
        model_len = len(model.encode())
        if not 1 <= model_len <= wire.MAX_MODEL_NAME:
            raise ValueError(f"model name must be 1..{wire.MAX_MODEL_NAME} UTF-8 bytes, got {model_len}")
        if frame.ndim > wire.MAX_NDIM:
            raise ValueError(f"frame has {frame.ndim} dimensions; the wire allows at most {wire.MAX_NDIM}")
        if any(d > _U32_MAX for d in frame.shape):
            raise ValueError(f"frame shape {frame.shape} has a dimension above {_U32_MAX}")
        code = wire.dtype_code(frame.dtype)  # ValueError for unsupported dtypes
        deadline_us = deadline_to_us(deadline)
        if sequence is None:
            seq = self._next_seq.get(stream_id, 0)
            if seq > _U64_MAX:
                raise ValueError(f"stream {stream_id} has used up its sequence numbers")
        else:
            seq = _int_in("sequence", sequence, _U64_MAX)
        if (stream_id, seq) in proto.pending:
            raise ValueError(f"stream {stream_id} sequence {seq} is already in flight")
        frame = as_wire_array(frame)
        if live:
            flags |= wire.FrameFlags.LIVE
        fh = wire.FrameHeader(
            stream_id, seq, model, code, frame.shape, frame.nbytes, time.time_ns(), deadline_us, priority, flags
        )
        return fh, self._encode(fh, frame)  # ValueError (e.g. too large for UDP) before anything is registered

    def _sent(self, header: wire.FrameHeader) -> None:
        """Advance the stream's automatic sequence past ``header``'s."""
        if header.sequence >= self._next_seq.get(header.stream_id, 0):
            self._next_seq[header.stream_id] = header.sequence + 1

    def _encode(self, header: wire.FrameHeader, frame: np.ndarray) -> list[bytes | memoryview]:
        """The frame as the transport sends it (TCP: header bytes, then the payload as a view)."""
        encoded: list[bytes | memoryview] = [wire.encode_frame_header(header)]
        if frame.nbytes:
            encoded.append(frame.data.cast("B"))  # passed as a view: no bytes() copy on our side
        return encoded

    def _write(self, encoded: Any) -> None:
        """Hand a frame to the transport. Small frames submitted in the same loop iteration (a burst, as replies
        arriving together call for) go in one vectored write at its end: a system call per frame cost a
        producer more CPU than the rest of ``submit`` (docs/BENCHMARKS.md). Past ``_CORK_BYTES`` they go now."""
        nbytes = sum(map(len, encoded))
        if not self._corked:
            if nbytes >= _CORK_BYTES:
                self._transport.writelines(encoded)
                return
            self._protocol.loop.call_soon(self._uncork)
        self._corked.extend(encoded)
        self._corked_bytes += nbytes
        if self._corked_bytes >= _CORK_BYTES:
            self._uncork()

    def _uncork(self) -> None:
        """Write what ``_write`` held back (nothing, if the connection has ended: its frames fail with it)."""
        if not self._corked:
            return
        corked, self._corked, self._corked_bytes = self._corked, [], 0
        if self._protocol.error is None:
            self._transport.writelines(corked)  # one vectored write

    async def infer(
        self,
        frame: np.ndarray,
        *,
        stream_id: int = 0,
        model: str = "default",
        deadline: float | None = None,
        priority: int = 0,
        live: bool = False,
        sequence: int | None = None,
    ) -> Reply:
        """Send one frame and wait for its reply (``await submit(...)``)."""
        return await self.submit(
            frame, stream_id=stream_id, model=model, deadline=deadline, priority=priority, live=live, sequence=sequence
        )

    async def wait_for_room(self) -> None:
        """Wait until one more frame fits the server's ``max_frames_in_flight``.

        Returns at once when :attr:`limits` is ``None`` (v1, or not announced)
        or fewer than ``limits.max_frames_in_flight`` frames are in flight (as
        counted by :attr:`in_flight`, cancelled ones included). Call
        :meth:`submit` right after it returns, without awaiting in between.
        Submitting without waiting is allowed too: past the limit the server
        stops reading the connection until replies go out (TCP flow control,
        not an error). Raises ConnectionError if the connection ends meanwhile.
        """
        proto = self._protocol
        limits = self._welcome.limits
        while True:
            if proto.error is not None:
                raise ConnectionClosedError(proto.error.reason, proto.error.status, proto.error.server_message)
            if limits is None or len(proto.pending) < limits.max_frames_in_flight:
                return
            waiter: asyncio.Future[None] = proto.loop.create_future()
            proto.room_waiters.append(waiter)
            await waiter

    async def drain(self) -> None:
        """Wait until the transport's write buffer is below its high-water mark.

        Raises ConnectionError if the connection ends meanwhile.
        """
        proto = self._protocol
        if proto.error is not None:
            raise ConnectionClosedError(proto.error.reason, proto.error.status, proto.error.server_message)
        self._uncork()  # the write buffer is measured with every frame submitted in it (a loop may not yield)
        if not proto.write_paused:
            return
        waiter: asyncio.Future[None] = proto.loop.create_future()
        proto.drain_waiters.append(waiter)
        await waiter

    # --- closing ----------------------------------------------------------

    async def close(self, timeout: float = 5.0) -> None:
        """Close the connection; frames still in flight fail with ConnectionError.

        Data already handed to the transport is flushed for up to ``timeout``
        seconds, then the connection is aborted.
        """
        proto = self._protocol
        if not proto.closing_by_client and proto.error is None:
            self._uncork()  # frames submitted before the close are sent, as data handed to the transport is
            proto.closing_by_client = True
            proto._set_error(ConnectionClosedError("connection closed by the client"))
            self._transport.close()
        try:
            await asyncio.wait_for(asyncio.shield(proto.lost), timeout)
        except TimeoutError:
            self._transport.abort()
            await proto.lost

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        peer = self._transport.get_extra_info("peername")
        state = "closed" if self.closed else "open"
        return f"<{type(self).__name__} {peer} {state} in_flight={self.in_flight}>"


def _check_protocol_version(version: object) -> None:
    if type(version) is not int or version not in wire.SUPPORTED_VERSIONS:  # not bool, float, str
        raise ValueError(f"protocol_version must be one of {wire.SUPPORTED_VERSIONS}, got {version!r}")


async def connect(
    host: str,
    port: int,
    *,
    token: str = "",
    timeout: float | None = 10.0,
    protocol_version: int = wire.VERSION,
) -> Connection:
    """Open a connection: TCP connect, send HELLO, wait for the server's WELCOME.

    ``timeout`` bounds the whole handshake (``None``: no limit; TimeoutError
    when it runs out). ``protocol_version`` (1 or 2, default 2) is sent in the
    HELLO and selects the connection's protocol version; use 1 for a server
    that only speaks v1 (it refuses a v2 HELLO with UNSUPPORTED_VERSION).

    Raises:
        HandshakeError: the server refused (status and message from its WELCOME),
            or accepted with another protocol version than asked for.
        ConnectionError / OSError: the connection could not be made or broke.
        TimeoutError: the handshake took longer than ``timeout``.
        ValueError: ``protocol_version`` is not supported, or the token is too long.
    """
    _check_protocol_version(protocol_version)
    hello = wire.encode_hello(wire.Hello(version=protocol_version, token=token))  # ValueError for a long token
    loop = asyncio.get_running_loop()
    protocol = _Protocol(loop)
    transport: asyncio.Transport | None = None
    try:
        async with asyncio.timeout(timeout):
            transport, _ = await loop.create_connection(lambda: protocol, host, port)
            transport.write(hello)
            welcome = await protocol.welcome
    except BaseException as exc:
        if transport is not None:
            transport.abort()
        if isinstance(exc, TimeoutError) and timeout is not None:
            raise no_answer(timeout) from None
        raise
    if welcome.status != wire.Status.OK:
        transport.close()
        raise HandshakeError(welcome.status, welcome.message)
    if welcome.version != protocol_version:
        transport.close()
        raise HandshakeError(
            wire.Status.UNSUPPORTED_VERSION,
            f"asked for protocol version {protocol_version}, server accepted with version {welcome.version}",
        )
    return Connection(protocol, transport, welcome)


def no_answer(timeout: float) -> TimeoutError:
    """What a connect whose handshake took longer than ``timeout`` raises (the timeout's own has no text)."""
    return TimeoutError(f"no answer within {timeout:g} s")


# --- UDP ----------------------------------------------------------------------

_UDP_READS_PER_WAKEUP = 256  # datagrams read per wake-up before the loop runs other work
_UDP_PARTIAL_REPLIES = 1024  # replies in reassembly kept at once (the oldest is dropped past it)


class _DatagramTransport:
    """The UDP side of a :class:`UdpConnection`: one connected non-blocking socket read by
    ``loop.add_reader``; reply datagrams are reassembled and handed to the shared reply matching
    (``_Protocol._on_reply``). Offers the few transport methods :class:`Connection` uses."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, protocol: _Protocol, loss: float,
                 seed: int | None, gso: bool = True) -> None:  # fmt: skip
        self._loop = loop
        self._sock = sock
        self._protocol = protocol
        self._buf = bytearray(udp.MAX_DATAGRAM_BYTES)
        self._view = memoryview(self._buf)
        self._partial: dict[tuple[int, int], tuple[udp.Assembly, bytearray, list[bytes]]] = {}
        self._loss = loss
        self._rng = np.random.default_rng(seed)
        self._sender = mmsg.Sender(use_gso=gso)
        self._closing = False
        self.datagrams_sent = 0
        self.datagrams_dropped = 0  # by ``loss``, or because the socket's send buffer was full
        self.datagrams_received = 0
        self.bad_datagrams = 0  # replies that could not be parsed
        loop.add_reader(sock.fileno(), self._on_readable)
        protocol.connection_made(cast(asyncio.BaseTransport, self))

    @property
    def socket(self) -> socket.socket:
        return self._sock

    # --- what Connection uses of a transport ---------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            with contextlib.suppress(OSError):
                return self._sock.getpeername()
        if name == "socket":
            return self._sock
        return default

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        self._loop.call_soon(self._protocol.connection_lost, None)

    abort = close

    def writelines(self, datagrams: udp.Datagrams) -> None:
        """Send a message's datagrams with one ``sendmmsg`` (no copy; runs of them as one GSO message each where
        the kernel takes it); ``loss`` drops a random fraction first."""
        if self._closing:
            return
        keep = self._rng.random(len(datagrams)) >= self._loss if self._loss else None
        sent, _failed = self._sender.send(self._sock, datagrams, keep)
        self.datagrams_sent += sent
        self.datagrams_dropped += len(datagrams) - sent  # by ``loss``, or refused by the kernel (``_failed``)

    # --- receiving replies -------------------------------------------------------

    def _on_readable(self) -> None:
        for _ in range(_UDP_READS_PER_WAKEUP):
            if self._closing:
                return
            try:
                n = self._sock.recv_into(self._buf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. ICMP port unreachable: the server is not (yet) there
                log.debug("udp receive: %s", exc)
                continue
            self.datagrams_received += 1
            try:
                self._on_datagram(self._view[:n])
            except (ValueError, wire.ProtocolError) as exc:
                self.bad_datagrams += 1
                log.debug("bad reply datagram: %s", exc)

    def _on_datagram(self, data: memoryview) -> None:
        ch = udp.decode_chunk_header(data)
        if ch.kind != udp.Kind.REPLY:
            raise ValueError("not a reply chunk")
        body = data[udp.HEADER_SIZE :]
        if ch.chunk_count == 1:  # the common case: the whole reply in one datagram
            got = wire.decode_reply(body)
            if got is None:
                raise ValueError("reply datagram shorter than its reply")
            self._protocol._on_reply(got[0], got[1])
            return
        key = (ch.stream_id, ch.sequence)
        entry = self._partial.get(key)
        if entry is None:
            if key not in self._protocol.pending:
                return  # a late duplicate, or a reply nobody waits for
            buffer = bytearray(ch.length)
            entry = self._partial[key] = (udp.Assembly(ch.chunk_count, ch.length, memoryview(buffer)), buffer, [])
            if len(self._partial) > _UDP_PARTIAL_REPLIES:
                del self._partial[next(iter(self._partial))]
        assembly, buffer, head = entry
        if ch.chunk_index == 0 and not assembly.seen[0]:
            used = udp.reply_head_length(body)
            head.append(bytes(body[:used]))
            body = body[used:]
        added = assembly.add(ch.chunk_index, ch.chunk_count, ch.offset, ch.length, body)
        if added is not udp.Added.NEW or not assembly.all_chunks:
            return
        del self._partial[key]
        got = wire.decode_reply(head[0] + buffer)
        if got is None or not assembly.complete:
            raise ValueError("reply chunks do not add up to the reply")
        self._protocol._on_reply(got[0], got[1])


class UdpConnection(Connection):
    """Frames over UDP (docs/PROTOCOL.md section 11): the same ``submit``/``infer`` as :class:`Connection`,
    and :meth:`send` for frames whose results go to the server's subscribers instead of back here.

    Create it with :func:`connect_udp`. There is no handshake, so there is no
    WELCOME: :attr:`welcome` is a local stand-in (``limits`` None). Datagrams
    can be lost: a frame the server got only part of is answered INCOMPLETE,
    but a frame none of whose datagrams arrived, or whose reply was lost,
    gets no reply; its future fails with TimeoutError after ``reply_timeout``.
    """

    def __init__(self, protocol: _Protocol, transport: _DatagramTransport, datagram_bytes: int,
                 reply_timeout: float | None) -> None:  # fmt: skip
        limit = udp.MAX_CHUNKS * (datagram_bytes - udp.HEADER_SIZE) - wire.FRAME_HEADER_SIZE
        welcome = wire.Welcome(wire.Status.OK, min(limit, udp.MAX_LENGTH), 0, "udp: no handshake")
        super().__init__(protocol, cast(asyncio.Transport, transport), welcome)
        self._udp = transport
        self.datagram_bytes = datagram_bytes
        self._reply_timeout = reply_timeout
        self._timer: asyncio.TimerHandle | None = None
        if reply_timeout is not None:
            self._timer = protocol.loop.call_later(min(reply_timeout / 4, 1.0), self._expire)

    @property
    def socket(self) -> socket.socket:
        """The connected UDP socket (to send hand-made datagrams, e.g. in tests; do not read from it)."""
        return self._udp.socket

    @property
    def datagrams_sent(self) -> int:
        return self._udp.datagrams_sent

    @property
    def datagrams_dropped(self) -> int:
        """Datagrams not sent: dropped on purpose (``loss``) or for a full send buffer."""
        return self._udp.datagrams_dropped

    @property
    def datagrams_received(self) -> int:
        """Datagrams that came to the socket (reply chunks, well-formed or not)."""
        return self._udp.datagrams_received

    @property
    def unmatched_replies(self) -> int:
        """Replies that matched no frame waiting here: late ones (after ``reply_timeout`` or a cancel) and,
        for frames sent with :meth:`send`, the refusals the server made before their first datagram
        with the frame header came (``TOO_LARGE``, ``OVERLOADED``, ``INCOMPLETE``; section 11.3)."""
        return self._protocol.unmatched_replies

    def send(
        self,
        frame: np.ndarray,
        *,
        stream_id: int = 0,
        model: str = "default",
        deadline: float | None = None,
        priority: int = 0,
        live: bool = False,
        sequence: int | None = None,
    ) -> int:
        """Send one frame whose result goes to the server's subscribers of ``stream_id``, not back here.

        Fire and forget, for a camera or sensor watched by someone else: the
        frame goes out with the ``SUBSCRIBERS`` flag (docs/PROTOCOL.md section
        11.3), so the server sends no reply datagram and publishes its outcome
        (a result or an error status) to the subscribers of ``stream_id``: a
        WebSocket on ``/v1/stream``, the results port or file. Nothing waits
        for a reply and nothing is kept per frame (it is not counted in
        :attr:`in_flight`); sequence numbers advance as for :meth:`submit`
        and share its counter. Returns the frame's sequence number, which is
        what a subscriber sees.

        The datagrams are handed to the kernel before this returns, so the
        array may be reused at once. As for :meth:`submit` nothing waits for
        room: datagrams the socket's send buffer refuses are lost and counted
        in :attr:`datagrams_dropped`; pace the frames (a camera's frame rate)
        to stay within what the server takes. A frame the model cannot take
        (wrong shape, unknown model) is refused by the server and its status
        published to the subscribers.

        Takes the arguments of :meth:`submit`.

        Raises:
            ValueError: an argument is out of range, the frame has an unsupported
                dtype or too many dimensions or bytes for UDP, or
                ``(stream_id, sequence)`` is in flight from :meth:`submit`.
            TypeError: ``frame`` is not a numpy array.
            ConnectionError: the connection is closed.
        """
        header, encoded = self._prepare(frame, stream_id, model, deadline, priority, live, sequence,
                                        wire.FrameFlags.SUBSCRIBERS)  # fmt: skip
        self._sent(header)
        self._write(encoded)
        return header.sequence

    def _encode(self, header: wire.FrameHeader, frame: np.ndarray) -> Any:
        payload = frame.data.cast("B") if frame.nbytes else memoryview(b"")  # (a view of no bytes cannot be cast)
        return udp.frame_datagrams(header, payload, self.datagram_bytes)

    def _write(self, encoded: Any) -> None:
        self._udp.writelines(encoded)

    def _expire(self) -> None:
        """Fail the futures of frames that got no reply within ``reply_timeout``."""
        proto = self._protocol
        assert self._reply_timeout is not None
        if proto.error is not None:
            return
        limit = time.perf_counter_ns() - int(self._reply_timeout * 1e9)
        for key, (fut, sent_ns) in list(proto.pending.items()):
            if sent_ns < limit:
                del proto.pending[key]
                if not fut.done():
                    why = f"frame {key[0]}/{key[1]}: no reply within {self._reply_timeout:g} s"
                    fut.set_exception(TimeoutError(why))
        self._timer = proto.loop.call_later(min(self._reply_timeout / 4, 1.0), self._expire)

    async def close(self, timeout: float = 5.0) -> None:
        """Close the socket; frames still in flight fail with ConnectionError."""
        if self._timer is not None:
            self._timer.cancel()
        await super().close(timeout)


async def connect_udp(
    host: str,
    port: int,
    *,
    datagram_bytes: int = udp.DEFAULT_DATAGRAM_BYTES,
    reply_timeout: float | None = 10.0,
    loss: float = 0.0,
    seed: int | None = None,
    recv_buffer_bytes: int = 4 * 1024 * 1024,
    gso: bool = True,
) -> UdpConnection:
    """Open a UDP "connection" to a server's UDP listener: a connected socket, no handshake.

    Args:
        datagram_bytes: size of each datagram sent (default fits a 1500-byte
            MTU; up to 65507 where the path allows, e.g. jumbo frames or loopback).
        reply_timeout: seconds after which a frame without reply fails with
            TimeoutError (``None``: wait for ever).
        loss: for tests and load generation: drop this fraction of datagrams
            at random instead of sending them (``seed`` seeds the choice).
        recv_buffer_bytes: SO_RCVBUF asked for the reply socket.
        gso: send a frame's datagrams as runs of up to 64 per message with UDP
            generic segmentation offload (Linux): the kernel cuts them into the
            same datagrams, for much less work per datagram. Where the kernel or
            the route refuses it (no checksum offload, a ``datagram_bytes``
            beyond the path MTU, not Linux) the connection sends one datagram
            per message from then on, losing nothing. ``False``: never try.

    Raises:
        ValueError: an argument is out of range. OSError: the address cannot be resolved or used.
    """
    if not udp.MIN_DATAGRAM_BYTES <= datagram_bytes <= udp.MAX_DATAGRAM_BYTES:
        raise ValueError(f"datagram_bytes must be {udp.MIN_DATAGRAM_BYTES}..{udp.MAX_DATAGRAM_BYTES}")
    if not 0 <= loss < 1:
        raise ValueError(f"loss must be a fraction in [0, 1), got {loss!r}")
    if reply_timeout is not None and not (reply_timeout > 0 and math.isfinite(reply_timeout)):
        raise ValueError(f"reply_timeout must be a positive number of seconds or None, got {reply_timeout!r}")
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, recv_buffer_bytes)
        sock.connect(address)  # replies from anyone else are filtered out by the kernel
        protocol = _Protocol(loop)
        protocol.welcome.set_result(wire.Welcome(wire.Status.OK, 0, 0))  # no handshake: replies parse at once
        transport = _DatagramTransport(loop, sock, protocol, loss, seed, gso)
    except BaseException:
        sock.close()
        raise
    return UdpConnection(protocol, transport, datagram_bytes, reply_timeout)


# --- blocking wrapper -----------------------------------------------------


class SyncConnection:
    """Blocking wrapper around :class:`Connection` for simple scripts.

    Runs a private event loop in one daemon thread (one per SyncConnection, not
    per request). Create it with :func:`connect_sync`. Methods may be called
    from any thread; frames submitted from one thread keep their order.
    """

    def __init__(self, conn: Connection, loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
        self._conn = conn
        self._loop = loop
        self._thread = thread
        self._closed = False

    @property
    def max_payload(self) -> int:
        """Largest payload (bytes) the server accepts per frame."""
        return self._conn.max_payload

    @property
    def ring_bytes(self) -> int:
        """Size of the server's receive ring."""
        return self._conn.ring_bytes

    @property
    def protocol_version(self) -> int:
        """The protocol version of this connection."""
        return self._conn.protocol_version

    @property
    def limits(self) -> wire.Limits | None:
        """What the server allows this connection (v2); ``None`` in v1 or when not announced."""
        return self._conn.limits

    @property
    def in_flight(self) -> int:
        """Frames submitted whose reply has not arrived yet (approximate across threads)."""
        return self._conn.in_flight

    def submit(self, frame: np.ndarray, **kwargs: Any) -> concurrent.futures.Future[Reply]:
        """Queue one frame; returns a concurrent future for its reply.

        Takes the same keyword arguments as :meth:`Connection.submit`; argument
        errors and ConnectionError are raised by the future's ``result()``.
        """
        if self._closed:
            raise ConnectionClosedError("connection closed by the client")
        out: concurrent.futures.Future[Reply] = concurrent.futures.Future()
        self._loop.call_soon_threadsafe(self._submit_on_loop, out, frame, kwargs)
        return out

    def _submit_on_loop(self, out: concurrent.futures.Future[Reply], frame: np.ndarray, kwargs: dict[str, Any]) -> None:
        if not out.set_running_or_notify_cancel():
            return
        try:
            fut = self._conn.submit(frame, **kwargs)
        except BaseException as e:
            out.set_exception(e)
            return
        fut.add_done_callback(_copy_to(out))

    def infer(self, frame: np.ndarray, timeout: float | None = None, **kwargs: Any) -> Reply:
        """Send one frame and block until its reply (``submit(...).result(timeout)``)."""
        return self.submit(frame, **kwargs).result(timeout)

    def close(self) -> None:
        """Close the connection and stop the private loop thread."""
        if self._closed:
            return
        self._closed = True
        try:
            asyncio.run_coroutine_threadsafe(self._conn.close(), self._loop).result()
        finally:
            _stop_loop(self._loop, self._thread)

    def __enter__(self) -> SyncConnection:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class SyncUdpConnection(SyncConnection):
    """Blocking wrapper around :class:`UdpConnection` (:func:`connect_udp_sync`): adds :meth:`send`."""

    def __init__(self, conn: UdpConnection, loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
        super().__init__(conn, loop, thread)
        self._udp = conn

    @property
    def datagrams_sent(self) -> int:
        """Datagrams sent (as :attr:`UdpConnection.datagrams_sent`)."""
        return self._udp.datagrams_sent

    @property
    def datagrams_dropped(self) -> int:
        """Datagrams not sent (as :attr:`UdpConnection.datagrams_dropped`)."""
        return self._udp.datagrams_dropped

    @property
    def datagrams_received(self) -> int:
        """Datagrams that came to the socket (as :attr:`UdpConnection.datagrams_received`)."""
        return self._udp.datagrams_received

    @property
    def unmatched_replies(self) -> int:
        """Replies that matched no waiting frame (as :attr:`UdpConnection.unmatched_replies`)."""
        return self._udp.unmatched_replies

    def send(self, frame: np.ndarray, **kwargs: Any) -> int:
        """:meth:`UdpConnection.send` from any thread: blocks until the datagrams are handed to the
        kernel (one hop to the private loop, no reply awaited), then returns the frame's sequence
        number; the array may be reused at once. Raises what :meth:`UdpConnection.send` raises."""
        if self._closed:
            raise ConnectionClosedError("connection closed by the client")
        out: concurrent.futures.Future[int] = concurrent.futures.Future()

        def on_loop() -> None:
            try:
                out.set_result(self._udp.send(frame, **kwargs))
            except BaseException as e:
                out.set_exception(e)

        try:
            self._loop.call_soon_threadsafe(on_loop)
        except RuntimeError:  # its loop closed meanwhile: close() from another thread
            raise ConnectionClosedError("connection closed by the client") from None
        while True:
            try:
                return out.result(timeout=0.1)
            except concurrent.futures.TimeoutError:
                if not self._thread.is_alive():  # closed before the send ran: it never will
                    raise ConnectionClosedError("connection closed by the client") from None


def _copy_to(out: concurrent.futures.Future[Reply]) -> Callable[[asyncio.Future[Reply]], None]:
    def done(fut: asyncio.Future[Reply]) -> None:
        if fut.cancelled():
            out.cancel()
        elif (exc := fut.exception()) is not None:
            out.set_exception(exc)
        else:
            out.set_result(fut.result())

    return done


def _stop_loop(loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
    loop.call_soon_threadsafe(loop.stop)
    thread.join()
    loop.close()


def connect_sync(
    host: str,
    port: int,
    *,
    token: str = "",
    timeout: float | None = 10.0,
    protocol_version: int = wire.VERSION,
) -> SyncConnection:
    """Blocking :func:`connect`: returns a :class:`SyncConnection`."""
    _check_protocol_version(protocol_version)
    loop, thread, conn = _sync(
        lambda: connect(host, port, token=token, timeout=timeout, protocol_version=protocol_version), f"{host}:{port}"
    )
    return SyncConnection(conn, loop, thread)


def connect_udp_sync(host: str, port: int, **kwargs: Any) -> SyncUdpConnection:
    """Blocking :func:`connect_udp` (same keyword arguments): a :class:`SyncUdpConnection`."""
    loop, thread, conn = _sync(lambda: connect_udp(host, port, **kwargs), f"{host}:{port}/udp")
    return SyncUdpConnection(cast(UdpConnection, conn), loop, thread)


def _sync(opening: Callable[[], Coroutine[Any, Any, Connection]],
          name: str) -> tuple[asyncio.AbstractEventLoop, threading.Thread, Connection]:  # fmt: skip
    """Open a connection on a private loop in one daemon thread, for a blocking wrapper to own."""
    loop = new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name=f"streamgpu-client {name}", daemon=True)
    thread.start()
    try:
        conn = asyncio.run_coroutine_threadsafe(opening(), loop).result()
    except BaseException:
        _stop_loop(loop, thread)
        raise
    return loop, thread, conn
