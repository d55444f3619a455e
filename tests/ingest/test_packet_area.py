"""The packet area: datagrams received many per call, coalesced runs (UDP_GRO) split back into rows."""

from __future__ import annotations

import socket
import struct

import numpy as np
import pytest

from streamgpu.ingest import mmsg as mmsg_area
from streamgpu.ingest.mmsg import HAVE_RECVMMSG, PacketArea, enable_gro
from streamgpu.mmsg import SOL_UDP, UDP_SEGMENT

HEAD = 32


def _pair(gro: bool) -> tuple[socket.socket, socket.socket]:
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 23)
    if gro and not enable_gro(receiver):
        receiver.close()
        pytest.skip("this kernel does not coalesce UDP datagrams (UDP_GRO)")
    receiver.bind(("127.0.0.1", 0))
    receiver.setblocking(False)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.connect(receiver.getsockname())
    return receiver, sender


def _received(area: PacketArea, receiver: socket.socket) -> tuple[list[bytes], int]:
    """Every datagram the area gives, as bytes (header and body joined), and how many chunks of rows it took."""
    got: list[bytes] = []
    chunks = 0
    n = area.receive(receiver)
    while n:
        chunks += 1
        for i in range(n):
            got.append(area.heads[i].tobytes() + bytes(area.body(i)))
        n = area.next_rows()
    return got, chunks


@pytest.mark.skipif(not HAVE_RECVMMSG, reason="recvmmsg is Linux's")
@pytest.mark.parametrize("small_chunks", [True, False], ids=["chunks of one receive's rows", "default rows"])
def test_coalesced_runs_are_split_into_their_datagrams_a_chunk_of_rows_at_a_time(
    monkeypatch: pytest.MonkeyPatch, small_chunks: bool
) -> None:
    if small_chunks:
        monkeypatch.setattr(mmsg_area, "GRO_ROWS", mmsg_area.GRO_SEGMENTS)
    receiver, sender = _pair(gro=True)
    rng = np.random.default_rng(3)
    sent: list[bytes] = []
    for size, count in ((700, 40), (700, 40), (1200, 33), (700, 7), (90, 1), (500, 64), (700, 40)):
        run = [rng.integers(0, 256, size, dtype=np.uint8).tobytes() for _ in range(count)]
        run[-1] = run[-1][: size - 17] if count > 1 else run[-1]  # the last of a run may be shorter
        sender.sendmsg([b"".join(run)], [(SOL_UDP, UDP_SEGMENT, struct.pack("H", size))])
        sent.extend(run)
    area = PacketArea(batch=128, head_bytes=HEAD, max_datagram=1500, gro=True)
    got, chunks = _received(area, receiver)
    assert got == sent  # every datagram, whole, in order
    if small_chunks:
        assert chunks >= 2, "the datagrams of one receive call fit the rows at once: the chunking is not tested"
    else:  # the listener's numpy work per chunk is mostly fixed cost: a receive call's 225 datagrams in one
        assert chunks == 1
    assert area.drained
    receiver.close()
    sender.close()


@pytest.mark.parametrize("gro, use_recvmmsg", [(False, True), (True, True), (True, False)])
def test_plain_datagrams_fill_the_rows_the_same_with_or_without_coalescing(gro: bool, use_recvmmsg: bool) -> None:
    """With recvmmsg, with coalescing, and on the fallback (recvmsg_into per datagram, which never coalesces)."""
    if use_recvmmsg and not HAVE_RECVMMSG:
        pytest.skip("recvmmsg is Linux's")
    receiver, sender = _pair(gro and use_recvmmsg)
    sent = [bytes([i % 256]) * (40 + i) for i in range(300)]
    for datagram in sent:
        sender.send(datagram)
    area = PacketArea(batch=256, head_bytes=HEAD, max_datagram=1500, use_recvmmsg=use_recvmmsg, gro=gro)
    assert area.gro == (gro and use_recvmmsg)
    got, _ = _received(area, receiver)
    assert got == sent[:256] and not area.drained  # a full batch: more may wait
    rest, _ = _received(area, receiver)
    assert rest == sent[256:] and area.drained
    receiver.close()
    sender.close()
