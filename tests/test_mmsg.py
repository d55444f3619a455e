"""streamgpu.mmsg.Sender: one sendmmsg per message sends exactly the datagrams sendmsg would."""

from __future__ import annotations

import socket

import numpy as np
import pytest

from streamgpu import mmsg
from streamgpu.protocol import udp, wire


def receive_all(sock: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(sock.recv(65536))
        except BlockingIOError:
            return out


@pytest.mark.parametrize("use_sendmmsg", [True, False])
def test_sender_sends_the_datagrams_sendmsg_would(use_sendmmsg: bool) -> None:
    if use_sendmmsg and mmsg.sendmmsg is None:
        pytest.skip("no sendmmsg in this libc (not Linux)")
    payload = np.random.default_rng(1).integers(0, 256, 20_000, dtype=np.uint8)
    header = wire.FrameHeader(3, 9, "default", 1, (20_000,), 20_000)
    grams = udp.frame_datagrams(header, payload.data, 1000)
    assert [(int(o), int(n)) for o, n in zip(grams.offsets, grams.sizes, strict=True)] == udp.chunk_spans(
        header.wire_size, 20_000, 1000
    )
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rx.bind(("127.0.0.1", 0))
        rx.setblocking(False)
        tx.connect(rx.getsockname())
        tx.setblocking(False)
        keep = np.ones(len(grams), bool)
        keep[[0, 5, len(grams) - 1]] = False  # as --loss drops them
        sender = mmsg.Sender(capacity=8, use_sendmmsg=use_sendmmsg)  # several calls for one message
        assert sender.send(tx, grams, keep) == (len(grams) - 3, 0)
        got = receive_all(rx)
        assert got == [udp.join(grams[i]) for i in np.flatnonzero(keep).tolist()]
        assert sender.send(tx, grams) == (len(grams), 0)
        assert receive_all(rx) == [udp.join(parts) for parts in grams]
    finally:
        rx.close()
        tx.close()


def test_a_refused_datagram_is_counted_and_the_rest_still_go() -> None:
    if mmsg.sendmmsg is None:
        pytest.skip("no sendmmsg in this libc (not Linux)")
    grams = udp.reply_datagrams(wire.ReplyHeader(1, 2, wire.Status.OK), bytes(3000), 1000)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
        tx.bind(("127.0.0.1", 0))
        tx.connect(tx.getsockname())  # to itself
        tx.setblocking(False)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as gone:
            gone.bind(("127.0.0.1", 0))
            port = gone.getsockname()[1]
        tx.connect(("127.0.0.1", port))  # nobody listens: the kernel answers port unreachable
        tx.send(b"x")
        sent, failed = mmsg.Sender().send(tx, grams)  # the first send reports the ICMP error
        assert failed >= 1 and sent + failed == len(grams)
