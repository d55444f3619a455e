"""Many datagrams per system call: ``recvmmsg`` (``streamgpu.mmsg``) into a preallocated packet area.

A :class:`PacketArea` holds ``batch`` rows. Each received datagram is
scattered by the kernel into two places: its first ``head_bytes`` into a
row of ``heads`` (so a whole batch's headers are one contiguous array that
numpy parses at once) and the rest into a row of ``bodies``. The sender's
address lands in a row of ``names`` (a raw ``sockaddr``, usable as a dict
key without decoding). Where ``recvmmsg`` is missing (not Linux), the same
area is filled by ``recvmsg_into``, one datagram per call.

With ``gro=True`` (Linux UDP generic receive offload, ``UDP_GRO``) the kernel
hands over runs of one sender's datagrams coalesced into one buffer of up
to 64 KiB, with their segment size in a control message: a GSO sender's
message arrives whole, one socket buffer instead of dozens. Only each
datagram's header (and its length, flags and sender) is gathered into the
rows, by numpy, a chunk of rows at a time; its body stays where it landed.

Where each row's body lies is told the same way in both modes, and only
here: ``body_rows`` (the buffer the bodies are in, as rows of any width
starting at any byte: :class:`ByteRows`), ``body_start[i]`` (where row
``i``'s body starts in it) and ``body_step[i]`` (how far on the next
datagram in line starts: ``body_bytes`` from row to row, the segment size
in a coalesced run, the buffer stride from one lone datagram's receive to
the next). A reader copies a run of rows whose starts are a constant step
apart with one strided copy, and any other set of rows with one gather.
The step only says which rows may form a run: a reader checks the starts
themselves, so a step that is off splits runs, it never misplaces a byte.
In coalescing mode the rows point into the coalesced buffers, which the
next ``receive`` overwrites: a chunk is used up before then.

Measured (tools/bench_udp.py) against a C ``recvmmsg`` receiver on the same
machine; the per-call Python cost is fixed, so larger batches amortise it.
"""

from __future__ import annotations

import ctypes
import os
import socket
import sys
from typing import Any

import numpy as np

from streamgpu.mmsg import (
    MSG_DONTWAIT,
    MSG_TRUNC,
    SOL_UDP,
    UDP_GRO,
    WOULD_BLOCK,
    IoVec,
    MMsgHdr,
    MsgHdr,
    field,
    recvmmsg,
    rows,
)

__all__ = ["HAVE_RECVMMSG", "MSG_TRUNC", "NAME_BYTES", "ByteRows", "PacketArea", "decode_sockaddr", "enable_gro"]

NAME_BYTES = 32  # room for a sockaddr_in6 (28 bytes), rounded up
HAVE_RECVMMSG = recvmmsg is not None
GRO_BYTES = 65536  # the most one coalesced receive holds (an IP datagram's limit)
GRO_SEGMENTS = 128  # the most datagrams the kernel coalesces into one (UDP_MAX_SEGMENTS)
# Rows a coalesced receive is split into at a time: the listener's numpy work per chunk of rows is mostly
# fixed cost, so fewer, larger chunks (a receive call of GSO messages holds up to batch x 45 datagrams).
GRO_ROWS = 8192
_CMSG_SPACE = 24  # CMSG_SPACE(sizeof(int)) on 64-bit Linux: a 16-byte cmsghdr, 4 bytes of data, padding


def enable_gro(sock: socket.socket) -> bool:
    """Ask the kernel to coalesce ``sock``'s datagrams (``UDP_GRO``); False where it cannot (not Linux, old kernel)."""
    try:
        sock.setsockopt(SOL_UDP, UDP_GRO, 1)
    except OSError:
        return False
    return True


