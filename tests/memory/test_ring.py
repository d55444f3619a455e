"""PinnedRing: alignment, wrap-around, out-of-order release, waiters, bounded memory."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from streamgpu.memory import ALIGNMENT, PinnedRing, Slot


def ring(nbytes: int = 4096) -> PinnedRing:
    return PinnedRing(np.zeros(nbytes, np.uint8))


def test_slots_are_aligned_disjoint_views() -> None:
    r = ring()
    a, b = r.reserve(10), r.reserve(300)
    assert a is not None and b is not None
    assert a.offset % ALIGNMENT == 0 and b.offset % ALIGNMENT == 0
    r.view(a)[:] = b"a" * 10
    r.view(b)[:] = b"b" * 300
    assert r.array(a).tobytes() == b"a" * 10 and r.array(b).tobytes() == b"b" * 300
    assert np.shares_memory(r.array(a), r.buffer)


def test_full_ring_refuses_then_wraps_around() -> None:
    r = ring(1024)
    slots = [r.reserve(256) for _ in range(4)]
    assert all(slots) and r.reserve(1) is None
    r.release(slots[0])  # type: ignore[arg-type]
    again = r.reserve(256)
    assert again is not None and again.offset == 0  # wrapped into the freed head
    assert r.reserve(1) is None


def test_out_of_order_release_reclaims_once_older_slots_go() -> None:
    r = ring(1024)
    a, b, c, d = (r.reserve(256) for _ in range(4))
    assert a and b and c and d
    r.release(c)
    assert r.reserve(256) is None  # c's space waits behind a and b
    r.release(a)
    r.release(b)
    assert r.used_bytes == 256  # only d is still live
    assert r.slots_in_use == 1


def test_waiters_are_woken_when_space_is_reclaimed() -> None:
    r = ring(512)
    a = r.reserve(512)
    assert a is not None and r.reserve(100) is None
    woken: list[Slot | None] = []
    r.when_space(lambda: woken.append(r.reserve(100)))
    r.release(a)
    assert woken and woken[0] is not None and r.waiters == 0


def test_cancelled_waiter_is_not_called() -> None:
    r = ring(512)
    a = r.reserve(512)
    assert a is not None
    calls: list[int] = []

    def cb() -> None:
        calls.append(1)

    r.when_space(cb)
    r.cancel_wait(cb)
    r.release(a)
    assert calls == []


def test_double_release_and_oversized_are_errors() -> None:
    r = ring(1024)
    a = r.reserve(8)
    assert a is not None
    r.release(a)
    with pytest.raises(RuntimeError, match="twice"):
        r.release(a)
    with pytest.raises(ValueError, match="never fit"):
        r.reserve(2048)


def test_random_workload_never_overlaps_and_memory_stays_bounded() -> None:
    rng = random.Random(1)
    r = ring(64 * 1024)
    live: list[Slot] = []
    for step in range(20000):
        if live and (rng.random() < 0.5 or r.used_bytes > 60 * 1024):
            r.release(live.pop(rng.randrange(len(live))))  # slow consumer, out-of-order release
        else:
            slot = r.reserve(rng.randint(1, 9000))
            if slot is not None:
                assert slot.offset + slot.nbytes <= r.capacity
                r.array(slot)[:] = step % 251
                live.append(slot)
        assert r.used_bytes <= r.capacity
        if step % 500 == 0:  # no two live slots overlap: every slot still holds its own fill
            spans = sorted((s.offset, s.offset + s.nbytes) for s in live)
            assert all(e1 <= s2 for (_, e1), (s2, _) in itertools.pairwise(spans))
    for s in live:
        r.release(s)
    assert r.used_bytes == 0 and r.slots_in_use == 0


def test_deferred_waiters_run_outside_release() -> None:
    deferred: list[object] = []
    r = PinnedRing(np.zeros(512, np.uint8), defer=deferred.append)
    a = r.reserve(512)
    assert a is not None
    woken: list[int] = []
    r.when_space(lambda: woken.append(1))
    r.release(a)
    assert woken == [] and len(deferred) == 1  # not called inside release...
    deferred[0]()  # type: ignore[operator]
    assert woken == [1]  # ...but when the loop runs it
