"""The descriptor channel between the scheduling process and its ingest worker processes.

One ``AF_UNIX`` stream socket per worker carries packed records both ways;
each side batches the records of one loop iteration into one write, and the
reader decodes every whole record of one read at once (``struct.iter_unpack``
for the fixed-size upward records). Payload bytes never travel here: they are
in the shared host segment, at the offset a FRAME record names.

Worker -> scheduler: fixed-size records of ``UP.size`` (80) bytes::

    kind u8, priority u8, flags u8, pad u8, index u16, pad u16, conn u32, fid u32,
    offset u64, payload_len u64, stream_id u32, deadline_us u32, sequence u64,
    timestamp_ns u64, received_ns i64, complete_ns i64, deadline_ns i64

* ``FRAME``: an admitted, fully received frame. ``index`` names the model
  (see ``MODELS``; dtype and shape are the model's: admission checked them);
  ``offset``/``payload_len`` locate the payload in the segment; the clocks
  are ``time.perf_counter_ns()`` values (CLOCK_MONOTONIC, the same in every
  process of the machine); ``fid`` names the frame in later records.
* ``OPEN``: connection ``conn`` sent its first frame; ``index`` is 0 for an
  anonymous producer, else 1 + the position of its token in ``Config.tokens``;
  ``priority`` is its priority ceiling; ``flags`` is ``OPEN_TCP`` for a TCP
  connection, ``OPEN_UDP`` for a UDP producer (a source address: "connection"
  below means either). ``conn`` is the worker's number for the connection,
  unique among its connections open up here (their ids modulo 2**32, the next
  free one where that is taken). One TEXT record follows: the connection's
  stream name, NUL-padded (``Origin.stream``: "tcp:wW/N", "tcp:wW.G/N" in the
  G-th replacement of worker W, or a UDP producer's "udp:ADDR:PORT"), under
  which the scheduling process publishes its frames' outcomes, as the worker
  publishes the ones it gives them itself.
* ``ASK``: an OPEN sent at the HELLO of a TCP connection whose named token
  has a ``max_connections``, fields and TEXT as OPEN's: the scheduling
  process, which counts every connection of the token (TCP on every worker,
  HTTP requests, WebSockets), answers ADMIT. Admitted, the connection is open
  up there as after an OPEN (its frames need none; a CLOSED ends it); refused,
  it never was (no CLOSED follows).
* ``CLOSED``: connection ``conn`` is gone (only after its ``OPEN``); ``offset``
  is how many of its frames the worker had not answered (0: none of them can be
  queued in the scheduling process, which then looks for none; a UDP producer
  says 1).
* ``READY``: the worker accepts connections. ``STOPPED``: the worker took its
  last frame (answer to ``STOP``); every FRAME it sent came before this.
* ``REPLIED``: the worker answered without a FRAME sent up (a refused frame, a
  refused handshake, a connection reply): ``priority`` is the status, ``index``
  the model's index (``NO_MODEL_INDEX``: none known). The scheduler counts it
  in its ``Admission.replies``, beside the replies of frames it ran.
* ``ANSWERED``: the worker gave frame ``stream_id``/``sequence`` an outcome
  itself (a refusal, ``INCOMPLETE``, ``SHUTTING_DOWN``, ...): ``priority`` is
  the status, ``flags`` the frame's flags, ``timestamp_ns`` and ``deadline_us``
  the header's, ``received_ns`` the reply's ``total_us``, the byte after ``flags``
  the model name's length in bytes (a name may hold NUL); ``offset`` bytes of
  text follow in that many ``TEXT`` records (see ``answered``): the outcome is
  published on the scheduling process's result hub, where subscribers and the
  results sink are (the REPLIED record counts it; this one tells who).
* ``TEXT``: ``TEXT_BYTES`` bytes of the text of the ANSWERED, OPEN or ASK record before it.
* ``CONNECTIONS``: the worker has taken up ``conn`` of the TCP connections
  handed to it (modulo 2**32; served, refused, found closed, or lost for want
  of a descriptor) and holds ``offset`` open now. Sent whenever either
  changes. The scheduling process hands each connection it accepts to the
  worker holding the fewest, counting those handed and not taken up yet.
* ``ALIVE``: sent at each of the worker's sweeps (at least once a second), so
  that a silent worker is known to be hung (the scheduling process kills it);
  ``offset`` is how many bytes of its range frames hold now (its pool's
  ``used_bytes``: the ring gauge counts those, not the whole range lent).
* ``MODELS_TAKEN``: the worker admits by the MODELS record of generation
  ``offset`` (and every one before) from now on.
* ``STATS``: UDP listener ``conn`` (its position among ``Config.listeners`` of
  kind udp) has the number ``offset`` for ``streamgpu.ingest.udp.STAT_NAMES[index]``
  (a count since the worker started, or a gauge now). Sent for the numbers
  that changed, once per sweep period.

Scheduler -> worker: a ``DOWN.size`` (64) byte head, then ``4 * ndim`` bytes
of shape, ``message_len`` bytes of message and ``payload_len`` bytes of body::

    kind u8, status u8, dtype u8, ndim u8, fid u32, payload_len u64,
    receive_us, queue_us, transfer_us, compute_us, total_us i64, batch_size u32,
    message_len u16, pad u16

* ``RELEASE``: the payloads of ``fid`` frames have been copied to the device;
  their slots may be reused. The body is their fids (u32 each): one record
  for all the releases of a loop iteration. (A frame whose REPLY comes before
  any release is not named: the REPLY releases it.)
* ``REPLY``: frame ``fid`` ended with ``status``; the result (``dtype`` a wire
  dtype code, or ``NO_RESULT``) travels inline: results are small (a row of
  logits), and copying them once into the channel costs less than managing a
  second shared area. A model with several outputs (a tuple or dict of them,
  a ``topk`` postprocess) sends them all: ``dtype`` is ``OUTPUTS_BLOCK``,
  ``ndim`` 0, and the body a wire outputs block (``wire.encode_outputs``;
  unnamed outputs were a tuple). A REPLY also releases the frame's slot.
* ``REPLIES``: the OK results of several frames of one batch (one result
  layout, no message), in one record: ``fid`` is their count, ``dtype`` and
  the shape the layout of one frame's result, as a REPLY's; the body is their
  fids (u32 each), then their timings (six i64 each: the five of the head and
  the batch size), then their results (C order, one after the other). The
  results are written from the batch's own array, never copied into records:
  a batch's are as large as its frames (a megabyte for 256 rows of 1,000
  logits). Each REPLIES frame is released as by its REPLY. A batch of one
  frame is sent as a REPLY (the cheaper to decode).
* ``ADMIT``: the answer to the ASK of connection ``fid`` (its number): ``status``
  OK, or the refusal's (OVERLOADED) with ``message_len`` bytes of message.
* ``STOP``: shutdown step 1 (take no new frames). ``CLOSE``: step 2, close the
  connections, flushing replies for up to ``fid`` milliseconds, then exit.
* ``MODELS``: the models served now, which the worker admits from here on
  (loaded or unloaded while serving), the ``fid``-th such record (it says
  MODELS_TAKEN with that number): the body (``payload_len`` bytes) is a
  pickled list of (index, ``ModelSpec``), the index being what FRAME records
  name it by. The scheduling process never gives an index another meaning (a
  FRAME sent before the change still names what it named); the config's
  models have their positions in ``Config.models``. A worker starts with the
  list of its ``WorkerInit`` (pickled too: both ends are one program).

Everything here is pure (no I/O): the ``workers`` (scheduler side) and
``worker`` (worker process) modules own the sockets.
"""