class PacketArea:
    """Preallocated receive buffers for ``batch`` datagrams and the ``recvmmsg`` vector pointing into them.

    Row ``i`` of a receive: ``heads[i]``, ``lengths[i]`` (header included), ``flags[i]``, ``names[i]``; its
    body is ``body(i)``, or for many rows at once where ``body_rows``, ``body_start`` and ``body_step`` say.
    """

    def __init__(
        self, batch: int, head_bytes: int, max_datagram: int, use_recvmmsg: bool = True, gro: bool = False
    ) -> None:
        if batch < 1 or head_bytes < 1 or max_datagram <= head_bytes:
            raise ValueError("batch >= 1 and max_datagram > head_bytes > 0 are needed")
        self.batch = batch
        self.head_bytes = head_bytes
        self.body_bytes = max_datagram - head_bytes
        self.use_recvmmsg = use_recvmmsg and HAVE_RECVMMSG
        self.gro = gro and self.use_recvmmsg
        # With coalescing, ``batch`` receives (each up to GRO_BYTES: only the pages written become resident)
        # are split into rows a chunk at a time (``next_rows``); a chunk holds at least one whole receive.
        self.rows = max(batch, GRO_ROWS) if self.gro else batch
        self.drained = False  # the last receive took what was waiting (it got fewer than it had room for)
        rows_ = self.rows
        self.heads = np.zeros((rows_, head_bytes), np.uint8)
        self.bodies = np.zeros((batch, self.body_bytes), np.uint8)  # one datagram per row (not coalesced)
        self.names = np.zeros((rows_, NAME_BYTES), np.uint8)
        self.names64 = self.names.view(np.uint64)  # (rows, 4): a sender compared in four words
        self.lengths = np.zeros(rows_, np.uint32)  # bytes of each datagram
        self.flags = np.zeros(rows_, np.int32)  # its msg_flags (MSG_TRUNC)
        # Where each row's body lies (module docstring): in ``bodies`` by default, in the coalesced buffers
        # (filled per chunk by next_rows) with coalescing.
        self.body_start = np.zeros(rows_, np.int64)
        self.body_step = np.zeros(rows_, np.int64)
        self.body_rows = ByteRows(self.bodies.reshape(-1))
        self._plain_bodies()
        if self.gro:
            self._gro = _CoalescedArea(batch, max_datagram)
            self.body_rows = self._gro.rows_of
        self._iov = (IoVec * (2 * batch))()
        self._msgs = (MMsgHdr * batch)()
        for i in range(batch):
            self._iov[2 * i] = IoVec(self.heads.ctypes.data + i * head_bytes, head_bytes)
            self._iov[2 * i + 1] = IoVec(self.bodies.ctypes.data + i * self.body_bytes, self.body_bytes)
            hdr = self._msgs[i].hdr
            hdr.name = self.names.ctypes.data + i * NAME_BYTES
            hdr.iov = ctypes.cast(ctypes.byref(self._iov, 2 * i * ctypes.sizeof(IoVec)), ctypes.POINTER(IoVec))
            hdr.iovlen = 2
        raw = rows(self._msgs, batch)
        self._namelen = field(raw, MMsgHdr.hdr.offset + MsgHdr.namelen.offset, "u4")
        self._lengths = field(raw, MMsgHdr.len.offset, "u4")  # msg_len
        self._flags = field(raw, MMsgHdr.hdr.offset + MsgHdr.flags.offset, "i4")  # msg_flags: MSG_TRUNC
        self._msgs_addr = ctypes.addressof(self._msgs)
        self._heads_mv = [row.data for row in self.heads]
        self._bodies_mv = [row.data for row in self.bodies]
        self.addresses: list[Any] = [None] * batch  # fallback path only: the sender address of each datagram

    def stop_coalescing(self) -> None:
        """Receive one datagram per row from now on (the socket has no ``UDP_GRO`` after all)."""
        if self.gro:
            self.gro = False
            self.body_rows = ByteRows(self.bodies.reshape(-1))
            self._plain_bodies()
            del self._gro  # its 64 MiB of receive buffers

    def _plain_bodies(self) -> None:
        self.body_start[:] = np.arange(self.rows, dtype=np.int64) * self.body_bytes  # rows past batch: unused
        self.body_step[:] = self.body_bytes

    def body(self, i: int) -> memoryview:
        """Row ``i``'s body (its bytes past the header), where it lies: valid until the next ``receive``."""
        start = int(self.body_start[i])
        return self.body_rows.buffer[start : start + max(int(self.lengths[i]) - self.head_bytes, 0)].data

    def receive(self, sock: socket.socket) -> int:
        """Fill the rows with up to ``batch`` waiting datagrams without blocking; returns how many came.

        0 when none is waiting. Raises OSError for errors other than "would block". With coalescing, the
        rows hold the receive's first chunk: ``next_rows`` gives the rest, a chunk at a time.
        """
        if not self.use_recvmmsg:
            return self._receive_one_by_one(sock)
        if self.gro:
            self.drained = self._gro.receive(sock) < self.batch
            return self.next_rows()
        self._namelen[:] = NAME_BYTES  # the kernel overwrites it with each address's length
        n = _recvmmsg(sock, self._msgs_addr, self.batch)
        self.drained = n < self.batch
        self.lengths[:n] = self._lengths[:n]
        self.flags[:n] = self._flags[:n]
        return n

    def next_rows(self) -> int:
        """The next chunk of the last receive's datagrams in the rows (0: none left; always 0 without
        coalescing): each datagram's header is copied into ``heads``; its body stays in the coalesced
        buffer, where ``body_start`` and ``body_step`` tell (a chunk's rows are used before the next one)."""
        if not self.gro:
            return 0
        area = self._gro
        chunk = area.next_chunk(self.rows)
        if chunk is None:
            return 0
        which, start, step, lengths = chunk
        n = len(which)
        self.lengths[:n] = lengths
        self.flags[:n] = area.flags[which]
        self.names[:n] = area.names[which]
        self.heads[:n] = area.rows_of(self.head_bytes)[start]
        self.body_start[:n] = start + self.head_bytes
        self.body_step[:n] = step
        return n

    def _receive_one_by_one(self, sock: socket.socket) -> int:
        n = 0
        self.drained = True
        while n < self.batch:
            try:
                nbytes, _, flags, address = sock.recvmsg_into([self._heads_mv[n], self._bodies_mv[n]], 0, MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                break
            self.lengths[n] = nbytes
            self.flags[n] = flags
            self.addresses[n] = address
            self.names64[n] = (hash(address) & 0xFFFFFFFFFFFFFFFF, 0, 0, 0)  # stands in for the raw sockaddr
            n += 1
        else:
            self.drained = False
        return n

    def sender(self, i: int) -> Any:
        """A hashable key for the sender of datagram ``i`` (raw sockaddr bytes, or the address tuple)."""
        if not self.use_recvmmsg:
            return self.addresses[i]
        return self.names[i].tobytes()


class _CoalescedArea:
    """``count`` receive buffers of ``GRO_BYTES`` for coalesced runs, with their control messages."""

    def __init__(self, count: int, max_datagram: int) -> None:
        self.count = count
        self.stride = GRO_BYTES
        # Room past the last buffer: a row view as wide as a datagram may start at its last byte.
        self._buffer = np.zeros(count * GRO_BYTES + max_datagram, np.uint8)
        self.names = np.zeros((count, NAME_BYTES), np.uint8)
        self._control = np.zeros((count, _CMSG_SPACE), np.uint8)
        self._iov = (IoVec * count)()
        self._msgs = (MMsgHdr * count)()
        for i in range(count):
            self._iov[i] = IoVec(self._buffer.ctypes.data + i * GRO_BYTES, GRO_BYTES)
            hdr = self._msgs[i].hdr
            hdr.name = self.names.ctypes.data + i * NAME_BYTES
            hdr.iov = ctypes.cast(ctypes.byref(self._iov, i * ctypes.sizeof(IoVec)), ctypes.POINTER(IoVec))
            hdr.iovlen = 1
            hdr.control = self._control.ctypes.data + i * _CMSG_SPACE
        raw = rows(self._msgs, count)
        self._namelen = field(raw, MMsgHdr.hdr.offset + MsgHdr.namelen.offset, "u4")
        self._controllen = field(raw, MMsgHdr.hdr.offset + MsgHdr.controllen.offset, "u8")
        self.lengths = field(raw, MMsgHdr.len.offset, "u4")
        self.flags = field(raw, MMsgHdr.hdr.offset + MsgHdr.flags.offset, "i4")
        self._addr = ctypes.addressof(self._msgs)
        self.rows_of = ByteRows(self._buffer)  # its bytes at any offset, as rows of a width
        self._whole = self._size = self._counts = np.zeros(0, np.int64)  # of the last receive
        self._next = 0  # its first receive not yet split into rows

    def receive(self, sock: socket.socket) -> int:
        """Up to ``count`` receives; returns how many came (their datagrams then go by ``next_chunk``)."""
        self._namelen[:] = NAME_BYTES
        self._controllen[:] = _CMSG_SPACE
        m = _recvmmsg(sock, self._addr, self.count)
        whole = self.lengths[:m].astype(np.int64)
        size = self._segment_sizes(m, whole)
        self._whole, self._size = whole, size
        self._counts = np.maximum(-(-whole // size), 1)  # datagrams per receive (an empty one counts: it is judged)
        self._next = 0
        return m

    def next_chunk(self, rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
        """The datagrams of the next whole receives that fit ``rows`` (at least one receive: a receive holds
        at most GRO_SEGMENTS <= rows): for each, its receive, where it starts in the buffer, how far on the
        next datagram in line starts (of its receive: the segment size; for a receive of one datagram, the
        next receive's first: the buffer stride), its length."""
        a, m = self._next, len(self._counts)
        if a >= m:
            return None
        b = a + max(1, int(np.searchsorted(np.cumsum(self._counts[a:]), rows, side="right")))
        count, size, whole = self._counts[a:b], self._size[a:b], self._whole[a:b]
        self._next = b
        n = int(count.sum())
        local = np.repeat(np.arange(b - a), count)  # the receive (from a) each datagram came in
        k = np.arange(n) - np.repeat(np.cumsum(count) - count, count)  # its place in that receive
        which = local + a
        size = size[local]
        start = which * self.stride + k * size
        # Lone datagrams (not coalesced: a plain sender's) in consecutive receives lie a stride apart: a run too.
        step = np.where(count[local] == 1, self.stride, size)
        return which, start, step, np.minimum(size, whole[local] - k * size)

    def _segment_sizes(self, m: int, whole: np.ndarray) -> np.ndarray:
        """Each receive's datagram size: its UDP_GRO control message's, or its whole length (one datagram).
        A receive without a control message reports a control length of 0, so stale bytes are not read."""
        control = self._control[:m]
        level = control[:, 8:12].copy().view(np.int32)[:, 0]
        kind = control[:, 12:16].copy().view(np.int32)[:, 0]
        size = control[:, 16:20].copy().view(np.int32)[:, 0].astype(np.int64)
        coalesced = (self._controllen[:m] >= 20) & (level == SOL_UDP) & (kind == UDP_GRO) & (size > 0)
        return np.where(coalesced, size, np.maximum(whole, 1))


class ByteRows:
    """A 1-D uint8 buffer as overlapping rows of a width, row i starting at byte i (no copy): indexing the
    rows with byte offsets gathers (or, assigned to, scatters) whole runs of bytes in one numpy call."""

    def __init__(self, buffer: np.ndarray) -> None:
        self.buffer = buffer  # 1-D uint8
        self._views: dict[int, np.ndarray] = {}

    def __call__(self, width: int) -> np.ndarray:
        view = self._views.get(width)
        if view is None:
            if len(self._views) >= 16:  # widths a producer made up: do not keep them all
                self._views.clear()
            buffer = self.buffer
            view = self._views[width] = np.lib.stride_tricks.as_strided(
                buffer, (len(buffer) - width + 1, width), (1, 1), writeable=True
            )
        return view


def _recvmmsg(sock: socket.socket, msgs: int, count: int) -> int:
    n = recvmmsg(sock.fileno(), msgs, count, MSG_DONTWAIT, None)
    if n < 0:
        err = ctypes.get_errno()
        if err in WOULD_BLOCK:
            return 0
        raise OSError(err, os.strerror(err))
    return int(n)


def decode_sockaddr(key: Any) -> Any:
    """The ``sendto`` address for a sender key of :meth:`PacketArea.sender`."""
    if not isinstance(key, bytes):
        return key
    family = int.from_bytes(key[:2], sys.byteorder)  # sa_family is native
    port = int.from_bytes(key[2:4], "big")
    if family == socket.AF_INET:
        return (socket.inet_ntop(socket.AF_INET, key[4:8]), port)
    if family == socket.AF_INET6:
        flowinfo = int.from_bytes(key[4:8], "big")
        scope = int.from_bytes(key[24:28], sys.byteorder)
        return (socket.inet_ntop(socket.AF_INET6, key[8:24]), port, flowinfo, scope)
    raise ValueError(f"unknown address family {family}")
