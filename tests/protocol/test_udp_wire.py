"""protocol/udp.py: chunk layout, batch checks, reassembly, reply chunks."""

from __future__ import annotations

import random

import numpy as np
import pytest

from streamgpu.protocol import udp, wire
from streamgpu.protocol.udp import Added, Assembly, ChunkHeader, Kind, Verdict
from streamgpu.protocol.wire import FrameHeader, ReplyHeader, Status


def frame_header(payload_len: int, stream: int = 3, seq: int = 9) -> FrameHeader:
    return FrameHeader(stream, seq, "default", 1, (payload_len,), payload_len, timestamp_ns=77)


def test_chunk_header_round_trip_and_layout() -> None:
    h = ChunkHeader(Kind.FRAME, 7, 2**40 + 1, 3, 9, 1234, 99999)
    raw = udp.encode_chunk_header(h)
    assert len(raw) == udp.HEADER_SIZE == udp.HEADER_DTYPE.itemsize
    assert raw[:4] == b"SGUD" and raw[4] == 1 and raw[5] == Kind.FRAME
    assert udp.decode_chunk_header(raw) == h
    parsed = np.frombuffer(raw, udp.HEADER_DTYPE)[0]
    assert (int(parsed["stream_id"]), int(parsed["sequence"]), int(parsed["index"]), int(parsed["count"])) == (
        7, 2**40 + 1, 3, 9)  # fmt: skip
    assert (int(parsed["offset"]), int(parsed["length"])) == (1234, 99999)
    with pytest.raises(ValueError, match="shorter"):
        udp.decode_chunk_header(raw[:31])
    with pytest.raises(ValueError, match="not below"):
        udp.decode_chunk_header(udp.encode_chunk_header(h._replace(chunk_index=9)))


@pytest.mark.parametrize("length", [0, 1, 1000, 1452 - 32 - 59, 1452 - 32 - 58, 150_528])
def test_frame_datagrams_tile_the_payload_and_fit_the_mtu(length: int) -> None:
    payload = np.random.default_rng(length).integers(0, 256, length, dtype=np.uint8)
    grams = udp.frame_datagrams(frame_header(length), payload.data)
    sizes = [sum(len(p) for p in parts) for parts in grams]
    assert max(sizes) <= udp.DEFAULT_DATAGRAM_BYTES and all(s > udp.HEADER_SIZE for s in sizes)
    out = bytearray(length)
    asm = Assembly(len(grams), length, memoryview(out))
    order = list(range(len(grams)))
    random.Random(length).shuffle(order)
    for i in order:
        data = memoryview(udp.join(grams[i]))
        ch = udp.decode_chunk_header(data)
        assert (ch.kind, ch.stream_id, ch.sequence, ch.chunk_count, ch.length) == (Kind.FRAME, 3, 9, len(grams), length)
        body = data[udp.HEADER_SIZE :]
        if ch.chunk_index == 0:
            got = wire.decode_frame_header(body)
            assert got is not None and got[0] == frame_header(length)
            body = body[got[1] :]
        assert asm.add(ch.chunk_index, ch.chunk_count, ch.offset, ch.length, body) is Added.NEW
        assert asm.add(ch.chunk_index, ch.chunk_count, ch.offset, ch.length, body) is Added.DUPLICATE
    assert asm.complete and bytes(out) == payload.tobytes()


def test_chunk_spans_limits() -> None:
    assert udp.chunk_spans(100, 0) == [(0, 0)]
    spans = udp.chunk_spans(100, 5000, 1000)
    assert spans[0] == (0, 868) and all(n == 968 for _, n in spans[1:-1])
    assert sum(n for _, n in spans) == 5000
    with pytest.raises(ValueError, match="datagram_bytes"):
        udp.chunk_spans(100, 10, 100)
    with pytest.raises(ValueError, match="at most 65535"):
        udp.chunk_spans(100, 70_000 * 480, 512)


