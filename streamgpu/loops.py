"""Choosing the event loop by name (``auto``: uvloop when installed, ``uvloop`` or ``asyncio``),
keeping the garbage collector off its back while servers run (:func:`freeze_heap`), giving it a CPU of
its own (:func:`pin_loop_thread`, the ``loop_cpu`` setting), and keeping it polling while traffic flows
(:class:`BusyPoll`, the ``busy_poll_us`` setting)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import dataclasses
import gc
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from streamgpu.errors import ConfigError
from streamgpu.metrics import Histogram

_frozen_by = 0  # running servers that froze the heap (freeze_heap)
_thresholds_before: tuple[int, int, int] | None = None  # the collector's thresholds before the first freeze
_thresholds_set: tuple[int, int, int] | None = None  # what the first freeze set them to

# While servers run, a young collection starts once this many more container objects are alive than at
# the last one (Python's default: 700). Every frame in flight is a few such objects (its Frame, Slot,
# header), so a burst of a few hundred frames crossed 700: 200+ young collections a second at 70,000
# frames/s, each promoting the frames in flight towards the old generations, and so a full pass every
# second or so that walked the loaded models (180 ms on the H100 host, the loop standing still). Frames
# die young; at this threshold they die before a collection sees them (docs/BENCHMARKS.md).
YOUNG_THRESHOLD = 10_000

LOOPS = ("auto", "uvloop", "asyncio")


def loop_factory(kind: str = "auto") -> Callable[[], asyncio.AbstractEventLoop]:
    """A factory of event loops of ``kind`` (for ``asyncio.Runner(loop_factory=...)``).

    Raises ValueError for an unknown kind, or for ``uvloop`` when it is not installed.
    """
    if kind not in LOOPS:
        raise ValueError(f"loop must be one of {LOOPS}, got {kind!r}")
    if kind == "asyncio":
        return asyncio.new_event_loop
    try:
        import uvloop
    except ImportError:
        if kind == "uvloop":
            raise ValueError("loop 'uvloop' requested but uvloop is not installed") from None
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def new_event_loop(kind: str = "auto") -> asyncio.AbstractEventLoop:
    """A new event loop of ``kind``."""
    return loop_factory(kind)()


class BusyPoll:
    """Keeps the running event loop polling, never asleep in its selector, for ``window_s`` after each
    :meth:`poke` (Linux's ``busy_poll`` for an event loop: the ``busy_poll_us`` setting).

    A process asleep in ``epoll_wait`` is woken by the kernel when its data lands, and on the GPU machine that
    costs 15-40 us at the median and up to ~250 us at p99 per wake-up (a round trip between two processes,
    docs/BENCHMARKS.md); a frame meets several (producer to server, and with ingest workers the channel up
    and down). A polling loop takes the data at its next iteration instead. The cost is a core kept busy
    while traffic flows, per process that polls: the scheduling process, and each ingest worker with
    traffic. ``window_s`` 0: never polls (``poke`` does nothing).

    The front ends poke when they write something that will be answered soon: replies to a producer (its
    next frames), frames up to the scheduling process (their replies), replies down to a worker (the next
    frames). Loop thread only.
    """

    def __init__(self, window_s: float) -> None:
        if window_s < 0:
            raise ValueError(f"window_s must be >= 0, got {window_s}")
        self.window_s = window_s
        self._until = 0.0  # perf_counter s: poll until then
        self._handle: asyncio.Handle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def polling(self) -> bool:
        """True while the loop is kept polling."""
        return self._handle is not None

    def poke(self) -> None:
        """Keep polling for ``window_s`` from now."""
        if self.window_s:
            # perf_counter, not loop.time(): uvloop's clock moves in whole milliseconds
            self._until = time.perf_counter() + self.window_s
            if self._handle is None:
                self._loop = asyncio.get_running_loop()
                self._handle = self._loop.call_soon(self._poll)

    def _poll(self) -> None:
        # A ready callback each iteration is what keeps the loop from sleeping: its selector then waits 0 s.
        if time.perf_counter() < self._until:
            assert self._loop is not None
            self._handle = self._loop.call_soon(self._poll)
        else:
            self._handle = None

    def close(self) -> None:
        """Stop polling now (a stopping server: its loop may close)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


# glibc's mallopt parameters (malloc.h) and what a server process sets them to (tune_malloc).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest: blocks below it come from the heap, and are reused
TRIM_THRESHOLD = 64 << 20  # free memory at the heap's top kept for reuse, not given back to the kernel


def tune_malloc() -> bool:
    """Keep freed memory for reuse in this process (glibc's ``mallopt``); False where there is no glibc.

    For the processes streamgpu runs itself (``streamgpu serve``, ingest workers), not a process that
    embeds a server. A batch makes megabyte buffers (its results; its replies to the ingest workers):
    with glibc's defaults they are mapped fresh from the kernel and unmapped again once freed, or given
    back when the heap's free top passes twice the last such size, so every batch paid a page fault per
    4 KiB it wrote. On the dev VM that was a third of the scheduling loop's time for 3 KB frames (loop
    CPU per frame 13.3-19.1 us, 7.2-9.6 us with these settings; docs/BENCHMARKS.md).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


class GcPauses:
    """How long the collector stopped the process, by generation, while servers ran (``gc.callbacks``).

    Process-wide: a collection holds the GIL, so the loop stands still for it whichever thread set it off.
    Cumulative over the process's life (``/metrics`` exposes them as ``streamgpu_gc_pause_seconds``).
    """

    def __init__(self) -> None:
        self.by_generation = (Histogram(), Histogram(), Histogram())
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.by_generation[info["generation"]].observe(time.perf_counter() - self._started)


GC_PAUSES = GcPauses()


def freeze_heap() -> None:
    """While servers run: freeze every object the process holds now (``gc.freeze``), collect the young
    generation only past ``YOUNG_THRESHOLD`` new objects, and time every collection (``GC_PAUSES``); all
    undone by ``thaw_heap``.

    A full (generation 2) collection walks every tracked object, and with torch imported that is
    hundreds of thousands of them: 87 ms on the H100 host, holding the GIL the whole time. A model
    load makes enough long-lived objects to set one off, in the loader thread or on the loop, and
    the loop then stands still (tools/bench_swap.py, docs/BENCHMARKS.md). Frozen objects are not
    walked. Call it after the libraries are imported and before models load: objects made later
    (models, their versions) stay collectable. Frozen garbage (a stopped server's cycles, say) is
    collected once the last running server has called ``thaw_heap``. Nested calls count.
    """
    global _frozen_by, _thresholds_before, _thresholds_set
    if _frozen_by == 0:
        gc.freeze()
        _thresholds_before = young, *older = gc.get_threshold()
        if young:  # (0: automatic collection is off, and stays off)
            gc.set_threshold(max(YOUNG_THRESHOLD, young), *older)
        _thresholds_set = gc.get_threshold()
        gc.callbacks.append(GC_PAUSES)
    _frozen_by += 1


def thaw_heap() -> None:
    """The other half of ``freeze_heap``: the last call unfreezes the heap (the next full pass walks it) and
    gives the collector its thresholds back, unless the process set its own meanwhile (those stay)."""
    global _frozen_by
    _frozen_by -= 1
    if _frozen_by == 0:
        gc.unfreeze()
        if _thresholds_before is not None and gc.get_threshold() == _thresholds_set:
            gc.set_threshold(*_thresholds_before)
        if GC_PAUSES in gc.callbacks:  # (unless the process cleared the list itself)
            gc.callbacks.remove(GC_PAUSES)


# -- the loop's own CPU (loop_cpu) ------------------------------------------------------------------------------
@dataclasses.dataclass
class _Pinned:
    """A server's loop pinned to its CPU (one per process)."""

    thread: int  # the loop's thread (threading.get_ident)
    cpu: int
    before: frozenset[int]  # the thread's CPUs before
    threads_before: frozenset[str]  # the process's threads then (/proc/self/task): not started on the pinned CPUs
    servers: int = 1  # servers that pinned it

    @property
    def spare(self) -> frozenset[int]:
        """The CPUs left to the rest of the process."""
        return self.before - {self.cpu}


_pin: _Pinned | None = None


def pin_loop_thread(cpu: int) -> None:
    """Run the calling thread (a server's event loop) on ``cpu`` alone, and leave that CPU to it: the helper
    threads streamgpu starts (:func:`leave_loop_cpu`) and its ingest workers (:func:`spare_cpus`) run on the
    others this process may use. Undone by :func:`unpin_loop_thread`, from the same thread; nested calls
    (a second server on the same loop and CPU) count.

    Why: on a 16-core host loaded by producers and ingest workers, the loop moved between cores and shared
    them; pinned to a CPU the others kept off, it took 0.95-1.26x the 3 KB frames, median 1.02x over seven pairs
    of runs: no consistent gain on that host (docs/BENCHMARKS.md). Threads and processes inherit the CPUs of the
    thread that starts them, hence the two helpers. Linux only.

    Raises ConfigError naming ``loop_cpu`` when the CPU is not one this process may run on, or is its only
    one, or when another thread's loop is pinned already.
    """
    global _pin
    thread = threading.get_ident()
    if _pin is not None:
        if _pin.thread != thread or _pin.cpu != cpu:
            raise ConfigError(f"loop_cpu = {cpu}: this process pins another server's loop to CPU {_pin.cpu} already "
                              "(one pinned loop per process)")  # fmt: skip
        _pin.servers += 1
        return
    if (problem := loop_cpu_problem(cpu)) is not None:
        raise ConfigError(problem)
    allowed = frozenset(os.sched_getaffinity(0))
    try:
        threads = frozenset(os.listdir("/proc/self/task"))
        os.sched_setaffinity(0, {cpu})
    except OSError as exc:  # (a sandbox that refuses it: seccomp, or no /proc)
        raise ConfigError(f"loop_cpu = {cpu}: the system refused to pin the loop's thread ({exc}); "
                          "leave it unset (-1)") from exc  # fmt: skip
    _pin = _Pinned(thread, cpu, allowed, threads)


def loop_cpu_problem(cpu: int) -> str | None:
    """Why this process cannot pin its loop to ``cpu`` (a message naming ``loop_cpu``), or None."""
    if sys.platform != "linux" or not hasattr(os, "sched_setaffinity"):  # (pinning reads /proc/self/task too)
        return "loop_cpu needs Linux (os.sched_setaffinity); leave it unset (-1) here"
    pin = _pin  # (read once: the loop's thread may release it meanwhile)
    allowed = pin.before if pin is not None else frozenset(os.sched_getaffinity(0))  # not the pinned loop's CPU
    if cpu not in allowed:
        return f"loop_cpu = {cpu}: this process may run on CPUs {_ranges(allowed)} only: pick one, or -1"
    if len(allowed) < 2:
        return (f"loop_cpu = {cpu}: this process may run on that CPU only, which would leave nothing to its other "
                "threads and ingest workers; leave it unset (-1)")  # fmt: skip
    return None


def unpin_loop_thread() -> None:
    """The other half of :func:`pin_loop_thread` (same thread): the last call gives the thread its CPUs back, and
    the threads started while it was pinned too: they inherited its CPU (the loop's default executor's) or were
    moved beside it (helper threads, and the native threads those started: torch's), and would keep that."""
    global _pin
    assert _pin is not None and _pin.thread == threading.get_ident(), "unpin_loop_thread: not the pinned thread"
    pin = _pin
    if pin.servers > 1:
        pin.servers -= 1
        return
    _pin = None
    os.sched_setaffinity(0, pin.before)
    for tid in set(os.listdir("/proc/self/task")) - pin.threads_before:
        with contextlib.suppress(OSError):  # (a thread that ended meanwhile)
            if os.sched_getaffinity(int(tid)) in ({pin.cpu}, pin.spare):
                os.sched_setaffinity(int(tid), pin.before)


def spare_cpus() -> tuple[int, ...] | None:
    """The CPUs left beside a pinned loop (an ingest worker runs on them); None: none pinned."""
    pin = _pin  # (read once: from another server's thread, the loop's thread may release it meanwhile)
    return tuple(sorted(pin.spare)) if pin is not None else None


def helper_threads(name: str) -> concurrent.futures.ThreadPoolExecutor:
    """A one-thread pool for a server's work off the loop (model loads, eager launches, CPU inference), its
    thread kept off a pinned loop's CPU (``leave_loop_cpu``: it would inherit it from the loop that starts it)."""
    return concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=name, initializer=leave_loop_cpu)


def leave_loop_cpu() -> None:
    """Move the calling thread off a pinned loop's CPU (the initializer of ``helper_threads``, which would
    otherwise inherit it from the loop thread that starts them); does nothing when no loop is pinned."""
    pin = _pin  # (read once: the loop's thread may release it meanwhile)
    if pin is not None and threading.get_ident() != pin.thread:
        os.sched_setaffinity(0, pin.spare)


def _ranges(cpus: frozenset[int]) -> str:
    """``0-3,8``: a CPU set as ``taskset -c`` writes it."""
    out: list[str] = []
    for cpu in sorted(cpus):
        if out and out[-1].split("-")[-1] == str(cpu - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{cpu}"
        else:
            out.append(str(cpu))
    return ",".join(out)
