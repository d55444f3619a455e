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
import os
import socket
from typing import Any

import numpy as np

from streamgpu.protocol.udp import HEADER_SIZE, Datagrams

MSG_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0x40)
MSG_TRUNC = getattr(socket, "MSG_TRUNC", 0x20)
WOULD_BLOCK = (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR)


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
    buffers per datagram: chunk header, message header (chunk 0 only), payload bytes)."""

    def __init__(self, capacity: int = 1024, use_sendmmsg: bool = True) -> None:
        self.capacity = capacity
        self.use_sendmmsg = use_sendmmsg and sendmmsg is not None
        self._iov = (IoVec * (3 * capacity))()
        self._msgs = (MMsgHdr * capacity)()
        iov = np.ctypeslib.as_array((ctypes.c_uint64 * (6 * capacity)).from_buffer(self._iov)).reshape(capacity, 3, 2)
        self._iov_base, self._iov_len = iov[:, :, 0], iov[:, :, 1]  # (capacity, 3) each: base, len
        msgs = rows(self._msgs, capacity)
        first_iov = ctypes.addressof(self._iov) + 3 * ctypes.sizeof(IoVec) * np.arange(capacity, dtype=np.uint64)
        field(msgs, MMsgHdr.hdr.offset + MsgHdr.iov.offset, "u8")[:] = first_iov
        field(msgs, MMsgHdr.hdr.offset + MsgHdr.iovlen.offset, "u8")[:] = 3
        self._msgs_addr = ctypes.addressof(self._msgs)
        self._msg_size = ctypes.sizeof(MMsgHdr)

    def send(self, sock: socket.socket, datagrams: Datagrams, keep: np.ndarray | None = None) -> tuple[int, int]:
        """Send the datagrams (those where ``keep`` is True, if given); returns (sent, failed).

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
            done = 0
            while done < n:
                got = sendmmsg(fd, self._msgs_addr + done * self._msg_size, n - done, 0)
                if got < 0:
                    err = ctypes.get_errno()
                    if err == errno.EINTR:
                        continue
                    failed += 1  # this datagram is lost; try the next
                    done += 1
                else:
                    sent += got
                    done += got
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
