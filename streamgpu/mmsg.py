"""Many datagrams per system call: the ``recvmmsg``/``sendmmsg`` structures and functions through ctypes.

Shared by the UDP listener (``ingest.mmsg.PacketArea`` receives into its
packet area with ``recvmmsg``) and the producers (:class:`Sender` sends a
message's :class:`~streamgpu.protocol.udp.Datagrams` with ``sendmmsg``).
Imports neither torch nor the server, so the client may use it. Where libc
has no such call (not Linux) the functions are None and callers fall back
to one ``recvmsg_into`` / ``sendmsg`` per datagram.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import socket
from typing import Any

import numpy as np

from streamgpu.protocol.udp import HEADER_SIZE, Datagrams

MSG_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0x40)
MSG_TRUNC = getattr(socket, "MSG_TRUNC", 0x20)
WOULD_BLOCK = (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR)

# UDP generic segmentation / receive offload (linux/udp.h; the socket module does not name them).
SOL_UDP = 17
UDP_SEGMENT = 103  # control message (or socket option): u16 gso_size, cut what is sent into datagrams of it
UDP_GRO = 104  # socket option: coalesce received runs; recvmsg then says the gso_size in a control message
UDP_MAX_SEGMENTS = 64  # the kernel's limit of datagrams per GSO message (older kernels; newer take 128)
GSO_MAX_BYTES = 65000  # the UDP payload of a GSO message stays under the 65535-byte IP packet limit
# What a kernel or route that cannot do GSO answers: no checksum offload on the device or an IPsec route (EIO),
# a gso_size beyond the path MTU (EMSGSIZE; EINVAL on older kernels), no UDP_SEGMENT at all (the rest).
GSO_REFUSED = frozenset({errno.EIO, errno.EINVAL, errno.EMSGSIZE, errno.ENOPROTOOPT, errno.EOPNOTSUPP})

log = logging.getLogger(__name__)


class IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class MsgHdr(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_void_p),
        ("namelen", ctypes.c_uint32),
        ("iov", ctypes.POINTER(IoVec)),
        ("iovlen", ctypes.c_size_t),
        ("control", ctypes.c_void_p),
        ("controllen", ctypes.c_size_t),
        ("flags", ctypes.c_int),
    ]


class MMsgHdr(ctypes.Structure):
    _fields_ = [("hdr", MsgHdr), ("len", ctypes.c_uint)]


class CMsgHdr(ctypes.Structure):
    _fields_ = [("len", ctypes.c_size_t), ("level", ctypes.c_int), ("type", ctypes.c_int)]


_CMSG_LEN = ctypes.sizeof(CMsgHdr) + 2  # CMSG_LEN(sizeof(u16)): the UDP_SEGMENT control message
_CMSG_SPACE = ctypes.sizeof(CMsgHdr) + ctypes.sizeof(ctypes.c_size_t)  # CMSG_SPACE(sizeof(u16))


def _load(name: str, last_arg: Any) -> Any:
    if not hasattr(os, "sched_getaffinity"):  # not Linux: no recvmmsg / sendmmsg
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = getattr(libc, name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, *last_arg]
    fn.restype = ctypes.c_int
    return fn


recvmmsg = _load("recvmmsg", [ctypes.c_void_p])  # (fd, msgs, n, flags, timeout)
sendmmsg = _load("sendmmsg", [])  # (fd, msgs, n, flags)


def field(array: np.ndarray, offset: int, dtype: str) -> np.ndarray:
    """A strided numpy view of one field of every row of a ctypes array seen as bytes (no copy)."""
    return np.ndarray(array.shape[:1], dtype, array, offset, (array.strides[0],))


def rows(structs: Any, count: int) -> np.ndarray:
    """A ctypes array of ``count`` structures as a (count, sizeof) uint8 numpy array over the same memory."""
    flat = (ctypes.c_uint8 * ctypes.sizeof(structs)).from_buffer(structs)
    return np.ctypeslib.as_array(flat).reshape(count, ctypes.sizeof(structs) // count)


def address(buffer: Any) -> int:
    """Where a buffer's bytes are (read-only ones too: bytes, a numpy array's memoryview)."""
    return int(np.frombuffer(buffer, np.uint8).ctypes.data) if len(memoryview(buffer)) else 0


class Sender:
    """Sends a message's datagrams on a connected, non-blocking socket: one ``sendmmsg`` per up to
    ``capacity`` datagrams, its vectors filled by numpy from the :class:`Datagrams` arrays (three
    buffers per datagram: chunk header, message header (chunk 0 only), payload bytes).

    With ``use_gso`` (Linux UDP generic segmentation offload) runs of up to
    64 datagrams of one size (the last of a run may be shorter) go as one
    message each, with a ``UDP_SEGMENT`` control message: the kernel walks
    its UDP/IP stack once per run and cuts the run into the same datagrams
    at ``gso_size`` (in the NIC, or on loopback at the receiving socket), so
    the receiver sees exactly what a plain send gives it, or, with
    ``UDP_GRO`` on its socket, the run coalesced. A kernel or route that
    refuses GSO (:data:`GSO_REFUSED`, e.g. a NIC without checksum offload,
    or a ``datagram_bytes`` beyond the path MTU) turns it off for this
    Sender for good; what it refused is sent again without it.
    """

    def __init__(self, capacity: int = 1024, use_sendmmsg: bool = True, use_gso: bool = False) -> None:
        self.capacity = capacity
        self.use_sendmmsg = use_sendmmsg and sendmmsg is not None
        self.use_gso = use_gso and self.use_sendmmsg
        self.gso_messages = 0  # GSO messages (2 or more datagrams each) the kernel took
        self._iov = (IoVec * (3 * capacity))()
        self._msgs = (MMsgHdr * capacity)()
        iov = np.ctypeslib.as_array((ctypes.c_uint64 * (6 * capacity)).from_buffer(self._iov)).reshape(capacity, 3, 2)
        self._iov_base, self._iov_len = iov[:, :, 0], iov[:, :, 1]  # (capacity, 3) each: base, len
        msgs = rows(self._msgs, capacity)
        self._iov_addr = ctypes.addressof(self._iov)
        first_iov = self._iov_addr + 3 * ctypes.sizeof(IoVec) * np.arange(capacity, dtype=np.uint64)
        field(msgs, MMsgHdr.hdr.offset + MsgHdr.iov.offset, "u8")[:] = first_iov
        field(msgs, MMsgHdr.hdr.offset + MsgHdr.iovlen.offset, "u8")[:] = 3
        self._msgs_addr = ctypes.addressof(self._msgs)
        self._msg_size = ctypes.sizeof(MMsgHdr)
        if self.use_gso:
            # The GSO messages: each points at its run's iovecs (they are consecutive) and its own control
            # message, filled per send; the control messages' header fields are the same for all of them.
            self._gso = (MMsgHdr * capacity)()
            self._gso_addr = ctypes.addressof(self._gso)
            gso = rows(self._gso, capacity)
            hdr = MMsgHdr.hdr.offset
            self._gso_iov = field(gso, hdr + MsgHdr.iov.offset, "u8")
            self._gso_iovlen = field(gso, hdr + MsgHdr.iovlen.offset, "u8")
            self._gso_control = field(gso, hdr + MsgHdr.control.offset, "u8")
            self._gso_controllen = field(gso, hdr + MsgHdr.controllen.offset, "u8")
            self._cmsg = (ctypes.c_uint8 * (_CMSG_SPACE * capacity))()
            cmsg = rows(self._cmsg, capacity)
            field(cmsg, CMsgHdr.len.offset, "u8")[:] = _CMSG_LEN
            field(cmsg, CMsgHdr.level.offset, "i4")[:] = SOL_UDP
            field(cmsg, CMsgHdr.type.offset, "i4")[:] = UDP_SEGMENT
            self._gso_size = field(cmsg, ctypes.sizeof(CMsgHdr), "u2")
            self._cmsg_at = ctypes.addressof(self._cmsg) + _CMSG_SPACE * np.arange(capacity, dtype=np.uint64)

    def send(self, sock: socket.socket, datagrams: Datagrams, keep: np.ndarray | None = None) -> tuple[int, int]:
        """Send the datagrams (those where ``keep`` is True, if given); returns (sent, failed), in datagrams.

        A datagram the kernel refuses (send buffer full, the peer's port said
        unreachable) is counted failed and the rest still go: UDP does not wait.
        """
        which = np.flatnonzero(keep) if keep is not None else np.arange(len(datagrams))
        if not self.use_sendmmsg:
            return self._send_one_by_one(sock, datagrams, which)
        heads, head, payload = address(datagrams.heads), address(datagrams.head), address(datagrams.payload)
        sent = failed = 0
        fd = sock.fileno()
        for start in range(0, len(which), self.capacity):
            idx = which[start : start + self.capacity]
            n = len(idx)
            self._iov_base[:n, 0] = heads + HEADER_SIZE * idx
            self._iov_len[:n, 0] = HEADER_SIZE
            self._iov_base[:n, 1] = head
            self._iov_len[:n, 1] = np.where(idx == 0, len(datagrams.head), 0)
            self._iov_base[:n, 2] = payload + datagrams.offsets[idx]
            self._iov_len[:n, 2] = datagrams.sizes[idx]
            s, f = self._send_gso(fd, n) if self.use_gso and n > 1 else self._send_plain(fd, 0, n)
            sent += s
            failed += f
        return sent, failed

    def _send_plain(self, fd: int, lo: int, hi: int) -> tuple[int, int]:
        """Datagrams ``lo:hi`` of the filled vectors, one message each."""
        sent = failed = 0
        done = lo
        while done < hi:
            got = sendmmsg(fd, self._msgs_addr + done * self._msg_size, hi - done, 0)
            if got < 0:
                if ctypes.get_errno() == errno.EINTR:
                    continue
                failed += 1  # this datagram is lost; try the next
                done += 1
            else:
                sent += got
                done += got
        return sent, failed

    def _send_gso(self, fd: int, n: int) -> tuple[int, int]:
        """The ``n`` datagrams of the filled vectors as GSO messages: fixed runs of ``k`` datagrams (numpy, no
        loop per datagram); a run whose sizes are not one size (the last may be shorter) goes one by one."""
        totals = self._iov_len[:n].sum(axis=1)
        k = min(UDP_MAX_SEGMENTS, GSO_MAX_BYTES // int(totals.max()))
        if k < 2:  # datagrams over half the limit: nothing to gain
            return self._send_plain(fd, 0, n)
        pos = np.arange(n)
        size = totals[pos - pos % k]  # each datagram's run's first size: its gso_size
        last = (pos % k == k - 1) | (pos == n - 1)
        odd = np.where(last, totals > size, totals != size)
        split = np.logical_or.reduceat(odd, np.arange(0, n, k))  # per run: not one size, send one by one
        starts = np.flatnonzero((pos % k == 0) | split[pos // k])
        m = len(starts)
        counts = np.diff(starts, append=n)
        gso = counts > 1
        self._gso_iov[:m] = self._iov_addr + (3 * ctypes.sizeof(IoVec)) * starts
        self._gso_iovlen[:m] = 3 * counts
        self._gso_control[:m] = np.where(gso, self._cmsg_at[:m], 0)
        self._gso_controllen[:m] = np.where(gso, _CMSG_SPACE, 0)
        self._gso_size[:m] = totals[starts]
        through = np.cumsum(counts)  # datagrams in messages 0..j
        sent = failed = 0
        done = 0
        while done < m:
            got = sendmmsg(fd, self._gso_addr + done * self._msg_size, m - done, 0)
            if got >= 0:
                sent += int(through[done + got - 1]) - (int(through[done - 1]) if done else 0)
                self.gso_messages += int(np.count_nonzero(gso[done : done + got]))
                done += got
                continue
            err = ctypes.get_errno()
            if err == errno.EINTR:
                continue
            lo, count = int(starts[done]), int(counts[done])
            if count == 1:
                failed += 1  # this datagram is lost; try the next
            elif err in GSO_REFUSED:
                self.use_gso = False
                log.debug("UDP GSO refused (%s): sending one datagram per message from now on", os.strerror(err))
                s, f = self._send_plain(fd, lo, n)  # this run and the rest, again without GSO
                return sent + s, failed + f
            else:  # a full send buffer, a pending ICMP error: as many of the run go as would without GSO
                s, f = self._send_plain(fd, lo, lo + count)
                sent += s
                failed += f
            done += 1
        return sent, failed

    @staticmethod
    def _send_one_by_one(sock: socket.socket, datagrams: Datagrams, which: np.ndarray) -> tuple[int, int]:
        sent = failed = 0
        for i in which.tolist():
            try:
                sock.sendmsg(datagrams[i])
            except OSError:
                failed += 1
            else:
                sent += 1
        return sent, failed
