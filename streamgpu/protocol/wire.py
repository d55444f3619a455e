"""Wire format, protocol versions 1 and 2: pure encoding and decoding, no I/O and no asyncio.

Everything is little-endian. docs/PROTOCOL.md is the normative description;
this module is its executable form. Four message kinds travel on a TCP
connection:

* ``HELLO`` (client -> server, once, first): magic, version, auth token. Its
  version selects the connection's protocol version (1 or 2).
* ``WELCOME`` (server -> client, once): status, sizes, (v2) the connection's
  admission limits, optional message.
* ``FRAME`` (client -> server): a fixed 48-byte header, the model name, the
  shape (``ndim`` x u32), then ``payload_len`` bytes of tensor data.
* ``REPLY`` (server -> client): a fixed 64-byte header, an optional UTF-8
  message, the result shape, then the result bytes.

Decoders take a buffer and return ``None`` when more bytes are needed, so a
transport can feed them any split of the byte stream.

What version 2 changes (v1 peers keep working unchanged): the WELCOME carries
a :class:`Limits` block, the REPLY header's reserved u16 at offset 10 becomes
``flags`` (:class:`ReplyFlags`, written for every version: v1 readers ignore
it), and :attr:`Status.RECEIVE_TIMEOUT` exists (a v1 connection gets its
stand-in, see :func:`status_for`). A v2 reply may carry several result
tensors (``ReplyFlags.OUTPUTS``, :func:`encode_outputs`); a v1 connection is
sent the first of them. The FRAME and REPLY headers' own version
byte stays 1 in both.
"""

from __future__ import annotations

import enum
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

VERSION = 2  # newest protocol version (the HELLO's and WELCOME's version field)
SUPPORTED_VERSIONS = (1, 2)
FRAME_VERSION = 1  # the FRAME header's own version byte, in every protocol version
REPLY_VERSION = 1  # the REPLY header's own version byte, in every protocol version

HELLO_MAGIC = b"SGHI"
WELCOME_MAGIC = b"SGWE"
FRAME_MAGIC = b"SGFR"
REPLY_MAGIC = b"SGRP"

MAX_NDIM = 8
MAX_MODEL_NAME = 255
MAX_TOKEN = 1024
MAX_MESSAGE = 65535

# Over WebSockets (``GET /v1/stream``) a refused upgrade gives its reason in this response header as well as in
# its JSON body: WebSocket clients (browsers, aiohttp's ``ws_connect``) do not read the body of an answer that is
# not 101, and aiohttp's error keeps only the status and the headers.
WS_REFUSAL_HEADER = "Streamgpu-Error"


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
    # --- v2 only (a v1 connection gets the stand-in from status_for) ---
    RECEIVE_TIMEOUT = 11  # connection-level: a frame's payload did not arrive within its time budget
    INCOMPLETE = 12  # UDP only: a frame's datagrams did not all arrive within its reassembly time


V1_STATUSES: frozenset[Status] = frozenset(s for s in Status if s <= Status.UNSUPPORTED_VERSION)
# What a v1 connection is sent instead of a status v1 does not know.
V1_STAND_INS: dict[Status, Status] = {Status.RECEIVE_TIMEOUT: Status.BAD_FRAME, Status.INCOMPLETE: Status.BAD_FRAME}


def status_for(status: Status, version: int) -> Status:
    """The status to put on the wire of a connection speaking protocol ``version``.

    Statuses that do not exist in v1 are mapped to their v1 stand-in
    (RECEIVE_TIMEOUT and INCOMPLETE -> BAD_FRAME) when ``version`` < 2; otherwise unchanged.
    """
    if version >= 2 or status in V1_STATUSES:
        return status
    return V1_STAND_INS[status]


class FrameFlags(enum.IntFlag):
    """Bits of the frame header's ``flags`` byte."""

    NONE = 0
    LIVE = 1  # supersede every older queued frame of this stream (live-stream mode)
    # UDP only: the outcome goes to the server's subscribers of this stream id (WebSocket /v1/stream), and no
    # reply datagram to the sender. TCP and WebSocket producers always get their reply (the flag is ignored).
    SUBSCRIBERS = 2


