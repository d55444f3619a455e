"""TcpConnection fed through a fake transport: every split of the byte stream, every bad input,
and the flow-control rules that keep one producer from stalling another."""

from __future__ import annotations

import asyncio
import errno
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from streamgpu.config import Config, ListenerSpec, TokenSpec
from streamgpu.frame import Frame, Outcome, finish_ok
from streamgpu.ingest import tcp
from streamgpu.ingest.admission import Admission, Grant, Refused
from streamgpu.ingest.tcp import HELLO_BYTES, TcpConnection, TcpListener
from streamgpu.memory import SlotPool
from streamgpu.models.spec import ModelSpec
from streamgpu.protocol import wire
from streamgpu.protocol.wire import FrameFlags, FrameHeader, ReplyFlags, ReplyHeader, Status

SMALL = ModelSpec(name="small", input_shape=(4, 4, 3))  # 48-byte frames: read in bulk
LARGE = ModelSpec(
    name="large", input_shape=(50, 100, 4), preprocess="none", max_batch_size=1
)  # 20000-byte frames: read straight into the slot (one a batch: rings here hold as few as one)


class FakeTransport:
    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False
        self.paused = False
        self.pause_calls = 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.written += data

    def writelines(self, parts: list[bytes | memoryview]) -> None:
        for p in parts:
            self.written += p

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def can_write_eof(self) -> bool:
        return False  # closes at once; the lingering close is tested over real sockets (tests/test_server.py)

    def pause_reading(self) -> None:
        self.paused = True
        self.pause_calls += 1

    def resume_reading(self) -> None:
        self.paused = False


class Harness:
    """A real Admission over a real SlotPool and a TcpListener that is never bound; frames are collected."""

    def __init__(self, ring_bytes: int = 1 << 17, **config: Any) -> None:
        config.setdefault("max_payload_bytes", min(1 << 16, ring_bytes - 256))
        config.setdefault("max_producer_ring_bytes", ring_bytes)  # one producer may fill it unless a test says
        self.config = Config(ring_bytes=ring_bytes, models=[SMALL, LARGE], **config)
        self.pool = SlotPool(np.zeros(ring_bytes, np.uint8))
        self.frames: list[tuple[Frame, bytes]] = []
        self.admission = Admission(self.config, self.pool, {SMALL.name: SMALL, LARGE.name: LARGE}, self._submit)
        self.listener = TcpListener(ListenerSpec(port=0), self.admission)

    def _submit(self, frame: Frame) -> None:
        assert frame.slot is not None
        self.frames.append((frame, self.pool.array(frame.slot).tobytes()))

    def connect(self) -> tuple[TcpConnection, FakeTransport]:
        conn = TcpConnection(self.listener)
        transport = FakeTransport()
        conn.connection_made(transport)  # type: ignore[arg-type]
        return conn, transport

    @property
    def ring(self) -> SlotPool:
        return self.pool


def make(harness: Harness | None = None) -> tuple[TcpConnection, FakeTransport, Harness]:
    harness = harness or Harness()
    conn, transport = harness.connect()
    return conn, transport, harness


def feed(conn: TcpConnection, data: bytes, transport: FakeTransport | None = None) -> None:
    """Deliver ``data`` as the loop would: into whatever buffers get_buffer hands out."""
    pos = 0
    while pos < len(data):
        if transport is not None and transport.paused:
            raise AssertionError("fed data while reading is paused")
        buf = conn.get_buffer(-1)
        assert len(buf) > 0, "get_buffer returned an empty buffer (fatal for the transport)"
        n = min(len(buf), len(data) - pos)
        buf[:n] = data[pos : pos + n]
        conn.buffer_updated(n)
        pos += n


def hello(token: str = "") -> bytes:
    return wire.encode_hello(wire.Hello(token=token))


def frame(spec: ModelSpec, seq: int, stream: int = 0, payload: bytes | None = None, **kw: Any) -> bytes:
    if payload is None:
        payload = np.random.default_rng(seq).integers(0, 256, spec.frame_nbytes, dtype=np.uint8).tobytes()
    fields: dict[str, Any] = dict(
        stream_id=stream, sequence=seq, model=spec.name, dtype_code=spec.frame_dtype_code,
        shape=spec.input_shape, payload_len=len(payload),
    )  # fmt: skip
    fields.update(kw)
    return wire.encode_frame_header(FrameHeader(**fields)) + payload