def test_assembly_refuses_inconsistent_chunks() -> None:
    asm = Assembly(3, 10, memoryview(bytearray(10)))
    assert asm.add(1, 4, 0, 10, memoryview(b"ab")) is Added.INCONSISTENT  # count differs
    assert asm.add(1, 3, 0, 11, memoryview(b"ab")) is Added.INCONSISTENT  # length differs
    assert asm.add(1, 3, 9, 10, memoryview(b"ab")) is Added.INCONSISTENT  # past the end
    for i, off in enumerate((0, 4, 8)):
        assert asm.add(i, 3, off, 10, memoryview(b"xx")) is Added.NEW
    assert asm.all_chunks and not asm.complete  # 6 of 10 bytes: the chunks do not tile the payload


@pytest.mark.parametrize(
    ("spans", "tiles"),
    [
        (((0, 4), (4, 3), (7, 3)), True),
        (((7, 3), (0, 4), (4, 3)), True),  # offsets in any order of the chunk indices
        (((0, 4), (0, 3), (7, 3)), False),  # 10 bytes, but 4..7 never written
        (((0, 4), (3, 4), (8, 2)), False),  # an overlap of one byte, and a hole of one
        (((0, 0), (0, 6), (6, 4)), True),  # an empty chunk
    ],
)
def test_assembly_is_complete_only_when_its_chunks_tile_the_payload(
    spans: tuple[tuple[int, int], ...], tiles: bool
) -> None:
    asm = Assembly(len(spans), 10, memoryview(bytearray(10)))
    for i, (offset, n) in enumerate(spans):
        assert asm.add(i, len(spans), offset, 10, memoryview(bytes(n))) is Added.NEW
    assert asm.all_chunks and asm.bytes == 10 and asm.complete is tiles


def batch(datagrams: list[bytes], row: int = 64) -> tuple[np.ndarray, np.ndarray]:
    area = np.zeros((len(datagrams), row), np.uint8)
    for i, d in enumerate(datagrams):
        area[i, : min(len(d), row)] = np.frombuffer(d[:row], np.uint8)
    return udp.header_view(area), np.array([len(d) for d in datagrams], np.uint32)


def test_check_batch_gives_one_verdict_per_datagram() -> None:
    good = ChunkHeader(Kind.FRAME, 1, 2, 1, 3, 100, 300)
    enc = udp.encode_chunk_header
    cases = {
        Verdict.OK: enc(good) + bytes(100),
        Verdict.TRUNCATED: enc(good)[:20],
        Verdict.BAD_HEADER: b"XXXX" + enc(good)[4:] + bytes(10),
        Verdict.BAD_CHUNK: enc(good._replace(chunk_index=3)) + bytes(10),
        Verdict.PAST_END: enc(good._replace(offset=250)) + bytes(100),
    }
    reply_kind = enc(good._replace(kind=Kind.REPLY)) + bytes(10)
    zero_count = enc(good._replace(chunk_index=0, chunk_count=0)) + bytes(10)
    chunk0_offset = enc(good._replace(chunk_index=0, offset=5)) + bytes(10)
    # More chunks than payload bytes + 1 (every chunk but chunk 0 carries a byte): the receiver's
    # per-chunk state (65535 chunks of a 0-byte frame) would not be bounded by the frame's ring space.
    many_chunks = enc(good._replace(offset=0, chunk_count=302)) + bytes(10)
    datagrams = [*cases.values(), reply_kind, zero_count, chunk0_offset, many_chunks, enc(good) + bytes(10)]
    heads, lengths = batch(datagrams)
    truncated = np.zeros(len(datagrams), bool)
    truncated[-1] = True
    verdict = udp.check_batch(heads, lengths, Kind.FRAME, truncated)
    expected = [*cases, Verdict.BAD_HEADER, Verdict.BAD_CHUNK, Verdict.PAST_END, Verdict.BAD_CHUNK, Verdict.OVERSIZED]
    assert verdict.tolist() == [int(v) for v in expected]
    assert udp.check_batch(*batch([enc(good._replace(chunk_count=301)) + bytes(10)]), Kind.FRAME).tolist() == [0]
    with pytest.raises(ValueError, match="more chunks than"):
        udp.decode_chunk_header(many_chunks)


