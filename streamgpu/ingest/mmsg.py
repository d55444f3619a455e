"""Many datagrams per system call: ``recvmmsg`` (``streamgpu.mmsg``) into a preallocated packet area.

A :class:`PacketArea` holds ``batch`` rows. Each received datagram is
scattered by the kernel into two places: its first ``head_bytes`` into a
row of ``heads`` (so a whole batch's headers are one contiguous array that
numpy parses at once) and the rest into a row of ``bodies``. The sender's
address lands in a row of ``names`` (a raw ``sockaddr``, usable as a dict
key without decoding). Where ``recvmmsg`` is missing (not Linux), the same
area is filled by ``recvmsg_into``, one datagram per call.

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

from streamgpu.mmsg import MSG_DONTWAIT, MSG_TRUNC, WOULD_BLOCK, IoVec, MMsgHdr, MsgHdr, field, recvmmsg, rows

__all__ = ["HAVE_RECVMMSG", "MSG_TRUNC", "NAME_BYTES", "PacketArea", "decode_sockaddr"]

NAME_BYTES = 32  # room for a sockaddr_in6 (28 bytes), rounded up
HAVE_RECVMMSG = recvmmsg is not None


class PacketArea:
    """Preallocated receive buffers for ``batch`` datagrams and the ``recvmmsg`` vector pointing into them."""

    def __init__(self, batch: int, head_bytes: int, max_datagram: int, use_recvmmsg: bool = True) -> None:
        if batch < 1 or head_bytes < 1 or max_datagram <= head_bytes:
            raise ValueError("batch >= 1 and max_datagram > head_bytes > 0 are needed")
        self.batch = batch
        self.head_bytes = head_bytes
        self.body_bytes = max_datagram - head_bytes
        self.heads = np.zeros((batch, head_bytes), np.uint8)
        self.bodies = np.zeros((batch, self.body_bytes), np.uint8)
        self.names = np.zeros((batch, NAME_BYTES), np.uint8)
        self.names64 = self.names.view(np.uint64)  # (batch, 4): a sender compared in four words
        self.bodies_flat = self.bodies.reshape(-1).data  # body of datagram i: [i * body_bytes, ...)
        self.use_recvmmsg = use_recvmmsg and HAVE_RECVMMSG
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
        self.lengths = field(raw, MMsgHdr.len.offset, "u4")  # bytes of each datagram (msg_len)
        self.flags = field(raw, MMsgHdr.hdr.offset + MsgHdr.flags.offset, "i4")  # msg_flags: MSG_TRUNC
        self._msgs_addr = ctypes.addressof(self._msgs)
        self._heads_mv = [row.data for row in self.heads]
        self._bodies_mv = [row.data for row in self.bodies]
        self.addresses: list[Any] = [None] * batch  # fallback path only: the sender address of each datagram

    def receive(self, sock: socket.socket) -> int:
        """Fill the area with up to ``batch`` waiting datagrams without blocking; returns how many came.

        0 when none is waiting. Raises OSError for errors other than "would block".
        """
        if not self.use_recvmmsg:
            return self._receive_one_by_one(sock)
        self._namelen[:] = NAME_BYTES  # the kernel overwrites it with each address's length
        n = recvmmsg(sock.fileno(), self._msgs_addr, self.batch, MSG_DONTWAIT, None)
        if n < 0:
            err = ctypes.get_errno()
            if err in WOULD_BLOCK:
                return 0
            raise OSError(err, os.strerror(err))
        return int(n)

    def _receive_one_by_one(self, sock: socket.socket) -> int:
        n = 0
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
        return n

    def sender(self, i: int) -> Any:
        """A hashable key for the sender of datagram ``i`` (raw sockaddr bytes, or the address tuple)."""
        if not self.use_recvmmsg:
            return self.addresses[i]
        return self.names[i].tobytes()


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
