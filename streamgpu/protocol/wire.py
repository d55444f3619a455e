"""Wire format v1: pure encoding and decoding, no I/O and no asyncio.

Everything is little-endian. docs/PROTOCOL.md is the normative description;
this module is its executable form. Three message kinds travel on a TCP
connection:

* ``HELLO`` (client -> server, once, first): magic, version, auth token.
* ``WELCOME`` (server -> client, once): status, limits, optional message.
* ``FRAME`` (client -> server): a fixed 48-byte header, the model name, the
  shape (``ndim`` x u32), then ``payload_len`` bytes of tensor data.
* ``REPLY`` (server -> client): a fixed 64-byte header, an optional UTF-8
  message, the result shape, then the result bytes.

Decoders take a buffer and return ``None`` when more bytes are needed, so a
transport can feed them any split of the byte stream.
"""

from __future__ import annotations

import enum
import math
import struct
from dataclasses import dataclass, field

import numpy as np

VERSION = 1

HELLO_MAGIC = b"SGHI"
WELCOME_MAGIC = b"SGWE"
FRAME_MAGIC = b"SGFR"
REPLY_MAGIC = b"SGRP"

MAX_NDIM = 8
MAX_MODEL_NAME = 255
MAX_TOKEN = 1024
MAX_MESSAGE = 65535


class ProtocolError(ValueError):
    """The byte stream cannot be parsed any further (framing is lost).

    ``status`` is the reply status the server sends before it closes.
    """

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(message)
        self.status = status


class Status(enum.IntEnum):
    """Reply (and welcome) status codes. Values are part of the wire format."""

    OK = 0
    BAD_FRAME = 1
    TOO_LARGE = 2
    UNKNOWN_MODEL = 3
    OVERLOADED = 4
    DEADLINE_MISSED = 5
    INTERNAL_ERROR = 6
    SHUTTING_DOWN = 7
    SUPERSEDED = 8
    UNAUTHORIZED = 9
    UNSUPPORTED_VERSION = 10


class FrameFlags(enum.IntFlag):
    """Bits of the frame header's ``flags`` byte."""

    NONE = 0
    LIVE = 1  # keep only this stream's newest queued frame (live-stream mode)


# dtype codes on the wire; the numpy dtypes are always little-endian.
DTYPES: dict[int, np.dtype] = {
    1: np.dtype("u1"),
    2: np.dtype("i1"),
    3: np.dtype("<u2"),
    4: np.dtype("<i2"),
    5: np.dtype("<i4"),
    6: np.dtype("<i8"),
    7: np.dtype("<f2"),
    8: np.dtype("<f4"),
    9: np.dtype("<f8"),
}
DTYPE_CODES: dict[np.dtype, int] = {dt: code for code, dt in DTYPES.items()}


def dtype_code(dtype: np.dtype | type | str) -> int:
    """Wire code of a numpy dtype; raises ValueError for unsupported ones."""
    dt = np.dtype(dtype).newbyteorder("<") if np.dtype(dtype).itemsize > 1 else np.dtype(dtype)
    try:
        return DTYPE_CODES[dt]
    except KeyError:
        raise ValueError(f"dtype {np.dtype(dtype)} is not supported on the wire") from None


# --- HELLO / WELCOME ------------------------------------------------------

_HELLO = struct.Struct("<4sHH")  # magic, version, token_len
_WELCOME = struct.Struct("<4sHHQQH")  # magic, version, status, max_payload, ring_bytes, message_len


@dataclass(frozen=True)
class Hello:
    version: int = VERSION
    token: str = ""


@dataclass(frozen=True)
class Welcome:
    status: Status
    max_payload: int
    ring_bytes: int
    message: str = ""
    version: int = VERSION


def encode_hello(hello: Hello) -> bytes:
    token = hello.token.encode()
    if len(token) > MAX_TOKEN:
        raise ValueError(f"auth token is {len(token)} bytes; at most {MAX_TOKEN}")
    return _HELLO.pack(HELLO_MAGIC, hello.version, len(token)) + token


def decode_hello(buf: bytes | memoryview) -> tuple[Hello, int] | None:
    """Parse a HELLO; returns (hello, bytes consumed) or None if incomplete."""
    if len(buf) < _HELLO.size:
        return None
    magic, version, token_len = _HELLO.unpack_from(buf)
    if magic != HELLO_MAGIC:
        raise ProtocolError(Status.BAD_FRAME, f"expected HELLO magic {HELLO_MAGIC!r}, got {bytes(magic)!r}")
    if token_len > MAX_TOKEN:
        raise ProtocolError(Status.BAD_FRAME, f"auth token length {token_len} exceeds {MAX_TOKEN}")
    end = _HELLO.size + token_len
    if len(buf) < end:
        return None
    try:
        token = bytes(buf[_HELLO.size : end]).decode()
    except UnicodeDecodeError:
        raise ProtocolError(Status.BAD_FRAME, "auth token is not valid UTF-8") from None
    return Hello(version=version, token=token), end


