"""streamgpu.mmsg.Sender: one sendmmsg per message sends exactly the datagrams sendmsg would, with UDP GSO
too (runs of datagrams per message, cut by the kernel), and falls back to plain sends where GSO is refused."""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import socket
import sys

import numpy as np
import pytest

from streamgpu import client, mmsg
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


# --- UDP generic segmentation offload (use_gso) ----------------------------------------------------------------


def needs_sendmmsg() -> None:
    if mmsg.sendmmsg is None:
        pytest.skip("no sendmmsg in this libc (not Linux)")


def receiver(gro: bool = False) -> socket.socket:
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 1024 * 1024)  # a burst of 200 datagrams, none dropped
    if gro:
        rx.setsockopt(mmsg.SOL_UDP, mmsg.UDP_GRO, 1)
    rx.bind(("127.0.0.1", 0))
    rx.setblocking(False)
    return rx


def sender_to(rx: socket.socket) -> socket.socket:
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.connect(rx.getsockname())
    tx.setblocking(False)
    return tx


def receive_gro(sock: socket.socket) -> list[tuple[bytes, int | None]]:
    """Messages of a UDP_GRO socket: (bytes, gso_size from its control message, or None without one)."""
    out: list[tuple[bytes, int | None]] = []
    while True:
        try:
            data, ancillary, _, _ = sock.recvmsg(65536, socket.CMSG_SPACE(4))
        except BlockingIOError:
            return out
        sizes = [int.from_bytes(d, sys.byteorder) for level, kind, d in ancillary
                 if (level, kind) == (mmsg.SOL_UDP, mmsg.UDP_GRO)]  # fmt: skip
        out.append((data, sizes[0] if sizes else None))


GRAM_BYTES = 1000  # runs of 64 datagrams (65 x 1000 > 65000)
HEAD = wire.FrameHeader(3, 9, "default", 1, (0,), 0).wire_size
FIRST = GRAM_BYTES - udp.HEADER_SIZE - HEAD  # payload bytes in chunk 0
STEP = GRAM_BYTES - udp.HEADER_SIZE


def message(length: int, seed: int = 1) -> udp.Datagrams:
    payload = np.random.default_rng(seed).integers(0, 256, length, dtype=np.uint8)
    return udp.frame_datagrams(wire.FrameHeader(3, seed, "default", 1, (length,), length), payload.data, GRAM_BYTES)


LENGTHS = {
    "one datagram": 100,
    "one full datagram": FIRST,
    "64 full datagrams: one run": FIRST + 63 * STEP,
    "129 full datagrams: 3 runs": FIRST + 128 * STEP,
    "short last datagram: 2 runs": FIRST + 99 * STEP + 17,
}
KEEPS = ("all", "random", "not the first nor last", "the last only")


def keep_mask(kind: str, n: int) -> np.ndarray | None:
    if kind == "all":
        return None
    if kind == "random":
        return np.random.default_rng(n).random(n) >= 0.2  # as --loss drops them
    keep = np.zeros(n, bool)
    if kind == "the last only":
        keep[-1] = True
    else:
        keep[1:-1] = True
    return keep


@pytest.mark.parametrize("keep_kind", KEEPS)
@pytest.mark.parametrize("length", LENGTHS.values(), ids=LENGTHS.keys())
def test_gso_sender_delivers_the_datagrams_a_plain_one_does(length: int, keep_kind: str) -> None:
    """A receiver without UDP_GRO gets the same datagrams, bytes and order, from a GSO Sender as from a plain one."""
    needs_sendmmsg()
    grams = message(length)
    keep = keep_mask(keep_kind, len(grams))
    want = [udp.join(grams[i]) for i in (np.flatnonzero(keep).tolist() if keep is not None else range(len(grams)))]
    rx = receiver()
    with rx, sender_to(rx) as tx:
        plain = mmsg.Sender(capacity=100)  # a message of more than 100 datagrams takes two sendmmsg calls
        assert plain.send(tx, grams, keep) == (len(want), 0)
        assert receive_all(rx) == want
        gso = mmsg.Sender(capacity=100, use_gso=True)
        assert gso.send(tx, grams, keep) == (len(want), 0)
        assert receive_all(rx) == want
        assert gso.use_gso and plain.gso_messages == 0
        assert (gso.gso_messages > 0) == (len(want) > 1)  # a lone datagram is sent as it is