class ReplyFlags(enum.IntFlag):
    """Bits of the REPLY header's ``flags`` u16 at offset 10 (reserved, always 0, in v1 replies of old servers)."""

    NONE = 0
    # This reply is about the connection, not a frame (framing lost, receive
    # timeout, shutdown abort); the connection ends after it. Its stream_id and
    # sequence are 0 and mean nothing.
    CONNECTION = 1
    # v2 only: the payload is an outputs block (several named result tensors, see encode_outputs);
    # the header's dtype is 0, its ndim 0.
    OUTPUTS = 2


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
    code = DTYPE_CODES.get(dtype) if isinstance(dtype, np.dtype) else None  # fast path: a little-endian dtype
    if code is not None:
        return code
    dt = np.dtype(dtype).newbyteorder("<") if np.dtype(dtype).itemsize > 1 else np.dtype(dtype)
    try:
        return DTYPE_CODES[dt]
    except KeyError:
        raise ValueError(f"dtype {np.dtype(dtype)} is not supported on the wire") from None


# --- HELLO / WELCOME ------------------------------------------------------

_HELLO = struct.Struct("<4sHH")  # magic, version, token_len
_WELCOME = struct.Struct("<4sHHQQH")  # magic, version, status, max_payload, ring_bytes, message_len
# v2 limits block at offset 26: max_frames_in_flight, max_producer_bytes, receive_timeout_ms,
# min_receive_rate, max_priority (u8), 3 reserved bytes
_LIMITS = struct.Struct("<IQIIB3x")
WELCOME_V1_SIZE = _WELCOME.size  # 26: the fixed part of a v1 WELCOME
LIMITS_SIZE = _LIMITS.size  # 24
WELCOME_V2_SIZE = WELCOME_V1_SIZE + LIMITS_SIZE  # 50: the fixed part of a v2 WELCOME

_U8 = 0xFF
_U32 = 0xFFFFFFFF
_U64 = 0xFFFFFFFFFFFFFFFF
_new_tuple = tuple.__new__  # (a NamedTuple built without its Python __new__)


@dataclass(frozen=True)
class Hello:
    version: int = VERSION
    token: str = ""


@dataclass(frozen=True)
class Limits:
    """What the server allows one connection (v2 WELCOME). docs/PROTOCOL.md section 6.

    * ``max_frames_in_flight``: frames this connection may have in the server
      at once (received, not yet answered); past it the server stops reading
      the connection until replies go out (flow control, not an error).
    * ``max_producer_bytes``: receive-buffer bytes this connection's producer
      may hold at once; past it the server stops reading its connections.
    * ``receive_timeout_ms`` and ``min_receive_rate`` (bytes/s): a frame's
      payload must arrive within ``receive_timeout_ms / 1000 + payload_len /
      min_receive_rate`` seconds (see :meth:`payload_budget_s`), else the
      server answers RECEIVE_TIMEOUT and drops the connection.
    * ``max_priority``: the highest frame priority this connection may use;
      frames above it are answered UNAUTHORIZED.

    On the wire the u32 fields saturate at 2**32-1 and ``max_producer_bytes``
    at 2**64-1. A block of all zero bytes means "not announced" (decoded as
    ``limits=None``), so an announced block has ``max_frames_in_flight`` >= 1.
    """

    max_frames_in_flight: int
    max_producer_bytes: int
    receive_timeout_ms: int
    min_receive_rate: int
    max_priority: int = 255

    def payload_budget_s(self, payload_len: int) -> float | None:
        """Seconds a payload of ``payload_len`` bytes may take to arrive; None = no budget.

        ``receive_timeout_ms`` = 0 means the server applies no payload time
        budget; ``min_receive_rate`` = 0 means no per-byte allowance (the
        budget is ``receive_timeout_ms`` alone).
        """
        if self.receive_timeout_ms == 0:
            return None
        rate = payload_len / self.min_receive_rate if self.min_receive_rate else 0.0
        return self.receive_timeout_ms / 1000 + rate


@dataclass(frozen=True)
class Welcome:
    status: Status
    max_payload: int
    ring_bytes: int
    message: str = ""
    version: int = VERSION
    limits: Limits | None = None  # v2 only; None: not announced (v1, refusals, or a server that does not say)