def replies(transport: FakeTransport, skip_welcome: bool = True) -> list[ReplyHeader]:
    buf = bytes(transport.written)
    if skip_welcome:
        welcome = wire.decode_welcome(buf)
        assert welcome is not None
        buf = buf[welcome[1] :]
    out = []
    while buf:
        parsed = wire.decode_reply(buf)
        assert parsed is not None, "truncated reply"
        out.append(parsed[0])
        buf = buf[parsed[2] :]
    return out


def answer(frame: Frame) -> None:
    frame.finish(Outcome(Status.OK))


STREAM = (
    hello() + frame(SMALL, 0) + frame(LARGE, 1, stream=2) + frame(SMALL, 2, flags=FrameFlags.LIVE) + frame(LARGE, 3)
)


def expected_frames() -> list[tuple[int, int, bytes]]:
    conn, _, harness = make()
    feed(conn, STREAM)
    return [(f.header.sequence, f.header.stream_id, payload) for f, payload in harness.frames]


def test_whole_stream_parses() -> None:
    got = expected_frames()
    assert [g[0] for g in got] == [0, 1, 2, 3]
    assert got[1][1] == 2
    assert got[1][2] == np.random.default_rng(1).integers(0, 256, LARGE.frame_nbytes, dtype=np.uint8).tobytes()


def test_every_two_way_split_parses_the_same() -> None:
    want = expected_frames()
    harness = Harness()  # one ring and admission for all the connections (made anew, they took most of the time)
    for cut in range(1, len(STREAM)):
        conn, transport, _ = make(harness)
        feed(conn, STREAM[:cut])
        feed(conn, STREAM[cut:])
        got = [(f.header.sequence, f.header.stream_id, p) for f, p in harness.frames]
        assert got == want, f"split at {cut}"
        assert not transport.closed
        for f, _ in harness.frames:  # answered: their slots are free for the next cut's frames
            answer(f)
        harness.frames.clear()
        conn.connection_lost(None)
    assert harness.pool.slots_in_use == 0


def test_random_many_way_splits_and_byte_at_a_time() -> None:
    want = expected_frames()
    rng = random.Random(7)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(STREAM)), 20))
        conn, _, harness = make()
        for a, b in zip([0, *cuts], [*cuts, len(STREAM)], strict=True):
            feed(conn, STREAM[a:b])
        assert [(f.header.sequence, f.header.stream_id, p) for f, p in harness.frames] == want
    conn, _, harness = make()
    for i in range(len(STREAM)):
        feed(conn, STREAM[i : i + 1])
    assert [(f.header.sequence, f.header.stream_id, p) for f, p in harness.frames] == want


def test_large_payload_lands_in_the_slot_without_passing_through_scratch() -> None:
    conn, _, harness = make()
    feed(conn, hello() + frame(LARGE, 0))
    whole = frame(LARGE, 1)
    header_len = wire.frame_header_length(whole)
    assert header_len is not None
    # After a large payload, the next reads ask for exactly one header...
    buf = conn.get_buffer(-1)
    assert len(buf) == wire.FRAME_HEADER_SIZE
    buf[:] = whole[: len(buf)]
    conn.buffer_updated(len(buf))
    buf = conn.get_buffer(-1)
    assert len(buf) == header_len - wire.FRAME_HEADER_SIZE
    buf[:] = whole[wire.FRAME_HEADER_SIZE : header_len]
    conn.buffer_updated(len(buf))
    # ...and then the kernel is handed the ring slot itself.
    slot_view = conn.get_buffer(-1)
    assert len(slot_view) == LARGE.frame_nbytes
    assert np.shares_memory(np.frombuffer(slot_view, np.uint8), harness.ring.buffer)


def test_replies_leave_in_arrival_order_per_stream() -> None:
    conn, transport, harness = make()
    feed(conn, hello() + frame(SMALL, 10) + frame(SMALL, 11) + frame(SMALL, 5, stream=1))
    (f10, _), (f11, _), (f5, _) = harness.frames
    answer(f11)
    assert replies(transport) == []  # 11 waits for 10
    answer(f5)
    assert [r.sequence for r in replies(transport)] == [5]  # another stream is not held back
    answer(f10)
    assert [r.sequence for r in replies(transport)] == [5, 10, 11]


