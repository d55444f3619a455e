"""TcpIngest fed through a fake transport: every split of the byte stream, every bad input."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest

from streamgpu.frame import Frame
from streamgpu.memory import PinnedRing
from streamgpu.models.spec import ModelSpec
from streamgpu.protocol import wire
from streamgpu.protocol.tcp import TcpIngest
from streamgpu.protocol.wire import FrameFlags, FrameHeader, ReplyHeader, Status

SMALL = ModelSpec(name="small", input_shape=(4, 4, 3))  # 48-byte frames: read in bulk
LARGE = ModelSpec(
    name="large", input_shape=(50, 100, 4), preprocess="none"
)  # 20000-byte frames: read straight into the slot


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

    def pause_reading(self) -> None:
        self.paused = True
        self.pause_calls += 1

    def resume_reading(self) -> None:
        self.paused = False


class FakeRouter:
    def __init__(self, ring_bytes: int = 1 << 20, token: str = "", max_frames: int = 1000) -> None:
        self.ring = PinnedRing(np.zeros(ring_bytes, np.uint8))
        self.max_payload = 1 << 16
        self.token = token
        self.accepting = True
        self.max_frames_per_connection = max_frames
        self.frames: list[tuple[Frame, bytes]] = []
        self.specs = {SMALL.name: SMALL, LARGE.name: LARGE}
        self.opened = self.closed = 0

    def model_spec(self, name: str) -> ModelSpec | None:
        return self.specs.get(name)

    def submit(self, frame: Frame) -> None:
        assert frame.slot is not None
        self.frames.append((frame, self.ring.array(frame.slot).tobytes()))

    def frame_done(self) -> None:
        pass

    def connection_opened(self, conn: TcpIngest) -> None:
        self.opened += 1

    def connection_closed(self, conn: TcpIngest) -> None:
        self.closed += 1


def make(router: FakeRouter | None = None) -> tuple[TcpIngest, FakeTransport, FakeRouter]:
    router = router or FakeRouter()
    conn = TcpIngest(router)
    transport = FakeTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    return conn, transport, router


def feed(conn: TcpIngest, data: bytes, transport: FakeTransport | None = None) -> None:
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
    h = frame.header
    frame.reply(ReplyHeader(h.stream_id, h.sequence, Status.OK))


STREAM = (
    hello() + frame(SMALL, 0) + frame(LARGE, 1, stream=2) + frame(SMALL, 2, flags=FrameFlags.LIVE) + frame(LARGE, 3)
)


def expected_frames() -> list[tuple[int, int, bytes]]:
    conn, _, router = make()
    feed(conn, STREAM)
    return [(f.header.sequence, f.header.stream_id, payload) for f, payload in router.frames]


def test_whole_stream_parses() -> None:
    got = expected_frames()
    assert [g[0] for g in got] == [0, 1, 2, 3]
    assert got[1][1] == 2
    assert got[1][2] == np.random.default_rng(1).integers(0, 256, LARGE.frame_nbytes, dtype=np.uint8).tobytes()


def test_every_two_way_split_parses_the_same() -> None:
    want = expected_frames()
    for cut in range(1, len(STREAM)):
        conn, transport, router = make()
        feed(conn, STREAM[:cut])
        feed(conn, STREAM[cut:])
        got = [(f.header.sequence, f.header.stream_id, p) for f, p in router.frames]
        assert got == want, f"split at {cut}"
        assert not transport.closed


def test_random_many_way_splits_and_byte_at_a_time() -> None:
    want = expected_frames()
    rng = random.Random(7)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(STREAM)), 20))
        conn, _, router = make()
        for a, b in zip([0, *cuts], [*cuts, len(STREAM)], strict=True):
            feed(conn, STREAM[a:b])
        assert [(f.header.sequence, f.header.stream_id, p) for f, p in router.frames] == want
    conn, _, router = make()
    for i in range(len(STREAM)):
        feed(conn, STREAM[i : i + 1])
    assert [(f.header.sequence, f.header.stream_id, p) for f, p in router.frames] == want


def test_large_payload_lands_in_the_slot_without_passing_through_scratch() -> None:
    conn, _, router = make()
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
    assert np.shares_memory(np.frombuffer(slot_view, np.uint8), router.ring.buffer)


def test_replies_leave_in_arrival_order_per_stream() -> None:
    conn, transport, router = make()
    feed(conn, hello() + frame(SMALL, 10) + frame(SMALL, 11) + frame(SMALL, 5, stream=1))
    (f10, _), (f11, _), (f5, _) = router.frames
    answer(f11)
    assert replies(transport) == []  # 11 waits for 10
    answer(f5)
    assert [r.sequence for r in replies(transport)] == [5]  # another stream is not held back
    answer(f10)
    assert [r.sequence for r in replies(transport)] == [5, 10, 11]


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
    conn, transport, router = make()
    feed(conn, hello() + frame(SMALL, 0) + bad + frame(SMALL, 2))
    assert [f.header.sequence for f, _ in router.frames] == [0, 2]
    for f, _ in router.frames:
        answer(f)
    got = replies(transport)
    assert [(r.sequence, r.status) for r in got] == [(0, Status.OK), (1, status), (2, Status.OK)]
    assert got[1].message
    assert not transport.closed
    assert router.ring.slots_in_use == 2


@pytest.mark.parametrize(
    ("bad", "status"),
    [
        (b"GARBAGE!" * 10, Status.BAD_FRAME),
        (b"SGFR\x02" + b"\0" * 60, Status.UNSUPPORTED_VERSION),
        (frame(SMALL, 1)[:6] + b"\x09" + frame(SMALL, 1)[7:], Status.BAD_FRAME),  # ndim 9
    ],
)
def test_lost_framing_answers_stream_zero_and_closes(bad: bytes, status: Status) -> None:
    conn, transport, router = make()
    feed(conn, hello() + frame(SMALL, 0) + bad)
    assert transport.closed
    ((f0, _),) = router.frames
    got = replies(transport)
    assert (got[-1].stream_id, got[-1].sequence, got[-1].status) == (0, 0, status)
    conn.connection_lost(None)
    answer(f0)  # a reply after the producer left goes nowhere, without error


def test_random_garbage_never_raises() -> None:
    rng = np.random.default_rng(3)
    for _ in range(200):
        conn, _transport, router = make()
        feed(conn, hello() + rng.integers(0, 256, int(rng.integers(1, 400)), dtype=np.uint8).tobytes())
        conn.connection_lost(None)
        assert router.ring.slots_in_use == 0


def test_truncated_frame_then_disconnect_frees_the_slot() -> None:
    conn, _transport, router = make()
    feed(conn, hello() + frame(LARGE, 0)[:5000])
    assert router.ring.slots_in_use == 1
    conn.connection_lost(None)
    assert router.ring.slots_in_use == 0 and router.frames == [] and router.closed == 1


@pytest.mark.parametrize(
    ("greeting", "status", "token"),
    [
        (hello("wrong"), Status.UNAUTHORIZED, "secret"),
        (wire.encode_hello(wire.Hello(version=2)), Status.UNSUPPORTED_VERSION, ""),
        (b"HELO" + b"\0" * 8, Status.BAD_FRAME, ""),
    ],
)
def test_bad_hello_is_refused(greeting: bytes, status: Status, token: str) -> None:
    conn, transport, _ = make(FakeRouter(token=token))
    feed(conn, greeting)
    parsed = wire.decode_welcome(bytes(transport.written))
    assert parsed is not None and parsed[0].status == status and parsed[0].message
    assert transport.closed


def test_good_token_is_welcome() -> None:
    conn, transport, router = make(FakeRouter(token="secret"))
    feed(conn, hello("secret") + frame(SMALL, 0))
    parsed = wire.decode_welcome(bytes(transport.written))
    assert parsed is not None and parsed[0].status == Status.OK
    assert len(router.frames) == 1


def test_full_ring_pauses_reading_and_resumes_when_a_slot_frees() -> None:
    router = FakeRouter(ring_bytes=LARGE.frame_nbytes + 256)  # room for exactly one large frame
    conn, transport, _ = make(router)
    feed(conn, hello() + frame(LARGE, 0) + frame(LARGE, 1)[:100], transport)
    assert len(router.frames) == 1 and transport.paused and router.ring.waiters == 1
    first, _ = router.frames[0]
    assert first.slot is not None
    router.ring.release(first.slot)  # its copy completed
    assert not transport.paused
    feed(conn, frame(LARGE, 1)[100:], transport)
    assert [f.header.sequence for f, _ in router.frames] == [0, 1]
    assert router.frames[1][1] == frame(LARGE, 1)[-LARGE.frame_nbytes :]


def test_per_connection_bound_answers_overloaded() -> None:
    conn, transport, router = make(FakeRouter(max_frames=2))
    feed(conn, hello() + b"".join(frame(SMALL, i) for i in range(4)))
    assert len(router.frames) == 2
    got = replies(transport)
    assert [(r.sequence, r.status) for r in got] == []  # held behind unanswered 0 and 1 (same stream)
    for f, _ in router.frames:
        answer(f)
    assert [(r.sequence, r.status) for r in replies(transport)] == [
        (0, Status.OK), (1, Status.OK), (2, Status.OVERLOADED), (3, Status.OVERLOADED)
    ]  # fmt: skip
    assert router.ring.slots_in_use == 2  # the rejected frames never took a slot


def test_shutdown_answers_the_half_received_frame() -> None:
    conn, transport, router = make()
    feed(conn, hello() + frame(LARGE, 0)[:3000])
    conn.stop_reading()
    assert transport.paused and router.ring.slots_in_use == 0
    assert [(r.sequence, r.status) for r in replies(transport)] == [(0, Status.SHUTTING_DOWN)]


def test_answers_held_back_behind_a_slow_frame_are_bounded() -> None:
    conn, transport, router = make(FakeRouter(max_frames=2))
    feed(conn, hello() + frame(SMALL, 0), transport)  # in the server, unanswered
    bad = frame(SMALL, 1, model="nope")
    fed = 0
    while not transport.paused:
        feed(conn, bad, transport)  # answered at once, but held behind frame 0 of the same stream
        fed += 1
        assert fed < 10, "reading never paused"
    assert fed == 3 and replies(transport) == []  # 4 tickets held: 2 x max_frames
    answer(router.frames[0][0])
    assert not transport.paused and len(replies(transport)) == 4