def token_problem(token: str) -> str | None:
    """Why a HELLO cannot carry ``token``, or None."""
    if (size := len(token.encode())) > MAX_TOKEN:
        return f"must be at most {MAX_TOKEN} UTF-8 bytes, got {size} (a HELLO carries no more)"
    return None


def encode_hello(hello: Hello) -> bytes:
    if (why := token_problem(hello.token)) is not None:
        raise ValueError(f"auth token {why}")
    token = hello.token.encode()
    return _HELLO.pack(HELLO_MAGIC, hello.version, len(token)) + token


def decode_hello(buf: bytes | memoryview) -> tuple[Hello, int] | None:
    """Parse a HELLO; returns (hello, bytes consumed) or None if incomplete.

    Any version decodes: judging it (UNSUPPORTED_VERSION) is the server's job.
    """
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


def welcome_size(version: int) -> int:
    """Size of the fixed part (before the message) of a WELCOME with this version field.

    Version 2 has the limits block; every other version, 1 and the refusal of
    an unsupported version included, is read in the v1 layout.
    """
    return WELCOME_V2_SIZE if version == 2 else WELCOME_V1_SIZE


def encode_welcome(welcome: Welcome) -> bytes:
    """Encode in the layout of ``welcome.version``: v2 writes the limits block
    (zeros when ``limits`` is None: not announced), any other version the v1
    layout (``limits`` is then not sent).
    """
    msg = welcome.message.encode()[:MAX_MESSAGE]
    status = status_for(welcome.status, welcome.version)
    head = _WELCOME.pack(WELCOME_MAGIC, welcome.version, status, welcome.max_payload, welcome.ring_bytes, len(msg))
    if welcome_size(welcome.version) == WELCOME_V2_SIZE:
        head += _encode_limits(welcome.limits)
    return head + msg


def _encode_limits(limits: Limits | None) -> bytes:
    if limits is None:
        return bytes(LIMITS_SIZE)
    for name in ("max_frames_in_flight", "max_producer_bytes", "receive_timeout_ms", "min_receive_rate"):
        if getattr(limits, name) < 0:
            raise ValueError(f"limits.{name} must not be negative, got {getattr(limits, name)}")
    if limits.max_frames_in_flight == 0:
        raise ValueError("limits.max_frames_in_flight must be at least 1 (an all-zero block means 'not announced')")
    if not 0 <= limits.max_priority <= _U8:
        raise ValueError(f"limits.max_priority must be 0..255, got {limits.max_priority}")
    return _LIMITS.pack(
        min(limits.max_frames_in_flight, _U32), min(limits.max_producer_bytes, _U64),
        min(limits.receive_timeout_ms, _U32), min(limits.min_receive_rate, _U32), limits.max_priority,
    )  # fmt: skip


def decode_welcome(buf: bytes | memoryview) -> tuple[Welcome, int] | None:
    """Parse a WELCOME of either layout (chosen by its version field at offset 4)."""
    if len(buf) < 6:
        if len(buf) >= 4 and bytes(buf[:4]) != WELCOME_MAGIC:
            raise ProtocolError(Status.BAD_FRAME, f"expected WELCOME magic {WELCOME_MAGIC!r}, got {bytes(buf[:4])!r}")
        return None
    fixed = welcome_size(int.from_bytes(buf[4:6], "little"))
    if len(buf) < fixed:
        return None
    magic, version, status, max_payload, ring_bytes, msg_len = _WELCOME.unpack_from(buf)
    if magic != WELCOME_MAGIC:
        raise ProtocolError(Status.BAD_FRAME, f"expected WELCOME magic {WELCOME_MAGIC!r}, got {bytes(magic)!r}")
    end = fixed + msg_len
    if len(buf) < end:
        return None
    limits = None
    if fixed == WELCOME_V2_SIZE and any(buf[WELCOME_V1_SIZE:WELCOME_V2_SIZE]):
        limits = Limits(*_LIMITS.unpack_from(buf, WELCOME_V1_SIZE))
        if limits.max_frames_in_flight == 0:  # (a producer waiting for room below it would wait forever)
            raise ProtocolError(Status.BAD_FRAME, "WELCOME announces limits with max_frames_in_flight 0 (at least 1)")
    message = bytes(buf[fixed:end]).decode(errors="replace")
    return Welcome(_status(status), max_payload, ring_bytes, message, version, limits), end