from __future__ import annotations

import array
import pickle
import struct
from collections.abc import Sequence

import numpy as np

from streamgpu.frame import Outcome
from streamgpu.models.spec import ModelSpec
from streamgpu.protocol import wire
from streamgpu.protocol.wire import FrameHeader, Timings

UP = struct.Struct("<BBBBHHIIQQIIQQqqq")
DOWN = struct.Struct("<BBBBIQqqqqqIHH")
assert UP.size == 80 and DOWN.size == 64

# upward kinds
FRAME, OPEN, CLOSED, READY, STOPPED = 1, 2, 3, 4, 5
REPLIED, STATS, ANSWERED, TEXT, CONNECTIONS, MODELS_TAKEN, ALIVE, ASK = 6, 7, 8, 9, 10, 11, 12, 13
TEXT_BYTES = UP.size - 1  # text per TEXT record: all of it but its kind byte
MAX_TEXT = 4 * TEXT_BYTES + wire.MAX_MESSAGE  # an ANSWERED record's text is cut here
OPEN_TCP, OPEN_UDP = 0, 1  # an OPEN record's flags
NO_MODEL_INDEX = 0xFFFF  # a REPLIED record's index for a reply that names no served model
# downward kinds
RELEASE, REPLY, STOP, CLOSE, MODELS, REPLIES, ADMIT = 1, 2, 3, 4, 5, 6, 7
NO_RESULT = 0  # a REPLY's dtype when there is no result
OUTPUTS_BLOCK = 0xFF  # a REPLY's dtype when its body is an outputs block (a model with several outputs)
_SHAPES = [struct.Struct(f"<{n}I") for n in range(wire.MAX_NDIM + 1)]