def test_a_batch_whose_results_cannot_be_encoded_is_answered_and_holds_nothing_back() -> None:
    """Results the wire cannot carry (loading refuses such models, but for odd ones) answer INTERNAL_ERROR
    saying why; the encoding raised out of ``finished_ok`` before, and those frames' places in the reply
    order were never filled: every later reply of their streams was held back for good."""
    conn, transport, harness = make()
    feed(conn, hello() + frame(SMALL, 0) + frame(SMALL, 1) + frame(SMALL, 2))
    (f0, _), (f1, _), (f2, _) = harness.frames
    finish_ok([f0, f1], np.zeros((2, 3), np.complex64), None, np.zeros((2, 6), np.int64))
    finish_ok([f2], np.ones((1, 3), np.float32), None, np.zeros((1, 6), np.int64))
    got = replies(transport)
    assert [(r.sequence, r.status) for r in got] == [(0, Status.INTERNAL_ERROR), (1, Status.INTERNAL_ERROR),
                                                     (2, Status.OK)]  # fmt: skip
    assert "complex64" in got[0].message and "cannot be sent" in got[0].message
    assert harness.ring.slots_in_use == 0


@pytest.mark.parametrize(
    ("bad", "status"),
    [
        (frame(SMALL, 1, payload=b"x" * 47), Status.BAD_FRAME),  # shape needs 48 bytes
        (frame(SMALL, 1, dtype_code=8), Status.BAD_FRAME),  # float32 of shape 4x4x3 is 192 bytes, says 48
        (frame(SMALL, 1, dtype_code=99), Status.BAD_FRAME),  # unknown dtype
        (frame(SMALL, 1, model="nope"), Status.UNKNOWN_MODEL),
        (frame(SMALL, 1, shape=(3, 4, 4)), Status.BAD_FRAME),  # right size, wrong shape for the model
        (frame(SMALL, 1, shape=(1 << 17,), payload=b"\0" * (1 << 17)), Status.TOO_LARGE),
    ],
)
def test_bad_frame_costs_only_that_frame(bad: bytes, status: Status) -> None:
    conn, transport, harness = make()
    feed(conn, hello() + frame(SMALL, 0) + bad + frame(SMALL, 2))
    assert [f.header.sequence for f, _ in harness.frames] == [0, 2]
    assert harness.ring.slots_in_use == 2  # the bad frame never took a slot
    for f, _ in harness.frames:
        answer(f)
    got = replies(transport)
    assert [(r.sequence, r.status) for r in got] == [(0, Status.OK), (1, status), (2, Status.OK)]
    assert got[1].message
    assert not transport.closed
    assert harness.ring.slots_in_use == 0


@pytest.mark.parametrize(
    ("bad", "status"),
    [
        (b"GARBAGE!" * 10, Status.BAD_FRAME),
        (b"SGFR\x02" + b"\0" * 60, Status.UNSUPPORTED_VERSION),
        (frame(SMALL, 1)[:6] + b"\x09" + frame(SMALL, 1)[7:], Status.BAD_FRAME),  # ndim 9
    ],
)
def test_lost_framing_answers_stream_zero_and_closes(bad: bytes, status: Status) -> None:
    conn, transport, harness = make()
    feed(conn, hello() + frame(SMALL, 0) + bad)
    assert transport.closed
    ((f0, _),) = harness.frames
    got = replies(transport)
    assert (got[-1].stream_id, got[-1].sequence, got[-1].status) == (0, 0, status)
    conn.connection_lost(None)
    answer(f0)  # a reply after the producer left goes nowhere, without error


def test_random_garbage_never_raises() -> None:
    rng = np.random.default_rng(3)
    for _ in range(200):
        conn, _transport, harness = make()
        feed(conn, hello() + rng.integers(0, 256, int(rng.integers(1, 400)), dtype=np.uint8).tobytes())
        conn.connection_lost(None)
        assert harness.ring.slots_in_use == 0


def test_truncated_frame_then_disconnect_frees_the_slot() -> None:
    conn, _transport, harness = make()
    feed(conn, hello() + frame(LARGE, 0)[:5000])
    assert harness.ring.slots_in_use == 1
    conn.connection_lost(None)
    assert harness.ring.slots_in_use == 0 and harness.frames == [] and harness.admission.connections == 0


@pytest.mark.parametrize(
    ("greeting", "status", "token"),
    [
        (hello("wrong"), Status.UNAUTHORIZED, "secret"),
        (wire.encode_hello(wire.Hello(version=3)), Status.UNSUPPORTED_VERSION, ""),
        (b"HELO" + b"\0" * 8, Status.BAD_FRAME, ""),
    ],
)
def test_bad_hello_is_refused(greeting: bytes, status: Status, token: str) -> None:
    conn, transport, _ = make(Harness(auth_token=token))
    feed(conn, greeting)
    parsed = wire.decode_welcome(bytes(transport.written))
    assert parsed is not None and parsed[0].status == status and parsed[0].message
    assert transport.closed


