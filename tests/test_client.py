"""streamgpu.client against a small fake server built from asyncio.start_server + wire.py."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_asyncio

from streamgpu import client
from streamgpu.client import ConnectionClosedError, HandshakeError, Reply, connect, connect_sync
from streamgpu.protocol import wire

# Model names the fake server understands (anything else is echoed):
HANG = "hang"  # never reply
DROP = "drop"  # close the connection without a word
BYE = "bye"  # connection reply BAD_FRAME, then close (what the server does when framing is lost)
TIMEOUT = "timeout"  # connection reply RECEIVE_TIMEOUT (BAD_FRAME on v1), then close
GARBAGE = "garbage"  # send bytes that are not a reply
UNKNOWN = "nope"  # reply UNKNOWN_MODEL without a result

LIMITS = wire.Limits(max_frames_in_flight=256, max_producer_bytes=1 << 26, receive_timeout_ms=10_000,
                     min_receive_rate=1_000_000, max_priority=255)  # fmt: skip


@dataclass
class FakeServer:
    """Answers HELLO with WELCOME and echoes each frame's payload as its result.

    ``batch``: collect up to this many frames (or until 5 ms pass without a
    new one), then reply grouped by stream, streams in descending order, so
    replies of different streams come out of submission order while each
    stream's stay in order. ``delay``: seconds to wait before replying.

    Speaks the version the HELLO asks for (refusing others in the v1 layout,
    as the real server does), announcing ``limits`` in v2; ``welcome_version``
    forces the WELCOME's version. ``connection_flag=False`` plays a server
    that predates the CONNECTION flag (its last word is a plain reply 0/0).
    """

    token: str = ""
    delay: float = 0.0
    batch: int = 1
    max_payload: int = 1 << 26
    ring_bytes: int = 1 << 28
    welcome_status: wire.Status = wire.Status.OK
    welcome_message: str = ""
    welcome_version: int | None = None
    limits: wire.Limits | None = LIMITS
    connection_flag: bool = True
    port: int = 0
    headers: list[wire.FrameHeader] = field(default_factory=list)
    connections: int = 0
    version: int = 0  # of the latest accepted connection
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> FakeServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            await self._serve(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client went away
        except asyncio.CancelledError:
            pass  # stop(); ending normally keeps 3.11's StreamReaderProtocol from reporting it
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readexactly(8)
        token_len = int.from_bytes(head[6:8], "little")
        got = wire.decode_hello(head + await reader.readexactly(token_len))
        assert got is not None
        hello, _ = got
        version = hello.version
        status, message = self.welcome_status, self.welcome_message
        if version not in wire.SUPPORTED_VERSIONS:
            status, message, version = wire.Status.UNSUPPORTED_VERSION, "use 1 or 2", 1
        elif status == wire.Status.OK and hello.token != self.token:
            status, message = wire.Status.UNAUTHORIZED, "wrong token"
        limits = self.limits if status == wire.Status.OK else None
        if self.welcome_version is not None:
            version = self.welcome_version
        welcome = wire.Welcome(status, self.max_payload, self.ring_bytes, message, version, limits)
        writer.write(wire.encode_welcome(welcome))
        if status != wire.Status.OK:
            return
        self.version = version
        queue: list[tuple[wire.FrameHeader, bytes, int]] = []
        while True:
            try:
                fixed = await asyncio.wait_for(reader.readexactly(wire.FRAME_HEADER_SIZE), 0.005 if queue else None)
            except TimeoutError:
                await self._flush(writer, queue)
                continue
            rx_ns = time.perf_counter_ns()
            rest = await reader.readexactly(fixed[9] + 4 * fixed[6])  # model_len, ndim
            parsed = wire.decode_frame_header(fixed + rest)
            assert parsed is not None
            header, _ = parsed
            payload = await reader.readexactly(header.payload_len)
            self.headers.append(header)
            if header.model == HANG:
                continue
            if header.model == DROP:
                return
            if header.model in (BYE, TIMEOUT):
                status = wire.Status.BAD_FRAME if header.model == BYE else wire.Status.RECEIVE_TIMEOUT
                text = "bad frame magic b'XXXX'" if header.model == BYE else "payload late"
                flags = wire.ReplyFlags.CONNECTION if self.connection_flag else wire.ReplyFlags.NONE
                writer.writelines(
                    wire.encode_reply(wire.ReplyHeader(0, 0, status, message=text, flags=flags), b"", version)
                )
                return
            if header.model == GARBAGE:
                writer.write(b"NOPE" * 16)
                await reader.read()  # until the client gives up
                return
            queue.append((header, payload, rx_ns))
            if len(queue) >= self.batch:
                await self._flush(writer, queue)

    async def _flush(self, writer: asyncio.StreamWriter, queue: list[tuple[wire.FrameHeader, bytes, int]]) -> None:
        if self.delay:
            await asyncio.sleep(self.delay)
        by_stream: dict[int, list[tuple[wire.FrameHeader, bytes, int]]] = defaultdict(list)
        for item in queue:
            by_stream[item[0].stream_id].append(item)
        queue.clear()
        for sid in sorted(by_stream, reverse=True):
            for h, payload, rx_ns in by_stream[sid]:
                timings = wire.Timings(receive_us=1, total_us=(time.perf_counter_ns() - rx_ns) // 1000, batch_size=1)
                if h.model == UNKNOWN:
                    reply = wire.ReplyHeader(
                        h.stream_id, h.sequence, wire.Status.UNKNOWN_MODEL, message="no such model"
                    )
                    writer.writelines(wire.encode_reply(reply))
                    continue
                reply = wire.ReplyHeader(
                    h.stream_id, h.sequence, wire.Status.OK, h.dtype_code, h.shape, timestamp_ns=h.timestamp_ns,
                    timings=timings,
                )  # fmt: skip
                writer.writelines(wire.encode_reply(reply, payload))
        await writer.drain()


@pytest_asyncio.fixture
async def server() -> AsyncIterator[FakeServer]:
    srv = await FakeServer().start()
    yield srv
    await srv.stop()


async def _serve(**kwargs: Any) -> FakeServer:
    return await FakeServer(**kwargs).start()


# --- the happy path -------------------------------------------------------


@pytest.mark.asyncio
async def test_many_frames_in_flight_on_several_streams_are_matched() -> None:
    srv = await _serve(batch=64)
    try:
        async with await connect("127.0.0.1", srv.port) as conn:
            rng = np.random.default_rng(0)
            sent: dict[tuple[int, int], np.ndarray] = {}
            futs = []
            order: list[tuple[int, int]] = []

            def record(f: asyncio.Future[Reply]) -> None:
                if f.exception() is None:
                    order.append((f.result().stream_id, f.result().sequence))

            for i in range(400):
                stream = int(rng.integers(0, 5))
                frame = rng.integers(0, 255, size=(int(rng.integers(1, 40)), 3), dtype=np.uint8)
                fut = conn.submit(frame, stream_id=stream)
                fut.add_done_callback(record)
                futs.append((stream, frame, fut))
                if i % 50 == 0:
                    await asyncio.sleep(0)
            assert conn.in_flight > 0
            replies = await asyncio.gather(*(f for _, _, f in futs))
            per_stream_seq: dict[int, int] = defaultdict(int)
            for (stream, frame, _), reply in zip(futs, replies, strict=True):
                assert reply.ok, reply
                assert reply.stream_id == stream
                assert reply.sequence == per_stream_seq[stream]  # auto-assigned 0, 1, 2, ... per stream
                per_stream_seq[stream] += 1
                sent[(stream, reply.sequence)] = frame
                assert reply.result is not None
                np.testing.assert_array_equal(reply.result, frame)
                assert reply.result.flags.writeable and reply.result.flags.owndata
                assert reply.sent_ns <= reply.received_ns and reply.latency_s >= 0
                assert reply.timings.batch_size == 1 and reply.message == ""
            assert conn.in_flight == 0
            # replies interleaved across streams out of submission order, but in order within each stream
            submitted = [(s, r.sequence) for (s, _, _), r in zip(futs, replies, strict=True)]
            assert order != submitted
            for stream in range(5):
                seqs = [q for s, q in order if s == stream]
                assert seqs == sorted(seqs)
    finally:
        await srv.stop()


ARRAYS = [
    np.array(3.5, dtype=np.float32),  # 0-d
    np.zeros((0, 3), dtype=np.int16),  # empty
    np.arange(2**8, dtype=np.float64).reshape((2,) * 8),  # 8 dims
    np.arange(24, dtype=np.int32).reshape(4, 6)[:, ::2],  # not contiguous
    np.arange(12, dtype=np.int64).reshape(3, 4).T,  # Fortran order
    np.arange(10, dtype=">f4"),  # big-endian
    np.array([-1, 0, 1], dtype=np.int8),
    np.array([0, 65535], dtype=np.uint16),
    np.array([1.5, -2.25], dtype=np.float16),
]


@pytest.mark.asyncio
@pytest.mark.parametrize("array", ARRAYS, ids=lambda a: f"{a.dtype.str}{list(a.shape)}")
async def test_results_equal_inputs(server: FakeServer, array: np.ndarray) -> None:
    async with await connect("127.0.0.1", server.port) as conn:
        reply = await conn.infer(array, stream_id=7)
    assert reply.ok and reply.result is not None
    assert reply.result.shape == array.shape
    assert reply.result.dtype == array.dtype.newbyteorder("<")
    np.testing.assert_array_equal(reply.result, array)
    assert server.headers[0].payload_len == array.nbytes
    assert server.headers[0].check_tensor() is None


@pytest.mark.asyncio
async def test_large_frames_and_drain(server: FakeServer) -> None:
    async with await connect("127.0.0.1", server.port) as conn:
        frame = np.random.default_rng(1).integers(0, 255, size=(1080, 1920, 3), dtype=np.uint8)
        futs = []
        for s in range(8):
            futs.append(conn.submit(frame, stream_id=s))
            await conn.drain()
        for reply in await asyncio.gather(*futs):
            assert reply.result is not None
            np.testing.assert_array_equal(reply.result, frame)


@pytest.mark.asyncio
async def test_header_fields_on_the_wire(server: FakeServer) -> None:
    async with await connect("127.0.0.1", server.port) as conn:
        before = time.time_ns()
        await conn.infer(np.zeros(4, np.float32), stream_id=2**32 - 1, model="rés", deadline=0.25, priority=200)
        await conn.infer(np.zeros(4, np.float32), live=True, sequence=10)
        await conn.infer(np.zeros(4, np.float32), deadline=1e-9)  # rounds up, never to 0 (= no deadline)
        r = await conn.infer(np.zeros(4, np.float32))
        assert r.sequence == 12  # the automatic sequence continues above an explicit one
    h0, h1, h2, h3 = server.headers
    assert (h0.stream_id, h0.sequence, h0.model, h0.deadline_us, h0.priority) == (2**32 - 1, 0, "rés", 250_000, 200)
    assert h0.flags == wire.FrameFlags.NONE and before <= h0.timestamp_ns <= time.time_ns()
    assert h0.dtype_code == wire.dtype_code(np.float32) and h0.shape == (4,)
    assert (h1.model, h1.flags, h1.deadline_us, h1.priority, h1.sequence) == ("default", wire.FrameFlags.LIVE, 0, 0, 10)
    assert h2.deadline_us == 1
    assert (h2.sequence, h3.sequence) == (11, 12)


@pytest.mark.asyncio
async def test_error_status_reply_has_no_result(server: FakeServer) -> None:
    async with await connect("127.0.0.1", server.port, token="") as conn:
        reply = await conn.infer(np.zeros(3, np.uint8), model=UNKNOWN)
        assert not reply.ok
        assert reply.status == wire.Status.UNKNOWN_MODEL and reply.result is None and reply.message == "no such model"
        assert (await conn.infer(np.ones(3, np.uint8))).ok  # the connection stays usable


@pytest.mark.asyncio
async def test_welcome_limits() -> None:
    srv = await _serve(max_payload=12345, ring_bytes=67890)
    try:
        async with await connect("127.0.0.1", srv.port) as conn:
            assert (conn.max_payload, conn.ring_bytes) == (12345, 67890)
            assert conn.protocol_version == 2 and srv.version == 2 and conn.limits == LIMITS
            assert "open" in repr(conn)
        assert conn.closed
    finally:
        await srv.stop()


@pytest.mark.asyncio
async def test_protocol_version_1() -> None:
    srv = await _serve(max_payload=12345, ring_bytes=67890)
    try:
        async with await connect("127.0.0.1", srv.port, protocol_version=1) as conn:
            assert srv.version == 1 and conn.protocol_version == 1 and conn.welcome.version == 1
            assert conn.limits is None and (conn.max_payload, conn.ring_bytes) == (12345, 67890)
            await conn.wait_for_room()  # no limits: never waits
            reply = await conn.infer(np.arange(5, dtype=np.int16), stream_id=3)
            assert reply.ok and reply.result is not None and reply.result.tolist() == [0, 1, 2, 3, 4]
    finally:
        await srv.stop()


@pytest.mark.asyncio
async def test_v2_without_announced_limits() -> None:
    srv = await _serve(limits=None)
    try:
        async with await connect("127.0.0.1", srv.port) as conn:
            assert conn.protocol_version == 2 and conn.limits is None
            assert (await conn.infer(np.ones(2, np.uint8))).ok
    finally:
        await srv.stop()


@pytest.mark.asyncio
@pytest.mark.parametrize("bad", [0, 3, "2", 2.0, True])
async def test_unsupported_protocol_version_argument(bad: Any) -> None:
    with pytest.raises(ValueError, match="protocol_version"):
        await connect("127.0.0.1", 1, protocol_version=bad)
    with pytest.raises(ValueError, match="protocol_version"):
        connect_sync("127.0.0.1", 1, protocol_version=bad)


@pytest.mark.asyncio
@pytest.mark.parametrize(("asked", "answered"), [(2, 1), (1, 2)])
async def test_welcome_in_another_version_is_refused(asked: int, answered: int) -> None:
    srv = await _serve(welcome_version=answered)
    try:
        with pytest.raises(HandshakeError, match=f"asked for protocol version {asked}, server accepted with") as info:
            await connect("127.0.0.1", srv.port, protocol_version=asked)
        assert info.value.status == wire.Status.UNSUPPORTED_VERSION
    finally:
        await srv.stop()


@pytest.mark.asyncio
async def test_v1_layout_refusal_of_a_v2_hello() -> None:
    """A v1-only server refuses a v2 HELLO with a v1-layout WELCOME; the client reports it."""

    async def v1_only(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(8)
        refusal = wire.Welcome(wire.Status.UNSUPPORTED_VERSION, 0, 0, "server speaks 1", version=1)
        writer.write(wire.encode_welcome(refusal))
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(v1_only, "127.0.0.1", 0)
    try:
        with pytest.raises(HandshakeError, match="UNSUPPORTED_VERSION: server speaks 1") as info:
            await connect("127.0.0.1", srv.sockets[0].getsockname()[1])
        assert info.value.status == wire.Status.UNSUPPORTED_VERSION
    finally:
        srv.close()
        await srv.wait_closed()


# --- handshake ------------------------------------------------------------


@pytest.mark.asyncio
async def test_wrong_token_raises_handshake_error() -> None:
    srv = await _serve(token="s3cret")
    try:
        with pytest.raises(HandshakeError) as info:
            await connect("127.0.0.1", srv.port, token="guess")
        assert isinstance(info.value, ConnectionError)
        assert info.value.status == wire.Status.UNAUTHORIZED and info.value.message == "wrong token"
        assert "wrong token" in str(info.value)
        async with await connect("127.0.0.1", srv.port, token="s3cret") as conn:
            assert (await conn.infer(np.ones(2, np.uint8))).ok
    finally:
        await srv.stop()


@pytest.mark.asyncio
async def test_refusal_status_and_message_are_reported() -> None:
    srv = await _serve(welcome_status=wire.Status.UNSUPPORTED_VERSION, welcome_message="server speaks 1 only")
    try:
        with pytest.raises(HandshakeError, match="UNSUPPORTED_VERSION: server speaks 1 only"):
            await connect("127.0.0.1", srv.port)
    finally:
        await srv.stop()


@pytest.mark.asyncio
async def test_server_closing_before_welcome_is_a_connection_error() -> None:
    async def slam(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(8)
        writer.close()

    srv = await asyncio.start_server(slam, "127.0.0.1", 0)
    try:
        with pytest.raises(ConnectionError, match="handshake"):
            await connect("127.0.0.1", srv.sockets[0].getsockname()[1])
    finally:
        srv.close()
        await srv.wait_closed()


@pytest.mark.asyncio
async def test_a_welcome_announcing_no_room_for_any_frame_is_a_connection_error() -> None:
    """A limits block that is announced (not all zero) with max_frames_in_flight 0, which the protocol rules out:
    it was taken as is, and ``wait_for_room`` then waited forever (no frame in flight, so no reply to wake it)."""

    async def broken(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(8)
        limits = wire.Limits(
            max_frames_in_flight=1, max_producer_bytes=1 << 20, receive_timeout_ms=1, min_receive_rate=1
        )
        welcome = bytearray(wire.encode_welcome(wire.Welcome(wire.Status.OK, 1 << 20, 1 << 22, limits=limits)))
        welcome[wire.WELCOME_V1_SIZE : wire.WELCOME_V1_SIZE + 4] = bytes(4)  # max_frames_in_flight = 0
        writer.write(bytes(welcome))
        await reader.read()
        writer.close()

    srv = await asyncio.start_server(broken, "127.0.0.1", 0)
    try:
        async with asyncio.timeout(5):
            with pytest.raises(ConnectionClosedError, match="max_frames_in_flight 0"):
                conn = await connect("127.0.0.1", srv.sockets[0].getsockname()[1])
                await conn.wait_for_room()
    finally:
        srv.close()
        await srv.wait_closed()


@pytest.mark.asyncio
async def test_handshake_timeout() -> None:
    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    srv = await asyncio.start_server(mute, "127.0.0.1", 0)
    try:
        with pytest.raises(TimeoutError):
            await connect("127.0.0.1", srv.sockets[0].getsockname()[1], timeout=0.05)
    finally:
        srv.close()
        await srv.wait_closed()


@pytest.mark.asyncio
async def test_connection_refused() -> None:
    srv = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    srv.close()
    await srv.wait_closed()
    with pytest.raises(OSError):
        await connect("127.0.0.1", port)


# --- the connection ending ------------------------------------------------


@pytest.mark.asyncio
async def test_server_closing_mid_flight_fails_pending_futures(server: FakeServer) -> None:
    conn = await connect("127.0.0.1", server.port)
    hanging = [conn.submit(np.zeros(8, np.uint8), stream_id=s, model=HANG) for s in range(5)]
    last = conn.submit(np.zeros(8, np.uint8), model=DROP)
    for fut in [*hanging, last]:
        with pytest.raises(ConnectionClosedError, match="server closed the connection") as info:
            await fut
        assert info.value.status is None
    assert conn.closed and conn.in_flight == 0
    with pytest.raises(ConnectionError):
        conn.submit(np.zeros(1, np.uint8))
    with pytest.raises(ConnectionError):
        await conn.drain()
    await conn.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("connection_flag", [True, False], ids=["flag", "old-server-0-0"])
async def test_framing_error_reason_reaches_pending_futures(version: int, connection_flag: bool) -> None:
    srv = await _serve(connection_flag=connection_flag)
    try:
        conn = await connect("127.0.0.1", srv.port, protocol_version=version)
        pending = [conn.submit(np.zeros(4, np.int16), stream_id=1, model=HANG) for _ in range(3)]
        pending.append(conn.submit(np.zeros(4, np.int16), stream_id=2, model=BYE))
        for fut in pending:
            with pytest.raises(ConnectionClosedError, match="BAD_FRAME: bad frame magic") as info:
                await fut
            assert info.value.status == wire.Status.BAD_FRAME
            assert info.value.server_message == "bad frame magic b'XXXX'"
        assert conn.closed
        await conn.close()
    finally:
        await srv.stop()


@pytest.mark.asyncio
@pytest.mark.parametrize(("version", "status"), [(2, wire.Status.RECEIVE_TIMEOUT), (1, wire.Status.BAD_FRAME)])
async def test_connection_reply_fails_every_pending_frame_even_0_0(version: int, status: wire.Status) -> None:
    """A CONNECTION reply is the close reason, never the answer to a frame with stream 0, sequence 0."""
    srv = await _serve()
    try:
        conn = await connect("127.0.0.1", srv.port, protocol_version=version)
        first = conn.submit(np.zeros(4, np.uint8), model=HANG)  # stream 0, sequence 0
        others = [conn.submit(np.zeros(4, np.uint8), stream_id=s, model=HANG) for s in (1, 2)]
        last = conn.submit(np.zeros(4, np.uint8), stream_id=3, model=TIMEOUT)
        for fut in [first, *others, last]:
            with pytest.raises(ConnectionClosedError, match=f"after {status.name}: payload late") as info:
                await fut
            assert info.value.status == status and info.value.server_message == "payload late"
        assert conn.closed and conn.in_flight == 0
        with pytest.raises(ConnectionClosedError, match=status.name):
            conn.submit(np.zeros(1, np.uint8))
        await conn.close()
    finally:
        await srv.stop()


@pytest.mark.asyncio
async def test_undecodable_reply_fails_pending_futures(server: FakeServer) -> None:
    conn = await connect("127.0.0.1", server.port)
    a = conn.submit(np.zeros(4, np.uint8), model=HANG)
    b = conn.submit(np.zeros(4, np.uint8), model=GARBAGE)
    for fut in (a, b):
        with pytest.raises(ConnectionError, match="undecodable"):
            await fut
    assert conn.closed
    await conn.close()


@pytest.mark.asyncio
async def test_close_fails_pending_and_is_idempotent(server: FakeServer) -> None:
    conn = await connect("127.0.0.1", server.port)
    fut = conn.submit(np.zeros(4, np.uint8), model=HANG)
    await conn.close()
    with pytest.raises(ConnectionClosedError, match="closed by the client"):
        await fut
    await conn.close()
    with pytest.raises(ConnectionError, match="closed by the client"):
        conn.submit(np.zeros(4, np.uint8))


@pytest.mark.asyncio
async def test_cancelled_request_reply_is_ignored() -> None:
    srv = await _serve(delay=0.02)
    try:
        async with await connect("127.0.0.1", srv.port) as conn:
            fut = conn.submit(np.zeros(4, np.uint8))
            fut.cancel()
            assert conn.in_flight == 1  # still in flight on the server
            with pytest.raises(ValueError, match="already in flight"):
                conn.submit(np.zeros(4, np.uint8), sequence=0)
            reply = await conn.infer(np.ones(4, np.uint8))
            assert reply.sequence == 1 and conn.in_flight == 0
            assert reply.latency_s >= 0.02
    finally:
        await srv.stop()


# --- argument validation --------------------------------------------------

BAD_ARGS: list[tuple[Any, dict[str, Any], type[Exception], str]] = [
    (np.zeros(2, np.uint8), {"priority": -1}, ValueError, "priority"),
    (np.zeros(2, np.uint8), {"priority": 256}, ValueError, "priority"),
    (np.zeros(2, np.uint8), {"priority": 1.5}, ValueError, "priority"),
    (np.zeros(2, np.uint8), {"model": ""}, ValueError, "model name"),
    (np.zeros(2, np.uint8), {"model": "é" * 128}, ValueError, "model name"),
    (np.zeros(2, np.uint8), {"stream_id": -1}, ValueError, "stream_id"),
    (np.zeros(2, np.uint8), {"stream_id": 2**32}, ValueError, "stream_id"),
    (np.zeros(2, np.uint8), {"sequence": -1}, ValueError, "sequence"),
    (np.zeros(2, np.uint8), {"sequence": 2**64}, ValueError, "sequence"),
    (np.zeros(2, np.uint8), {"deadline": 0}, ValueError, "deadline"),
    (np.zeros(2, np.uint8), {"deadline": -1.0}, ValueError, "deadline"),
    (np.zeros(2, np.uint8), {"deadline": float("nan")}, ValueError, "deadline"),
    (np.zeros(2, np.uint8), {"deadline": 5000.0}, ValueError, "deadline"),
    (np.zeros(2, bool), {}, ValueError, "not supported"),
    (np.zeros(2, np.complex64), {}, ValueError, "not supported"),
    (np.zeros(2, np.uint32), {}, ValueError, "not supported"),
    (np.zeros((1,) * 9, np.uint8), {}, ValueError, "dimensions"),
    ([1, 2, 3], {}, TypeError, "numpy array"),
]


@pytest.mark.asyncio
@pytest.mark.parametrize(("frame", "kwargs", "exc", "match"), BAD_ARGS, ids=[m + str(k) for _, k, _, m in BAD_ARGS])
async def test_bad_arguments(
    server: FakeServer, frame: Any, kwargs: dict[str, Any], exc: type[Exception], match: str
) -> None:
    async with await connect("127.0.0.1", server.port) as conn:
        with pytest.raises(exc, match=match):
            conn.submit(frame, **kwargs)
        assert conn.in_flight == 0
        reply = await conn.infer(np.arange(3, dtype=np.uint8))  # nothing half-written: the stream is intact
        assert reply.ok and reply.sequence == 0
    assert server.headers == [server.headers[0]]


@pytest.mark.asyncio
async def test_duplicate_in_flight_and_numpy_integers(server: FakeServer) -> None:
    async with await connect("127.0.0.1", server.port) as conn:
        a = conn.submit(np.zeros(2, np.uint8), stream_id=np.uint32(4), sequence=np.int64(9), model=HANG)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="stream 4 sequence 9 is already in flight"):
            conn.submit(np.zeros(2, np.uint8), stream_id=4, sequence=9)
        ok = await conn.infer(np.zeros(2, np.uint8), stream_id=5, sequence=9)  # same sequence, other stream
        assert ok.ok
    with pytest.raises(ConnectionClosedError):
        await a


# --- the receive path, byte by byte ---------------------------------------


class _FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.writes: list[int] = []  # each writelines call: how many parts
        self.aborted = False

    def write(self, data: Any) -> None:
        self.written.append(bytes(data))

    def writelines(self, list_of_data: Any) -> None:
        self.writes.append(len(list_of_data))
        for d in list_of_data:
            self.write(d)

    def abort(self) -> None:
        self.aborted = True

    def close(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def _reply_bytes(stream: int, seq: int, result: np.ndarray | None, status: wire.Status = wire.Status.OK) -> bytes:
    if result is None:
        return b"".join(bytes(p) for p in wire.encode_reply(wire.ReplyHeader(stream, seq, status, message="m")))
    h = wire.ReplyHeader(stream, seq, status, wire.dtype_code(result.dtype), result.shape, message="hi")
    return b"".join(bytes(p) for p in wire.encode_reply(h, result.tobytes()))


async def _fed_protocol(chunks: list[bytes]) -> tuple[client._Protocol, list[asyncio.Future[Reply]]]:
    proto = client._Protocol(asyncio.get_running_loop())
    proto.connection_made(_FakeTransport())
    futs = []
    for key in [(1, 0), (2, 0), (1, 1)]:
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        proto.pending[key] = (fut, 0)
        futs.append(fut)
    for c in chunks:
        proto.data_received(c)
    return proto, futs


@pytest.mark.asyncio
async def test_receive_path_at_every_split() -> None:
    welcome = wire.encode_welcome(wire.Welcome(wire.Status.OK, 1000, 2000, "hello"))
    stream = (
        welcome
        + _reply_bytes(1, 0, np.arange(6, dtype=np.float32).reshape(2, 3))
        + _reply_bytes(2, 0, None, wire.Status.OVERLOADED)
        + _reply_bytes(1, 1, np.array(7, dtype=np.int64))
    )
    for cut in range(1, len(stream)):
        proto, futs = await _fed_protocol([stream[:cut], stream[cut:]])
        assert proto.welcome.result().message == "hello"
        r0, r1, r2 = (f.result() for f in futs)
        assert r0.result is not None and r0.result.tolist() == [[0, 1, 2], [3, 4, 5]] and r0.message == "hi"
        assert r1.status == wire.Status.OVERLOADED and r1.result is None and r1.message == "m"
        assert r2.result is not None and r2.result.shape == () and int(r2.result) == 7
        assert not proto.pending and proto.unmatched_replies == 0
    # and one byte at a time
    proto, futs = await _fed_protocol([stream[i : i + 1] for i in range(len(stream))])
    assert all(f.done() and f.exception() is None for f in futs)


@pytest.mark.asyncio
async def test_receive_buffer_compacts() -> None:
    proto = client._Protocol(asyncio.get_running_loop())
    proto.connection_made(_FakeTransport())
    proto.data_received(wire.encode_welcome(wire.Welcome(wire.Status.OK, 1, 1)))
    one = _reply_bytes(9, 0, np.zeros(1000, np.uint8))
    blob = b"".join(_reply_bytes(9, i, np.zeros(1000, np.uint8)) for i in range(500))
    futs = []
    for i in range(500):
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        proto.pending[(9, i)] = (fut, 0)
        futs.append(fut)
    step = len(one) // 3 + 7  # never aligned with message boundaries
    for i in range(0, len(blob), step):
        proto.data_received(blob[i : i + step])
        assert len(proto._buf) - proto._pos < len(one) + step
        assert proto._pos < 2 * (1 << 16) + step
    assert all(f.done() for f in futs) and not proto._buf


@pytest.mark.asyncio
async def test_bad_result_fails_only_that_request() -> None:
    h = wire.ReplyHeader(1, 0, wire.Status.OK, wire.dtype_code(np.float32), (3,))
    bad = b"".join(bytes(p) for p in wire.encode_reply(h, b"\0" * 8))  # 8 bytes for 3 x f4
    good = _reply_bytes(2, 0, np.ones(2, np.uint8))
    welcome = wire.encode_welcome(wire.Welcome(wire.Status.OK, 1, 1))
    proto, futs = await _fed_protocol([welcome + bad + good])
    with pytest.raises(wire.ProtocolError, match="does not match"):
        futs[0].result()
    assert futs[1].result().ok and proto.error is None


@pytest.mark.asyncio
async def test_unmatched_stream0_reply_becomes_the_close_reason() -> None:
    welcome = wire.encode_welcome(wire.Welcome(wire.Status.OK, 1, 1))
    bye = b"".join(
        bytes(p) for p in wire.encode_reply(wire.ReplyHeader(0, 0, wire.Status.UNSUPPORTED_VERSION, message="v9?"))
    )
    proto, futs = await _fed_protocol([welcome + bye])
    proto.connection_lost(None)
    for f in futs:
        exc = f.exception()
        assert isinstance(exc, ConnectionClosedError) and exc.status == wire.Status.UNSUPPORTED_VERSION
        assert "UNSUPPORTED_VERSION: v9?" in str(exc)


@pytest.mark.asyncio
async def test_connection_reply_on_the_receive_path() -> None:
    """Replies before it resolve; it fails the rest (a pending (0, 0) too); bytes after it are ignored."""
    welcome = wire.encode_welcome(wire.Welcome(wire.Status.OK, 1, 1, limits=LIMITS))
    bye = wire.ReplyHeader(0, 0, wire.Status.SHUTTING_DOWN, message="stopping", flags=wire.ReplyFlags.CONNECTION)
    bye_bytes = b"".join(bytes(p) for p in wire.encode_reply(bye))
    stream = welcome + _reply_bytes(1, 0, np.ones(2, np.uint8)) + bye_bytes + _reply_bytes(2, 0, np.ones(2, np.uint8))
    for cut in range(1, len(stream)):
        proto = client._Protocol(asyncio.get_running_loop())
        proto.connection_made(_FakeTransport())
        futs = {}
        for key in [(1, 0), (2, 0), (0, 0)]:
            futs[key] = asyncio.get_running_loop().create_future()
            proto.pending[key] = (futs[key], 0)
        proto.data_received(stream[:cut])
        proto.data_received(stream[cut:])
        assert futs[(1, 0)].result().ok
        for key in [(2, 0), (0, 0)]:
            exc = futs[key].exception()
            assert isinstance(exc, ConnectionClosedError), (cut, key)
            assert exc.status == wire.Status.SHUTTING_DOWN and exc.server_message == "stopping"
            assert str(exc) == "server closed the connection after SHUTTING_DOWN: stopping"
        assert proto.error is not None and not proto.pending and proto.unmatched_replies == 0
        proto.connection_lost(None)
        assert proto.error.status == wire.Status.SHUTTING_DOWN  # the reason stays the server's


@pytest.mark.asyncio
async def test_wait_for_room_keeps_within_max_frames_in_flight() -> None:
    proto = client._Protocol(asyncio.get_running_loop())
    transport = _FakeTransport()
    proto.connection_made(transport)
    limits = wire.Limits(max_frames_in_flight=2, max_producer_bytes=1, receive_timeout_ms=1, min_receive_rate=1)
    conn = client.Connection(proto, transport, wire.Welcome(wire.Status.OK, 1, 1, limits=limits))
    proto.data_received(wire.encode_welcome(conn.welcome))
    assert conn.limits == limits and conn.protocol_version == 2
    await conn.wait_for_room()
    a = conn.submit(np.zeros(1, np.uint8))
    await conn.wait_for_room()
    b = conn.submit(np.zeros(1, np.uint8))
    b.cancel()  # a cancelled frame is still in the server: it still counts
    waiters = [asyncio.ensure_future(conn.wait_for_room()) for _ in range(2)]
    await asyncio.sleep(0.01)
    assert not any(w.done() for w in waiters)
    proto.data_received(_reply_bytes(0, 1, np.zeros(1, np.uint8)))  # b's reply: one place free
    await asyncio.sleep(0)
    assert all(w.done() for w in waiters)  # both see room; the first to submit takes it
    c = conn.submit(np.zeros(1, np.uint8))
    waiter = asyncio.ensure_future(conn.wait_for_room())
    await asyncio.sleep(0.01)
    assert not waiter.done()
    proto.connection_lost(ConnectionResetError("reset"))
    with pytest.raises(ConnectionClosedError, match="reset"):
        await waiter
    for fut in (a, c):
        with pytest.raises(ConnectionClosedError):
            await fut
    with pytest.raises(ConnectionClosedError, match="reset"):
        await conn.wait_for_room()


@pytest.mark.asyncio
async def test_wait_for_room_against_a_server() -> None:
    limits = wire.Limits(
        max_frames_in_flight=3, max_producer_bytes=1 << 20, receive_timeout_ms=1000, min_receive_rate=1
    )
    srv = await _serve(limits=limits, batch=3)
    try:
        async with await connect("127.0.0.1", srv.port) as conn:
            futs = []
            most = 0
            for i in range(30):
                await conn.wait_for_room()
                futs.append(conn.submit(np.full(3, i, np.uint8), stream_id=i % 2))
                most = max(most, conn.in_flight)
            replies = await asyncio.gather(*futs)
            assert most == 3 and all(r.ok for r in replies)
    finally:
        await srv.stop()


@pytest.mark.asyncio
async def test_drain_waits_for_resume_writing() -> None:
    proto = client._Protocol(asyncio.get_running_loop())
    transport = _FakeTransport()
    proto.connection_made(transport)
    conn = client.Connection(proto, transport, wire.Welcome(wire.Status.OK, 1, 1))
    await conn.drain()  # not paused: returns at once
    proto.pause_writing()
    assert conn.write_paused
    fut = conn.submit(np.zeros(3, np.uint8))  # submit still queues while paused
    await asyncio.sleep(0)  # (written at the end of the loop iteration it was submitted in)
    assert transport.written
    waiter = asyncio.ensure_future(conn.drain())
    await asyncio.sleep(0.01)
    assert not waiter.done()
    proto.resume_writing()
    await waiter
    proto.pause_writing()
    waiter = asyncio.ensure_future(conn.drain())
    await asyncio.sleep(0)
    proto.connection_lost(ConnectionResetError("reset"))
    with pytest.raises(ConnectionError, match="reset"):
        await waiter
    with pytest.raises(ConnectionError, match="reset"):
        await fut


def _fake_connection() -> tuple[client.Connection, client._Protocol, _FakeTransport]:
    proto = client._Protocol(asyncio.get_running_loop())
    transport = _FakeTransport()
    proto.connection_made(transport)
    return client.Connection(proto, transport, wire.Welcome(wire.Status.OK, 1 << 20, 1 << 30)), proto, transport


@pytest.mark.asyncio
async def test_small_frames_submitted_together_go_in_one_write() -> None:
    """A burst (replies arriving together, each answered with a new frame) is one system call, not one per frame:
    a write per frame cost a producer more CPU than the rest of ``submit``."""
    conn, _, transport = _fake_connection()
    frames = [np.full(1024, k, np.uint8) for k in range(48)]
    futures = [conn.submit(frame, stream_id=k % 4) for k, frame in enumerate(frames)]
    assert transport.writes == []  # held to the end of the loop iteration
    await asyncio.sleep(0)
    assert transport.writes == [96]  # one write: each frame's header and payload, in submit order
    for k, frame in enumerate(frames):
        decoded = wire.decode_frame_header(transport.written[2 * k])
        assert decoded is not None
        header = decoded[0]
        assert (header.stream_id, header.sequence) == (k % 4, k // 4)
        assert transport.written[2 * k + 1] == frame.tobytes()
    conn.submit(np.zeros(3, np.uint8))
    await asyncio.sleep(0)
    assert transport.writes == [96, 2]  # the next iteration's frames: the next write
    for fut in futures:
        fut.cancel()


@pytest.mark.asyncio
async def test_a_large_frame_is_written_at_once_and_drain_and_close_write_what_is_held() -> None:
    conn, proto, transport = _fake_connection()
    futures: list[asyncio.Future[client.Reply]] = []
    futures.append(conn.submit(np.zeros(1 << 16, np.uint8)))  # nothing to gain by holding it
    assert transport.writes == [2]
    futures.append(conn.submit(np.zeros(3, np.uint8)))
    futures.append(conn.submit(np.zeros(1 << 16, np.uint8)))  # past the bytes held: both go now, in order
    assert transport.writes == [2, 4]
    # A producer loop of submit and drain may never yield (drain returns at once when not paused): drain writes
    # what is held, so that the write buffer it measures holds every frame submitted
    for _ in range(3):
        futures.append(conn.submit(np.zeros(3, np.uint8)))
        await conn.drain()
    assert transport.writes == [2, 4, 2, 2, 2]
    await asyncio.sleep(0)  # (the end-of-iteration writes those submits asked for: nothing left to write)
    assert transport.writes == [2, 4, 2, 2, 2]
    closing = asyncio.ensure_future(conn.close())  # (runs after the submit below, before its end-of-iteration write)
    futures.append(conn.submit(np.zeros(3, np.uint8)))
    await asyncio.sleep(0)
    assert transport.writes == [2, 4, 2, 2, 2, 2]  # frames submitted before the close are sent
    proto.connection_lost(None)
    await closing
    for fut in futures:
        with pytest.raises(ConnectionError):
            await fut
    await asyncio.sleep(0)
    assert transport.writes == [2, 4, 2, 2, 2, 2]  # (and not again)


# --- the blocking wrapper -------------------------------------------------


@pytest.fixture
def threaded_server() -> Iterator[FakeServer]:
    """A FakeServer on its own loop in a thread, for plain (non-async) tests."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    srv = asyncio.run_coroutine_threadsafe(FakeServer(token="tok", batch=8).start(), loop).result(5)
    try:
        yield srv
    finally:
        asyncio.run_coroutine_threadsafe(srv.stop(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def test_sync_wrapper(threaded_server: FakeServer) -> None:
    threads_before = threading.active_count()
    with connect_sync("127.0.0.1", threaded_server.port, token="tok") as conn:
        assert threading.active_count() == threads_before + 1  # one loop thread per connection
        frame = np.arange(12, dtype=np.float32).reshape(3, 4)
        reply = conn.infer(frame, stream_id=3, model="m", deadline=1.0)
        assert reply.ok and reply.result is not None
        np.testing.assert_array_equal(reply.result, frame)
        futs = [conn.submit(np.full(5, i, np.int16), stream_id=i % 3) for i in range(60)]
        for i, f in enumerate(futs):
            r = f.result(5)
            assert r.stream_id == i % 3 and r.result is not None and r.result.tolist() == [i] * 5
        assert conn.in_flight == 0 and conn.max_payload == 1 << 26 and conn.ring_bytes == 1 << 28
        assert conn.protocol_version == 2 and conn.limits == LIMITS
        with pytest.raises(ValueError, match="priority"):
            conn.infer(frame, priority=300)
        assert threading.active_count() == threads_before + 1
        hanging = conn.submit(frame, model=HANG)
    with pytest.raises(ConnectionError):
        hanging.result(5)
    assert threading.active_count() == threads_before
    with pytest.raises(ConnectionError):
        conn.submit(frame)
    conn.close()  # idempotent


def test_sync_handshake_error(threaded_server: FakeServer) -> None:
    threads_before = threading.active_count()
    with pytest.raises(HandshakeError, match="wrong token"):
        connect_sync("127.0.0.1", threaded_server.port, token="nope")
    assert threading.active_count() == threads_before


def test_sync_protocol_version_1(threaded_server: FakeServer) -> None:
    with connect_sync("127.0.0.1", threaded_server.port, token="tok", protocol_version=1) as conn:
        assert conn.protocol_version == 1 and conn.limits is None
        assert conn.infer(np.ones(2, np.uint8)).ok


def test_plain_socket_client_sketch_in_docs(threaded_server: FakeServer) -> None:
    """The minimal socket + struct client in docs/PROTOCOL.md talks to a server built on wire.py."""
    doc = (Path(__file__).parent.parent / "docs" / "PROTOCOL.md").read_text()
    section = doc[doc.index("## 9. A minimal client") :]
    code = section[section.index("```python\n") + len("```python\n") :]
    code = code[: code.index("```")]
    namespace: dict[str, Any] = {"__name__": "sketch"}
    exec(compile(code, "PROTOCOL.md", "exec"), namespace)
    for version in (1, 2):
        _sketch_round_trip(namespace, threaded_server, version)
    with pytest.raises(ConnectionError, match="refused"):
        namespace["connect"]("127.0.0.1", threaded_server.port, token="bad")


def _sketch_round_trip(namespace: dict[str, Any], threaded_server: FakeServer, version: int) -> None:
    threaded_server.headers.clear()
    sock, welcome = namespace["connect"]("127.0.0.1", threaded_server.port, token="tok", version=version)
    try:
        assert welcome["version"] == version and welcome["max_payload"] == 1 << 26
        assert welcome["limits"] == (LIMITS.__dict__ if version == 2 else None)
        status, message, dtype, shape, result = namespace["infer"](
            sock, bytes([1, 2, 3, 4, 5, 6]), (2, 3), model="echo", stream_id=7, sequence=42, live=True
        )
        assert (status, message, dtype, shape, result) == (0, "", 1, (2, 3), bytes([1, 2, 3, 4, 5, 6]))
        data = np.arange(4, dtype=np.float32).tobytes()
        assert namespace["infer"](sock, data, (4,), dtype=8, sequence=43, deadline_us=1000)[4] == data
        header = threaded_server.headers[0]
        assert (header.stream_id, header.sequence, header.flags, header.check_tensor()) == (
            7,
            42,
            wire.FrameFlags.LIVE,
            None,
        )
    finally:
        sock.close()


def test_unwrap_returns_the_result_or_raises_with_the_status() -> None:
    from streamgpu.client import Reply, ReplyError

    ok = Reply(1, 2, wire.Status.OK, np.arange(3), wire.Timings(), "", 0, 0)
    assert ok.unwrap().tolist() == [0, 1, 2]
    bad = Reply(1, 3, wire.Status.UNKNOWN_MODEL, None, wire.Timings(), "no model named 'x'", 0, 0)
    with pytest.raises(ReplyError, match="frame 1/3: UNKNOWN_MODEL: no model named 'x'") as info:
        bad.unwrap()
    assert info.value.status == wire.Status.UNKNOWN_MODEL