@pytest.mark.parametrize("use_gso", [True, False])
def test_a_gro_receiver_sees_the_runs_coalesced(use_gso: bool) -> None:
    """With UDP_GRO on the receiving socket, each GSO message arrives whole with its gso_size: GSO was really
    used (a plain Sender's datagrams arrive one by one, without the control message)."""
    needs_sendmmsg()
    grams = message(LENGTHS["short last datagram: 2 runs"])
    keep = np.ones(len(grams), bool)
    keep[70] = False  # a lost datagram in the second run: the others still go as one run
    want = [udp.join(grams[i]) for i in np.flatnonzero(keep).tolist()]
    rx = receiver(gro=True)
    with rx, sender_to(rx) as tx:
        sender = mmsg.Sender(use_gso=use_gso)
        assert sender.send(tx, grams, keep) == (len(want), 0)
        got = receive_gro(rx)
    if not use_gso:
        assert got == [(w, None) for w in want]
        return
    assert [(len(data), size) for data, size in got] == [
        (64 * GRAM_BYTES, GRAM_BYTES), (35 * GRAM_BYTES + len(want[-1]), GRAM_BYTES)
    ]  # fmt: skip
    joined = b"".join(data for data, _ in got)
    assert [joined[i : i + GRAM_BYTES] for i in range(0, len(joined), GRAM_BYTES)] == want
    assert sender.gso_messages == 2


def test_runs_of_unequal_datagrams_go_one_by_one() -> None:
    """Datagrams not cut at one size (not what frame_datagrams makes, but what Datagrams allows) are
    still sent right: a run whose sizes differ goes as one message per datagram."""
    needs_sendmmsg()
    grams = message(FIRST + 199 * STEP)
    sizes = grams.sizes.copy()
    sizes[[70, 150]] -= 5  # two short datagrams in the middle of the second and third runs
    odd = udp.Datagrams(grams.heads, grams.head, grams.payload, grams.offsets, sizes)
    want = [udp.join(parts) for parts in odd]
    rx = receiver(gro=True)
    with rx, sender_to(rx) as tx:
        sender = mmsg.Sender(use_gso=True)
        assert sender.send(tx, odd) == (200, 0)
        got = receive_gro(rx)
    assert [len(d) for d, _ in got] == [64 * GRAM_BYTES] + [len(w) for w in want[64:192]] + [8 * GRAM_BYTES]
    joined = b"".join(data for data, _ in got)
    assert joined == b"".join(want)


class RefusingSendmmsg:
    """Stands in for ``mmsg.sendmmsg``: messages with a control message (GSO) fail with ``err`` from the
    ``after``-th GSO message on, as a kernel that cannot do GSO answers; the others go to the real one."""

    def __init__(self, err: int, after: int = 0, times: int | None = None) -> None:
        self.real = mmsg.sendmmsg
        self.err = err
        self.after = after
        self.times = times  # refusals before it takes GSO again (None: never)
        self.refused = 0
        self.gso_seen = 0

    def __call__(self, fd: int, msgs: int, n: int, flags: int) -> int:
        gso = [bool(mmsg.MMsgHdr.from_address(msgs + i * ctypes.sizeof(mmsg.MMsgHdr)).hdr.controllen)
               for i in range(n)]  # fmt: skip
        seen = self.gso_seen
        upto = 0
        while upto < n and not (gso[upto] and seen >= self.after and (self.times is None or self.refused < self.times)):
            seen += gso[upto]  # this one goes; stop at the first refused
            upto += 1
        if upto == 0:
            self.refused += 1
            ctypes.set_errno(self.err)
            return -1
        got: int = self.real(fd, msgs, upto, flags)  # the messages before the refused one go, as sendmmsg does
        self.gso_seen += sum(gso[: max(got, 0)])
        return got