def up(kind: int, conn: int = 0, index: int = 0, priority: int = 0, flags: int = 0, value: int = 0) -> bytes:
    """An upward record other than FRAME (OPEN, CLOSED, READY, STOPPED, CONNECTIONS, STATS: ``value`` is its
    ``offset``)."""
    return UP.pack(kind, priority, flags, 0, index, 0, conn, 0, value, 0, 0, 0, 0, 0, 0, 0, 0)


def opened(conn: int, identity: int, max_priority: int, kind: int, stream: str, record: int = OPEN) -> bytes:
    """An OPEN (or ASK) record and the TEXT record of the connection's stream name (cut to ``TEXT_BYTES``)."""
    name = stream.encode()[:TEXT_BYTES].ljust(TEXT_BYTES, b"\0")
    return up(record, conn, identity, max_priority, kind) + _TEXT + name


def text_of(fields: tuple[int, ...]) -> bytes:
    """The text a TEXT record carries (its fields, as ``UP.iter_unpack`` gave them)."""
    return UP.pack(*fields)[1:]


def replied(index: int, status: int) -> bytes:
    """A REPLIED record: the worker answered ``status`` itself, for model ``index`` (or ``NO_MODEL_INDEX``)."""
    return up(REPLIED, 0, index, status)


def answered(header: FrameHeader, outcome: Outcome, source: str, stream: str) -> bytes:
    """An ANSWERED record and its TEXT records: the worker answered ``header``'s frame with ``outcome``
    (published by ``origin`` = (``source``, ``stream``)). The text: source, stream, model, message,
    separated by NUL; the model name (1..255 bytes, NUL allowed) is as long as the record says."""
    model = header.model.encode()
    text = b"\0".join((source.encode(), stream.encode(), model, outcome.message.encode()))[:MAX_TEXT]
    head = UP.pack(ANSWERED, int(outcome.status), int(header.flags) & 0xFF, min(len(model), 255), 0, 0, 0, 0,
                   len(text), 0, header.stream_id, header.deadline_us, header.sequence, header.timestamp_ns,
                   outcome.timings.total_us, 0, 0)  # fmt: skip
    blocks = [_TEXT + text[at : at + TEXT_BYTES].ljust(TEXT_BYTES, b"\0") for at in range(0, len(text), TEXT_BYTES)]
    return head + b"".join(blocks)


class Answer:
    """An ANSWERED record being read: its fields, then its text from the TEXT records after it."""

    __slots__ = ("fields", "text", "want")

    def __init__(self, fields: tuple[int, ...]) -> None:
        self.fields = fields
        self.want = fields[8]  # text bytes to come
        self.text = bytearray()

    @property
    def complete(self) -> bool:
        return len(self.text) >= self.want

    def add(self, fields: tuple[int, ...]) -> None:
        """A TEXT record's fields (as ``UP.iter_unpack`` gave them): its text."""
        self.text += text_of(fields)

    def outcome(self) -> tuple[FrameHeader, Outcome, str, str]:
        """(header, outcome, source, stream) to publish; the header holds what the record carries."""
        _k, status, flags, model_len, _i, _q, _c, _f, _o, _l, stream_id, deadline_us, sequence, timestamp_ns, \
            total_us, _r, _d = self.fields  # fmt: skip
        at, by, rest = [*bytes(self.text[: self.want]).split(b"\0", 2), b"", b""][:3]  # (origins hold no NUL)
        source, stream, model, message = (part.decode(errors="replace")
                                          for part in (at, by, rest[:model_len], rest[model_len + 1 :]))  # fmt: skip
        header = FrameHeader(stream_id, sequence, model, 0, (), 0, timestamp_ns, deadline_us, 0,
                             wire.FrameFlags(flags & _KNOWN_FLAGS))  # fmt: skip
        return header, Outcome(_STATUS.get(status, wire.Status.INTERNAL_ERROR), message,
                               timings=Timings(total_us=total_us)), source, stream  # fmt: skip