def test_good_token_is_welcome_and_v2_announces_the_limits() -> None:
    conn, transport, harness = make(Harness(auth_token="secret", max_frames_per_connection=100))
    feed(conn, hello("secret") + frame(SMALL, 0))
    parsed = wire.decode_welcome(bytes(transport.written))
    assert parsed is not None and parsed[0].status == Status.OK
    limits = parsed[0].limits
    assert limits is not None and limits.max_frames_in_flight == 100
    assert limits.max_producer_bytes == harness.config.producer_ring_bytes and limits.max_priority == 255
    assert len(harness.frames) == 1


def test_v1_clients_get_v1_welcome_and_v1_statuses() -> None:
    conn, transport, _harness = make(Harness(receive_timeout_s=1.0))
    feed(conn, wire.encode_hello(wire.Hello(version=1)) + frame(LARGE, 0)[:100])
    conn.sweep(1e12)  # long past the payload budget
    welcome = wire.decode_welcome(bytes(transport.written))
    assert welcome is not None and welcome[0].version == 1 and welcome[0].limits is None
    (reply,) = replies(transport)
    assert reply.status == Status.BAD_FRAME and reply.flags & ReplyFlags.CONNECTION  # RECEIVE_TIMEOUT in v2


def test_a_frame_waits_for_ring_space_and_goes_on_when_a_slot_frees() -> None:
    harness = Harness(ring_bytes=LARGE.frame_nbytes + 256, max_producer_ring_bytes=LARGE.frame_nbytes + 256)
    conn, transport, _ = make(harness)
    other, _ = harness.connect()
    feed(other, hello() + frame(LARGE, 9))  # another producer holds the only room
    feed(conn, hello() + frame(LARGE, 0)[:100], transport)
    assert harness.ring.waiters == 1 and len(harness.frames) == 1
    held, _ = harness.frames[0]
    held.release_slot()  # its copy completed
    feed(conn, frame(LARGE, 0)[100:], transport)
    assert [f.header.sequence for f, _ in harness.frames] == [9, 0]
    assert harness.frames[1][1] == frame(LARGE, 0)[-LARGE.frame_nbytes :]


def test_waiting_for_space_reads_only_into_scratch_and_notices_a_producer_that_leaves() -> None:
    """Regression (review): reading was paused while a frame waited for ring space, so a producer that
    reset its connection kept its place at the head of the queue (and under max_connections)."""
    harness = Harness(ring_bytes=LARGE.frame_nbytes + 256, max_producer_ring_bytes=LARGE.frame_nbytes + 256)
    other, _ = harness.connect()
    feed(other, hello() + frame(LARGE, 9))
    conn, transport = harness.connect()
    feed(conn, hello() + frame(LARGE, 0)[:100], transport)
    assert not transport.paused and harness.ring.waiters == 1  # still reading: an EOF or reset is seen
    while not transport.paused:
        feed(conn, b"\0" * min(1000, len(conn.get_buffer(-1))), transport)  # they pile up in scratch...
    assert harness.ring.slots_in_use == 1  # ...not in the ring; and a full scratch pauses reading
    conn.connection_lost(ConnectionResetError())
    assert harness.ring.waiters == 0 and harness.admission.connections == 1


def test_per_connection_bound_is_flow_control_not_overloaded() -> None:
    conn, transport, harness = make(Harness(max_frames_per_connection=2))
    feed(conn, hello() + b"".join(frame(SMALL, i) for i in range(4)))
    assert len(harness.frames) == 2 and transport.paused  # frames 2 and 3 wait in scratch, nothing reserved
    assert harness.ring.slots_in_use == 2
    for f, _ in list(harness.frames):
        answer(f)
    assert [f.header.sequence for f, _ in harness.frames] == [0, 1, 2, 3]
    for f, _ in harness.frames[2:]:
        answer(f)
    assert not transport.paused
    assert [(r.sequence, r.status) for r in replies(transport)] == [(i, Status.OK) for i in range(4)]


def test_shutdown_answers_the_half_received_frame() -> None:
    conn, transport, harness = make()
    feed(conn, hello() + frame(LARGE, 0)[:3000])
    conn.stop_reading()
    assert transport.paused and harness.ring.slots_in_use == 0
    assert [(r.sequence, r.status) for r in replies(transport)] == [(0, Status.SHUTTING_DOWN)]