@pytest.mark.parametrize("after", [0, 1], ids=["first GSO message", "second GSO message"])
@pytest.mark.parametrize("err", [errno.EIO, errno.EINVAL, errno.EMSGSIZE, errno.EOPNOTSUPP], ids=errno.errorcode.get)
def test_a_kernel_refusing_gso_turns_it_off_and_loses_nothing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, err: int, after: int
) -> None:
    needs_sendmmsg()
    fake = RefusingSendmmsg(err, after)
    monkeypatch.setattr(mmsg, "sendmmsg", fake)
    grams = message(LENGTHS["129 full datagrams: 3 runs"])
    want = [udp.join(parts) for parts in grams]
    rx = receiver()
    with rx, sender_to(rx) as tx, caplog.at_level(logging.DEBUG, "streamgpu.mmsg"):
        sender = mmsg.Sender(use_gso=True)
        assert sender.send(tx, grams) == (len(grams), 0)
        assert receive_all(rx) == want  # the refused run and those after it sent again, one by one, in order
        assert not sender.use_gso and sender.gso_messages == after and fake.refused == 1
        assert sender.send(tx, grams) == (len(grams), 0)  # for good: no GSO tried again
        assert receive_all(rx) == want and fake.refused == 1
    assert len([r for r in caplog.records if "GSO refused" in r.getMessage()]) == 1


def test_another_error_on_a_gso_message_sends_its_run_one_by_one_and_keeps_gso(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A full send buffer (EAGAIN) refuses a run: its datagrams are tried one by one, as a plain Sender
    would, and the next runs go with GSO again."""
    needs_sendmmsg()
    fake = RefusingSendmmsg(errno.EAGAIN, after=1, times=1)
    monkeypatch.setattr(mmsg, "sendmmsg", fake)
    grams = message(FIRST + 149 * STEP)  # runs of 64, 64 and 22
    rx = receiver(gro=True)
    with rx, sender_to(rx) as tx:
        sender = mmsg.Sender(use_gso=True)
        assert sender.send(tx, grams) == (len(grams), 0)
        got = receive_gro(rx)
    assert sender.use_gso and sender.gso_messages == 2 and fake.refused == 1
    assert [size for _, size in got] == [GRAM_BYTES] + [None] * 64 + [GRAM_BYTES]  # the second run one by one
    assert b"".join(d for d, _ in got) == b"".join(udp.join(parts) for parts in grams)


@pytest.mark.asyncio
async def test_the_client_sends_gso_by_default() -> None:
    """connect_udp's frames reach a GRO socket as coalesced runs (gso=False: one datagram per message), and
    cut at their size they are the frame's datagrams."""
    needs_sendmmsg()
    frame = np.random.default_rng(5).integers(0, 256, (150, 150, 3), dtype=np.uint8)  # 70 datagrams: 2 runs
    head = wire.FrameHeader(4, 0, "default", 1, frame.shape, frame.nbytes).wire_size
    for gso in (None, False):
        rx = receiver(gro=True)
        with rx:
            host, port = rx.getsockname()
            options = {} if gso is None else {"gso": gso}
            conn = await client.connect_udp(host, port, datagram_bytes=GRAM_BYTES, **options)
            try:
                conn.send(frame, stream_id=4)
                await asyncio.sleep(0.05)
                got = receive_gro(rx)
            finally:
                await conn.close()
        joined = b"".join(d for d, _ in got)
        grams = [joined[i : i + GRAM_BYTES] for i in range(0, len(joined), GRAM_BYTES)]
        chunks = [udp.decode_chunk_header(g) for g in grams]
        assert [c.chunk_index for c in chunks] == list(range(70)) and {c.chunk_count for c in chunks} == {70}
        payload = grams[0][udp.HEADER_SIZE + head :] + b"".join(g[udp.HEADER_SIZE :] for g in grams[1:])
        assert payload == frame.tobytes()
        assert [size for _, size in got] == ([GRAM_BYTES, GRAM_BYTES] if gso is None else [None] * 70)
