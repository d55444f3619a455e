"""UDP datagrams: frames and replies split into chunks. Pure encoding and decoding, no I/O.

docs/PROTOCOL.md section 11 is the normative description. Every datagram
starts with a 32-byte chunk header (:data:`HEADER_DTYPE`, little-endian)::

    magic "SGUD" | version u8 | kind u8 | flags u16 | stream_id u32 | sequence u64
    | chunk_index u16 | chunk_count u16 | offset u32 | length u32

``length`` is the message's *payload* length (a frame's tensor bytes, a
reply's result bytes) and ``offset`` where this chunk's bytes go in it. Chunk
0 carries, between its chunk header and its payload bytes, the message header
exactly as TCP sends it: a FRAME header (:func:`wire.encode_frame_header`:
48 bytes + model name + shape) or a REPLY header (64 bytes + message + shape,
see :func:`wire.encode_reply`). So a receiver knows the payload length and
where every byte goes from any chunk, and the model, shape and the rest from
chunk 0, whatever order the datagrams come in.

A receive batch's headers are parsed at once: :func:`check_batch` takes a
structured array of headers (one row per datagram) and their lengths and
returns a verdict per datagram, and :func:`group` sorts the good ones into
messages, with no Python loop per datagram.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np

from streamgpu.protocol import wire
from streamgpu.protocol.wire import FrameHeader, ReplyHeader

MAGIC = b"SGUD"
MAGIC_U32 = int.from_bytes(MAGIC, "little")
UDP_VERSION = 1
HEADER_SIZE = 32
# 1500-byte Ethernet MTU less the IPv6 (40) and UDP (8) headers: one datagram fits a 1500 MTU over IPv4 and IPv6.
DEFAULT_DATAGRAM_BYTES = 1452
MAX_DATAGRAM_BYTES = 65507  # the largest UDP payload over IPv4
# Chunk 0 must hold its chunk header, the largest frame header (model name 255 bytes, 8 dimensions) and one byte.
MIN_DATAGRAM_BYTES = 512
MAX_CHUNKS = 0xFFFF
MAX_LENGTH = 0xFFFFFFFF

_CHUNK = struct.Struct("<4sBBHIQHHII")
assert _CHUNK.size == HEADER_SIZE

HEADER_DTYPE = np.dtype(
    [
        ("magic", "<u4"),
        ("version", "u1"),
        ("kind", "u1"),
        ("flags", "<u2"),
        ("stream_id", "<u4"),
        ("sequence", "<u8"),
        ("index", "<u2"),
        ("count", "<u2"),
        ("offset", "<u4"),
        ("length", "<u4"),
    ]
)
assert HEADER_DTYPE.itemsize == HEADER_SIZE


class Kind(enum.IntEnum):
    """What a datagram carries a chunk of."""

    FRAME = 1  # producer -> server
    REPLY = 2  # server -> producer


class Verdict(enum.IntEnum):
    """What :func:`check_batch` says about one datagram. Values index the server's bad-datagram counters."""

    OK = 0
    TRUNCATED = 1  # shorter than its chunk header (or, for chunk 0, than the message header it announces)
    OVERSIZED = 2  # larger than the receiver's datagram buffer (cut off by the kernel)
    BAD_HEADER = 3  # wrong magic, version or kind
    BAD_CHUNK = 4  # chunk_index >= chunk_count (so also chunk_count 0)
    PAST_END = 5  # offset + bytes past the message length, or chunk 0 not at offset 0


class ChunkHeader(NamedTuple):
    kind: Kind
    stream_id: int
    sequence: int
    chunk_index: int
    chunk_count: int
    offset: int
    length: int
    flags: int = 0


def encode_chunk_header(h: ChunkHeader) -> bytes:
    return _CHUNK.pack(MAGIC, UDP_VERSION, h.kind, h.flags, h.stream_id, h.sequence, h.chunk_index, h.chunk_count,
                       h.offset, h.length)  # fmt: skip