def test_answers_held_back_behind_a_slow_frame_are_bounded() -> None:
    conn, transport, harness = make(Harness(max_frames_per_connection=4))
    feed(conn, hello() + frame(SMALL, 0), transport)  # in the server, unanswered
    bad = frame(SMALL, 1, model="nope")
    fed = 0
    while not transport.paused:
        feed(conn, bad, transport)  # answered at once, but held behind frame 0 of the same stream
        fed += 1
        assert fed < 10, "reading never paused"
    assert fed == 3 and replies(transport) == []  # 4 tickets held: the per-connection bound
    answer(harness.frames[0][0])
    assert not transport.paused and len(replies(transport)) == 4


# -- regressions: one producer must never stall another (issue 8) ---------------------------------


def test_not_reading_replies_never_pauses_mid_payload_or_reserves_for_the_next_frame() -> None:
    """Regression (defect 3): the server paused a connection that held a reserved slot (write buffer
    full) and then dropped it as stalled. Flow control now waits for the frame boundary, and checks
    the bounds before reserving anything for the next frame."""
    conn, transport, harness = make()
    whole = frame(LARGE, 0)
    feed(conn, hello() + whole[:5000], transport)
    conn.pause_writing()  # the producer stopped reading its replies, mid-payload
    assert not transport.paused  # the rest of this payload is still read...
    feed(conn, whole[5000:], transport)
    assert transport.paused and [f.header.sequence for f, _ in harness.frames] == [0]
    assert harness.ring.slots_in_use == 1  # ...and nothing is reserved for frame 1 while paused
    conn.sweep(1e12)  # no payload is due: the paused producer did nothing wrong and is not dropped
    assert not transport.closed
    conn.resume_writing()
    assert not transport.paused
    feed(conn, frame(LARGE, 1), transport)
    assert [f.header.sequence for f, _ in harness.frames] == [0, 1]