def encode_welcome(welcome: Welcome) -> bytes:
    msg = welcome.message.encode()[:MAX_MESSAGE]
    head = _WELCOME.pack(
        WELCOME_MAGIC, welcome.version, welcome.status, welcome.max_payload, welcome.ring_bytes, len(msg)
    )
    return head + msg


def decode_welcome(buf: bytes | memoryview) -> tuple[Welcome, int] | None:
    if len(buf) < _WELCOME.size:
        return None
    magic, version, status, max_payload, ring_bytes, msg_len = _WELCOME.unpack_from(buf)
    if magic != WELCOME_MAGIC:
        raise ProtocolError(Status.BAD_FRAME, f"expected WELCOME magic {WELCOME_MAGIC!r}, got {bytes(magic)!r}")
    end = _WELCOME.size + msg_len
    if len(buf) < end:
        return None
    message = bytes(buf[_WELCOME.size : end]).decode(errors="replace")
    return Welcome(_status(status), max_payload, ring_bytes, message, version), end


# --- FRAME ----------------------------------------------------------------

# magic, version, dtype, ndim, priority, flags, model_len, reserved(u16),
# stream_id, sequence, payload_len, timestamp_ns, deadline_us, reserved(u32)
_FRAME = struct.Struct("<4sBBBBBBHIQQQII")
FRAME_HEADER_SIZE = _FRAME.size  # 48


@dataclass(frozen=True)
class FrameHeader:
    """One frame's header. ``deadline_us`` is a budget from server arrival (0 = none)."""

    stream_id: int
    sequence: int
    model: str
    dtype_code: int
    shape: tuple[int, ...]
    payload_len: int
    timestamp_ns: int = 0
    deadline_us: int = 0
    priority: int = 0
    flags: FrameFlags = FrameFlags.NONE
    version: int = VERSION

    @property
    def wire_size(self) -> int:
        """Bytes of header + model name + shape, before the payload."""
        return FRAME_HEADER_SIZE + len(self.model.encode()) + 4 * len(self.shape)

    def check_tensor(self) -> str | None:
        """Why dtype, shape and payload length disagree, or None if they agree."""
        dt = DTYPES.get(self.dtype_code)
        if dt is None:
            return f"unknown dtype code {self.dtype_code}"
        expected = dt.itemsize * math.prod(self.shape)  # exact: np.prod(int64) wraps, e.g. (65536,)*4 -> 0
        if expected != self.payload_len:
            return (
                f"shape {list(self.shape)} of {dt.name} needs {expected} bytes,"
                f" header says payload_len={self.payload_len}"
            )
        return None


def encode_frame_header(h: FrameHeader) -> bytes:
    model = h.model.encode()
    if not 1 <= len(model) <= MAX_MODEL_NAME:
        raise ValueError(f"model name must be 1..{MAX_MODEL_NAME} UTF-8 bytes, got {len(model)}")
    if len(h.shape) > MAX_NDIM:
        raise ValueError(f"at most {MAX_NDIM} dimensions, got {len(h.shape)}")
    if not 0 <= h.priority <= 255:
        raise ValueError(f"priority must be 0..255, got {h.priority}")
    head = _FRAME.pack(
        FRAME_MAGIC, h.version, h.dtype_code, len(h.shape), h.priority, int(h.flags), len(model), 0,
        h.stream_id, h.sequence, h.payload_len, h.timestamp_ns, h.deadline_us, 0,
    )  # fmt: skip
    return head + model + struct.pack(f"<{len(h.shape)}I", *h.shape)


def decode_frame_header(buf: bytes | memoryview) -> tuple[FrameHeader, int] | None:
    """Parse a frame header (not its payload).

    Returns (header, bytes consumed) or None if ``buf`` is too short. Raises
    ProtocolError when framing is lost (bad magic, unsupported version, bad
    lengths); a well-framed header with a bad dtype or shape is returned as is
    and judged by the server (see FrameHeader.check_tensor), so it costs only
    that frame.
    """
    if len(buf) < 5:
        if len(buf) and bytes(buf[: len(buf)]) != FRAME_MAGIC[: len(buf)]:
            raise ProtocolError(Status.BAD_FRAME, f"bad frame magic {bytes(buf)!r}")
        return None
    if bytes(buf[:4]) != FRAME_MAGIC:
        raise ProtocolError(Status.BAD_FRAME, f"bad frame magic {bytes(buf[:4])!r}, expected {FRAME_MAGIC!r}")
    if buf[4] != VERSION:
        raise ProtocolError(
            Status.UNSUPPORTED_VERSION, f"frame version {buf[4]} is not supported (server speaks {VERSION})"
        )
    if len(buf) < FRAME_HEADER_SIZE:
        return None
    (_, version, dtype, ndim, priority, flags, model_len, _r1,
     stream_id, sequence, payload_len, timestamp_ns, deadline_us, _r2) = _FRAME.unpack_from(buf)  # fmt: skip
    if ndim > MAX_NDIM:
        raise ProtocolError(Status.BAD_FRAME, f"ndim {ndim} exceeds {MAX_NDIM}")
    if model_len == 0:
        raise ProtocolError(Status.BAD_FRAME, "model name is empty")
    end = FRAME_HEADER_SIZE + model_len + 4 * ndim
    if len(buf) < end:
        return None
    try:
        model = bytes(buf[FRAME_HEADER_SIZE : FRAME_HEADER_SIZE + model_len]).decode()
    except UnicodeDecodeError:
        raise ProtocolError(Status.BAD_FRAME, "model name is not valid UTF-8") from None
    shape = struct.unpack_from(f"<{ndim}I", buf, FRAME_HEADER_SIZE + model_len)
    header = FrameHeader(
        stream_id=stream_id, sequence=sequence, model=model, dtype_code=dtype, shape=tuple(shape),
        payload_len=payload_len, timestamp_ns=timestamp_ns, deadline_us=deadline_us, priority=priority,
        flags=FrameFlags(flags & int(FrameFlags.LIVE)), version=version,
    )  # fmt: skip
    return header, end