def down(kind: int, fid: int = 0) -> bytes:
    """A downward record without a body (STOP, CLOSE)."""
    return DOWN.pack(kind, 0, 0, 0, fid, 0, 0, 0, 0, 0, 0, 0, 0, 0)


def admit(conn: int, status: int, message: str = "") -> bytes:
    """An ADMIT record: the answer to connection ``conn``'s ASK."""
    msg = wire.message_bytes(message)
    return DOWN.pack(ADMIT, status, 0, 0, conn, 0, 0, 0, 0, 0, 0, 0, len(msg), 0) + msg


def admitted(buf: bytes, pos: int) -> tuple[int, wire.Status, str]:
    """(connection number, status, message) of the whole ADMIT record at ``buf[pos]``."""
    _k, status, _d, _n, conn, _l, *_t, msg_len, _p = DOWN.unpack_from(buf, pos)
    at = pos + DOWN.size
    return conn, _STATUS.get(status, wire.Status.INTERNAL_ERROR), buf[at : at + msg_len].decode(errors="replace")


def model_key(spec: ModelSpec) -> tuple[str, int, tuple[int, ...]]:
    """What a model index stands for: the model's name and the dtype code and shape of its frames (a frame's
    header gives the same three once admitted)."""
    return spec.name, spec.frame_dtype_code, tuple(spec.input_shape)


def models(table: Sequence[tuple[int, ModelSpec]], generation: int) -> bytes:
    """A MODELS record (the ``generation``-th): the models served now, each with the index FRAME records name
    it by."""
    body = pickle.dumps(list(table))
    return DOWN.pack(MODELS, 0, 0, 0, generation & 0xFFFFFFFF, len(body), 0, 0, 0, 0, 0, 0, 0, 0) + body


def models_of(buf: bytes, pos: int) -> tuple[int, list[tuple[int, ModelSpec]]]:
    """(generation, table) of the whole MODELS record at ``buf[pos]`` (from the scheduling process: trusted)."""
    _k, _s, _d, _n, generation, n, *_ = DOWN.unpack_from(buf, pos)
    table: list[tuple[int, ModelSpec]] = pickle.loads(buf[pos + DOWN.size : pos + DOWN.size + n])
    return generation, table


def release(fids: list[int]) -> bytes:
    """One RELEASE record for the slots of frames ``fids``."""
    body = array.array("I", fids)
    return DOWN.pack(RELEASE, 0, 0, 0, len(fids), 4 * len(fids), 0, 0, 0, 0, 0, 0, 0, 0) + body.tobytes()


def released(buf: bytes, pos: int) -> array.array[int]:
    """The fids of the whole RELEASE record at ``buf[pos]``."""
    fids = array.array("I")
    count = DOWN.unpack_from(buf, pos)[4]
    fids.frombytes(buf[pos + DOWN.size : pos + DOWN.size + 4 * count])
    return fids


def encode_reply(fid: int, outcome: Outcome) -> bytes:
    """A REPLY record for frame ``fid``: header, shape, message, result bytes."""
    t = outcome.timings
    msg = wire.message_bytes(outcome.message)  # (cut as the reply itself will be)
    result = outcome.result
    if outcome.outputs is not None:
        block = wire.encode_outputs(outcome.outputs)
        return b"".join((DOWN.pack(REPLY, outcome.status, OUTPUTS_BLOCK, 0, fid, len(block), *t, len(msg), 0), msg,
                         block))  # fmt: skip
    if result is None:
        head = DOWN.pack(REPLY, outcome.status, NO_RESULT, 0, fid, 0, *t, len(msg), 0)
        return head + msg if msg else head
    ndim = result.ndim
    code = _result_code(result.dtype, result.shape)
    data = result.tobytes()  # a copy (C order): the result row may be a view of a reused buffer
    head = DOWN.pack(REPLY, outcome.status, code, ndim, fid, len(data), *t, len(msg), 0)
    return b"".join((head, _SHAPES[ndim].pack(*result.shape), msg, data))


def _result_code(dtype: np.dtype, shape: tuple[int, ...]) -> int:
    """The wire code of one frame's result of ``dtype`` and ``shape``; ValueError for one a reply cannot carry."""
    if len(shape) > wire.MAX_NDIM:
        raise ValueError(f"a result has at most {wire.MAX_NDIM} dimensions, got shape {shape}")
    return wire.dtype_code(dtype)