def decode_chunk_header(buf: bytes | memoryview) -> ChunkHeader:
    """One datagram's chunk header; ValueError (with the reason) for a datagram that is not one."""
    if len(buf) < HEADER_SIZE:
        raise ValueError(f"datagram of {len(buf)} bytes is shorter than the {HEADER_SIZE}-byte chunk header")
    magic, version, kind, flags, stream_id, sequence, index, count, offset, length = _CHUNK.unpack_from(buf)
    if magic != MAGIC or version != UDP_VERSION or kind not in (Kind.FRAME, Kind.REPLY):
        raise ValueError(f"not a version {UDP_VERSION} chunk: magic {bytes(magic)!r}, version {version}, kind {kind}")
    if not index < count:
        raise ValueError(f"chunk index {index} is not below chunk count {count}")
    if count > length + 1:
        raise ValueError(f"chunk count {count}: more chunks than the {length} payload bytes + 1")
    return ChunkHeader(Kind(kind), stream_id, sequence, index, count, offset, length, flags)


def chunk_spans(head_len: int, length: int, datagram_bytes: int = DEFAULT_DATAGRAM_BYTES) -> list[tuple[int, int]]:
    """(offset, nbytes) of every chunk's payload bytes for a message whose header is ``head_len`` bytes.

    Chunk 0 holds the message header and as many payload bytes as fit after
    it; each later chunk holds ``datagram_bytes - HEADER_SIZE`` bytes (the last
    one what is left). ValueError when the message needs more than 65535
    chunks or the header does not fit one datagram.
    """
    if not MIN_DATAGRAM_BYTES <= datagram_bytes <= MAX_DATAGRAM_BYTES:
        raise ValueError(f"datagram_bytes must be {MIN_DATAGRAM_BYTES}..{MAX_DATAGRAM_BYTES}, got {datagram_bytes}")
    first = datagram_bytes - HEADER_SIZE - head_len
    if first < 0:
        raise ValueError(f"a message header of {head_len} bytes does not fit a {datagram_bytes}-byte datagram")
    if length > MAX_LENGTH:
        raise ValueError(f"a payload of {length} bytes exceeds the UDP limit of {MAX_LENGTH}")
    spans = [(0, min(first, length))]
    step = datagram_bytes - HEADER_SIZE
    spans += [(off, min(step, length - off)) for off in range(spans[0][1], length, step)]
    if len(spans) > MAX_CHUNKS:
        raise ValueError(
            f"a payload of {length} bytes needs {len(spans)} datagrams of {datagram_bytes} bytes; at most {MAX_CHUNKS}"
        )
    return spans


class Datagrams:
    """A message as datagrams, laid out for one vectored send: no Python object per datagram.

    ``heads``: every chunk header, 32 bytes each, back to back; ``head``: the
    message header, sent in chunk 0 after its chunk header; datagram ``i``
    then carries ``sizes[i]`` payload bytes from ``offsets[i]``. Indexing
    and iterating give one datagram's buffers (a list for ``socket.sendmsg``,
    the payload not copied); ``streamgpu.mmsg.Sender`` sends them all with
    ``sendmmsg`` from these arrays.
    """

    __slots__ = ("head", "heads", "offsets", "payload", "sizes")

    def __init__(self, heads: bytes, head: bytes, payload: memoryview, offsets: np.ndarray, sizes: np.ndarray) -> None:
        self.heads = heads
        self.head = head
        self.payload = payload
        self.offsets = offsets
        self.sizes = sizes

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int) -> list[bytes | memoryview]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"datagram {i} of {len(self)}")
        i %= len(self)
        parts: list[bytes | memoryview] = [memoryview(self.heads)[i * HEADER_SIZE : (i + 1) * HEADER_SIZE]]
        if i == 0:
            parts.append(self.head)
        off, n = int(self.offsets[i]), int(self.sizes[i])
        if n:
            parts.append(self.payload[off : off + n])
        return parts

    def __iter__(self) -> Iterator[list[bytes | memoryview]]:
        return (self[i] for i in range(len(self)))


