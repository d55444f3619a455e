"""SlotPool and HostSegment: independent reuse, alignment, coalescing, FIFO waiters, cancellation, shared memory.

Run this file as a script for the micro-benchmark quoted in ``streamgpu/memory/pool.py``:
``.venv/bin/python tests/memory/test_pool.py``.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import multiprocessing
import os
import random
import time
from collections.abc import Callable
from multiprocessing.reduction import DupFd
from typing import Any, Protocol

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamgpu.memory import ALIGNMENT, HostSegment, Slot, SlotPool, Waiter


def pool(nbytes: int = 4096, **kwargs: Any) -> SlotPool:
    return SlotPool(np.zeros(nbytes, np.uint8), **kwargs)


def take(p: SlotPool, nbytes: int) -> Slot:
    slot = p.reserve(nbytes)
    assert slot is not None, f"no room for {nbytes} bytes in {p!r}"
    return slot


def check_invariants(p: SlotPool, live: list[Slot]) -> None:
    """Live slots and free extents tile [start, usable end) exactly; nothing overlaps; counters agree."""
    usable_end = p.start + (p.capacity // p.alignment) * p.alignment
    spans = sorted((s.offset, s.offset + s._alloc) for s in live if s._alloc)
    for s in live:
        assert s.offset % p.alignment == 0 and p.start <= s.offset and s.offset + s.nbytes <= p.end
        assert s._alloc >= s.nbytes and s._alloc % p.alignment == 0
    free = p.free_extents()
    assert all(e1 < s2 for (_, e1), (s2, _) in itertools.pairwise(free)), "adjacent free extents not coalesced"
    tiles = sorted(spans + free)
    assert all(e1 == s2 for (_, e1), (s2, _) in itertools.pairwise(tiles)), "overlap or hole"
    if tiles:
        assert tiles[0][0] == p.start and tiles[-1][1] == usable_end
    assert p.used_bytes == sum(s._alloc for s in live)
    assert p.slots_in_use == len(live)
    assert p.largest_free() == max((e - s for s, e in free), default=0)


# -- independent reuse: the regression test for head-of-line blocking ------------------------


class _Allocator(Protocol):
    def reserve(self, nbytes: int) -> Any: ...
    def release(self, slot: Any) -> None: ...


def producers_never_blocked(make: Callable[[np.ndarray], _Allocator]) -> None:
    """One slot is held forever (a trickling producer); the others keep cycling sizes: never blocked."""
    rng = random.Random(7)
    alloc = make(np.zeros(1 << 20, np.uint8))
    parked = alloc.reserve(1000)  # never released
    assert parked is not None
    window: collections.deque[Any] = collections.deque()
    for round_ in range(2000):
        slot = alloc.reserve(rng.choice([150528, 4096, 1, 65536, rng.randint(1, 100_000)]))
        assert slot is not None, f"blocked at round {round_} with {len(window)} other slots live"
        window.append(slot)
        while len(window) > 4:  # at most 4 x 150528 bytes live besides the parked slot: < 60% of the pool
            alloc.release(window.popleft())


def test_one_held_slot_does_not_block_the_others() -> None:
    producers_never_blocked(SlotPool)


def test_held_slots_cost_only_their_own_bytes() -> None:
    p = pool(64 * 1024)
    held, others = [], []
    for _ in range(8):  # small held slots scattered between larger ones
        held.append(take(p, 100))
        others.append(take(p, 5000))
    for s in others:
        p.release(s)
    assert p.used_bytes == 8 * ALIGNMENT
    check_invariants(p, held)
    # Every byte outside the held slots is usable again: the holes between them and the rest.
    again = [take(p, 5000) for _ in range(8)] + [take(p, 64 * 1024 - 8 * ALIGNMENT - 8 * 5120)]
    assert p.reserve(1) is None
    check_invariants(p, held + again)


# -- alignment, views ----------------------------------------------------------------------


def test_slots_are_aligned_disjoint_views_of_the_buffer() -> None:
    p = pool()
    a, b = take(p, 10), take(p, 300)
    assert a.offset % ALIGNMENT == 0 and b.offset % ALIGNMENT == 0
    assert p.used_bytes == ALIGNMENT + 2 * ALIGNMENT  # rounded up to the alignment
    p.view(a)[:] = b"a" * 10
    p.view(b)[:] = b"b" * 300
    assert p.array(a).tobytes() == b"a" * 10 and p.array(b).tobytes() == b"b" * 300
    assert np.shares_memory(p.array(a), p.buffer)
    assert np.shares_memory(np.frombuffer(p.view(b), np.uint8), p.buffer)
    assert len(p.view(a)) == 10 and not p.view(a).readonly


def test_other_alignments_and_unaligned_end() -> None:
    p = SlotPool(np.zeros(5000, np.uint8), start=64, end=1000, alignment=64)
    assert p.capacity == 936 and p.fits(896) and not p.fits(897)
    slots = [take(p, 1) for _ in range(14)]  # 896 // 64
    assert all(s.offset % 64 == 0 for s in slots) and p.reserve(1) is None
    check_invariants(p, slots)
    with pytest.raises(ValueError, match="power of two"):
        SlotPool(np.zeros(100, np.uint8), alignment=48)
    with pytest.raises(ValueError, match="multiple of the alignment"):
        SlotPool(np.zeros(4096, np.uint8), start=100)
    with pytest.raises(ValueError, match="not inside"):
        SlotPool(np.zeros(4096, np.uint8), start=0, end=5000)
    with pytest.raises(ValueError, match="1-D uint8"):
        SlotPool(np.zeros(4096, np.float32))


def test_zero_length_slots_cost_nothing() -> None:
    p = pool(512)
    full = take(p, 512)
    z = take(p, 0)  # fits even though the pool is full
    assert z.nbytes == 0 and z.offset % ALIGNMENT == 0 and len(p.view(z)) == 0
    assert p.used_bytes == 512 and p.slots_in_use == 2
    p.release(z)
    with pytest.raises(RuntimeError, match="twice"):
        p.release(z)
    p.release(full)
    assert p.used_bytes == 0 and p.slots_in_use == 0


# -- coalescing and fragmentation ------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    alignment=st.sampled_from([16, 256]),
    start_units=st.integers(0, 4),
    length=st.integers(1, 40_000),
    ops=st.lists(st.tuples(st.booleans(), st.integers(0, 12_000), st.integers(0, 10**6)), max_size=150),
    order_seed=st.integers(0, 10**6),
)
def test_random_alloc_free_never_overlaps_and_coalesces_fully(
    alignment: int, start_units: int, length: int, ops: list[tuple[bool, int, int]], order_seed: int
) -> None:
    start = start_units * alignment
    buffer = np.zeros(start + length + 777, np.uint8)
    p = SlotPool(buffer, start=start, end=start + length, alignment=alignment)
    live: list[Slot] = []
    for is_alloc, nbytes, pick in ops:
        if is_alloc or not live:
            if not p.fits(nbytes):
                with pytest.raises(ValueError, match="never fit"):
                    p.reserve(nbytes)
                continue
            slot = p.reserve(nbytes)
            rounded = -(-nbytes // alignment) * alignment
            if slot is None:  # the search is complete: None means no free extent is big enough
                assert p.largest_free() < rounded
            else:
                assert slot.nbytes == nbytes
                live.append(slot)
        else:
            p.release(live.pop(pick % len(live)))
        check_invariants(p, live)
    random.Random(order_seed).shuffle(live)
    while live:
        p.release(live.pop())
        check_invariants(p, live)
    usable = (length // alignment) * alignment
    assert p.used_bytes == 0 and p.slots_in_use == 0
    assert p.free_extents() == ([(start, start + usable)] if usable else [])


def test_data_in_live_slots_survives_a_random_workload() -> None:
    rng = random.Random(1)
    p = pool(256 * 1024)
    live: list[tuple[Slot, int]] = []
    for step in range(20000):
        if live and (rng.random() < 0.5 or p.used_bytes > 200 * 1024):
            slot, fill = live.pop(rng.randrange(len(live)))
            assert (p.array(slot) == fill).all()  # nobody wrote over it
            p.release(slot)
        else:
            got = p.reserve(rng.randint(1, 9000))
            if got is not None:
                p.array(got)[:] = step % 251
                live.append((got, step % 251))
    check_invariants(p, [s for s, _ in live])


def test_same_size_workload_never_fragments() -> None:
    """Frames of one size: a reserve fails only when every whole frame-sized place is taken."""
    rng = random.Random(3)
    frame = 150528
    p = pool(40 * frame + 1000)  # a tail that fits no frame
    live: list[Slot] = []
    for _ in range(5000):
        if live and rng.random() < 0.5:
            p.release(live.pop(rng.randrange(len(live))))
        else:
            slot = p.reserve(frame)
            assert (slot is None) == (len(live) == 40)
            if slot is not None:
                live.append(slot)
    assert len(p.free_extents()) <= 40 - len(live) + 1  # free space stays in frame-sized pieces
    check_invariants(p, live)


def test_a_released_frame_slot_is_reused_before_the_big_free_extent_is_split() -> None:
    p = pool(1 << 20)
    a, b, c = take(p, 150528), take(p, 150528), take(p, 150528)
    p.release(b)
    assert take(p, 150528).offset == b.offset  # exact hole reused: the large extent stays whole
    assert len(p.free_extents()) == 1
    p.release(a)
    p.release(c)


def test_search_finds_a_fit_behind_many_too_small_extents_of_the_same_class() -> None:
    """The own size class is probed only a few times first; with nothing larger, it is scanned to the end."""
    unit = 16
    p = SlotPool(np.zeros(200 * unit, np.uint8), alignment=unit)
    holes, walls = [], []
    for n in [16] * 6 + [17]:  # 16 and 17 units share a size class; a request of 17 fits only the last
        holes.append(take(p, n * unit))
        walls.append(take(p, unit))
    rest = take(p, p.largest_free())
    for h in holes:  # released in address order: the too-small holes come first in their class
        p.release(h)
    assert p.largest_free() == 17 * unit
    got = take(p, 17 * unit)
    assert got.offset == holes[-1].offset
    check_invariants(p, [*walls, rest, got])


def test_never_fits_is_a_value_error() -> None:
    p = pool(1024)
    assert p.fits(1024) and not p.fits(1025) and p.fits(0)
    with pytest.raises(ValueError, match="never fit"):
        p.reserve(1025)
    with pytest.raises(ValueError, match="never fit"):
        p.wait(2048, lambda slot: None)
    with pytest.raises(ValueError, match="never fit"):
        p.reserve(-1)


def test_double_release_and_foreign_slots_are_errors() -> None:
    p, q = pool(1024), pool(1024)
    a = take(p, 8)
    with pytest.raises(ValueError, match="another pool"):
        q.release(a)
    p.release(a)
    with pytest.raises(RuntimeError, match="twice"):
        p.release(a)
    assert p.used_bytes == 0 and p.slots_in_use == 0


# -- waiters ---------------------------------------------------------------------------------


class Deferred:
    """A stand-in for loop.call_soon: callbacks wait here until ``run``."""

    def __init__(self) -> None:
        self.calls: list[Callable[[], None]] = []

    def __call__(self, callback: Callable[[], None]) -> None:
        self.calls.append(callback)

    def run(self) -> None:
        calls, self.calls = self.calls, []
        for callback in calls:
            callback()


def test_head_waiter_is_not_overtaken_and_callbacks_run_outside_release() -> None:
    defer = Deferred()
    p = pool(4096, defer=defer)
    a, b = take(p, 2048), take(p, 2048)
    got: list[tuple[str, Slot]] = []
    big = p.wait(4096, lambda s: got.append(("big", s)))
    assert p.reserve(256) is None  # no room, and a queue: a new request does not overtake
    small = p.wait(256, lambda s: got.append(("small", s)))
    assert p.waiters == 2 and defer.calls == []
    p.release(a)  # 2048 free: the small waiter would fit, but the big one is first
    assert p.reserve(256) is None and p.waiters == 2 and defer.calls == []
    p.release(b)
    assert got == [] and len(defer.calls) == 1  # granted, but not called inside release
    assert p.waiters == 1 and p.used_bytes == 4096  # the slot is already the big waiter's
    defer.run()
    assert [name for name, _ in got] == ["big"] and got[0][1].nbytes == 4096
    assert repr(big).endswith("done)") and repr(small).endswith("queued)")
    p.release(got[0][1])
    defer.run()
    assert [name for name, _ in got] == ["big", "small"] and p.waiters == 0
    p.release(got[1][1])
    assert p.used_bytes == 0


def test_release_serves_heads_while_they_fit_and_stops_at_the_first_that_does_not() -> None:
    defer = Deferred()
    p = pool(4096, defer=defer)
    blocker = take(p, 4096)
    got: list[int] = []
    for n in (1024, 1024, 3000, 256):  # the 3000-byte waiter will block the 256-byte one behind it
        p.wait(n, lambda s: got.append(s.nbytes))
    p.release(blocker)
    defer.run()
    assert got == [1024, 1024] and p.waiters == 2  # 2048 left free, the 3000 head waits, 256 stays behind
    assert p.largest_free() == 2048


def test_wait_grants_at_once_when_the_queue_is_empty() -> None:
    defer = Deferred()
    p = pool(1024, defer=defer)
    got: list[Slot] = []
    p.wait(100, got.append)
    assert got == [] and p.waiters == 0 and p.used_bytes == ALIGNMENT  # reserved now, delivered via defer
    defer.run()
    assert len(got) == 1


def test_without_defer_callbacks_run_inline_and_may_reenter() -> None:
    p = pool(1024)
    blocker = take(p, 1024)
    got: list[int] = []

    def give_back(slot: Slot) -> None:  # releases its slot at once: the next waiter gets the space
        got.append(slot.nbytes)
        p.release(slot)

    for n in (1024, 512, 1024):
        p.wait(n, give_back)
    p.release(blocker)
    assert got == [1024, 512, 1024] and p.waiters == 0 and p.used_bytes == 0


def test_cancel_a_queued_waiter() -> None:
    defer = Deferred()
    p = pool(1024, defer=defer)
    blocker = take(p, 1024)
    called: list[Slot] = []
    head = p.wait(1024, called.append)
    second = p.wait(256, called.append)
    p.cancel(second)
    p.cancel(second)  # idempotent
    assert p.waiters == 1
    p.cancel(head)  # the head goes: nobody is left waiting, and nothing was taken for them
    assert p.waiters == 0
    p.release(blocker)
    defer.run()
    assert called == [] and p.used_bytes == 0 and p.slots_in_use == 0
    assert take(p, 1024) is not None  # the queue is really empty


def test_cancelling_the_head_serves_the_next_waiters() -> None:
    defer = Deferred()
    p = pool(1024, defer=defer)
    a = take(p, 512)
    got: list[Slot] = []
    head = p.wait(1024, got.append)
    p.wait(256, got.append)
    p.wait(256, got.append)
    p.cancel(head)
    defer.run()
    assert [s.nbytes for s in got] == [256, 256] and p.waiters == 0
    for s in [a, *got]:
        p.release(s)
    assert p.used_bytes == 0


def test_cancel_after_grant_before_delivery_releases_the_slot() -> None:
    defer = Deferred()
    p = pool(1024, defer=defer)
    blocker = take(p, 1024)
    called: list[Slot] = []
    w = p.wait(512, called.append)
    p.release(blocker)
    assert p.used_bytes == 512 and len(defer.calls) == 1  # granted, delivery pending
    p.cancel(w)
    assert p.used_bytes == 0 and p.slots_in_use == 0
    defer.run()
    assert called == []
    p.cancel(w)  # still idempotent


def test_cancel_after_delivery_leaves_the_slot_to_its_owner() -> None:
    defer = Deferred()
    p = pool(1024, defer=defer)
    got: list[Slot] = []
    w = p.wait(512, got.append)
    defer.run()
    p.cancel(w)
    assert p.used_bytes == 512 and len(got) == 1 and not got[0].released
    p.release(got[0])
    assert p.used_bytes == 0


def test_cancelled_waiters_do_not_pile_up_behind_a_stuck_head() -> None:
    p = pool(1024)
    blocker = take(p, 1024)
    p.wait(1024, lambda s: None)  # stuck head
    for _ in range(1000):
        p.cancel(p.wait(8, lambda s: None))
    assert p.waiters == 1 and len(p._queue) < 100
    with pytest.raises(ValueError, match="another pool"):
        pool(1024).cancel(Waiter(p, 1, 1, lambda s: None))
    p.release(blocker)


# -- reserve_wait --------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_reserve_wait_returns_at_once_or_in_turn() -> None:
    loop = asyncio.get_running_loop()
    p = pool(1024, defer=loop.call_soon)
    a = await p.reserve_wait(1024)
    first = asyncio.ensure_future(p.reserve_wait(1024))
    second = asyncio.ensure_future(p.reserve_wait(100))
    await asyncio.sleep(0)
    assert p.waiters == 2 and not first.done()
    p.release(a)
    b = await first
    assert b.nbytes == 1024 and not second.done()
    p.release(b)
    c = await second
    p.release(c)
    assert p.used_bytes == 0
    with pytest.raises(ValueError, match="never fit"):
        await p.reserve_wait(4096)


@pytest.mark.asyncio
async def test_reserve_wait_cancelled_while_waiting_leaks_nothing() -> None:
    loop = asyncio.get_running_loop()
    p = pool(1024, defer=loop.call_soon)
    a = take(p, 1024)
    task = asyncio.ensure_future(p.reserve_wait(512))
    await asyncio.sleep(0)
    assert p.waiters == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert p.waiters == 0
    p.release(a)
    await asyncio.sleep(0)
    assert p.used_bytes == 0 and p.slots_in_use == 0


@pytest.mark.asyncio
@pytest.mark.parametrize("inline", [False, True], ids=["deferred", "inline"])
async def test_reserve_wait_cancelled_after_grant_leaks_nothing(inline: bool) -> None:
    loop = asyncio.get_running_loop()
    p = pool(1024, defer=None if inline else loop.call_soon)
    a = take(p, 1024)
    task = asyncio.ensure_future(p.reserve_wait(512))
    await asyncio.sleep(0)
    p.release(a)  # grants the waiter; deferred: delivery pending; inline: the future has its slot
    assert p.used_bytes == 512
    task.cancel()  # before the task runs again
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0)
    assert p.used_bytes == 0 and p.slots_in_use == 0 and p.waiters == 0


@pytest.mark.asyncio
async def test_reserve_wait_cancelled_then_granted_inline_gives_the_slot_back() -> None:
    p = pool(1024)  # no defer: the grant runs inside release, before the cancelled task resumes
    a = take(p, 1024)
    task = asyncio.ensure_future(p.reserve_wait(512))
    await asyncio.sleep(0)
    task.cancel()  # cancels its future now; the task's own clean-up runs at its next step
    p.release(a)
    with pytest.raises(asyncio.CancelledError):
        await task
    assert p.used_bytes == 0 and p.slots_in_use == 0 and p.waiters == 0


# -- shared memory -------------------------------------------------------------------------


def test_segment_create_attach_and_close() -> None:
    seg = HostSegment.create(1 << 20)
    assert seg.nbytes == 1 << 20 and seg.buffer.dtype == np.uint8 and seg.buffer.shape == (1 << 20,)
    assert seg.buffer.ctypes.data % os.sysconf("SC_PAGE_SIZE") == 0
    if seg.fd < 0:
        pytest.skip("no memfd_create: anonymous segment, nothing to attach")
    other = HostSegment.attach(seg.fd, seg.nbytes)
    assert other.fd != seg.fd  # its own descriptor
    seg.buffer[12345:12349] = [1, 2, 3, 4]
    assert other.buffer[12345:12349].tolist() == [1, 2, 3, 4]
    other.buffer[-1] = 99
    assert seg.buffer[-1] == 99
    assert not np.shares_memory(seg.buffer, other.buffer)  # two mappings of one memory
    fd = other.fd
    other.close()
    other.close()  # idempotent
    assert other.closed and other.fd == -1
    with pytest.raises(OSError):
        os.fstat(fd)
    assert seg.buffer[12345] == 1  # the first mapping is untouched
    seg.close()
    with pytest.raises(ValueError, match="fewer"):
        HostSegment.attach(HostSegment.create(4096).fd, 8192)
    with pytest.raises(ValueError, match="positive"):
        HostSegment.create(0)


def test_segment_close_with_live_views_defers_the_unmap() -> None:
    with HostSegment.create(1 << 16) as seg:
        p = SlotPool(seg.buffer)
        slot = take(p, 100)
        view = p.array(slot)
        view[:] = 7
        fd = seg.fd
    assert seg.closed  # no BufferError: the mapping lives on while views do
    if fd >= 0:
        with pytest.raises(OSError):
            os.fstat(fd)
    assert (view == 7).all()
    del p, view


def test_segment_anonymous_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(os, "memfd_create", raising=False)
    seg = HostSegment.create(10000)
    assert seg.fd == -1 and len(seg.buffer) == 10000
    seg.buffer[:] = 5
    seg.close()
    seg.close()


def _child_reads_and_writes(fd: Any, nbytes: int) -> None:
    seg = HostSegment.attach(fd.detach() if hasattr(fd, "detach") else fd, nbytes)
    ok = seg.buffer[:4].tolist() == [9, 8, 7, 6]
    seg.buffer[nbytes - 4 :] = [1, 2, 3, 4]
    seg.close()
    os._exit(0 if ok else 3)


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_segment_attached_by_a_child_process(method: str) -> None:
    if method not in multiprocessing.get_all_start_methods():
        pytest.skip(f"no {method} start method here")
    seg = HostSegment.create(1 << 16)
    if seg.fd < 0:
        pytest.skip("no memfd_create")
    seg.buffer[:4] = [9, 8, 7, 6]
    ctx: Any = multiprocessing.get_context(method)
    # spawn: DupFd hands the descriptor to the new process as multiprocessing does for sockets.
    fd = DupFd(seg.fd) if method == "spawn" else seg.fd
    child = ctx.Process(target=_child_reads_and_writes, args=(fd, seg.nbytes))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    assert seg.buffer[-4:].tolist() == [1, 2, 3, 4]
    seg.close()


def test_pools_over_sub_ranges_stay_inside_them() -> None:
    with HostSegment.create(64 * 1024) as seg:
        buffer = seg.buffer
        pools = [SlotPool(buffer, 4096, 20000), SlotPool(buffer, 20480, 40000), SlotPool(buffer, 40960)]
        mark = {id(p): i + 1 for i, p in enumerate(pools)}  # each pool's own non-zero byte
        rng = random.Random(5)
        live: list[tuple[SlotPool, Slot]] = []
        for _ in range(3000):
            if live and rng.random() < 0.45:
                p, slot = live.pop(rng.randrange(len(live)))
                assert (p.array(slot) == mark[id(p)]).all()
                p.release(slot)
            else:
                p = rng.choice(pools)
                got = p.reserve(rng.randint(0, 6000))
                if got is not None:
                    assert p.start <= got.offset and got.offset + got.nbytes <= p.end
                    p.array(got)[:] = mark[id(p)]
                    live.append((p, got))
        outside = np.ones(len(buffer), bool)
        for p in pools:
            outside[p.start : p.end] = False
        assert not buffer[outside].any()  # nobody wrote outside their pool
        assert buffer[4096:20000].any() and buffer[40960:].any()
        for p, slot in live:
            p.release(slot)
        for p in pools:
            check_invariants(p, [])
        del pools, p, live


# -- micro-benchmark (run this file as a script) ---------------------------------------------


def _bench() -> None:  # pragma: no cover - manual
    def steady(p: SlotPool, size: int, held: int, n: int) -> float:
        window: collections.deque[Any] = collections.deque(take(p, size) for _ in range(held))
        reserve, release = p.reserve, p.release
        t0 = time.perf_counter()
        for _ in range(n):
            release(window.popleft())
            window.append(reserve(size))
        dt = time.perf_counter() - t0
        for s in window:
            release(s)
        return dt / n

    def mixed(p: SlotPool, held: int, n: int) -> float:
        rng = random.Random(1)
        choices = [150528, 921600, 1555200]
        sizes = [rng.choice([rng.randint(1, 4096), rng.randint(1, 1 << 20), rng.choice(choices)]) for _ in range(n)]
        picks = [rng.randrange(held) for _ in range(n)]
        live: list[Slot | None] = [p.reserve(size) for size in sizes[:held]]
        reserve, release = p.reserve, p.release
        t0 = time.perf_counter()
        for i, size in zip(picks, sizes, strict=True):
            s = live[i]
            if s is not None:
                release(s)
            live[i] = reserve(size)
        dt = time.perf_counter() - t0
        for s in live:
            if s is not None:
                release(s)
        return dt / n

    p = SlotPool(np.zeros(256 << 20, np.uint8))
    for name, run in [
        ("steady 150528 B, 64 held, FIFO release", lambda: steady(p, 150528, 64, 50_000)),
        ("mixed 1 B..1.5 MB, 200 held, random release", lambda: mixed(p, 200, 50_000)),
    ]:
        best = min(run() for _ in range(15))
        print(f"{name}: {best * 1e6:.2f} us per reserve+release, {1 / best:,.0f} pairs/s")


if __name__ == "__main__":  # pragma: no cover
    _bench()