# --- REPLY ----------------------------------------------------------------


@dataclass(frozen=True)
class Timings:
    """Server-side time per stage, in microseconds (saturating at 2**32-1).

    receive: frame header parsed to last payload byte; queue: frame complete to
    batch launch; transfer: host-to-device copy; compute: pre-processing +
    model + result copy back; total: frame header parsed to reply encoded.
    """

    receive_us: int = 0
    queue_us: int = 0
    transfer_us: int = 0
    compute_us: int = 0
    total_us: int = 0
    batch_size: int = 0


# magic, version, status, dtype, ndim, message_len, reserved(u16), stream_id,
# sequence, payload_len, timestamp_ns (echoed), receive, queue, transfer,
# compute, total (u32 us), batch_size (u16), reserved(u16)
_REPLY = struct.Struct("<4sBBBBHHIQQQIIIIIHH")
REPLY_HEADER_SIZE = _REPLY.size  # 64

_U32 = 0xFFFFFFFF


@dataclass(frozen=True)
class ReplyHeader:
    stream_id: int
    sequence: int
    status: Status
    dtype_code: int = 0
    shape: tuple[int, ...] = ()
    payload_len: int = 0
    timestamp_ns: int = 0
    timings: Timings = field(default_factory=Timings)
    message: str = ""


def encode_reply(h: ReplyHeader, payload: bytes | memoryview = b"") -> list[bytes | memoryview]:
    """Encode a reply as buffers for ``transport.writelines`` (no payload copy)."""
    msg = h.message.encode()[:MAX_MESSAGE]
    payload = memoryview(payload).cast("B")  # len() of a typed view counts items, not bytes
    t = h.timings
    head = _REPLY.pack(
        REPLY_MAGIC, VERSION, h.status, h.dtype_code, len(h.shape), len(msg), 0,
        h.stream_id, h.sequence, len(payload), h.timestamp_ns,
        min(t.receive_us, _U32), min(t.queue_us, _U32), min(t.transfer_us, _U32),
        min(t.compute_us, _U32), min(t.total_us, _U32), min(t.batch_size, 0xFFFF), 0,
    )  # fmt: skip
    parts: list[bytes | memoryview] = [head + msg + struct.pack(f"<{len(h.shape)}I", *h.shape)]
    if len(payload):
        parts.append(payload)
    return parts


def decode_reply(buf: bytes | memoryview) -> tuple[ReplyHeader, memoryview, int] | None:
    """Parse a whole reply; returns (header, payload view, bytes consumed) or None."""
    if len(buf) < REPLY_HEADER_SIZE:
        return None
    (magic, _version, status, dtype, ndim, msg_len, _r1, stream_id, sequence, payload_len, ts,
     rx, q, tr, comp, total, bs, _r2) = _REPLY.unpack_from(buf)  # fmt: skip
    if magic != REPLY_MAGIC:
        raise ProtocolError(Status.BAD_FRAME, f"bad reply magic {bytes(magic)!r}")
    shape_at = REPLY_HEADER_SIZE + msg_len
    payload_at = shape_at + 4 * ndim
    end = payload_at + payload_len
    if len(buf) < end:
        return None
    message = bytes(buf[REPLY_HEADER_SIZE:shape_at]).decode(errors="replace")
    shape = struct.unpack_from(f"<{ndim}I", buf, shape_at)
    header = ReplyHeader(
        stream_id=stream_id, sequence=sequence, status=_status(status), dtype_code=dtype, shape=tuple(shape),
        payload_len=payload_len, timestamp_ns=ts, timings=Timings(rx, q, tr, comp, total, bs), message=message,
    )  # fmt: skip
    return header, memoryview(buf)[payload_at:end], end


def _status(value: int) -> Status:
    try:
        return Status(value)
    except ValueError:
        raise ProtocolError(Status.BAD_FRAME, f"unknown status code {value}") from None


def frame_header_length(buf: bytes | memoryview) -> int | None:
    """Total length of the frame header starting at ``buf`` (fixed part + model name + shape),
    or None until the fixed 48-byte part is there. Lets a transport read exactly one header.
    """
    if len(buf) < FRAME_HEADER_SIZE:
        return None
    return FRAME_HEADER_SIZE + buf[9] + 4 * buf[6]  # model_len at byte 9, ndim at byte 6