# --- FRAME ----------------------------------------------------------------

# magic, version, dtype, ndim, priority, flags, model_len, reserved(u16),
# stream_id, sequence, payload_len, timestamp_ns, deadline_us, reserved(u32)
_FRAME = struct.Struct("<4sBBBBBBHIQQQII")
FRAME_HEADER_SIZE = _FRAME.size  # 48
_SHAPES = [struct.Struct(f"<{n}I") for n in range(256)]  # shape fields by ndim (a u8 on the wire)
_KNOWN_FRAME_FLAGS = int(FrameFlags.LIVE | FrameFlags.SUBSCRIBERS)
_FRAME_FLAGS = [FrameFlags(f) for f in range(_KNOWN_FRAME_FLAGS + 1)]  # making an IntFlag per frame is slow
_MODEL_NAMES: dict[bytes, str] = {}  # decoded model names: a handful in practice
_MODEL_NAMES_CACHED = 1024


class FrameHeader(NamedTuple):
    """One frame's header. ``deadline_us`` is a budget from server arrival (0 = none).

    The header types are named tuples: made once per frame on the hot path,
    and a tuple is several times cheaper to build than a frozen dataclass.
    """

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
    version: int = FRAME_VERSION

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
    return head + model + _SHAPES[len(h.shape)].pack(*h.shape)


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
    if buf[4] != FRAME_VERSION:
        raise ProtocolError(
            Status.UNSUPPORTED_VERSION,
            f"frame version {buf[4]} is not supported (frames are version {FRAME_VERSION})",
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
    name = bytes(buf[FRAME_HEADER_SIZE : FRAME_HEADER_SIZE + model_len])
    model = _MODEL_NAMES.get(name)
    if model is None:
        try:
            model = name.decode()
        except UnicodeDecodeError:
            raise ProtocolError(Status.BAD_FRAME, "model name is not valid UTF-8") from None
        if len(_MODEL_NAMES) < _MODEL_NAMES_CACHED:  # bounded: a producer inventing names cannot grow it
            _MODEL_NAMES[name] = model
    shape = _SHAPES[ndim].unpack_from(buf, FRAME_HEADER_SIZE + model_len)
    # tuple.__new__: the NamedTuple's own __new__ is a Python call, per frame
    flag_set = _FRAME_FLAGS[flags & _KNOWN_FRAME_FLAGS]
    header = _new_tuple(FrameHeader, (stream_id, sequence, model, dtype, shape, payload_len, timestamp_ns,
                                      deadline_us, priority, flag_set, version))  # fmt: skip
    return header, end


# --- REPLY ----------------------------------------------------------------


class Timings(NamedTuple):
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


# magic, version, status, dtype, ndim, message_len, flags(u16; reserved in v1),
# stream_id, sequence, payload_len, timestamp_ns (echoed), receive, queue,
# transfer, compute, total (u32 us), batch_size (u16), reserved(u16)
_REPLY = struct.Struct("<4sBBBBHHIQQQIIIIIHH")
REPLY_HEADER_SIZE = _REPLY.size  # 64


class ReplyHeader(NamedTuple):
    stream_id: int
    sequence: int
    status: Status
    dtype_code: int = 0
    shape: tuple[int, ...] = ()
    payload_len: int = 0
    timestamp_ns: int = 0
    timings: Timings = Timings()
    message: str = ""
    flags: ReplyFlags = ReplyFlags.NONE  # CONNECTION: about the connection, not a frame (stream_id/sequence 0)


def message_bytes(message: str) -> bytes:
    """A reply's message as sent: UTF-8, at most ``MAX_MESSAGE`` bytes, cut on a character boundary."""
    msg = message.encode() if message else b""
    if len(msg) > MAX_MESSAGE:  # (the message stays UTF-8)
        msg = msg[:MAX_MESSAGE].decode(errors="ignore").encode()
    return msg


def encode_reply(h: ReplyHeader, payload: bytes | memoryview = b"", version: int = VERSION) -> list[bytes | memoryview]:
    """Encode a reply as buffers for ``transport.writelines`` (no payload copy).

    ``version`` is the connection's protocol version: a status that version
    does not know is replaced by its stand-in (:func:`status_for`). ``flags``
    is written in every version (v1 readers ignore that field).
    """
    msg = message_bytes(h.message)
    payload = memoryview(payload).cast("B")  # len() of a typed view counts items, not bytes
    t = h.timings
    status = h.status if version >= 2 or h.status in V1_STATUSES else status_for(h.status, version)
    head = _REPLY.pack(
        REPLY_MAGIC, REPLY_VERSION, status, h.dtype_code, len(h.shape), len(msg), h.flags,
        h.stream_id, h.sequence, len(payload), h.timestamp_ns,
        min(t.receive_us, _U32), min(t.queue_us, _U32), min(t.transfer_us, _U32),
        min(t.compute_us, _U32), min(t.total_us, _U32), min(t.batch_size, 0xFFFF), 0,
    )  # fmt: skip
    parts: list[bytes | memoryview] = [head + msg + _SHAPES[len(h.shape)].pack(*h.shape)]
    if len(payload):
        parts.append(payload)
    return parts


# _REPLY as a numpy record, for encoding many OK replies at once (the same bytes as ``encode_reply``)
_REPLY_FIELDS = [("magic", "S4"), ("version", "u1"), ("status", "u1"), ("dtype", "u1"), ("ndim", "u1"),
                 ("message_len", "<u2"), ("flags", "<u2"), ("stream_id", "<u4"), ("sequence", "<u8"),
                 ("payload_len", "<u8"), ("timestamp_ns", "<u8"), ("timings", "<u4", (5,)), ("batch_size", "<u2"),
                 ("pad", "<u2")]  # fmt: skip
_OK_REPLY_TYPES: dict[tuple[np.dtype, tuple[int, ...]], tuple[np.dtype, np.ndarray]] = {}


def row_record(head: Sequence[tuple[object, ...]], dtype: np.dtype, shape: tuple[int, ...],
               **constants: object) -> tuple[np.dtype, np.ndarray]:  # fmt: skip
    """A packed numpy record that carries one result row: the fields ``head`` (which name ``dtype``,
    ``ndim`` and ``payload_len``), ``shape`` (u32 each; none for a scalar), then a row of ``dtype`` and
    ``shape`` (``data``); and the bytes before ``data`` of such a record (as uint8), with the row's
    dtype code, ndim, size and shape and the ``constants`` filled in, for encoding many at once:
    broadcast as plain bytes (a structured copy of the fields is ~20x slower), then the rest set."""
    if len(shape) > MAX_NDIM:
        raise ValueError(f"a result has at most {MAX_NDIM} dimensions, got shape {shape}")
    code = dtype_code(dtype)
    fields: list[tuple[object, ...]] = list(head)
    if shape:
        fields.append(("shape", "<u4", (len(shape),)))
    fields.append(("data", DTYPES[code], shape))
    rtype = np.dtype(fields)  # packed: no padding, as a struct's "<"
    record = np.zeros((), rtype)
    record["dtype"], record["ndim"], record["payload_len"] = code, len(shape), rtype["data"].itemsize
    if shape:
        record["shape"] = shape
    for name, value in constants.items():
        record[name] = value
    return rtype, np.frombuffer(record.tobytes(), np.uint8)[: rtype.itemsize - rtype["data"].itemsize].copy()


def encode_ok_replies(fields: np.ndarray, rows: np.ndarray, timings: np.ndarray) -> memoryview:
    """The OK replies (no message) of several frames at once: the bytes ``encode_reply(reply_to(...))``
    gives each, joined, in one array (a view of it).

    ``fields[i]`` is frame i's (stream_id, sequence, timestamp_ns), ``rows[i]`` its result, ``timings[i]``
    its ``Timings`` as six int64. OK means the same in every protocol version: this serves all of them.
    """
    key = (rows.dtype, rows.shape[1:])
    known = _OK_REPLY_TYPES.get(key)
    if known is None:
        known = _OK_REPLY_TYPES[key] = row_record(_REPLY_FIELDS, rows.dtype, rows.shape[1:], magic=REPLY_MAGIC,
                                                  version=REPLY_VERSION, status=Status.OK)  # fmt: skip
    rtype, prefix = known
    out = np.empty(len(rows), rtype)
    out.view(np.uint8).reshape(len(rows), rtype.itemsize)[:, : len(prefix)] = prefix
    out["stream_id"], out["sequence"], out["timestamp_ns"] = fields[:, 0], fields[:, 1], fields[:, 2]
    out["timings"] = np.clip(timings[:, :5], 0, _U32)
    out["batch_size"] = np.clip(timings[:, 5], 0, 0xFFFF)
    out["data"] = rows
    return out.view(np.uint8).data


_NO_TIMINGS = Timings()


def reply_to(
    h: FrameHeader,
    status: Status,
    message: str = "",
    result: np.ndarray | None = None,
    timings: Timings = _NO_TIMINGS,
    outputs: dict[str, np.ndarray] | Sequence[np.ndarray] | None = None,
    *,
    version: int = VERSION,
) -> tuple[ReplyHeader, memoryview]:
    """The reply to the frame ``h`` (an ``Outcome``'s fields, in its order): header and result bytes (no copy).

    Several ``outputs`` go as an outputs block (``ReplyFlags.OUTPUTS``) when ``version`` >= 2; an
    older version gets the first (``result``) and a message saying so.
    """
    if outputs is not None:
        if version >= 2:
            block = encode_outputs(outputs)
            reply = ReplyHeader(h.stream_id, h.sequence, status, 0, (), len(block), h.timestamp_ns, timings, message,
                                ReplyFlags.OUTPUTS)  # fmt: skip
            return reply, memoryview(block)
        message = first_output_note(outputs)
    if result is None:
        return ReplyHeader(h.stream_id, h.sequence, status, timestamp_ns=h.timestamp_ns, timings=timings,
                           message=message), memoryview(b"")  # fmt: skip
    payload = result.reshape(-1).view("u1").data
    reply = ReplyHeader(
        h.stream_id, h.sequence, status, dtype_code(result.dtype), tuple(result.shape), payload.nbytes, h.timestamp_ns,
        timings, message,
    )  # fmt: skip
    return reply, payload


def decode_reply(buf: bytes | memoryview) -> tuple[ReplyHeader, memoryview, int] | None:
    """Parse a whole reply; returns (header, payload view, bytes consumed) or None."""
    if len(buf) < REPLY_HEADER_SIZE:
        return None
    (magic, _version, status, dtype, ndim, msg_len, flags, stream_id, sequence, payload_len, ts,
     rx, q, tr, comp, total, bs, _r2) = _REPLY.unpack_from(buf)  # fmt: skip
    if magic != REPLY_MAGIC:
        raise ProtocolError(Status.BAD_FRAME, f"bad reply magic {bytes(magic)!r}")
    shape_at = REPLY_HEADER_SIZE + msg_len
    payload_at = shape_at + 4 * ndim
    end = payload_at + payload_len
    if len(buf) < end:
        return None
    message = bytes(buf[REPLY_HEADER_SIZE:shape_at]).decode(errors="replace")
    shape = _SHAPES[ndim].unpack_from(buf, shape_at)
    header = ReplyHeader(
        stream_id=stream_id, sequence=sequence, status=_status(status), dtype_code=dtype, shape=tuple(shape),
        payload_len=payload_len, timestamp_ns=ts, timings=Timings(rx, q, tr, comp, total, bs), message=message,
        flags=ReplyFlags(flags & _KNOWN_REPLY_FLAGS),
    )  # fmt: skip
    return header, memoryview(buf)[payload_at:end], end


_KNOWN_REPLY_FLAGS = int(ReplyFlags.CONNECTION | ReplyFlags.OUTPUTS)
_OUTPUTS = struct.Struct("<HH")  # count, reserved (0)
_OUTPUT = struct.Struct("<BBHQ")  # dtype, ndim, name_len, nbytes; then name, shape (ndim x u32), data
MAX_OUTPUTS = 0xFFFF


def encode_outputs(outputs: dict[str, np.ndarray] | Sequence[np.ndarray]) -> bytes:
    """An outputs block: several result tensors, named by the dict's keys (a sequence: each name "").

    Layout (docs/PROTOCOL.md section 5.2): u16 count, u16 reserved, then per
    output u8 dtype, u8 ndim, u16 name_len, u64 nbytes, the UTF-8 name, the
    shape (ndim x u32) and nbytes of little-endian data.
    """
    if len(outputs) > MAX_OUTPUTS:
        raise ValueError(f"at most {MAX_OUTPUTS} outputs, got {len(outputs)}")
    named = outputs.items() if isinstance(outputs, dict) else (("", array) for array in outputs)
    parts: list[bytes | memoryview] = [_OUTPUTS.pack(len(outputs), 0)]
    for name, array in named:
        raw = name.encode()
        if len(raw) > 0xFFFF or array.ndim > MAX_NDIM:
            raise ValueError(f"output {name!r}: name over 65535 bytes or more than {MAX_NDIM} dimensions")
        data = np.asarray(array, order="C")  # (not ascontiguousarray: it makes a 0-d output 1-d)
        if data.dtype.byteorder == ">":
            data = data.astype(data.dtype.newbyteorder("<"))
        parts += [_OUTPUT.pack(dtype_code(data.dtype), data.ndim, len(raw), data.nbytes), raw,
                  _SHAPES[data.ndim].pack(*data.shape), data.reshape(-1).view("u1").data]  # fmt: skip
    return b"".join(parts)


def first_output_note(
    outputs: dict[str, np.ndarray] | Sequence[np.ndarray],
    carrier: str = "protocol v1",
    remedy: str = "connect with protocol version 2 to receive all of them",
) -> str:
    """The message of a reply that holds only the first of a model's several outputs: what carries it (a v1
    connection, by default) and how to get them all."""
    first = f" ({next(iter(outputs))!r})" if isinstance(outputs, dict) else ""
    return f"the model returns {len(outputs)} outputs; {carrier} carries only the first{first}: {remedy}"


def decode_outputs(payload: bytes | memoryview) -> list[tuple[str, np.ndarray]]:
    """The (name, array) pairs of an outputs block; the arrays are copies. ProtocolError when malformed."""
    buf = memoryview(payload).cast("B")
    if len(buf) < _OUTPUTS.size:
        raise ProtocolError(Status.BAD_FRAME, "outputs block shorter than its 4-byte count")
    count, _ = _OUTPUTS.unpack_from(buf)
    at, out = _OUTPUTS.size, []
    for i in range(count):
        if len(buf) < at + _OUTPUT.size:
            raise ProtocolError(Status.BAD_FRAME, f"outputs block ends inside output {i}'s header")
        code, ndim, name_len, nbytes = _OUTPUT.unpack_from(buf, at)
        dt = DTYPES.get(code)
        if dt is None or ndim > MAX_NDIM:
            raise ProtocolError(Status.BAD_FRAME, f"output {i}: unknown dtype code {code} or ndim {ndim} > {MAX_NDIM}")
        at += _OUTPUT.size
        shape_at = at + name_len
        data_at = shape_at + 4 * ndim
        if len(buf) < data_at + nbytes:
            raise ProtocolError(Status.BAD_FRAME, f"outputs block ends inside output {i}")
        name = bytes(buf[at:shape_at]).decode(errors="replace")
        shape = _SHAPES[ndim].unpack_from(buf, shape_at)
        if dt.itemsize * math.prod(shape) != nbytes:
            raise ProtocolError(Status.BAD_FRAME, f"output {i}: shape {list(shape)} of {dt.name} is not {nbytes} bytes")
        out.append((name, np.frombuffer(buf[data_at : data_at + nbytes], dtype=dt).reshape(shape).copy()))
        at = data_at + nbytes
    if at != len(buf):
        raise ProtocolError(Status.BAD_FRAME, f"outputs block has {len(buf) - at} bytes after its {count} outputs")
    return out


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
