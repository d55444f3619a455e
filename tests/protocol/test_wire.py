"""Wire format v1 and v2 (streamgpu.protocol.wire): round trips, every split, malformed input, properties."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamgpu.protocol import wire
from streamgpu.protocol.wire import (
    FrameFlags,
    FrameHeader,
    Hello,
    Limits,
    ProtocolError,
    ReplyFlags,
    ReplyHeader,
    Status,
    Timings,
    Welcome,
)

U32 = 2**32 - 1
U64 = 2**64 - 1


def frame_header(**kw: Any) -> FrameHeader:
    base: dict[str, Any] = dict(
        stream_id=3, sequence=7, model="resnet50", dtype_code=1, shape=(2, 2, 3), payload_len=12,
        timestamp_ns=1_700_000_000_000_000_000, deadline_us=50_000, priority=5, flags=FrameFlags.LIVE,
    )  # fmt: skip
    base.update(kw)
    return FrameHeader(**base)


LIMITS = Limits(max_frames_in_flight=256, max_producer_bytes=64 << 20, receive_timeout_ms=10_000,
                min_receive_rate=1_000_000, max_priority=200)  # fmt: skip


def reply_bytes(h: ReplyHeader, payload: bytes | memoryview = b"", version: int = wire.VERSION) -> bytes:
    return b"".join(bytes(p) for p in wire.encode_reply(h, payload, version))


def patch(buf: bytes, offset: int, fmt: str, value: Any) -> bytes:
    b = bytearray(buf)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


# --- the layout itself ----------------------------------------------------


def test_fixed_sizes() -> None:
    assert wire._HELLO.size == 8
    assert wire._WELCOME.size == wire.WELCOME_V1_SIZE == 26
    assert wire.LIMITS_SIZE == 24 and wire.WELCOME_V2_SIZE == 50
    assert wire.FRAME_HEADER_SIZE == 48
    assert wire.REPLY_HEADER_SIZE == 64


def test_versions() -> None:
    assert wire.VERSION == 2 and wire.SUPPORTED_VERSIONS == (1, 2)
    assert wire.FRAME_VERSION == 1 and wire.REPLY_VERSION == 1
    assert Hello().version == 2 and FrameHeader(0, 0, "m", 1, (), 1).version == 1


def test_golden_bytes_match_docs_protocol_md() -> None:
    """The worked example in docs/PROTOCOL.md, byte for byte (v1 handshake; FRAME and REPLY are the same in v2)."""
    frame = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.uint8)
    h = FrameHeader(
        stream_id=7, sequence=42, model="echo", dtype_code=1, shape=(2, 3), payload_len=6,
        timestamp_ns=0x0102030405060708, deadline_us=20_000, priority=10, flags=FrameFlags.LIVE,
    )  # fmt: skip
    assert (wire.encode_frame_header(h) + frame.tobytes()).hex() == (
        "53474652" "01" "01" "02" "0a" "01" "04" "0000" "07000000" "2a00000000000000" "0600000000000000"
        "0807060504030201" "204e0000" "00000000" "6563686f" "02000000" "03000000" "010203040506"
    )  # fmt: skip
    r = ReplyHeader(
        stream_id=7, sequence=42, status=Status.OK, dtype_code=1, shape=(2, 3), timestamp_ns=0x0102030405060708,
        timings=Timings(receive_us=3, queue_us=150, transfer_us=12, compute_us=900, total_us=1100, batch_size=4),
    )  # fmt: skip
    assert reply_bytes(r, frame.tobytes()).hex() == (
        "53475250" "01" "00" "01" "02" "0000" "0000" "07000000" "2a00000000000000" "0600000000000000"
        "0807060504030201" "03000000" "96000000" "0c000000" "84030000" "4c040000" "0400" "0000"
        "02000000" "03000000" "010203040506"
    )  # fmt: skip
    assert wire.encode_hello(Hello(version=1, token="ab")).hex() == "53474849010002006162"
    assert wire.encode_welcome(Welcome(Status.OK, 1 << 24, 1 << 28, "hi", version=1)).hex() == (
        "5347574501000000" "0000000100000000" "0000001000000000" "0200" "6869"
    )  # fmt: skip
    # the reply's u16 at offset 10 is 0 unless the reply is about the connection
    assert reply_bytes(r, frame.tobytes(), version=1) == reply_bytes(r, frame.tobytes(), version=2)


def test_golden_bytes_v2_handshake_and_connection_reply() -> None:
    """The v2 examples in docs/PROTOCOL.md, byte for byte."""
    assert wire.encode_hello(Hello(token="ab")).hex() == "53474849020002006162"
    assert wire.encode_welcome(Welcome(Status.OK, 1 << 24, 1 << 28, "hi", limits=LIMITS)).hex() == (
        "5347574502000000" "0000000100000000" "0000001000000000" "0200"
        "00010000" "0000000400000000" "10270000" "40420f00" "c8" "000000" "6869"
    )  # fmt: skip
    bye = ReplyHeader(0, 0, Status.RECEIVE_TIMEOUT, message="late", flags=ReplyFlags.CONNECTION)
    assert reply_bytes(bye).hex() == (
        "53475250" "01" "0b" "00" "00" "0400" "0100" "00000000" "0000000000000000" "0000000000000000"
        "0000000000000000" "00000000" "00000000" "00000000" "00000000" "00000000" "0000" "0000" "6c617465"
    )  # fmt: skip
    v1 = reply_bytes(bye, version=1)  # the same reply on a v1 connection: BAD_FRAME, flag still set
    v2 = reply_bytes(bye)
    assert v1[5] == Status.BAD_FRAME and v1[10:12] == b"\x01\x00" and v1[:5] + v1[6:] == v2[:5] + v2[6:]


# --- round trips ----------------------------------------------------------


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("token", ["", "s3cret", "tøkén ✓", "x" * wire.MAX_TOKEN])
def test_hello_round_trip(token: str, version: int) -> None:
    data = wire.encode_hello(Hello(version=version, token=token))
    assert wire.decode_hello(data) == (Hello(version=version, token=token), len(data))
    assert wire.decode_hello(data + b"SGFR") == (Hello(version=version, token=token), len(data))


@pytest.mark.parametrize("version", [0, 3, 0xFFFF])
def test_hello_other_version_decodes(version: int) -> None:
    """The version is the server's to judge (it answers UNSUPPORTED_VERSION), not the decoder's."""
    data = wire.encode_hello(Hello(version=version))
    assert wire.decode_hello(data) == (Hello(version=version), 8)


@pytest.mark.parametrize("status", list(Status))
@pytest.mark.parametrize("message", ["", "welcome", "ünïcødé"])
@pytest.mark.parametrize("version", [1, 2])
def test_welcome_round_trip(status: Status, message: str, version: int) -> None:
    limits = LIMITS if version == 2 else None
    w = Welcome(status, max_payload=U64, ring_bytes=1 << 30, message=message, version=version, limits=limits)
    data = wire.encode_welcome(w)
    assert len(data) == (26 if version == 1 else 50) + len(message.encode())
    expected = (
        w if status in wire.V1_STATUSES or version == 2 else Welcome(**{**w.__dict__, "status": Status.BAD_FRAME})
    )
    assert wire.decode_welcome(data) == (expected, len(data))


def test_welcome_v1_layout_drops_limits() -> None:
    """A v1 WELCOME has no limits block, even if limits are given (e.g. a server answering a v1 HELLO)."""
    with_limits = wire.encode_welcome(Welcome(Status.OK, 1, 2, "x", version=1, limits=LIMITS))
    assert with_limits == wire.encode_welcome(Welcome(Status.OK, 1, 2, "x", version=1))
    assert wire.decode_welcome(with_limits) == (Welcome(Status.OK, 1, 2, "x", version=1), 27)


def test_welcome_v2_without_limits_writes_zeros_not_announced() -> None:
    data = wire.encode_welcome(Welcome(Status.UNAUTHORIZED, 0, 0, "no", version=2))
    assert len(data) == 52 and data[26:50] == bytes(24) and data[50:] == b"no"
    assert wire.decode_welcome(data) == (Welcome(Status.UNAUTHORIZED, 0, 0, "no", version=2, limits=None), 52)


@pytest.mark.parametrize("version", [0, 3, 0xFFFF])
def test_welcome_of_other_versions_uses_the_v1_layout(version: int) -> None:
    """What a refusal of an unsupported version looks like to any reader: the v1 layout."""
    w = Welcome(Status.UNSUPPORTED_VERSION, 0, 0, "speaks 1, 2", version=version)
    data = wire.encode_welcome(w)
    assert len(data) == 26 + 11 and wire.decode_welcome(data) == (w, len(data))


@pytest.mark.parametrize(
    "limits",
    [
        Limits(1, 0, 0, 0, 0),  # the smallest announced block: max_priority 0 is a real limit
        Limits(U32, U64, U32, U32, 255),
        LIMITS,
    ],
)
def test_limits_round_trip(limits: Limits) -> None:
    data = wire.encode_welcome(Welcome(Status.OK, 1, 1, limits=limits))
    got = wire.decode_welcome(data)
    assert got is not None and got[0].limits == limits


def test_limits_saturate_and_validate() -> None:
    big = Limits(U32 + 1, U64 + 1, 2**40, 2**33, 7)
    got = wire.decode_welcome(wire.encode_welcome(Welcome(Status.OK, 1, 1, limits=big)))
    assert got is not None and got[0].limits == Limits(U32, U64, U32, U32, 7)
    for bad, match in [
        (Limits(0, 1, 1, 1), "at least 1"),
        (Limits(1, -1, 1, 1), "max_producer_bytes"),
        (Limits(1, 1, -1, 1), "receive_timeout_ms"),
        (Limits(1, 1, 1, 1, 256), "max_priority"),
        (Limits(1, 1, 1, 1, -1), "max_priority"),
    ]:
        with pytest.raises(ValueError, match=match):
            wire.encode_welcome(Welcome(Status.OK, 1, 1, limits=bad))


def test_limits_payload_budget() -> None:
    assert LIMITS.payload_budget_s(2_000_000) == pytest.approx(12.0)
    assert LIMITS.payload_budget_s(0) == pytest.approx(10.0)
    assert Limits(1, 1, 500, 0).payload_budget_s(10**9) == pytest.approx(0.5)
    assert Limits(1, 1, 0, 1000).payload_budget_s(10**9) is None


# --- statuses and versions --------------------------------------------------


def test_status_for_maps_v2_statuses_to_v1_stand_ins() -> None:
    assert Status.RECEIVE_TIMEOUT == 11
    assert {int(s) for s in wire.V1_STATUSES} == set(range(11))
    for s in Status:
        assert wire.status_for(s, 2) is s
        if s in wire.V1_STATUSES:
            assert wire.status_for(s, 1) is s
        else:
            assert wire.status_for(s, 1) in wire.V1_STATUSES  # every newer status has a v1 stand-in
    assert wire.status_for(Status.RECEIVE_TIMEOUT, 1) is Status.BAD_FRAME


@pytest.mark.parametrize("version", [1, 2])
def test_encode_reply_applies_the_connection_version(version: int) -> None:
    h = ReplyHeader(0, 0, Status.RECEIVE_TIMEOUT, message="payload late", flags=ReplyFlags.CONNECTION)
    got = wire.decode_reply(reply_bytes(h, version=version))
    assert got is not None
    expected = Status.RECEIVE_TIMEOUT if version == 2 else Status.BAD_FRAME
    assert got[0].status is expected and got[0].flags == ReplyFlags.CONNECTION and got[0].message == "payload late"


def test_frame_and_reply_version_bytes_stay_1() -> None:
    assert wire.encode_frame_header(frame_header())[4] == 1
    for version in (1, 2):
        assert reply_bytes(ReplyHeader(1, 1, Status.OK), version=version)[4] == 1


def test_reply_flags_round_trip_and_unknown_bits_are_ignored() -> None:
    h = ReplyHeader(0, 0, Status.SHUTTING_DOWN, flags=ReplyFlags.CONNECTION)
    data = reply_bytes(h)
    assert data[10:12] == b"\x01\x00"
    got = wire.decode_reply(data)
    assert got is not None and got[0] == h
    got = wire.decode_reply(patch(data, 10, "<H", 0xFFFF))
    assert got is not None and got[0].flags == ReplyFlags.CONNECTION | ReplyFlags.OUTPUTS
    got = wire.decode_reply(patch(data, 10, "<H", 0xFFFC))
    assert got is not None and got[0].flags == ReplyFlags.NONE
    assert ReplyHeader(1, 2, Status.OK).flags == ReplyFlags.NONE  # keyword-compatible default


@pytest.mark.parametrize("code", sorted(wire.DTYPES))
@pytest.mark.parametrize("ndim", range(wire.MAX_NDIM + 1))
def test_frame_header_round_trip_all_dtypes_and_ranks(code: int, ndim: int) -> None:
    shape = tuple(range(1, ndim + 1))
    payload_len = wire.DTYPES[code].itemsize * int(np.prod(shape))
    h = frame_header(dtype_code=code, shape=shape, payload_len=payload_len)
    data = wire.encode_frame_header(h)
    assert len(data) == h.wire_size == 48 + len(h.model) + 4 * ndim
    assert wire.decode_frame_header(data + b"\xff" * 3) == (h, len(data))
    assert h.check_tensor() is None


@pytest.mark.parametrize(
    "h",
    [
        frame_header(stream_id=0, sequence=0, timestamp_ns=0, deadline_us=0, priority=0, flags=FrameFlags.NONE),
        frame_header(stream_id=U32, sequence=U64, timestamp_ns=U64, deadline_us=U32, priority=255),
        frame_header(model="m" * wire.MAX_MODEL_NAME),
        frame_header(model="модель"),
        frame_header(shape=(U32, 0), payload_len=0),
    ],
    ids=["zeros", "maxima", "longest-model", "utf8-model", "huge-dim"],
)
def test_frame_header_round_trip_extremes(h: FrameHeader) -> None:
    data = wire.encode_frame_header(h)
    assert wire.decode_frame_header(data) == (h, len(data))


def test_unknown_flag_bits_are_ignored() -> None:
    data = patch(wire.encode_frame_header(frame_header(flags=FrameFlags.LIVE)), 8, "<B", 0xFD)
    got = wire.decode_frame_header(data)
    assert got is not None and got[0].flags == FrameFlags.LIVE
    data = patch(wire.encode_frame_header(frame_header()), 8, "<B", 0xFF)
    got = wire.decode_frame_header(data)
    assert got is not None and got[0].flags == FrameFlags.LIVE | FrameFlags.SUBSCRIBERS


@pytest.mark.parametrize("status", list(Status))
def test_reply_round_trip_all_statuses(status: Status) -> None:
    h = ReplyHeader(stream_id=9, sequence=U64, status=status, message=f"status {status.name}")
    data = reply_bytes(h)
    got = wire.decode_reply(data)
    assert got is not None
    header, payload, used = got
    assert header == h and used == len(data) and bytes(payload) == b""


@pytest.mark.parametrize("code", sorted(wire.DTYPES))
@pytest.mark.parametrize("ndim", range(wire.MAX_NDIM + 1))
def test_reply_round_trip_all_dtypes_and_ranks(code: int, ndim: int) -> None:
    dt = wire.DTYPES[code]
    result = (np.arange(2**ndim) % 100).astype(dt).reshape((2,) * ndim)
    h = ReplyHeader(
        stream_id=1, sequence=2, status=Status.OK, dtype_code=code, shape=result.shape, payload_len=result.nbytes,
        timestamp_ns=123, timings=Timings(1, 2, 3, 4, 5, 6), message="ok" if ndim % 2 else "",
    )  # fmt: skip
    data = reply_bytes(h, result.tobytes())
    got = wire.decode_reply(data + b"SGRP")
    assert got is not None
    header, payload, used = got
    assert header == h and used == len(data)
    np.testing.assert_array_equal(np.frombuffer(payload, dtype=dt).reshape(header.shape), result)


def test_reply_timings_saturate() -> None:
    t = Timings(receive_us=2**40, queue_us=U32 + 1, transfer_us=U32, compute_us=0, total_us=10**12, batch_size=70000)
    got = wire.decode_reply(reply_bytes(ReplyHeader(1, 1, Status.OK, timings=t)))
    assert got is not None
    assert got[0].timings == Timings(U32, U32, U32, 0, U32, 0xFFFF)


@pytest.mark.parametrize("code", sorted(wire.DTYPES))
@pytest.mark.parametrize("shape", [(), (3,), (2, 5)])
def test_ok_replies_encoded_at_once_are_the_bytes_of_each_encoded_alone(code: int, shape: tuple[int, ...]) -> None:
    """``encode_ok_replies`` gives, for every frame, the bytes ``encode_reply(reply_to(...))`` does, in every
    protocol version; timings and batch sizes past their fields saturate alike."""
    rows = (np.arange(4 * int(np.prod(shape))) % 100).astype(wire.DTYPES[code]).reshape(4, *shape)
    timings = np.array([[1, 2, 3, 4, 5, 4], [U32 + 1, 0, 7, 2**40, U32, 70_000], [0] * 6, [9, 8, 7, 6, 5, 0xFFFF]],
                       np.int64)  # fmt: skip
    headers = [frame_header(stream_id=s, sequence=U64 - s, timestamp_ns=2**63 + s) for s in (0, 1, U32, 7)]
    fields = np.array([(h.stream_id, h.sequence, h.timestamp_ns) for h in headers], np.uint64)
    got = bytes(wire.encode_ok_replies(fields, rows, timings))
    for version in (1, 2):
        alone = [
            reply_bytes(*wire.reply_to(h, Status.OK, result=rows[i], timings=Timings(*timings[i].tolist())), version)
            for i, h in enumerate(headers)
        ]  # fmt: skip
        assert got == b"".join(alone)


def test_reply_message_is_truncated_to_max() -> None:
    got = wire.decode_reply(reply_bytes(ReplyHeader(1, 1, Status.INTERNAL_ERROR, message="e" * 70000)))
    assert got is not None and got[0].message == "e" * wire.MAX_MESSAGE
    # cut on a character boundary: what is sent stays UTF-8 (65535 is odd: half of a 2-byte character)
    encoded = wire.encode_reply(ReplyHeader(1, 1, Status.INTERNAL_ERROR, message="é" * 40000))
    head = bytes(encoded[0])
    message = head[wire.REPLY_HEADER_SIZE :]
    assert len(message) == wire.MAX_MESSAGE - 1 and message.decode() == "é" * (wire.MAX_MESSAGE // 2)


@pytest.mark.parametrize(
    "payload",
    [
        np.arange(4, dtype=np.float32).data,
        np.arange(6, dtype=np.int64).reshape(2, 3).data,
        np.array(2.5, dtype=np.float64).data,
        bytearray(b"abc"),
    ],
    ids=["f4-view", "2d-i8-view", "0d-view", "bytearray"],
)
def test_encode_reply_counts_payload_bytes(payload: Any) -> None:
    """Regression: len() of a typed memoryview counts items, not bytes."""
    nbytes = memoryview(payload).nbytes
    parts = wire.encode_reply(ReplyHeader(1, 1, Status.OK), payload)
    assert sum(memoryview(p).nbytes for p in parts) == 64 + nbytes
    got = wire.decode_reply(b"".join(bytes(p) for p in parts))
    assert got is not None and got[0].payload_len == nbytes and bytes(got[1]) == bytes(memoryview(payload))


def test_encode_reply_does_not_copy_the_payload() -> None:
    payload = bytearray(1000)
    parts = wire.encode_reply(ReplyHeader(1, 1, Status.OK), memoryview(payload))
    assert len(parts) == 2 and isinstance(parts[1], memoryview) and parts[1].obj is payload


# --- every split ----------------------------------------------------------

Decoder = Callable[[Any], Any]  # bytes | bytearray | memoryview

MESSAGES: list[tuple[str, Decoder, bytes]] = [
    ("hello", wire.decode_hello, wire.encode_hello(Hello(token="tøken"))),
    ("hello-empty", wire.decode_hello, wire.encode_hello(Hello())),
    ("hello-v1", wire.decode_hello, wire.encode_hello(Hello(version=1, token="t"))),
    ("welcome-v1", wire.decode_welcome, wire.encode_welcome(Welcome(Status.OK, 1 << 20, 1 << 26, "hi ✓", version=1))),
    (
        "welcome-v1-refusal",
        wire.decode_welcome,
        wire.encode_welcome(Welcome(Status.UNAUTHORIZED, 0, 0, "bad token", version=1)),
    ),
    (
        "welcome-v2",
        wire.decode_welcome,
        wire.encode_welcome(Welcome(Status.OK, 1 << 20, 1 << 26, "hi ✓", limits=LIMITS)),
    ),
    ("welcome-v2-unannounced", wire.decode_welcome, wire.encode_welcome(Welcome(Status.OK, 1, 1))),
    ("welcome-v2-refusal", wire.decode_welcome, wire.encode_welcome(Welcome(Status.UNAUTHORIZED, 0, 0, "bad token"))),
    ("frame", wire.decode_frame_header, wire.encode_frame_header(frame_header())),
    ("frame-0d", wire.decode_frame_header, wire.encode_frame_header(frame_header(shape=(), payload_len=1))),
    (
        "frame-8d",
        wire.decode_frame_header,
        wire.encode_frame_header(frame_header(shape=(1,) * 8, payload_len=1, model="é")),
    ),
    (
        "reply",
        wire.decode_reply,
        reply_bytes(ReplyHeader(1, 2, Status.OK, 8, (2, 2), message="m", timings=Timings(1, 2, 3, 4, 5, 6)), b"x" * 16),
    ),
    ("reply-error", wire.decode_reply, reply_bytes(ReplyHeader(0, 0, Status.BAD_FRAME, message="bad frame magic"))),
    (
        "reply-connection",
        wire.decode_reply,
        reply_bytes(ReplyHeader(0, 0, Status.RECEIVE_TIMEOUT, message="late", flags=ReplyFlags.CONNECTION)),
    ),
]


@pytest.mark.parametrize(("name", "decode", "data"), MESSAGES, ids=[m[0] for m in MESSAGES])
def test_every_strict_prefix_needs_more(name: str, decode: Decoder, data: bytes) -> None:
    full = decode(data)
    assert full is not None and full[-1] == len(data)
    for cut in range(len(data)):
        assert decode(data[:cut]) is None, f"prefix of {cut} bytes"
        assert decode(memoryview(data)[:cut]) is None
        assert decode(bytearray(data[:cut])) is None
    # fed as a growing buffer (the way a transport accumulates bytes), at every split
    for cut in range(len(data) + 1):
        buf = bytearray(data[:cut])
        if decode(buf) is None:
            buf += data[cut:]
        got = decode(buf)
        assert got is not None
        assert got[0] == full[0] and got[-1] == len(data)
    assert decode(memoryview(data + b"\0" * 100))[0] == full[0]


# --- malformed input ------------------------------------------------------


def raises(status: Status, match: str) -> Any:
    class _Ctx:
        def __enter__(self) -> None:
            self._cm = pytest.raises(ProtocolError, match=match)
            self._info = self._cm.__enter__()

        def __exit__(self, *exc: Any) -> bool:
            handled = self._cm.__exit__(*exc)
            assert self._info.value.status == status
            return bool(handled)

    return _Ctx()


GOOD_FRAME = wire.encode_frame_header(frame_header())


@pytest.mark.parametrize(
    ("data", "status", "match"),
    [
        (b"XXXX" + GOOD_FRAME[4:], Status.BAD_FRAME, "bad frame magic"),
        (b"SGFX", Status.BAD_FRAME, "bad frame magic"),
        (b"Q", Status.BAD_FRAME, "bad frame magic"),  # detected from the first byte
        (GOOD_FRAME[:4] + b"\x02", Status.UNSUPPORTED_VERSION, "version 2"),  # detected at byte 5
        (GOOD_FRAME[:4] + b"\x00" + GOOD_FRAME[5:], Status.UNSUPPORTED_VERSION, "version 0"),
        (patch(GOOD_FRAME, 6, "<B", 9), Status.BAD_FRAME, "ndim 9 exceeds 8"),
        (patch(GOOD_FRAME, 6, "<B", 255), Status.BAD_FRAME, "ndim 255"),
        (patch(GOOD_FRAME, 9, "<B", 0), Status.BAD_FRAME, "model name is empty"),
        (GOOD_FRAME[:48] + b"\xff\xfe" + GOOD_FRAME[50:], Status.BAD_FRAME, "not valid UTF-8"),
    ],
    ids=["magic", "magic-partial", "magic-first-byte", "version-2", "version-0", "ndim-9", "ndim-255", "no-model",
         "model-not-utf8"],
)  # fmt: skip
def test_malformed_frame_header(data: bytes, status: Status, match: str) -> None:
    with raises(status, match):
        wire.decode_frame_header(data)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"SGHX\x01\x00\x00\x00", "HELLO magic"),
        (struct.pack("<4sHH", b"SGHI", 1, wire.MAX_TOKEN + 1), "token length 1025"),
        (struct.pack("<4sHH", b"SGHI", 1, 2) + b"\xc3\x28", "not valid UTF-8"),
    ],
    ids=["magic", "token-too-long", "token-not-utf8"],
)
def test_malformed_hello(data: bytes, match: str) -> None:
    with raises(Status.BAD_FRAME, match):
        wire.decode_hello(data)


@pytest.mark.parametrize("version", [1, 2])
def test_malformed_welcome_and_reply(version: int) -> None:
    welcome = wire.encode_welcome(Welcome(Status.OK, 1, 1, version=version))
    with raises(Status.BAD_FRAME, "WELCOME magic"):
        wire.decode_welcome(b"SGWX" + welcome[4:])
    with raises(Status.BAD_FRAME, "WELCOME magic"):
        wire.decode_welcome(b"SGWX\x02")  # seen as soon as the magic is there
    with raises(Status.BAD_FRAME, "unknown status code 99"):
        wire.decode_welcome(patch(welcome, 6, "<H", 99))
    reply = reply_bytes(ReplyHeader(1, 1, Status.OK))
    with raises(Status.BAD_FRAME, "bad reply magic"):
        wire.decode_reply(b"SGRX" + reply[4:])
    with raises(Status.BAD_FRAME, "unknown status code 200"):
        wire.decode_reply(patch(reply, 5, "<B", 200))


@pytest.mark.parametrize(
    ("h", "match"),
    [
        (frame_header(dtype_code=0), "unknown dtype code 0"),
        (frame_header(dtype_code=200), "unknown dtype code 200"),
        (frame_header(dtype_code=8, shape=(2, 2, 3), payload_len=12), "needs 48 bytes"),
        (frame_header(shape=(), payload_len=0), "needs 1 bytes"),
        (frame_header(shape=(65536,) * 4, payload_len=0), "needs 18446744073709551616 bytes"),  # no int64 wrap
        (frame_header(shape=(U32,) * 8, payload_len=U64), "needs"),
    ],
    ids=["dtype-0", "dtype-200", "size-mismatch", "0d-empty", "overflow-wraps-to-0", "huge"],
)
def test_bad_tensor_decodes_and_is_judged_by_check_tensor(h: FrameHeader, match: str) -> None:
    """A well-framed header with a bad dtype or size costs only that frame: it decodes."""
    data = wire.encode_frame_header(h)
    got = wire.decode_frame_header(data)
    assert got is not None and got[0] == h
    problem = got[0].check_tensor()
    assert problem is not None and match in problem


def test_check_tensor_accepts_empty_and_scalar() -> None:
    assert frame_header(shape=(0, 5), payload_len=0).check_tensor() is None
    assert frame_header(dtype_code=9, shape=(), payload_len=8).check_tensor() is None


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"model": ""}, "model name"),
        ({"model": "x" * 256}, "model name"),
        ({"shape": (1,) * 9, "payload_len": 1}, "at most 8"),
        ({"priority": 256}, "priority"),
        ({"priority": -1}, "priority"),
    ],
)
def test_encode_frame_header_rejects(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        wire.encode_frame_header(frame_header(**kw))


def test_encode_hello_rejects_long_token() -> None:
    with pytest.raises(ValueError, match="auth token"):
        wire.encode_hello(Hello(token="x" * (wire.MAX_TOKEN + 1)))


def test_dtype_codes() -> None:
    for code, dt in wire.DTYPES.items():
        assert wire.dtype_code(dt) == code
        assert wire.dtype_code(dt.newbyteorder(">")) == code  # the code names the type; bytes go little-endian
    assert wire.dtype_code(np.float32) == 8 and wire.dtype_code("u1") == 1
    for bad in (bool, np.complex64, np.uint32, np.uint64, "U3", object):
        with pytest.raises(ValueError, match="not supported"):
            wire.dtype_code(bad)


def test_protocol_error_is_a_value_error() -> None:
    e = ProtocolError(Status.TOO_LARGE, "x")
    assert isinstance(e, ValueError) and e.status == Status.TOO_LARGE and str(e) == "x"


# --- properties -----------------------------------------------------------

model_names = st.text(min_size=1, max_size=60).filter(lambda s: 1 <= len(s.encode()) <= wire.MAX_MODEL_NAME)
u32 = st.integers(0, U32)
u64 = st.integers(0, U64)


@st.composite
def frame_headers(draw: st.DrawFn) -> FrameHeader:
    return FrameHeader(
        stream_id=draw(u32), sequence=draw(u64), model=draw(model_names), dtype_code=draw(st.integers(0, 255)),
        shape=tuple(draw(st.lists(u32, max_size=wire.MAX_NDIM))), payload_len=draw(u64), timestamp_ns=draw(u64),
        deadline_us=draw(u32), priority=draw(st.integers(0, 255)), flags=draw(st.sampled_from(list(FrameFlags))),
    )  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(frame_headers(), st.binary(max_size=16))
def test_random_frame_headers_round_trip(h: FrameHeader, tail: bytes) -> None:
    data = wire.encode_frame_header(h)
    assert wire.decode_frame_header(data + tail) == (h, len(data))
    assert wire.decode_frame_header(data[: len(data) - 1]) is None


@st.composite
def replies(draw: st.DrawFn) -> tuple[ReplyHeader, bytes]:
    payload = draw(st.binary(max_size=64))
    h = ReplyHeader(
        stream_id=draw(u32), sequence=draw(u64), status=draw(st.sampled_from(list(Status))),
        dtype_code=draw(st.integers(0, 255)), shape=tuple(draw(st.lists(u32, max_size=wire.MAX_NDIM))),
        payload_len=len(payload), timestamp_ns=draw(u64),
        timings=Timings(draw(u32), draw(u32), draw(u32), draw(u32), draw(u32), draw(st.integers(0, 0xFFFF))),
        message=draw(st.text(max_size=40)), flags=draw(st.sampled_from(list(ReplyFlags))),
    )  # fmt: skip
    return h, payload


@settings(max_examples=300, deadline=None)
@given(replies(), st.integers(0, 10**6))
def test_random_replies_round_trip(reply: tuple[ReplyHeader, bytes], cut_seed: int) -> None:
    h, payload = reply
    data = reply_bytes(h, payload)
    got = wire.decode_reply(data)
    assert got is not None
    assert got[0] == h and bytes(got[1]) == payload and got[2] == len(data)
    cut = cut_seed % len(data)
    assert wire.decode_reply(data[:cut]) is None


DECODERS: list[Decoder] = [wire.decode_hello, wire.decode_welcome, wire.decode_frame_header, wire.decode_reply]
PREFIXES = [b"", b"SGHI", b"SGHI\x01\x00", b"SGWE\x01\x00", b"SGWE\x02\x00", b"SGFR", b"SGFR\x01", b"SGRP\x01"]


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(PREFIXES), st.binary(max_size=200))
def test_garbage_only_ever_raises_protocol_error(prefix: bytes, garbage: bytes) -> None:
    data = prefix + garbage
    for decode in DECODERS:
        try:
            got = decode(data)
        except ProtocolError as e:
            assert isinstance(e.status, Status)
            continue
        if got is not None:
            assert 0 < got[-1] <= len(data)
        if decode is wire.decode_frame_header and got is not None:
            got[0].check_tensor()  # judging a decoded header never raises either


def test_outputs_block_round_trip_and_layout() -> None:
    named: dict[str, np.ndarray] = {
        "indices": np.arange(5, dtype=np.int32), "scores": np.linspace(1, 0, 5, dtype=np.float32),
        "mask": np.ones((2, 3), dtype=np.uint8), "empty": np.zeros((0, 4), dtype=np.float32),
    }  # fmt: skip
    block = wire.encode_outputs(named)
    assert block[:4] == b"\x04\x00\x00\x00"  # count 4, reserved
    assert block[4:16] == struct.pack("<BBHQ", 5, 1, 7, 20) and block[16:23] == b"indices"
    assert block[23:27] == struct.pack("<I", 5) and block[27:47] == named["indices"].tobytes()
    decoded = wire.decode_outputs(block)
    assert [n for n, _ in decoded] == list(named)
    for (_, got), want in zip(decoded, named.values(), strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape and got.flags.writeable
        np.testing.assert_array_equal(got, want)
    # A tuple: every name empty. Big-endian arrays go out little-endian.
    decoded = wire.decode_outputs(wire.encode_outputs((np.array([1.5, 2], dtype=">f8"), np.int64(7) * np.ones(1))))
    assert [n for n, _ in decoded] == ["", ""] and decoded[0][1].dtype == np.dtype("<f8")
    np.testing.assert_array_equal(decoded[0][1], [1.5, 2])


def test_an_output_of_one_value_per_frame_keeps_its_empty_shape_in_an_outputs_block() -> None:
    """A (batch,) output gives each frame a 0-d value (a numpy scalar, as ``array[i]`` is): its shape is
    ``[]``, as a single-output model's scalar result is, not ``[1]`` (``np.ascontiguousarray`` makes 0-d 1-d)."""
    counts = np.array([3, 0, 7], np.int64)
    scores = np.array(0.25, ">f4")  # 0-d and big-endian: goes out little-endian, still 0-d
    decoded = wire.decode_outputs(wire.encode_outputs({"boxes": np.ones((3, 4), np.float32), "count": counts[2],
                                                       "score": scores}))  # fmt: skip
    assert [(name, got.shape) for name, got in decoded] == [("boxes", (3, 4)), ("count", ()), ("score", ())]
    assert decoded[1][1] == 7 and decoded[2][1] == 0.25


@pytest.mark.parametrize("cut", [0, 3, 4, 10, 16, 30, 46])
def test_a_truncated_outputs_block_is_refused(cut: int) -> None:
    block = wire.encode_outputs({"indices": np.arange(5, dtype=np.int32)})
    with pytest.raises(wire.ProtocolError):
        wire.decode_outputs(block[:cut])


def test_a_malformed_outputs_block_is_refused() -> None:
    block = bytearray(wire.encode_outputs({"x": np.arange(3, dtype=np.int32)}))
    with pytest.raises(wire.ProtocolError, match="after its 1 outputs"):
        wire.decode_outputs(bytes(block) + b"\x00")
    bad = bytearray(block)
    bad[4] = 99  # dtype
    with pytest.raises(wire.ProtocolError, match="dtype code 99"):
        wire.decode_outputs(bytes(bad))
    bad = bytearray(block)
    bad[8:16] = struct.pack("<Q", 8)  # nbytes disagrees with the shape
    with pytest.raises(wire.ProtocolError, match="is not 8 bytes"):
        wire.decode_outputs(bytes(bad)[:-4])