def _datagrams(
    kind: Kind, stream_id: int, sequence: int, head: bytes, payload: memoryview, datagram_bytes: int
) -> Datagrams:
    length = len(payload)
    if not MIN_DATAGRAM_BYTES <= datagram_bytes <= MAX_DATAGRAM_BYTES:
        raise ValueError(f"datagram_bytes must be {MIN_DATAGRAM_BYTES}..{MAX_DATAGRAM_BYTES}, got {datagram_bytes}")
    first = datagram_bytes - HEADER_SIZE - len(head)
    if first < 0 or length > MAX_LENGTH:
        chunk_spans(len(head), length, datagram_bytes)  # raises, saying why
    if length <= first:  # the common reply (a status, a small result): one datagram, no numpy per header
        chunk = _CHUNK.pack(MAGIC, UDP_VERSION, kind, 0, stream_id, sequence, 0, 1, 0, length)
        return Datagrams(chunk, head, payload, np.zeros(1, np.int64), np.full(1, length, np.int64))
    layout = _LAYOUTS.get((kind, len(head), length, datagram_bytes))
    if layout is None:
        layout = _layout(kind, len(head), length, datagram_bytes)
    template, offsets, sizes = layout
    heads = template.copy()  # a camera sends one size again and again: only stream and sequence change
    heads["stream_id"] = stream_id
    heads["sequence"] = sequence
    return Datagrams(heads.tobytes(), head, payload, offsets, sizes)