def encode_ok(fids: Sequence[int], rows: np.ndarray, timings: np.ndarray) -> list[bytes | memoryview]:
    """The records of a batch's OK results: one REPLIES record (a REPLY for a lone frame), as parts to
    write one after the other. ``rows[i]`` is frame ``fids[i]``'s result; ``timings[i]`` its ``Timings``
    as six int64 (receive, queue, transfer, compute, total, batch size). ``rows`` is written as it is,
    not copied: it must not change until written (a batch's results are its own: see
    ``frame.BatchSink``)."""
    n = len(fids)
    if n == 1:
        return [encode_reply(fids[0], Outcome(wire.Status.OK, result=rows[0], timings=Timings(*timings[0].tolist())))]
    shape = rows.shape[1:]
    code = _result_code(rows.dtype, shape)
    # Parts as wire.encode_reply's: bytes, never empty (Python 3.12's writelines counts what it wrote off a
    # part by its len(), items for a typed memoryview; and spins on an empty last part until the next write)
    data = np.ascontiguousarray(rows).reshape(-1).view(np.uint8).data
    ids = np.asarray(fids, "<u4").tobytes()
    times = np.ascontiguousarray(timings, "<i8").tobytes()
    head = DOWN.pack(REPLIES, wire.Status.OK, code, len(shape), n, len(ids) + len(times) + data.nbytes,
                     0, 0, 0, 0, 0, 0, 0, 0)  # fmt: skip
    small = b"".join((head, _SHAPES[len(shape)].pack(*shape), ids, times))
    return [small, data] if data.nbytes else [small]


def decode_ok(buf: bytes, pos: int) -> tuple[list[int], np.ndarray, np.ndarray]:
    """(fids, rows, timings as six int64 each) of the whole REPLIES record at ``buf[pos]``; ``rows`` is a
    view of ``buf``."""
    _k, _s, dtype, ndim, n, *_ = DOWN.unpack_from(buf, pos)
    at = pos + DOWN.size
    shape = _SHAPES[ndim].unpack_from(buf, at)
    at += 4 * ndim
    fids = np.frombuffer(buf, "<u4", n, at).tolist()
    at += 4 * n
    timings = np.frombuffer(buf, "<i8", 6 * n, at).reshape(n, 6)
    at += 48 * n
    row_type = wire.DTYPES[dtype]
    rows = np.frombuffer(buf, row_type, n * int(np.prod(shape)), at).reshape(n, *shape)
    return fids, rows, timings


def record_length(buf: bytes, pos: int) -> int | None:
    """Bytes of the downward record starting at ``buf[pos]``, or None until its fixed part is there."""
    if len(buf) - pos < DOWN.size:
        return None
    _k, _s, _d, ndim, _f, payload_len, *_t, msg_len, _p = DOWN.unpack_from(buf, pos)
    return DOWN.size + 4 * ndim + msg_len + payload_len


def decode_reply(buf: bytes, pos: int) -> tuple[int, Outcome]:
    """(fid, outcome) of the whole REPLY record at ``buf[pos]``; the result is a view of ``buf``."""
    _k, status, dtype, ndim, fid, payload_len, rx, q, tr, comp, total, bs, msg_len, _p = DOWN.unpack_from(buf, pos)
    at = pos + DOWN.size
    shape = _SHAPES[ndim].unpack_from(buf, at)
    at += 4 * ndim
    message = buf[at : at + msg_len].decode(errors="replace") if msg_len else ""
    at += msg_len
    result = outputs = None
    if dtype == OUTPUTS_BLOCK:
        named = wire.decode_outputs(memoryview(buf)[at : at + payload_len])
        outputs = tuple(a for _, a in named) if all(not name for name, _ in named) else dict(named)
        result = named[0][1]
    elif dtype != NO_RESULT:
        result = np.frombuffer(buf, wire.DTYPES[dtype], payload_len // wire.DTYPES[dtype].itemsize, at).reshape(shape)
    return fid, Outcome(_STATUS[status], message, result, Timings(rx, q, tr, comp, total, bs), outputs)


_STATUS = {int(s): s for s in wire.Status}
_TEXT = bytes([TEXT])
_KNOWN_FLAGS = int(wire.FrameFlags.LIVE | wire.FrameFlags.SUBSCRIBERS)
