"""Pinned host ring buffer: one allocation at start-up, a slot per frame.

Slots are carved from the ring in arrival order and handed to the transport,
which lets the kernel write the payload straight into them. A slot is released
when the host-to-device copy that read it has completed (not when the reply is
sent). Releases may come out of order (several models, several batches); the
space of a released slot is reused once every older slot is released too,
which keeps the allocator a pair of offsets and a deque.

The ring never grows: when it is full, ``reserve`` returns None and the caller
registers ``when_space`` to be told when to retry (TCP pauses reading).
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable

import numpy as np

ALIGNMENT = 256  # slot starts aligned for 16-byte vector loads and DMA-friendly addresses


class Slot:
    """A reserved region of the ring. ``offset``/``nbytes`` address the payload."""

    __slots__ = ("_alloc", "nbytes", "offset", "released")

    def __init__(self, offset: int, nbytes: int, alloc: int) -> None:
        self.offset = offset
        self.nbytes = nbytes
        self._alloc = alloc
        self.released = False

    def __repr__(self) -> str:
        return f"Slot(offset={self.offset}, nbytes={self.nbytes}, released={self.released})"


class PinnedRing:
    """Variable-size slots over one preallocated uint8 buffer.

    ``buffer`` is the backing memory (page-locked on CUDA machines, see
    ``Backend.allocate_host``); it must be a 1-D uint8 numpy array. All methods
    run on the event loop thread; none blocks.

    ``defer`` runs the wake-ups of ``when_space`` waiters (the server passes
    ``loop.call_soon``): a waiter is another connection that parses frames and
    submits them, which must not happen inside whatever code released a slot.
    Without it (tests) waiters run inside ``release``.
    """

    def __init__(
        self,
        buffer: np.ndarray,
        alignment: int = ALIGNMENT,
        defer: Callable[[Callable[[], None]], object] | None = None,
    ) -> None:
        if buffer.dtype != np.uint8 or buffer.ndim != 1:
            raise ValueError("ring buffer must be a 1-D uint8 array")
        if alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"alignment must be a power of two, got {alignment}")
        self.buffer = buffer
        self.capacity = len(buffer)
        self._alignment = alignment
        self._live: collections.deque[Slot] = collections.deque()
        self._used = 0  # bytes held by live slots, including alignment padding and skipped tails
        self._waiters: collections.deque[Callable[[], None]] = collections.deque()
        self._defer = defer

    # -- state ---------------------------------------------------------------

    @property
    def slots_in_use(self) -> int:
        """Slots reserved and not yet reclaimed (released slots behind an older live one count)."""
        return sum(not s.released for s in self._live)

    @property
    def used_bytes(self) -> int:
        return self._used

    @property
    def waiters(self) -> int:
        return len(self._waiters)

    # -- reserve / release ----------------------------------------------------

    def reserve(self, nbytes: int) -> Slot | None:
        """Reserve a contiguous slot of ``nbytes``; None if the ring has no room now."""
        size = self._round(nbytes)
        if size > self.capacity:
            raise ValueError(f"slot of {nbytes} bytes can never fit a ring of {self.capacity} bytes")
        if not self._live:
            return self._take(0, nbytes, size)
        oldest, newest = self._live[0], self._live[-1]
        tail = oldest.offset
        head = newest.offset + newest._alloc
        if newest.offset >= tail:  # not wrapped: free space is [head, capacity) then [0, tail)
            if self.capacity - head >= size:
                return self._take(head, nbytes, size)
            if tail >= size:
                # Skip the unusable end of the ring: charge it to the newest slot so
                # it is given back with that slot.
                newest._alloc += self.capacity - head
                self._used += self.capacity - head
                return self._take(0, nbytes, size)
            return None
        if tail - head >= size:  # wrapped: free space is [head, tail)
            return self._take(head, nbytes, size)
        return None

    def release(self, slot: Slot) -> None:
        """Give a slot back. Its memory must no longer be read by any pending copy."""
        if slot.released:
            raise RuntimeError(f"{slot!r} released twice")
        slot.released = True
        freed = False
        while self._live and self._live[0].released:
            self._used -= self._live.popleft()._alloc
            freed = True
        if freed:
            self._wake()

    def when_space(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (once, on the loop) the next time space is reclaimed.

        The callback should retry ``reserve`` and register again if it fails.
        """
        self._waiters.append(callback)

    def cancel_wait(self, callback: Callable[[], None]) -> None:
        with contextlib.suppress(ValueError):  # already woken
            self._waiters.remove(callback)

    # -- views ----------------------------------------------------------------

    def view(self, slot: Slot) -> memoryview:
        """Writable memoryview of the slot's payload bytes (for recv_into / get_buffer)."""
        return self.buffer[slot.offset : slot.offset + slot.nbytes].data

    def array(self, slot: Slot) -> np.ndarray:
        """The slot's payload as a uint8 numpy view (no copy)."""
        return self.buffer[slot.offset : slot.offset + slot.nbytes]

    # -- internals --------------------------------------------------------------

    def _round(self, nbytes: int) -> int:
        a = self._alignment
        return max(a, (nbytes + a - 1) & ~(a - 1))

    def _take(self, offset: int, nbytes: int, size: int) -> Slot:
        slot = Slot(offset, nbytes, size)
        self._live.append(slot)
        self._used += size
        return slot

    def _wake(self) -> None:
        # Wake every waiter: each retries and re-registers if it still does not fit.
        waiters, self._waiters = self._waiters, collections.deque()
        for callback in waiters:
            if self._defer is not None:
                self._defer(callback)
            else:
                callback()