_LAYOUTS: dict[tuple[int, int, int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
_LAYOUTS_KEPT = 64


def _layout(kind: int, head_len: int, length: int, datagram_bytes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A multi-datagram message's chunk headers (stream and sequence 0), payload offsets and sizes."""
    first = datagram_bytes - HEADER_SIZE - head_len
    step = datagram_bytes - HEADER_SIZE
    n = 1 + -(-(length - first) // step)
    if n > MAX_CHUNKS:
        chunk_spans(head_len, length, datagram_bytes)  # raises, saying why
    offsets = np.zeros(n, np.int64)
    offsets[1:] = first + step * np.arange(n - 1)
    sizes = np.minimum(np.diff(offsets, append=length), step)
    heads = np.zeros(n, HEADER_DTYPE)  # every chunk header of the message in one go
    heads["magic"] = MAGIC_U32
    heads["version"] = UDP_VERSION
    heads["kind"] = kind
    heads["index"] = np.arange(n)
    heads["count"] = n
    heads["offset"] = offsets
    heads["length"] = length
    if len(_LAYOUTS) >= _LAYOUTS_KEPT:
        _LAYOUTS.clear()
    _LAYOUTS[(kind, head_len, length, datagram_bytes)] = (heads, offsets, sizes)
    return heads, offsets, sizes


def frame_datagrams(
    header: FrameHeader, payload: bytes | memoryview, datagram_bytes: int = DEFAULT_DATAGRAM_BYTES
) -> Datagrams:
    """A frame as datagrams (:class:`Datagrams`: each a list of buffers for ``socket.sendmsg``; the
    payload is not copied). Chunk 0 and the rest as :func:`chunk_spans` says."""
    view = memoryview(payload).cast("B")
    if len(view) != header.payload_len:
        raise ValueError(f"payload is {len(view)} bytes, header says {header.payload_len}")
    head = wire.encode_frame_header(header)
    return _datagrams(Kind.FRAME, header.stream_id, header.sequence, head, view, datagram_bytes)


def reply_datagrams(
    header: ReplyHeader, payload: bytes | memoryview = b"", datagram_bytes: int = DEFAULT_DATAGRAM_BYTES
) -> Datagrams:
    """A reply as datagrams (chunk 0: chunk header + REPLY header + message + shape + result bytes).

    Chunk 0 must hold the whole REPLY header: a longer message (a model's error text, a refusal quoting a
    hostile model name) is cut to fit, on a character boundary, so that every reply can go.
    """
    room = datagram_bytes - HEADER_SIZE - wire.REPLY_HEADER_SIZE - 4 * len(header.shape)
    if header.message and len(message := header.message.encode()) > room:
        header = header._replace(message=message[: max(room, 0)].decode(errors="ignore"))
    parts = wire.encode_reply(header, payload)
    head = bytes(parts[0])
    view = memoryview(parts[1]).cast("B") if len(parts) > 1 else memoryview(b"")
    return _datagrams(Kind.REPLY, header.stream_id, header.sequence, head, view, datagram_bytes)


def header_view(area: np.ndarray) -> np.ndarray:
    """The chunk headers at the start of each row of a 2-D uint8 packet area, as a structured array (no copy)."""
    if area.dtype != np.uint8 or area.ndim != 2 or area.shape[1] < HEADER_SIZE:
        raise ValueError("the packet area must be a 2-D uint8 array with rows of at least HEADER_SIZE bytes")
    return np.ndarray(area.shape[:1], HEADER_DTYPE, area, 0, (area.strides[0],))


def words(heads: np.ndarray) -> np.ndarray:
    """A batch of chunk headers as an (n, 8) array of little-endian u32 words (no copy when contiguous).

    Word 0 is the magic, word 1 version | kind << 8 | flags << 16, word 2
    stream_id, words 3-4 the sequence, word 5 chunk_index | chunk_count << 16,
    word 6 offset, word 7 length: comparing whole words is what makes the batch
    checks cheap.
    """
    return np.ascontiguousarray(heads).view("<u4").reshape(len(heads), HEADER_SIZE // 4)


def check_batch(heads: np.ndarray, lengths: np.ndarray, kind: Kind, truncated: np.ndarray | None = None) -> np.ndarray:
    """A :class:`Verdict` per datagram of a receive batch (uint8 array), numpy over the whole batch.

    ``heads``: the batch's chunk headers (:data:`HEADER_DTYPE`, contiguous),
    ``lengths``: each datagram's size in bytes, ``truncated``: True where the
    kernel cut a datagram off or it is over the receiver's limit. The checks
    that need chunk 0's message header (its length, and that it agrees with
    the chunk header) are the receiver's, once per frame. A batch without a
    bad datagram costs a dozen numpy operations, whatever its size.
    """
    w = words(heads)
    body = lengths.astype(np.int64) - HEADER_SIZE
    index = w[:, 5] & 0xFFFF
    count = w[:, 5] >> 16
    offset = w[:, 6].astype(np.int64)
    bad_header = (w[:, 0] != MAGIC_U32) | ((w[:, 1] & 0xFFFF) != (UDP_VERSION | int(kind) << 8))
    # also catches chunk_count 0; every chunk but chunk 0 carries a byte, so that a receiver's per-chunk
    # state is bounded by the payload it reserved (not 65535 chunks claimed for a 0-byte frame)
    bad_chunk = (index >= count) | (count > w[:, 7].astype(np.int64) + 1)
    past = np.where(index == 0, offset != 0, offset + body > w[:, 7])
    short = body < 0
    bad = bad_header | bad_chunk | past | short
    if truncated is not None:
        bad |= truncated
    verdict = np.zeros(len(lengths), np.uint8)
    if not bad.any():
        return verdict
    # Each rule in order of precedence: a later (weaker) one does not overwrite an earlier one.
    for value, mask in ((Verdict.PAST_END, past), (Verdict.BAD_CHUNK, bad_chunk), (Verdict.BAD_HEADER, bad_header),
                        (Verdict.TRUNCATED, short), (Verdict.OVERSIZED, truncated)):  # fmt: skip
        if mask is not None:
            verdict[mask] = value
    return verdict


class Groups(NamedTuple):
    """A receive batch's good datagrams grouped by message (:func:`group`); every array is in sorted order."""

    order: np.ndarray  # positions (into the datagrams given) sorted by sender, stream, sequence, chunk index
    starts: np.ndarray  # where each message's datagrams start in ``order``
    ends: np.ndarray  # ... and end
    group: np.ndarray  # per sorted datagram: its message's number (0 .. len(starts) - 1)
    repeat: np.ndarray  # per sorted datagram: True when the one before it is the same chunk of the same message
    first: np.ndarray  # per message: the position of its first-arriving datagram (so: arrival order of messages)


def group(w: np.ndarray, senders: np.ndarray | None = None) -> Groups:
    """Group a batch's datagrams by message, numpy over the batch (a sort and a few compares).

    ``w``: their header words (:func:`words`), ``senders``: a row of u64 per
    datagram naming its sender (None: all from one). A message is one sender's
    ``(stream_id, sequence)``; within it the datagrams are sorted by chunk
    index, so a chunk that came twice in the batch is marked in ``repeat``
    and chunk 0, when present, is a message's first datagram.
    """
    m = len(w)
    index = w[:, 5] & 0xFFFF
    keys = [index, w[:, 3], w[:, 4], w[:, 2]]
    if senders is not None:
        keys += [senders[:, j] for j in range(senders.shape[1] - 1, -1, -1)]
    order = np.lexsort(keys)  # last key is the primary one
    ws = w[order]
    start = np.ones(m, bool)
    repeat = np.zeros(m, bool)
    if m > 1:
        a, b = ws[:-1], ws[1:]
        same = (b[:, 2] == a[:, 2]) & (b[:, 3] == a[:, 3]) & (b[:, 4] == a[:, 4])
        if senders is not None:
            ss = senders[order]
            same &= (ss[1:] == ss[:-1]).all(axis=1)
        start[1:] = ~same
        repeat[1:] = same & ((b[:, 5] & 0xFFFF) == (a[:, 5] & 0xFFFF))
    starts = np.flatnonzero(start)
    ends = np.append(starts[1:], m)
    return Groups(order, starts, ends, np.cumsum(start) - 1, repeat, np.minimum.reduceat(order, starts))


class Added(enum.IntEnum):
    """What :meth:`Assembly.add` did with a chunk."""

    NEW = 0
    DUPLICATE = 1  # this chunk index arrived before: ignored
    INCONSISTENT = 2  # its count or length disagrees with the message's first chunk: ignored


_SHIFT, _END = np.uint64(32), np.uint64(0xFFFFFFFF)  # Assembly.spans: offset << 32 | end


class Assembly:
    """One message being put together from its chunks, in any order, duplicates ignored.

    ``target`` receives the payload bytes at their offsets (a ring slot on the
    server, a bytearray in the client). Chunk 0's message header is the
    caller's: it passes the bytes after it as the chunk's body.
    """

    __slots__ = ("bytes", "chunks", "count", "has_head", "length", "seen", "spans", "target")

    def __init__(self, count: int, length: int, target: np.ndarray | memoryview | bytearray) -> None:
        self.count = count
        self.length = length
        self.target = np.frombuffer(target, np.uint8) if not isinstance(target, np.ndarray) else target
        self.seen = np.zeros(count, bool)  # per chunk index: the duplicate filter
        # Where each chunk's bytes went, offset << 32 | end, in arrays as chunks come (memory for the chunks that
        # came, not for the count a header claims). Bytes that add up to the length may still overlap and leave
        # a hole (holding whatever the buffer held before); a single chunk cannot, so it is not recorded.
        self.spans: list[np.ndarray] | None = [] if count > 1 else None
        self.chunks = 0
        self.bytes = 0
        self.has_head = False

    def add(self, index: int, count: int, offset: int, length: int, body: memoryview | np.ndarray) -> Added:
        if count != self.count or length != self.length:
            return Added.INCONSISTENT
        if self.seen[index]:
            return Added.DUPLICATE
        n = len(body)
        if offset + n > self.length:  # checked again here for callers that did not run check_batch
            return Added.INCONSISTENT
        self.seen[index] = True
        if self.spans is not None:
            self.spans.append(np.array([offset << 32 | (offset + n)], np.uint64))
        self.chunks += 1
        self.bytes += n
        if n:
            self.target[offset : offset + n] = np.frombuffer(body, np.uint8) if isinstance(body, memoryview) else body
        if index == 0:
            self.has_head = True
        return Added.NEW

    @property
    def all_chunks(self) -> bool:
        return self.chunks == self.count

    @property
    def complete(self) -> bool:
        """Every chunk is in and together they cover the payload exactly once (no overlap, no hole)."""
        if self.chunks != self.count or self.bytes != self.length:
            return False
        if self.spans is None:
            return True
        spans = np.concatenate(self.spans)
        spans.sort()  # by offset: then each chunk must end where the next starts
        if int(spans[0]) >> 32 or int(spans[-1]) & 0xFFFFFFFF != self.length:
            return False
        return bool(((spans[1:] >> _SHIFT) == (spans[:-1] & _END)).all())

    def missing(self) -> int:
        return self.count - self.chunks


def reply_head_length(body: bytes | memoryview) -> int:
    """Bytes of the REPLY header (fixed part + message + shape) at the start of a reply's chunk 0 body."""
    if len(body) < wire.REPLY_HEADER_SIZE:
        raise ValueError(f"chunk 0 of a reply holds {len(body)} bytes, less than a REPLY header")
    ndim, message_len = body[7], int.from_bytes(body[8:10], "little")
    end = wire.REPLY_HEADER_SIZE + message_len + 4 * ndim
    if len(body) < end:
        raise ValueError("chunk 0 of a reply is shorter than its REPLY header")
    return end


def join(parts: Sequence[bytes | memoryview]) -> bytes:
    """One datagram's buffers as bytes (for senders that cannot send a list of buffers)."""
    return b"".join(bytes(p) for p in parts)