def test_reply_datagrams_carry_the_tcp_reply() -> None:
    result = np.arange(1000, dtype=np.float32)
    h = ReplyHeader(5, 6, Status.OK, wire.dtype_code(result.dtype), (1000,), 4000, 11, message="hi")
    grams = udp.reply_datagrams(h, result.data.cast("B"))
    assert len(grams) == 3
    head = bytearray()
    buf = bytearray(4000)
    asm = Assembly(3, 4000, memoryview(buf))
    for parts in reversed(grams):
        data = memoryview(udp.join(parts))
        ch = udp.decode_chunk_header(data)
        body = data[udp.HEADER_SIZE :]
        if ch.chunk_index == 0:
            n = udp.reply_head_length(body)
            head += body[:n]
            body = body[n:]
        asm.add(ch.chunk_index, ch.chunk_count, ch.offset, ch.length, body)
    got = wire.decode_reply(bytes(head) + buf)
    assert got is not None and got[0] == h and np.array_equal(np.frombuffer(got[1], np.float32), result)


@pytest.mark.parametrize("datagram_bytes", [udp.MIN_DATAGRAM_BYTES, udp.DEFAULT_DATAGRAM_BYTES])
def test_a_reply_message_too_long_for_chunk_0_is_cut_to_fit(datagram_bytes: int) -> None:
    """A model's error text, or a refusal quoting a hostile model name, can be longer than chunk 0 has room for:
    the reply still goes, its message cut (on a character boundary)."""
    h = ReplyHeader(5, 6, Status.INTERNAL_ERROR, message="é" * 3000)  # 6,000 bytes
    grams = udp.reply_datagrams(h, b"", datagram_bytes)
    assert len(grams) == 1
    data = udp.join(grams[0])
    assert len(data) <= datagram_bytes
    got = wire.decode_reply(data[udp.HEADER_SIZE :])
    assert got is not None and got[0].status == Status.INTERNAL_ERROR
    assert "é" * 100 in got[0].message and h.message.startswith(got[0].message)
    short = udp.reply_datagrams(h._replace(message="é" * 300), b"", udp.MIN_DATAGRAM_BYTES)  # fits only in chars
    assert len(udp.join(short[0])) <= udp.MIN_DATAGRAM_BYTES


def test_incomplete_has_a_v1_stand_in() -> None:
    assert wire.status_for(Status.INCOMPLETE, 1) == Status.BAD_FRAME
    assert wire.status_for(Status.INCOMPLETE, 2) == Status.INCOMPLETE


def test_group_sorts_a_batch_into_messages_in_arrival_order() -> None:
    length = 5000
    payload = np.random.default_rng(3).integers(0, 256, length, dtype=np.uint8)
    a = [udp.join(p) for p in udp.frame_datagrams(frame_header(length, seq=7), payload.data, 1000)]
    b = [udp.join(p) for p in udp.frame_datagrams(frame_header(length, seq=5), payload.data, 1000)]
    # (datagram, sender): frame 7 from sender 1 first, frame 5 from senders 1 and 2, chunk 3 of frame 7 twice
    batch = [(a[3], 1), (b[2], 1), (a[0], 1), (b[1], 2), (a[3], 1), (b[0], 1), (a[1], 1)]
    area = np.zeros((len(batch), 1000), np.uint8)
    for i, (d, _) in enumerate(batch):
        area[i, : len(d)] = np.frombuffer(d, np.uint8)
    senders = np.zeros((len(batch), 4), np.uint64)
    senders[:, 0] = [s for _, s in batch]
    g = udp.group(udp.words(udp.header_view(area)), senders)
    frames = [[int(g.order[j]) for j in range(s, e)] for s, e in zip(g.starts, g.ends, strict=True)]
    # sender 1's frame 5, sender 1's frame 7 (chunk 0 first, then by index), sender 2's frame 5
    assert frames == [[5, 1], [2, 6, 0, 4], [3]]
    assert g.group.tolist() == [0, 0, 1, 1, 1, 1, 2]
    assert g.repeat.tolist() == [False, False, False, False, False, True, False]  # the second chunk 3 of frame 7
    assert g.first.tolist() == [1, 0, 3]  # where each frame's first datagram is in the batch
    one = udp.group(udp.words(udp.header_view(area)))  # senders None: all from one sender
    assert [int(e - s) for s, e in zip(one.starts, one.ends, strict=True)] == [3, 4]