def test_a_trickling_payload_is_dropped_when_its_budget_is_spent(monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression (defect 2): "no progress for receive_timeout_s" was beaten by one byte per timeout.
    A payload now has an absolute budget: receive_timeout_s + payload_len / min_receive_rate."""
    clock = [1000.0]
    monkeypatch.setattr(tcp.time, "monotonic", lambda: clock[0])
    conn, transport, harness = make(Harness(receive_timeout_s=1.0, min_receive_rate=100_000))
    feed(conn, hello() + frame(LARGE, 0)[:200], transport)  # the slot is reserved at t = 1000 s
    for _ in range(11):  # one byte every 0.1 s: progress all the time, never a pause of 1 s
        clock[0] += 0.1
        feed(conn, b"\0", transport)
        conn.sweep(clock[0])
    assert not transport.closed  # 1.1 s: within its budget of 1 + 20000 / 100000 = 1.2 s
    clock[0] += 0.15
    feed(conn, b"\0", transport)
    conn.sweep(clock[0])
    assert transport.closed  # dropped at 1.25 s, though it made progress a moment ago
    (reply,) = replies(transport)
    assert reply.status == Status.RECEIVE_TIMEOUT and reply.flags & ReplyFlags.CONNECTION
    assert "did not arrive within 1.2 s" in reply.message
    assert harness.ring.slots_in_use == 0


@pytest.mark.asyncio
async def test_a_large_frame_is_not_overtaken_and_its_deadline_runs_while_it_waits() -> None:
    """Regression (defect 4): a 48 KB frame starved for 6 s while small frames flowed, and its deadline
    was ignored. Waiters are served in order, and a frame's deadline runs from its header."""
    ring = 2 * 20224 + 256  # two large slots (20000 bytes rounded to 256) and one small one
    harness = Harness(ring_bytes=ring, max_producer_ring_bytes=ring)
    hog, _ = harness.connect()
    feed(hog, hello() + frame(LARGE, 0) + frame(LARGE, 1))  # the ring is (nearly) full
    big, big_t = harness.connect()
    feed(big, hello() + frame(LARGE, 7)[:100], big_t)
    assert harness.ring.waiters == 1
    small, small_t = harness.connect()
    feed(small, hello() + frame(SMALL, 0)[:70], small_t)
    assert harness.ring.waiters == 2  # it would fit, but it does not overtake the large frame at the head
    harness.frames[0][0].release_slot()
    await asyncio.sleep(0)
    assert harness.ring.waiters == 0  # the head goes first, then the next in line fits too
    feed(big, frame(LARGE, 7)[100:], big_t)
    feed(small, frame(SMALL, 0)[70:], small_t)
    assert [f.header.sequence for f, _ in harness.frames] == [0, 1, 7, 0]
    late, late_t = harness.connect()
    feed(late, hello() + frame(LARGE, 3, deadline_us=30_000)[:100], late_t)
    assert harness.ring.waiters == 1
    await asyncio.sleep(0.06)
    assert [(r.sequence, r.status) for r in replies(late_t)] == [(3, Status.DEADLINE_MISSED)]
    assert harness.ring.waiters == 0  # its place in the queue is given up; its payload is skipped
    harness.frames[1][0].release_slot()  # room again: the connection goes on after the skipped payload
    feed(late, frame(LARGE, 3)[100:] + frame(SMALL, 4), late_t)
    assert harness.frames[-1][0].header.sequence == 4 and harness.ring.waiters == 0


def test_no_buffer_before_the_handshake_and_a_hello_timeout() -> None:
    """Regression (defect 6): 1500 connections that never sent HELLO held ~98 MiB and stayed open."""
    conn, transport, _harness = make(Harness(hello_timeout_s=5.0))
    assert len(conn.get_buffer(-1)) <= HELLO_BYTES
    conn.sweep(conn._due - 1)
    assert not transport.closed
    conn.sweep(conn._due + 0.01)
    welcome = wire.decode_welcome(bytes(transport.written))
    assert transport.closed and welcome is not None and welcome[0].status == Status.BAD_FRAME
    assert "no HELLO within 5 s" in welcome[0].message


class ResetTransport(FakeTransport):
    """A socket whose producer reset it before the server read the reset: asyncio's ``write_eof`` shuts it
    down at once, which raises ENOTCONN."""

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        raise OSError(errno.ENOTCONN, "Transport endpoint is not connected")


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
async def test_a_connection_reset_before_its_close_costs_no_other_connection_its_close() -> None:
    """Regression: closing a connection whose producer had reset it raised OSError out of ``_close``: a
    server's shutdown (``listener.close``) stopped at it, leaving the connections after it open and the
    server's stop failing; a hello-timeout sweep stopped there too."""
    harness = Harness(hello_timeout_s=5.0)
    conns: list[tuple[TcpConnection, FakeTransport]] = []
    for _ in range(4):
        conn = TcpConnection(harness.listener)
        transport = ResetTransport() if len(conns) % 2 == 0 else FakeTransport()
        conn.connection_made(transport)  # type: ignore[arg-type]
        conns.append((conn, transport))
    for conn, _ in conns[2:]:
        feed(conn, hello())
    harness.listener.sweep(max(conn._due for conn, _ in conns) + 1)  # the first two, in HELLO, past their time
    assert [transport.closed for _, transport in conns] == [True, True, False, False]
    await harness.listener.close(timeout=0)  # shutdown: every connection closed, none left open
    assert all(transport.closed for _, transport in conns)


def test_connections_past_the_cap_are_refused_at_once() -> None:
    harness = Harness(max_connections=2)
    conns = [harness.connect() for _ in range(3)]
    welcome = wire.decode_welcome(bytes(conns[2][1].written))
    assert welcome is not None and welcome[0].status == Status.OVERLOADED and conns[2][1].closed
    assert harness.admission.connections == 2
    conns[0][0].connection_lost(None)
    conns[2][0].connection_lost(None)  # a refused connection does not uncount another
    assert harness.admission.connections == 1
    assert not harness.connect()[1].closed


def test_priorities_above_the_ceiling_need_a_token_that_allows_them() -> None:
    harness = Harness(max_priority=10, tokens={"ops": TokenSpec("ops-secret", max_priority=200)})
    anon, anon_t = harness.connect()
    feed(anon, hello() + frame(SMALL, 0, priority=50) + frame(SMALL, 1, priority=10))
    welcome = wire.decode_welcome(bytes(anon_t.written))
    assert welcome is not None and welcome[0].status == Status.UNAUTHORIZED  # named tokens: a token is needed
    ops, ops_t = harness.connect()
    feed(ops, hello("ops-secret") + frame(SMALL, 0, priority=50) + frame(SMALL, 1, stream=1, priority=250))
    assert [f.header.sequence for f, _ in harness.frames] == [0]
    assert [(r.sequence, r.status) for r in replies(ops_t)] == [(1, Status.UNAUTHORIZED)]


def test_connections_of_one_token_share_one_producer() -> None:
    harness = Harness(tokens={"fleet": TokenSpec("fleet-secret")})
    a, _ = harness.connect()
    b, _ = harness.connect()
    feed(a, hello("fleet-secret") + frame(SMALL, 0))
    feed(b, hello("fleet-secret") + frame(SMALL, 1))
    (fa, _), (fb, _) = harness.frames
    assert fa.producer is fb.producer and fa.producer.frames_in_server == 2
    assert fa.stream != fb.stream  # streams stay per connection


def test_a_token_past_its_max_connections_is_refused_and_its_other_producers_are_not() -> None:
    """One token's holder cannot take every place under the server's max_connections: past the token's own
    cap its HELLO is answered OVERLOADED saying why, while other tokens and anonymous connections get in."""
    harness = Harness(
        auth_token="anyone", tokens={"fleet": TokenSpec("fleet-secret", max_connections=2), "ops": TokenSpec("ops")}
    )
    fleet = [harness.connect() for _ in range(3)]
    for conn, _ in fleet:
        feed(conn, hello("fleet-secret"))
    statuses = [wire.decode_welcome(bytes(t.written))[0] for _, t in fleet]  # type: ignore[index]
    assert [w.status for w in statuses] == [Status.OK, Status.OK, Status.OVERLOADED]
    assert statuses[2].message == "too many connections of token 'fleet' (its max_connections is 2)"
    assert fleet[2][1].closed
    fleet[2][0].connection_lost(None)
    assert harness.admission.connections == 2  # its place under max_connections given back
    for token in ("ops", "anyone"):
        other, transport = harness.connect()
        feed(other, hello(token))
        assert wire.decode_welcome(bytes(transport.written))[0].status == Status.OK  # type: ignore[index]
    fleet[0][0].connection_lost(None)  # one of the token's connections closes: a place for another
    again, transport = harness.connect()
    feed(again, hello("fleet-secret"))
    assert wire.decode_welcome(bytes(transport.written))[0].status == Status.OK  # type: ignore[index]


class AskingListener(TcpListener):
    """As an ingest worker's: a capped token's HELLO waits for the answer the test gives (``answers``)."""

    def __init__(self, spec: ListenerSpec, admission: Any) -> None:
        super().__init__(spec, admission)
        self.answers: list[Callable[[Refused | None], None]] = []

    def admission_pending(self, conn: TcpConnection, grant: Grant, answer: Callable[[Refused | None], None]) -> bool:
        self.answers.append(answer)
        return True


@pytest.mark.parametrize("answer", ["admitted", "refused", "gone first"])
def test_a_hello_that_waits_for_admission_holds_what_follows_until_the_answer(answer: str) -> None:
    """An ingest worker asks the scheduling process before it answers a capped token's HELLO: the frames sent
    right behind the HELLO wait (nothing is admitted, nothing answered, reading paused) until the answer; then
    WELCOME OK and the frames, or the refusal's WELCOME and a close, or nothing for a connection gone."""
    harness = Harness(tokens={"fleet": TokenSpec("fleet-secret", max_connections=1)})
    harness.listener = AskingListener(ListenerSpec(port=0), harness.admission)
    conn, transport = harness.connect()
    feed(conn, hello("fleet-secret") + frame(SMALL, 0) + frame(SMALL, 1))
    assert transport.written == b"" and harness.frames == [] and transport.paused  # waiting, reading paused
    (reply,) = harness.listener.answers
    if answer == "admitted":
        reply(None)
        assert wire.decode_welcome(bytes(transport.written))[0].status == Status.OK  # type: ignore[index]
        assert [f.header.sequence for f, _ in harness.frames] == [0, 1] and not transport.paused
    elif answer == "refused":
        reply(Refused(Status.OVERLOADED, "too many connections of token 'fleet' (its max_connections is 1)"))
        welcome = wire.decode_welcome(bytes(transport.written))[0]  # type: ignore[index]
        assert (welcome.status, welcome.message) == (Status.OVERLOADED, "too many connections of token 'fleet' "
                                                     "(its max_connections is 1)")  # fmt: skip
        assert transport.closed and harness.frames == [] and conn.producer is None
    else:
        conn.connection_lost(None)
        reply(None)  # the answer finds it gone
        assert transport.written == b"" and harness.frames == [] and conn.producer is None
    assert harness.admission.frames_in_flight == len(harness.frames)


# -- regressions from the hostile review -----------------------------------------------------------


def test_an_answer_given_during_parsing_does_not_make_the_parse_run_twice() -> None:
    """Regression: at its frame limit a connection blocks; a frame answered at once by the scheduler
    (deadline passed, queue full, superseded) unblocked it *inside* the running parse, which parsed the
    same bytes again: duplicate replies, lost ones, a RecursionError."""
    harness = Harness(max_frames_per_connection=1)
    harness.admission._submit = lambda f: f.finish(Outcome(Status.DEADLINE_MISSED))  # answered synchronously
    conn, transport = harness.connect()
    feed(conn, hello())
    feed(conn, b"".join(frame(SMALL, i) for i in range(5)), transport)
    assert [(r.sequence, r.status) for r in replies(transport)] == [(i, Status.DEADLINE_MISSED) for i in range(5)]
    assert harness.admission.frames_in_flight == 0 and not transport.closed


@pytest.mark.asyncio
async def test_a_named_producer_is_not_wedged_when_its_waiting_frame_gives_up() -> None:
    """Regression: a token's frame waiting in the pool gave up (deadline); the token's next frame, waiting
    over the share behind it, was never let in, though nothing of the token held the ring any more."""
    ring = 20224 + 256  # one large slot
    harness = Harness(ring_bytes=ring, auth_token="open", tokens={"cam": TokenSpec("secret")})
    hog, _ = harness.connect()
    feed(hog, hello("open") + frame(LARGE, 0)[:200])  # holds the only slot, payload in progress
    first, _ = harness.connect()
    feed(first, hello("secret") + frame(LARGE, 1, deadline_us=20_000)[:100])  # waits in the pool
    second, _ = harness.connect()
    feed(second, hello("secret") + frame(LARGE, 2)[:100])  # the token is over its share: waits for it
    assert harness.ring.waiters == 1
    await asyncio.sleep(0.05)  # the first frame's deadline passes: it leaves the queue
    assert harness.ring.waiters == 1  # the second now waits in the pool
    feed(hog, frame(LARGE, 0)[200:])
    harness.frames[0][0].release_slot()
    await asyncio.sleep(0)
    feed(second, frame(LARGE, 2)[100:])
    assert [f.header.sequence for f, _ in harness.frames] == [0, 2]


def test_a_payload_that_stops_is_dropped_after_the_idle_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: a header alone reserved its whole payload for the absolute budget (10 s + 1 s per MB):
    four header-only connections held the ring for seconds. A payload must also keep moving."""
    clock = [1000.0]
    monkeypatch.setattr(tcp.time, "monotonic", lambda: clock[0])
    conn, transport, harness = make(Harness(receive_idle_timeout_s=0.5))
    feed(conn, hello() + frame(LARGE, 0)[:200], transport)
    clock[0] += 0.4
    conn.sweep(clock[0])
    assert not transport.closed
    clock[0] += 0.2
    conn.sweep(clock[0])
    assert transport.closed and harness.ring.slots_in_use == 0
    (reply,) = replies(transport)
    assert reply.status == Status.RECEIVE_TIMEOUT and "made no progress for 0.5 s" in reply.message


def test_a_token_reconnecting_while_its_frames_are_in_the_server_gets_the_same_producer() -> None:
    harness = Harness(tokens={"fleet": TokenSpec("fleet-secret")})
    a, _ = harness.connect()
    feed(a, hello("fleet-secret") + frame(SMALL, 0))
    ((held, _),) = harness.frames
    a.connection_lost(None)
    b, _ = harness.connect()
    feed(b, hello("fleet-secret") + frame(SMALL, 1))
    assert harness.frames[1][0].producer is held.producer  # not a fresh share
    answer(held)
    answer(harness.frames[1][0])
    b.connection_lost(None)
    c, _ = harness.connect()
    feed(c, hello("fleet-secret") + frame(SMALL, 2))
    assert harness.frames[2][0].producer is not held.producer  # nothing was left of the old one


@pytest.mark.asyncio
async def test_the_awaitable_reservation_keeps_the_share_and_leaks_nothing_when_cancelled() -> None:
    """``Producer.reserve_wait`` (for front ends that are not callback-driven, such as HTTP)."""
    harness = Harness(ring_bytes=1 << 16, max_producer_ring_bytes=32768)
    producer = harness.admission.producer_for(harness.admission.authenticate(""), "test")  # type: ignore[arg-type]
    first = await producer.reserve_wait(32768)
    waiting = asyncio.ensure_future(producer.reserve_wait(1024))  # over the share: waits for the producer's own
    await asyncio.sleep(0)
    assert not waiting.done() and producer.bytes_held == 32768
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    producer.release(first)
    assert producer.bytes_held == 0 and harness.pool.used_bytes == 0
    second = await producer.reserve_wait(1024)
    producer.release(second)
    assert harness.pool.slots_in_use == 0
