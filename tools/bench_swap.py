"""Model swaps under steady load: GPU idle gap at each swap, failed frames, p99 during swaps, memory after unload.

A streamgpu server runs in this process; a closed-loop producer (another
process, ``--connections`` x ``--window`` frames in flight) streams frames to
model ``m`` the whole time. Phases:

1. steady: ``--steady-s`` seconds without swaps (the p99 and inter-batch gap baseline);
2. memory: load a second copy of the model under another name, then unload it;
   device memory allocated before the load vs after the unload;
3. swaps: ``--swaps`` times, a new version of ``m`` (alternating two weight
   files) is loaded, warmed and captured while the old one serves, swapped in
   between two batches, the old one freed after its last batch. With
   ``--swap-arch``, every other version is of that architecture instead (the
   same frames): with ``--compile auto`` or ``on``, the first swap to it
   compiles an architecture the process has not compiled, under load (later
   swaps reuse the process's compiled code, as swaps of one architecture do).

Figures (each a ratio or a comparison inside this one run):

* idle gap at a swap: the first new-version batch's device start minus the
  last old-version batch's device end, from CUDA event timestamps (the backend's
  per-batch trace); negative = the two overlapped on the GPU. Compared with the
  gap between consecutive batches in steady state;
* frames refused or failed over the whole run (target 0);
* p99 latency of frames sent while a swap was in progress vs steady state (target within 20 %): against the
  steady window before the swaps, and against the frames sent between the swaps (from 50 ms after one ends to
  the next's start: ``--between-s`` pauses), which interleave with them in time;
* the frames sent during swaps by when, from their swap's start (``--offset-ms`` bins);
* device memory allocated after unload vs before load (target within 1 %).

``--attribute-stalls`` (a diagnosis; it slows the loads): during the swaps, the loader thread's calls
(Python or C) that run over 1 ms, against the loop's lag events over 1.5 ms (``StallRecorder``).
``--time-loop-calls`` (a diagnosis): how long the loop thread's calls into the CUDA driver (and, as a
control, one pure Python call) take in steady state and while a version loads (``LoopCallTimer``).

    python tools/bench_swap.py                          # H100: ResNet-50 fp16, 100 swaps
    python tools/bench_swap.py --device cpu --model builtin:small --swaps 3 --steady-s 2 --shape 64,64,3
    python tools/bench_swap.py --swaps 10 --steady-s 4 --attribute-stalls   # what the loop lags during
    python tools/bench_swap.py --swaps 8 --steady-s 6 --time-loop-calls     # whether its own calls slow down
    python tools/bench_swap.py --swaps 1 --compile auto --swap-arch resnet18 # a new architecture compiled under load
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import collections
import contextlib
import functools
import json
import multiprocessing
import multiprocessing.connection
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Literal
from unittest import mock

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

if TYPE_CHECKING:  # the producer process imports this file: torch and the server only where used
    from streamgpu.gpu.backend import BatchTrace


def producer(port: int, shape: tuple[int, ...], connections: int, window: int, stop: Any,
             out: multiprocessing.connection.Connection) -> None:  # fmt: skip
    """Closed loop until ``stop`` is set; sends back (sent monotonic s, latency s, status) per frame."""
    from streamgpu import client

    def record(records: list[tuple[float, float, int]], sent: float, fut: asyncio.Future[Any]) -> None:
        records.append((sent, time.monotonic() - sent, -1 if fut.exception() else int(fut.result().status)))

    async def one(records: list[tuple[float, float, int]]) -> None:
        conn = await client.connect("127.0.0.1", port)
        frame = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
        pending: set[asyncio.Future[Any]] = set()
        seq = 0
        while not stop.is_set() or pending:
            while not stop.is_set() and len(pending) < window:
                sent = time.monotonic()
                fut = conn.submit(frame, model="m", stream_id=seq % 4)
                fut.add_done_callback(functools.partial(record, records, sent))
                pending.add(fut)
                seq += 1
            _, pending = await asyncio.wait(pending, timeout=0.1, return_when=asyncio.FIRST_COMPLETED)
        await conn.close()

    async def main() -> list[tuple[float, float, int]]:
        records: list[tuple[float, float, int]] = []
        tasks = [asyncio.ensure_future(one(records)) for _ in range(connections)]
        while len(records) < 10 * connections:  # streaming: the benchmark may begin
            await asyncio.sleep(0.01)
        out.send("ready")
        await asyncio.gather(*tasks)
        return records

    out.send(asyncio.run(main()))


class ProducerProcess:
    """``producer`` in a process of its own (``start``: streaming), its records back at ``stop``."""

    def __init__(self, port: int, shape: tuple[int, ...], connections: int, window: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._stop = ctx.Event()
        self._receive, send = ctx.Pipe(duplex=False)
        # (daemon: a bench that fails before ``stop`` ends it at exit instead of waiting for it forever)
        self._proc = ctx.Process(target=producer, args=(port, shape, connections, window, self._stop, send),
                                 daemon=True)  # fmt: skip

    async def start(self) -> None:
        self._proc.start()
        assert await asyncio.get_running_loop().run_in_executor(None, self._receive.recv) == "ready"

    async def stop(self) -> list[tuple[float, float, int]]:
        """(sent monotonic s, latency s, status) of every frame."""
        self._stop.set()
        records: list[tuple[float, float, int]] = await asyncio.get_running_loop().run_in_executor(
            None, self._receive.recv
        )
        self._proc.join()
        return records


def weights(tmp: str, arch: str, count: int = 2) -> list[str]:
    """``count`` weight files of ``arch`` that differ (each a distinct version)."""
    import torch

    from streamgpu.models.builtin import build_builtin

    paths = []
    for i in range(count):
        module = build_builtin(arch)
        with torch.no_grad():
            for p in module.parameters():
                p.add_(i * 1e-3)
        path = os.path.join(tmp, f"{arch}-v{i}.pt")
        torch.save(module.state_dict(), path)
        paths.append(f"state_dict:{path}")
    return paths


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def steady_gaps(trace: list[BatchTrace]) -> list[float]:
    """Device idle time between consecutive batches (start of the next minus the latest end so far)."""
    gaps, latest = [], -float("inf")
    for b in sorted(trace, key=lambda b: b.start_s):
        if latest > -float("inf"):
            gaps.append(b.start_s - latest)
        latest = max(latest, b.end_s)
    return gaps


def version_key(models: Sequence[Any]) -> tuple[int, int]:
    """A served version: its first instance and the weights it holds (an in-place swap keeps the instance)."""
    return id(models[0]), models[0].weights_version


class LoopWatch:
    """Ticks on the loop every ``period_s``: how late each tick ran (the loop's lag), its thread's CPU time over
    the tick (the rest of the tick it waited: for I/O, the GIL or a core), and when the version of ``name`` that
    new batches launch on changed (a swap's switch), on ``time.monotonic``."""

    def __init__(self, server: Any, name: str, period_s: float = 0.001) -> None:
        self._server, self._name, self._period = server, name, period_s
        self.lags: list[tuple[float, float, float]] = []  # (tick, seconds late, CPU seconds)
        self.switches: list[float] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        def version() -> tuple[int, int] | None:
            models = self._server.serving(self._name)
            return version_key(models) if models else None

        serving = version()
        while True:
            before, cpu = time.monotonic(), time.thread_time()
            await asyncio.sleep(self._period)
            now = time.monotonic()
            self.lags.append((now, now - before - self._period, time.thread_time() - cpu))
            current = version()
            if current != serving:
                serving = current
                self.switches.append(now)

    def lag_p99_ms(self, windows: list[tuple[float, float]]) -> float:
        return percentile([lag for t, lag, _ in self.lags if any(a <= t <= b for a, b in windows)], 99) * 1e3

    def stalls(self, windows: list[tuple[float, float]], over_s: float) -> list[tuple[float, float, float]]:
        """The lag events over ``over_s`` of ticks in ``windows``: (when the tick was due, when it ran, CPU s)."""
        return [(t - lag, t, cpu) for t, lag, cpu in self.lags if lag > over_s and any(a <= t <= b for a, b in windows)]


LONG_CALL_S = 0.001  # a loader call running longer is recorded (--attribute-stalls)
STALL_S = 0.0015  # a loop lag event longer is attributed
BETWEEN_SETTLE_S = 0.05  # frames sent this soon after a swap are neither during it nor between swaps
PAUSED_S = 0.0001  # this long in the pacing hook: it slept, or the GIL was taken (the loader ran nothing)
ProfileEvent = Literal["call", "return", "c_call", "c_return", "c_exception"]  # a sys.setprofile hook's


class StallRecorder:
    """``--attribute-stalls``: in the loader thread, every call (Python or C) running over LONG_CALL_S, its
    pauses for the loop (``manager._yielding``) left out, with its name and its Python caller's file:line.

    A call's running time still holds the loader's waits for the GIL outside the hook (while the loop ran):
    the loop's CPU time over its lag events (``LoopWatch``) tells lag the loop waited through from its own work.
    Times on ``time.perf_counter``; ``offset`` takes them to the loop ticker's ``time.monotonic``.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[float, float, float, str, str]] = []  # (start, end, running s, name, caller)
        self.pauses: list[tuple[float, float]] = []  # (start, end) of the pacing hook's sleeps (see PAUSED_S)
        self.offset = time.monotonic() - time.perf_counter()

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Record the loads' paced part (``_yielding``, chained onto its hook) and the frees of old versions."""
        from streamgpu.models import manager

        yielding, free = manager._yielding, manager.ModelManager._free

        @contextlib.contextmanager
        def paced(run_s: float, pause_s: float, busy: Callable[[], bool]) -> Iterator[None]:
            with yielding(run_s, pause_s, busy), self.recording():
                yield

        def freeing(mgr: manager.ModelManager, models: list[Any]) -> None:
            with self.recording():
                free(mgr, models)

        with mock.patch.object(manager, "_yielding", paced), mock.patch.object(manager.ModelManager, "_free", freeing):
            yield

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """In the calling thread, chained onto its profile hook if it has one (the loader's pacing)."""
        inner = sys.getprofile()
        clock, calls, pauses = time.perf_counter, self.calls, self.pauses
        stack: list[tuple[float, float]] = []  # (start, paused s so far) of each call entered
        push, pop = stack.append, stack.pop
        paused = 0.0

        def hook(frame: FrameType, event: ProfileEvent, arg: Any) -> None:
            nonlocal paused  # (every event of the thread runs this: compare times, record only the long)
            t0 = t1 = clock()
            if inner is not None:
                inner(frame, event, arg)
                t1 = clock()
                if t1 - t0 > PAUSED_S:
                    pauses.append((t0, t1))
                    paused += t1 - t0
            if event == "call" or event == "c_call":
                push((t1, paused))
            elif stack:  # (empty: the return of a frame entered before the hook was set)
                start, paused_then = pop()
                running = t0 - start - (paused - paused_then)
                if running > LONG_CALL_S:
                    calls.append((start, t0, running, *describe(frame, event, arg)))

        sys.setprofile(hook)  # this thread only
        try:
            yield
        finally:
            sys.setprofile(inner)


def describe(frame: FrameType, event: ProfileEvent, arg: Any) -> tuple[str, str]:
    """A returning call's (qualified name, its Python caller's file:line); C functions end in ``[C]``."""
    if event == "return":
        caller = frame.f_back
        name = f"{frame.f_globals.get('__name__')}.{frame.f_code.co_qualname}"
    else:  # c_return, c_exception: ``arg`` is the C function, ``frame`` the Python code calling it
        caller = frame
        module = arg.__module__ if isinstance(getattr(arg, "__module__", None), str) else None
        module = module or type(getattr(arg, "__self__", None)).__module__  # a method: its object's type's
        name = f"{module}.{getattr(arg, '__qualname__', repr(arg))} [C]"
    if caller is None:
        return name, "?"
    path = caller.f_code.co_filename
    short = path.rpartition("site-packages/")[2] if "site-packages/" in path else os.path.relpath(path, ROOT)
    return name, f"{short}:{caller.f_lineno}"


def overlap(intervals: list[tuple[float, float]], a: float, b: float) -> float:
    """Seconds of (sorted, disjoint) ``intervals`` inside ``[a, b]``."""
    i = bisect.bisect_right(intervals, a, key=lambda iv: iv[1])
    j = bisect.bisect_left(intervals, b, key=lambda iv: iv[0])
    return sum(min(b, end) - max(a, start) for start, end in intervals[i:j])


def attribute(recorder: StallRecorder, stalls: list[tuple[float, float, float]]) -> dict[str, Any]:
    """The loader's long calls against the loop's lag events ``stalls`` (``LoopWatch.stalls``).

    Lag while the loader pauses (sleeping, the GIL left to the loop) is put on no call; a call's lag is what
    of the rest overlaps it. ``rows``: per call name, by lag overlapped; lag ms: overlapped by a long call,
    by a pause, by neither (the loader's short calls, or the loop's own work); ``loop_ran_ms``: at most that much
    of the lag the loop's thread ran (its CPU time over each tick, up to the lag), the rest it waited. A recursive
    call's time and lag count once, in its outermost call."""
    shift = recorder.offset
    pauses = [(a + shift, b + shift) for a, b in recorder.pauses]
    blamed: list[tuple[float, float]] = []  # ``stalls`` less the pauses
    for a, b, _ in stalls:
        for start, end in pauses[bisect.bisect_right(pauses, a, key=lambda p: p[1]) :]:
            if start >= b:
                break
            if start > a:
                blamed.append((a, start))
            a = max(a, end)
        if a < b:
            blamed.append((a, b))
    rows: dict[str, dict[str, Any]] = {}
    outer_end: dict[str, float] = {}  # per name, the end of its latest call not inside another of that name
    union: list[tuple[float, float]] = []  # of the calls' spans
    for start, end, running, name, caller in sorted(recorder.calls):
        start, end = start + shift, end + shift
        row = rows.setdefault(name, {"name": name, "count": 0, "total_ms": 0.0, "max_ms": 0.0, "lag_ms": 0.0,
                                     "callers": collections.Counter()})  # fmt: skip
        row["count"] += 1
        row["max_ms"] = max(row["max_ms"], running * 1e3)
        row["callers"][caller] += 1
        if start > outer_end.get(name, -float("inf")):  # a recursive call's time is its outer call's already
            outer_end[name] = end
            row["total_ms"] += running * 1e3
            row["lag_ms"] += overlap(blamed, start, end) * 1e3
        if union and start <= union[-1][1]:
            union[-1] = (union[-1][0], max(union[-1][1], end))
        else:
            union.append((start, end))
    for row in rows.values():
        row["callers"] = row["callers"].most_common(3)
    lag = sum(b - a for a, b, _ in stalls)
    in_calls = sum(overlap(blamed, a, b) for a, b in union)
    return {
        "events": len(stalls), "lag_ms": lag * 1e3, "loop_ran_ms": sum(min(b - a, cpu) for a, b, cpu in stalls) * 1e3,
        "in_long_calls_ms": in_calls * 1e3,
        "in_pauses_ms": (lag - sum(b - a for a, b in blamed)) * 1e3,
        "in_neither_ms": (sum(b - a for a, b in blamed) - in_calls) * 1e3,
        "rows": sorted(rows.values(), key=lambda r: -r["lag_ms"])[:15],
    }  # fmt: skip


class PhaseRecorder:
    """``--attribute-phases``: when each part of a load ran on the loader thread (building the module, moving it to
    the GPU, the eager warm-up, graph capture; for weights in place: the serving module's layout, the reader
    process's read, staging on the GPU), for the p99 of the frames in flight during each against the frames in
    flight during none: which part of a load raises the tail."""

    PHASES = (
        ("streamgpu.models.manager", "", "load_module", "build module (CPU only)"),
        ("streamgpu.gpu.cuda", "CudaModel", "__init__", "weights to the GPU"),
        ("streamgpu.gpu.cuda", "CudaModel", "warm_up", "eager warm-up"),
        ("streamgpu.gpu.cuda", "CudaModel", "capture", "graph capture"),
        ("streamgpu.gpu.cuda", "CudaBackend", "unload", "old version freed"),
        ("streamgpu.models.weights", "WeightsLayout", "of", "in place: serving layout"),
        ("streamgpu.models.weights", "WeightsReader", "read", "in place: the reader reads"),
        ("streamgpu.gpu.cuda", "CudaBackend", "stage_weights", "in place: staged on the GPU"),
    )  # fmt: skip

    def __init__(self) -> None:
        self.spans: list[tuple[float, float, str]] = []
        self.collections: list[tuple[float, float, int]] = []  # the collector's runs: (start, end, generation)
        self._collecting_from = 0.0

    def _collector(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._collecting_from = time.monotonic()
        else:
            self.collections.append((self._collecting_from, time.monotonic(), info["generation"]))

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        import gc
        import importlib

        with contextlib.ExitStack() as stack:
            gc.callbacks.append(self._collector)
            stack.callback(gc.callbacks.remove, self._collector)
            for module, owner, name, label in self.PHASES:
                target: Any = importlib.import_module(module)
                target = getattr(target, owner) if owner else target
                original = getattr(target, name)

                def spanned(*args: Any, _original: Any = original, _label: str = label, **kwargs: Any) -> Any:
                    started = time.monotonic()
                    try:
                        return _original(*args, **kwargs)
                    finally:
                        self.spans.append((started, time.monotonic(), _label))

                stack.enter_context(mock.patch.object(target, name, spanned))
            yield

    def summary(self, records: list[tuple[float, float, int]], windows: list[tuple[float, float]],
                lags: list[tuple[float, float, float]]) -> dict[str, Any]:  # fmt: skip
        """Per phase: its seconds, the p50 / p99 of the frames (sent during a swap) whose time in the server
        overlapped it, and the loop's longest lag (``LoopWatch.lags``) in it; "none": the frames of the swap
        windows that overlapped no phase."""
        by: dict[str, list[float]] = {label: [] for *_, label in self.PHASES}
        by["none"] = []
        for sent, lat, status in records:
            if status != 0 or not any(a <= sent <= b for a, b in windows):
                continue
            hit = {label for a, b, label in self.spans if a < sent + lat and sent < b}
            for label in hit or {"none"}:
                by[label].append(lat)
        seconds: dict[str, float] = collections.defaultdict(float)
        worst_lag: dict[str, float] = collections.defaultdict(float)
        for a, b, label in self.spans:
            seconds[label] += b - a
            # a tick at ``t`` that ran ``late`` late: the loop could not run from ``t - late`` to ``t``
            late = [lag for t, lag, _ in lags if a < t and t - lag < b]
            worst_lag[label] = max([worst_lag[label], *late])
        out: dict[str, Any] = {
            label: {"frames": len(lats), "seconds": seconds.get(label, 0.0),
                    "p50_ms": percentile(lats, 50) * 1e3, "p99_ms": percentile(lats, 99) * 1e3,
                    "loop_lag_max_ms": worst_lag.get(label, 0.0) * 1e3}
            for label, lats in by.items()
        }  # fmt: skip
        for generation in range(3):
            took = [b - a for a, b, g in self.collections if g == generation and any(s <= a < e for s, e in windows)]
            out[f"collector, generation {generation}"] = {
                "frames": len(took), "seconds": sum(took), "p50_ms": percentile(took, 50) * 1e3,
                "p99_ms": percentile(took, 99) * 1e3, "loop_lag_max_ms": max(took, default=0.0) * 1e3,
            }  # fmt: skip
        return out


class LoopCallTimer:
    """``--time-loop-calls``: the duration of each call the loop thread makes to a few functions, by when it
    started: the CUDA driver calls of a batch's launch and completion, and ``SlotPool.release`` (pure Python)
    as a control. A driver call that slows down while a version loads, where the control does not, points at
    the driver (its locks, shared with the loader's calls); both slowing down, at the CPU."""

    TARGETS = (
        ("streamgpu.gpu.driver", "Event", "record"), ("streamgpu.gpu.driver", "Event", "query"),
        ("streamgpu.gpu.driver", "Event", "elapsed_ms"),
        ("streamgpu.gpu.kernels", "", "enqueue_replay"), ("streamgpu.gpu.kernels", "", "gather_frames"),
        ("streamgpu.memory.pool", "SlotPool", "release"),
    )  # fmt: skip

    def __init__(self) -> None:
        self.calls: dict[str, list[tuple[float, float]]] = {}  # name: (started, seconds), the loop thread's

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        import importlib

        loop_thread = threading.get_ident()
        patches = []
        for module, owner, name in self.TARGETS:
            target: Any = importlib.import_module(module)
            target = getattr(target, owner) if owner else target
            original = getattr(target, name)
            log = self.calls.setdefault(f"{owner or module.rpartition('.')[2]}.{name}", [])

            def timed(*args: Any, _original: Any = original, _log: Any = log, **kwargs: Any) -> Any:
                if threading.get_ident() != loop_thread:
                    return _original(*args, **kwargs)
                started = time.monotonic()
                try:
                    return _original(*args, **kwargs)
                finally:
                    _log.append((started, time.monotonic() - started))

            patches.append(mock.patch.object(target, name, timed))
        with contextlib.ExitStack() as stack:
            for patch in patches:
                stack.enter_context(patch)
            yield

    def summary(self, windows: list[tuple[float, float]]) -> dict[str, dict[str, float]]:
        """Per function, of the calls started in ``windows``: count, p50, p99 and max (us), ms in calls over 1 ms."""
        out = {}
        for name, calls in self.calls.items():
            took = [d for t, d in calls if any(a <= t < b for a, b in windows)]
            out[name] = {"calls": len(took), "p50_us": percentile(took, 50) * 1e6, "p99_us": percentile(took, 99) * 1e6,
                         "max_us": max(took, default=float("nan")) * 1e6,
                         "over_1ms_ms": sum(d for d in took if d > 0.001) * 1e3}  # fmt: skip
        return out


def batch_ms(trace: list[BatchTrace], size: int, q: float = 50) -> float:
    """The ``q``th percentile of the device time of the traced batches of ``size`` frames (default: the median)."""
    return percentile([(b.end_s - b.start_s) for b in trace if b.size == size], q) * 1e3


def device_memory(device: str) -> int | None:
    if device != "cuda":
        return None
    import torch

    torch.cuda.synchronize()
    return int(torch.cuda.memory_allocated())


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    from streamgpu.config import Config, ListenerSpec
    from streamgpu.models.spec import ModelSpec
    from streamgpu.server import Server

    shape = tuple(int(d) for d in args.shape.split(","))
    arch = args.model.partition(":")[2]
    tmp = tempfile.mkdtemp(prefix="bench_swap-")
    versions = weights(tmp, arch)
    other = weights(tmp, args.swap_arch, 1)[0] if args.swap_arch else None
    base = ModelSpec(name="m", source=versions[0], arch=arch, input_shape=shape, precision=args.precision,
                     max_batch_size=args.max_batch, compile=args.compile,
                     weights_in_place=args.weights_in_place == "on")  # fmt: skip
    cfg = Config(listeners=[ListenerSpec(port=0)], device=args.device, models=[base], shutdown_timeout_s=30,
                 ingest_workers=args.ingest_workers, max_payload_bytes=1 << 20, loop_cpu=args.loop_cpu,
                 **({} if args.loader_share is None else {"loader_share": args.loader_share}))  # fmt: skip
    began = time.monotonic()

    def progress(what: str) -> None:  # (on stderr as it goes: a run cut short by a time limit says how far it got)
        print(f"[bench_swap {time.monotonic() - began:7.1f} s] {what}", file=sys.stderr, flush=True)

    server = Server(cfg)
    await server.start()
    progress("server started (models loaded, warmed, captured)")
    assert server.backend is not None
    device, device_name = server.backend.name, server.backend.device_name
    trace: list[BatchTrace] = []
    server.backend.trace = trace

    frames_from = ProducerProcess(server.port, shape, args.connections, args.window)
    await frames_from.start()
    await asyncio.sleep(args.warmup_s)

    timer = LoopCallTimer() if args.time_loop_calls else None
    timing = timer.installed() if timer is not None else contextlib.nullcontext()
    timing.__enter__()
    watch = LoopWatch(server, "m")
    watch.start()
    steady_from = time.monotonic()
    steady_trace_from = len(trace)
    await asyncio.sleep(args.steady_s)
    steady_to = time.monotonic()
    steady_trace = trace[steady_trace_from:]
    progress("steady window done")

    memory_before = device_memory(device)
    await server.load_model(replace(base, name="extra", source=versions[1]))
    memory_loaded = device_memory(device)
    await server.unload_model("extra")
    memory_after = device_memory(device)
    progress("memory: a second copy loaded and unloaded")

    windows: list[tuple[float, float]] = []
    swaps: list[dict[str, Any]] = []
    swaps_trace_from = len(trace)
    recorder = StallRecorder() if args.attribute_stalls else None
    phases = PhaseRecorder() if args.attribute_phases else None
    with (recorder.installed() if recorder is not None else contextlib.nullcontext(),
          phases.installed() if phases is not None else contextlib.nullcontext()):  # fmt: skip
        for i in range(args.swaps):
            old = server.serving("m")
            assert old is not None
            old_version = version_key(old)
            start = time.monotonic()
            if other is not None and i % 2 == 0:
                version = replace(base, source=other, arch=args.swap_arch)
            else:
                version = replace(base, source=versions[(i + 1) % len(versions)])
            await server.swap_model("m", version)
            end = time.monotonic()
            progress(f"swap {i + 1} of {args.swaps}: {end - start:.2f} s")
            new = server.serving("m")
            assert new is not None
            windows.append((start, end))
            swaps.append({"old": old_version, "new": version_key(new), "seconds": end - start,
                          "in_place": new[0] is old[0]})  # fmt: skip
            await asyncio.sleep(args.between_s)  # the new version's first batches are traced
    memory_end = device_memory(device)
    timing.__exit__(None, None, None)
    watch.stop()
    records = await frames_from.stop()
    await server.stop()

    # GPU idle gap at each swap, from the backend's per-batch device timestamps.
    first_start: dict[tuple[int, int], float] = {}
    last_end: dict[tuple[int, int], float] = {}
    for batch in trace:
        key = (id(batch.model), batch.weights_version)
        first_start[key] = min(first_start.get(key, batch.start_s), batch.start_s)
        last_end[key] = max(last_end.get(key, batch.end_s), batch.end_s)
    gaps = []  # one device (the first instance of each version)
    for swap in swaps:
        old_id, new_id = swap["old"], swap["new"]
        if old_id in last_end and new_id in first_start:
            gaps.append(first_start[new_id] - last_end[old_id])
    steady = [lat for sent, lat, status in records if steady_from <= sent < steady_to and status == 0]
    during = [lat for sent, lat, status in records if status == 0 and any(a <= sent <= b for a, b in windows)]
    # Steady state between the swaps too, interleaved with them (the steady window before them all drifts from the
    # swaps' minutes on a shared host: its p99 moved 9.9-13.0 ms between 4 s windows of one run)
    starts = [a for a, _ in windows[1:]] + [windows[-1][1] + args.between_s] if windows else []
    calm = [(b + BETWEEN_SETTLE_S, start) for (_, b), start in zip(windows, starts, strict=True)]
    between_swaps = [lat for sent, lat, status in records if status == 0 and any(a <= sent < b for a, b in calm)]
    failed = sum(1 for _, _, status in records if status != 0)
    between = steady_gaps(steady_trace)
    # Where the p99 goes: while the new version loads (warm-up, capture) or from its switch to the old one freed.
    switch_at = [min((t for t in watch.switches if a <= t <= b), default=b) for a, b in windows]
    loading = [(a, s) for (a, _), s in zip(windows, switch_at, strict=True)]
    switching = [(s, b) for (_, b), s in zip(windows, switch_at, strict=True)]
    sizes = np.bincount([b.size for b in steady_trace]) if steady_trace else np.zeros(1, int)
    common = int(sizes.argmax())
    result = {
        "device": device_name, "model": args.model, "precision": args.precision,
        "shape": list(shape), "swaps": len(swaps), "frames": len(records), "frames_failed_or_refused": failed,
        "swap_gap_us": {"p50": percentile(gaps, 50) * 1e6, "p99": percentile(gaps, 99) * 1e6,
                        "max": max(gaps, default=float("nan")) * 1e6, "all": [g * 1e6 for g in gaps]},
        "swap_idle_us_max": max((max(g, 0.0) for g in gaps), default=float("nan")) * 1e6,
        "steady_batch_gap_us": {"p50": percentile(between, 50) * 1e6, "p99": percentile(between, 99) * 1e6},
        "swap_seconds_p50": percentile([s["seconds"] for s in swaps], 50),
        "swaps_in_place": sum(s["in_place"] for s in swaps),
        "p99_steady_ms": percentile(steady, 99) * 1e3, "p99_during_swaps_ms": percentile(during, 99) * 1e3,
        # (the p50 is the steadier sign of what a load costs: the steady p99 swings between windows of seconds)
        "p50_steady_ms": percentile(steady, 50) * 1e3, "p50_during_swaps_ms": percentile(during, 50) * 1e3,
        "frames_during_swaps": len(during),
        "p99_between_swaps_ms": percentile(between_swaps, 99) * 1e3, "frames_between_swaps": len(between_swaps),
        "memory_before_load": memory_before, "memory_loaded": memory_loaded, "memory_after_unload": memory_after,
        "memory_after_swaps": memory_end,
        "p99_while_loading_ms": percentile(
            [lat for sent, lat, st in records if st == 0 and any(a <= sent < b for a, b in loading)], 99) * 1e3,
        "p99_switch_to_freed_ms": percentile(
            [lat for sent, lat, st in records if st == 0 and any(a <= sent <= b for a, b in switching)], 99) * 1e3,
        "switch_to_freed_s_p50": percentile([b - a for a, b in switching], 50),
        "loop_lag_p99_ms": {"steady": watch.lag_p99_ms([(steady_from, steady_to)]),
                            "loading": watch.lag_p99_ms(loading), "switch_to_freed": watch.lag_p99_ms(switching)},
        "batch_size_common": common,
        "batch_ms_p50": {"steady": batch_ms(steady_trace, common), "swaps": batch_ms(trace[swaps_trace_from:], common)},
        "batch_ms_p99": {"steady": batch_ms(steady_trace, common, 99),
                         "swaps": batch_ms(trace[swaps_trace_from:], common, 99)},
    }  # fmt: skip
    result["p99_ratio"] = result["p99_during_swaps_ms"] / result["p99_steady_ms"]
    result["p99_ratio_between"] = result["p99_during_swaps_ms"] / result["p99_between_swaps_ms"]
    result["by_offset"] = by_offset(records, windows, args.offset_ms / 1e3)
    if memory_before:
        result["memory_ratio"] = (memory_after or 0) / memory_before
    if timer is not None:
        result["loop_calls"] = {"steady": timer.summary([(steady_from, steady_to)]), "loading": timer.summary(loading),
                                "switch_to_freed": timer.summary(switching)}  # fmt: skip
    if phases is not None:
        result["phases"] = phases.summary(records, windows, watch.lags)
    if recorder is not None:
        result["stalls"] = {"long_call_ms": LONG_CALL_S * 1e3, "lag_over_ms": STALL_S * 1e3,
                            "swaps": attribute(recorder, watch.stalls(windows, STALL_S))}  # fmt: skip
        if timer is not None:  # the loader's calls that the loop's slow driver calls (over 1 ms) overlap
            slow = sorted((t, t + d, d) for name, calls in timer.calls.items() if name != "SlotPool.release"
                          for t, d in calls if d > 0.001 and any(a <= t < b for a, b in windows))  # fmt: skip
            result["stalls"]["slow_loop_calls"] = attribute(recorder, slow)
        for phase, spans in (("loading", loading), ("switch_to_freed", switching)):
            result["stalls"][phase] = {k: v for k, v in attribute(recorder, watch.stalls(spans, STALL_S)).items()
                                       if k != "rows"}  # fmt: skip
    return result


def by_offset(
    records: list[tuple[float, float, int]], windows: list[tuple[float, float]], width_s: float
) -> list[dict[str, float]]:
    """The frames sent during swaps, by when they were sent from their swap's start (bins ``width_s`` wide): where
    in a swap the slow ones fall. Each bin: its start (ms), frames, p50 and p99 (ms)."""
    bins: dict[int, list[float]] = {}
    for sent, lat, status in records:
        if status == 0:
            for a, b in windows:
                if a <= sent <= b:
                    bins.setdefault(int((sent - a) / width_s), []).append(lat)
                    break
    return [{"from_ms": k * width_s * 1e3, "frames": len(v), "p50_ms": percentile(v, 50) * 1e3,
             "p99_ms": percentile(v, 99) * 1e3} for k, v in sorted(bins.items())]  # fmt: skip


def offset_table(rows: list[dict[str, float]]) -> str:
    """``by_offset``'s bins, one line each."""
    lines = ["frames sent during swaps by when, from their swap's start: ms, frames, p50 / p99 ms"]
    lines += [f"  {r['from_ms']:7.0f} {r['frames']:7d}  {r['p50_ms']:6.2f} / {r['p99_ms']:6.2f}" for r in rows]
    return "\n".join(lines)


def table(r: dict[str, Any]) -> str:
    mem = (f"{r['memory_after_unload'] / 2**20:.1f} MiB after unload vs {r['memory_before_load'] / 2**20:.1f} MiB "
           f"before load (x{r['memory_ratio']:.4f}; {r['memory_loaded'] / 2**20:.1f} MiB loaded)"
           if r["memory_before_load"] else "n/a (cpu)")  # fmt: skip
    rows = [
        ("device", r["device"]),
        ("model", f"{r['model']} {r['precision']} {r['shape']}"),
        ("swaps / frames", f"{r['swaps']} / {r['frames']}"),
        ("GPU idle gap at a swap (us)", f"p50 {r['swap_gap_us']['p50']:.1f}, p99 {r['swap_gap_us']['p99']:.1f}, "
                                        f"max {r['swap_gap_us']['max']:.1f} (negative: overlapped)"),
        ("gap between batches, steady (us)", f"p50 {r['steady_batch_gap_us']['p50']:.1f}, "
                                             f"p99 {r['steady_batch_gap_us']['p99']:.1f}"),
        ("frames refused or failed", str(r["frames_failed_or_refused"])),
        ("p99 during swaps vs steady", f"{r['p99_during_swaps_ms']:.2f} ms vs {r['p99_steady_ms']:.2f} ms "
                                       f"(x{r['p99_ratio']:.3f}, {r['frames_during_swaps']} frames)"),
        ("p99 during swaps vs between them", f"{r['p99_during_swaps_ms']:.2f} ms vs {r['p99_between_swaps_ms']:.2f} "
                                             f"ms (x{r['p99_ratio_between']:.3f}, {r['frames_between_swaps']} frames "
                                             f"sent from {BETWEEN_SETTLE_S * 1e3:.0f} ms after a swap to the next)"),
        ("p50 during swaps vs steady", f"{r['p50_during_swaps_ms']:.2f} ms vs {r['p50_steady_ms']:.2f} ms "
                                       f"(x{r['p50_during_swaps_ms'] / r['p50_steady_ms']:.3f})"),
        ("p99 sent while loading / switch to freed", f"{r['p99_while_loading_ms']:.2f} ms / "
                                                     f"{r['p99_switch_to_freed_ms']:.2f} ms "
                                                     f"(switch to freed: {r['switch_to_freed_s_p50'] * 1e3:.0f} ms)"),
        ("loop lag p99 (1 ms ticks)", "steady {steady:.2f} ms, loading {loading:.2f} ms, switch to freed "
                                      "{switch_to_freed:.2f} ms".format(**r["loop_lag_p99_ms"])),
        (f"device ms per batch of {r['batch_size_common']}, p50", "steady {steady:.2f}, during swaps {swaps:.2f}"
                                                                  .format(**r["batch_ms_p50"])),
        (f"device ms per batch of {r['batch_size_common']}, p99", "steady {steady:.2f}, during swaps {swaps:.2f}"
                                                                  .format(**r["batch_ms_p99"])),
        ("device memory", mem),
        ("one swap (load+warm+capture+switch+free)", f"{r['swap_seconds_p50']:.2f} s median"),
        ("swaps by their weights in place", f"{r['swaps_in_place']} of {r['swaps']}"),
    ]  # fmt: skip
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def stall_table(s: dict[str, Any]) -> str:
    """``--attribute-stalls``'s figures: the loader's calls by loop lag overlapped, then where the lag fell."""
    swaps = s["swaps"]
    lines = [f"loop lag events over {s['lag_over_ms']} ms during swaps: {swaps['events']}, {swaps['lag_ms']:.1f} ms; "
             f"loader calls over {s['long_call_ms']} ms (ms running, pauses left out) by lag overlapped:",
             f"{'lag ms':>8} {'calls':>6} {'total ms':>9} {'max ms':>7}  name  (top caller)"]  # fmt: skip

    def rows(attributed: dict[str, Any]) -> None:
        for r in attributed["rows"]:
            caller = f"{r['callers'][0][0]} x{r['callers'][0][1]}" if r["callers"] else "?"
            lines.append(
                f"{r['lag_ms']:8.1f} {r['count']:6d} {r['total_ms']:9.1f} {r['max_ms']:7.2f}  {r['name']}  ({caller})"
            )

    rows(swaps)
    if "slow_loop_calls" in s:  # (with --time-loop-calls)
        slow = s["slow_loop_calls"]
        lines.append(f"the loop's driver calls over 1 ms during swaps: {slow['events']}, {slow['lag_ms']:.1f} ms "
                     f"({slow['in_pauses_ms']:.1f} ms in the loader's pauses); loader calls by time "
                     "overlapped:")  # fmt: skip
        rows(slow)
    for phase in ("loading", "switch_to_freed"):
        p = s[phase]
        share = (p["lag_ms"] - p["in_long_calls_ms"]) / p["lag_ms"] if p["lag_ms"] else float("nan")
        ran = p["loop_ran_ms"] / p["lag_ms"] if p["lag_ms"] else float("nan")
        lines.append(f"lag while {phase.replace('_', ' ')}: {p['lag_ms']:.1f} ms in {p['events']} events; "
                     f"{share:.0%} overlaps no long loader call ({p['in_pauses_ms']:.1f} ms in the loader's pauses, "
                     f"{p['in_neither_ms']:.1f} ms neither); the loop ran at most {ran:.0%} of it "
                     "(its CPU time)")  # fmt: skip
    return "\n".join(lines)


def calls_table(c: dict[str, dict[str, dict[str, float]]]) -> str:
    """``--time-loop-calls``'s figures: each function's call times, steady against loading."""
    lines = [
        "loop thread's calls (us): steady p50 / p99 / max (calls) | loading p50 / p99 / max (calls), "
        "ms in calls over 1 ms"
    ]
    for name, steady in c["steady"].items():
        loading = c["loading"][name]
        lines.append(f"  {name:<22} {steady['p50_us']:7.1f} / {steady['p99_us']:8.1f} / {steady['max_us']:8.1f} "
                     f"({steady['calls']:6.0f}) | {loading['p50_us']:7.1f} / {loading['p99_us']:8.1f} / "
                     f"{loading['max_us']:8.1f} ({loading['calls']:6.0f}), {steady['over_1ms_ms']:.1f} / "
                     f"{loading['over_1ms_ms']:.1f} ms")  # fmt: skip
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu", "auto"))
    parser.add_argument("--model", default="builtin:resnet50", help="builtin:ARCH (two weight files are made)")
    parser.add_argument("--precision", default="fp16")
    parser.add_argument("--shape", default="224,224,3", help="frame shape H,W,C (uint8)")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--compile", default="off", choices=("off", "auto", "on"),
                        help="the model's compile setting (default off: a compile per swap takes seconds)")  # fmt: skip
    parser.add_argument("--swaps", type=int, default=100)
    parser.add_argument("--weights-in-place", default="on", choices=("on", "off"),
                        help="the model's weights_in_place: a new version of the same architecture and settings takes "
                             "the serving one's place by its weights (on), or is built beside it (off)")  # fmt: skip
    parser.add_argument("--swap-arch", default=None,
                        help="every other swap's version is of this builtin ARCH (taking the same frames)")  # fmt: skip
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--window", type=int, default=16, help="frames in flight per connection")
    parser.add_argument("--warmup-s", type=float, default=3.0)
    parser.add_argument("--steady-s", type=float, default=10.0)
    parser.add_argument("--between-s", type=float, default=0.05, help="pause after each swap")
    parser.add_argument("--ingest-workers", type=int, default=0, help="the server's ingest_workers (0: one process)")
    parser.add_argument("--loader-share", type=float, default=None,
                        help="the server's loader_share (the share of the time a load's Python may take; default: "
                        "the server's)")  # fmt: skip
    parser.add_argument("--loading-switch-interval-us", type=float, default=None,
                        help="diagnosis: the GIL switch interval while a version built beside loads (the server's "
                             "LOADING_SWITCH_INTERVAL_S), in microseconds")  # fmt: skip
    parser.add_argument("--loop", default="auto")
    parser.add_argument("--loop-cpu", type=int, default=-1, help="the server's loop_cpu (-1: any)")
    parser.add_argument(
        "--offset-ms",
        type=float,
        default=20.0,
        help="the width of the bins of frames sent during swaps by when from the swap's start",
    )
    parser.add_argument("--json", default="bench_swap.json", help="where to write the figures")
    parser.add_argument("--attribute-stalls", action="store_true",
                        help="record the loader's calls over 1 ms and the loop's lag over 1.5 ms during the swaps, "
                             "and which calls the lag overlaps (slows the loads)")  # fmt: skip
    parser.add_argument("--attribute-phases", action="store_true",
                        help="the p99 of the frames in flight during each part of a load (build, to the GPU, warm-up, "
                             "capture) against the frames in flight during none")  # fmt: skip
    parser.add_argument("--time-loop-calls", action="store_true",
                        help="time the loop thread's CUDA driver calls (and a pure Python control), steady against "
                             "loading")  # fmt: skip
    args = parser.parse_args()
    from streamgpu.loops import new_event_loop

    if args.loading_switch_interval_us is not None:
        from streamgpu.models import manager

        manager.LOADING_SWITCH_INTERVAL_S = args.loading_switch_interval_us / 1e6

    loop = new_event_loop(args.loop)
    try:
        result = loop.run_until_complete(bench(args))
    finally:
        loop.close()
    print(table(result))
    print(offset_table(result["by_offset"]))
    if "stalls" in result:
        print(stall_table(result["stalls"]))
    if "loop_calls" in result:
        print(calls_table(result["loop_calls"]))
    if "phases" in result:
        print(
            "frames in flight during each part of the swaps (sent during swaps): frames, p50 / p99 ms, seconds, "
            "the loop's longest lag in it;"
        )
        print("for the collector: its runs during swaps, p50 / p99 / max ms, seconds")
        for label, row in result["phases"].items():
            latency = f"{row['p50_ms']:6.2f} / {row['p99_ms']:6.2f}"
            print(
                f"  {label:<24} {row['frames']:7d}  {latency}  {row['seconds']:.2f} s  {row['loop_lag_max_ms']:.1f} ms"
            )
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
