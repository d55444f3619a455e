#!/usr/bin/env python3
"""GPU data-path benchmark: H2D DMA, batch assembly, completion bridges, pre-processing, CUDA graphs.

Every figure is measured against a baseline taken in the same run (the machines are shared and
noisy). GPU times come from CUDA events, as medians of many repeats after warm-up; where the
host would otherwise starve the GPU, the stream is first held by a spin kernel so that the whole
batch is queued before the timed region starts (``_gpu_times``). Inputs are random and rotated
so that caches do not flatter the numbers.

    python3 tools/bench_gpu.py [--json PATH] [--quick]

Prints one table (figure, value, baseline, ratio, target, met?) and writes JSON (default
$OUT/bench_gpu.json when OUT is set). Exits with status 2 on a machine without CUDA.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streamgpu.gpu.bridge import CompletionBridge
from streamgpu.gpu.kernels import gather_frames, gather_preprocess, preprocess_image

MiB = 1 << 20
FRAME_HWC = (224, 224, 3)
FRAME_NBYTES = 224 * 224 * 3  # 150528 B
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


@dataclass
class Row:
    figure: str
    value: float
    unit: str
    baseline: float | None = None
    baseline_what: str = ""
    target: str = "-"
    met: bool | None = None

    @property
    def ratio(self) -> float | None:
        if self.baseline is None or self.baseline == 0:
            return None
        return self.value / self.baseline


@dataclass
class Report:
    device: str
    rows: list[Row] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def add(self, *args: Any, **kwargs: Any) -> Row:
        row = Row(*args, **kwargs)
        self.rows.append(row)
        print(f"  {row.figure}: {row.value:.4g} {row.unit}", flush=True)
        return row


# ---------------------------------------------------------------- timing helpers


class Timer:
    """GPU-side timing with a pre-queued stream, so host launch cost does not show as GPU time."""

    def __init__(self, stream: torch.cuda.Stream) -> None:
        self.stream = stream
        with torch.cuda.stream(stream):
            torch.cuda._sleep(1000)  # load the spin kernel
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        cycles = 2_000_000
        with torch.cuda.stream(stream):
            start.record(stream)
            torch.cuda._sleep(cycles)
            end.record(stream)
        end.synchronize()
        self.cycles_per_us = cycles / (start.elapsed_time(end) * 1000.0)

    def hold(self, us: float) -> None:
        with torch.cuda.stream(self.stream):
            torch.cuda._sleep(int(us * self.cycles_per_us))

    def gpu_times(self, fn: Callable[[int], None], reps: int, warmup: int = 5) -> list[float]:
        """Milliseconds of GPU time of fn(rep) on the stream, each rep queued behind a spin kernel."""
        for i in range(warmup):
            fn(i)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(0)
        issue_us = (time.perf_counter() - t0) * 1e6
        torch.cuda.synchronize()
        hold_us = 3 * issue_us + 30
        times: list[float] = []
        for start_rep in range(0, reps, 50):
            pairs = []
            for i in range(start_rep, min(reps, start_rep + 50)):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                self.hold(hold_us)
                s.record(self.stream)
                fn(i)
                e.record(self.stream)
                pairs.append((s, e))
            torch.cuda.synchronize()
            times += [s.elapsed_time(e) for s, e in pairs]
        return times


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def pct(xs: list[float], q: float) -> float:
    ys = sorted(xs)
    return ys[min(len(ys) - 1, int(q * len(ys)))]


def random_pinned(nbytes: int) -> torch.Tensor:
    t = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    t.view(torch.int64).random_()  # never time zeros
    return t


# ---------------------------------------------------------------- 1. H2D DMA


def bench_h2d(rep: Report, quick: bool) -> None:
    print("H2D DMA", flush=True)
    copy_stream = torch.cuda.Stream()
    side = torch.cuda.Stream()
    timer = Timer(copy_stream)
    ring = random_pinned(256 * MiB)
    pageable = torch.empty(256 * MiB, dtype=torch.uint8)
    pageable.view(torch.int64).random_()
    dev = torch.empty(256 * MiB, dtype=torch.uint8, device="cuda")
    reps = 10 if quick else 30

    big = 64 * MiB

    def copy_big(src: torch.Tensor) -> Callable[[int], None]:
        def fn(i: int) -> None:
            o = (i % 3) * big
            with torch.cuda.stream(copy_stream):
                dev[o : o + big].copy_(src[o : o + big], non_blocking=True)

        return fn

    peak = big / (med(timer.gpu_times(copy_big(ring), reps)) * 1e-3) / 1e9
    # Pageable copies are staged by the host: time them on the wall clock.
    walls = []
    for i in range(reps // 2 + 3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        copy_big(pageable)(i)
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - t0)
    pageable_peak = big / med(walls[3:]) / 1e9
    rep.add(
        "H2D 64 MiB pinned (peak)",
        peak,
        "GB/s",
        pageable_peak,
        "pageable 64 MiB",
        ">= 4x pageable",
        peak >= 4 * pageable_peak,
    )
    rep.details["h2d"] = {"pinned_peak_GBps": peak, "pageable_peak_GBps": pageable_peak}

    for size in (FRAME_NBYTES, 1 * MiB, 6 * MiB):
        slot = -(-size // 256) * 256
        nslots = (256 * MiB) // slot
        k = max(4, min(64, (32 * MiB) // size))  # copies per timed batch

        def copies(
            src: torch.Tensor, size: int = size, slot: int = slot, nslots: int = nslots, k: int = k
        ) -> Callable[[int], None]:
            def fn(r: int) -> None:
                with torch.cuda.stream(copy_stream):
                    for j in range(k):
                        s = ((r * k + j) * 7919 % nslots) * slot  # scattered slots
                        d = ((r * k + j) % nslots) * slot
                        dev[d : d + size].copy_(src[s : s + size], non_blocking=True)

            return fn

        def copies_two_streams(r: int, size: int = size, slot: int = slot, nslots: int = nslots, k: int = k) -> None:
            # Alternate two copy streams: one copy's setup overlaps the other's transfer.
            side.wait_stream(copy_stream)
            for j in range(k):
                st = copy_stream if j % 2 == 0 else side
                s = ((r * k + j) * 7919 % nslots) * slot
                d = ((r * k + j) % nslots) * slot
                with torch.cuda.stream(st):
                    dev[d : d + size].copy_(ring[s : s + size], non_blocking=True)
            copy_stream.wait_stream(side)

        def gather_k(r: int, size: int = size, slot: int = slot, nslots: int = nslots, k: int = k) -> None:
            offs = [((r * k + j) * 7919 % nslots) * slot for j in range(k)]
            o = (r % 4) * 32 * MiB
            gather_frames(ring, offs, size, dev[o : o + k * size].view(k, size), copy_stream)

        pinned_gbps = k * size / (med(timer.gpu_times(copies(ring), reps)) * 1e-3) / 1e9
        two_gbps = k * size / (med(timer.gpu_times(copies_two_streams, reps)) * 1e-3) / 1e9
        gather_gbps = k * size / (med(timer.gpu_times(gather_k, reps)) * 1e-3) / 1e9
        walls = []
        for i in range(8):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            copies(pageable)(i)
            torch.cuda.synchronize()
            walls.append(time.perf_counter() - t0)
        pageable_gbps = k * size / med(walls[2:]) / 1e9
        label = f"{size / 1e3:.0f} KB" if size < MiB else f"{size // MiB} MiB"
        big_enough = size >= MiB
        rep.add(
            f"H2D {label} slots, pinned vs peak",
            pinned_gbps,
            "GB/s",
            peak,
            "pinned 64 MiB peak",
            ">= 0.9" if big_enough else "-",
            pinned_gbps >= 0.9 * peak if big_enough else None,
        )
        for how, gbps in (("2 copy streams", two_gbps), ("gather kernel", gather_gbps)):
            rep.add(
                f"H2D {label} slots, {how} vs peak",
                gbps,
                "GB/s",
                peak,
                "pinned 64 MiB peak",
                ">= 0.9" if big_enough else "-",
                gbps >= 0.9 * peak if big_enough else None,
            )
        rep.add(
            f"H2D {label} slots, pinned vs pageable",
            pinned_gbps,
            "GB/s",
            pageable_gbps,
            f"pageable {label}",
            ">= 4",
            pinned_gbps >= 4 * pageable_gbps,
        )
        rep.details["h2d"][str(size)] = {
            "pinned_GBps": pinned_gbps,
            "two_streams_GBps": two_gbps,
            "gather_kernel_GBps": gather_gbps,
            "pageable_GBps": pageable_gbps,
            "copies": k,
        }


# ---------------------------------------------------------------- 2. batch assembly


def bench_batch(rep: Report, quick: bool) -> None:
    print("batch assembly", flush=True)
    stream = torch.cuda.Stream()
    timer = Timer(stream)
    ring = random_pinned(64 * MiB)
    nslots = ring.numel() // FRAME_NBYTES  # 150528 = 588 * 256: slots stay 256-aligned
    slots = [ring[i * FRAME_NBYTES : (i + 1) * FRAME_NBYTES] for i in range(nslots)]
    gen = torch.Generator().manual_seed(1)
    reps = 60 if quick else 200
    h, w, c = FRAME_HWC
    details: dict[str, Any] = {}
    for n in (1, 8, 32):
        picks = [torch.randperm(nslots, generator=gen)[:n].tolist() for _ in range(16)]
        offsets = [[s * FRAME_NBYTES for s in p] for p in picks]
        out_u8 = [torch.empty((n, FRAME_NBYTES), dtype=torch.uint8, device="cuda") for _ in range(2)]
        out_pre = [
            torch.empty((n, c, h, w), dtype=torch.float16, device="cuda", memory_format=torch.channels_last)
            for _ in range(2)
        ]

        def per_frame(i: int, n: int = n, picks: list[list[int]] = picks, out_u8: list[torch.Tensor] = out_u8) -> None:
            out = out_u8[i % 2]
            with torch.cuda.stream(stream):
                for j, s in enumerate(picks[i % 16]):
                    out[j].copy_(slots[s], non_blocking=True)

        def gather(i: int, offsets: list[list[int]] = offsets, out_u8: list[torch.Tensor] = out_u8) -> None:
            gather_frames(ring, offsets[i % 16], FRAME_NBYTES, out_u8[i % 2], stream)

        def per_frame_pre(
            i: int, n: int = n, out_u8: list[torch.Tensor] = out_u8, out_pre: list[torch.Tensor] = out_pre
        ) -> None:
            per_frame(i)
            preprocess_image(
                out_u8[i % 2].view(n, h, w, c), MEAN, STD, torch.float16, True, out=out_pre[i % 2], stream=stream
            )

        def fused(i: int, offsets: list[list[int]] = offsets, out_pre: list[torch.Tensor] = out_pre) -> None:
            gather_preprocess(
                ring, offsets[i % 16], h, w, c, MEAN, STD, torch.float16, True, out=out_pre[i % 2], stream=stream
            )

        # Correctness in the same run: gather and fused against the per-frame path.
        per_frame(0)
        ref = out_u8[0].clone()
        gather(0)
        torch.cuda.synchronize()
        gather_ok = torch.equal(ref, out_u8[0])
        per_frame_pre(1)
        ref_pre = out_pre[1].clone()
        fused(1)
        torch.cuda.synchronize()
        fused_err = ((out_pre[1].float() - ref_pre.float()).abs().max()).item()

        res: dict[str, Any] = {"gather_equal": gather_ok, "fused_max_abs_diff": fused_err}
        for name, fn in (("copies", per_frame), ("gather", gather), ("copies+pre", per_frame_pre), ("fused", fused)):
            gpu = med(timer.gpu_times(fn, reps))
            cpu = []
            for i in range(reps):
                if i % 50 == 0:
                    torch.cuda.synchronize()
                t0 = time.perf_counter_ns()
                fn(i)
                cpu.append((time.perf_counter_ns() - t0) / 1e3 / n)
            torch.cuda.synchronize()
            res[name] = {"gpu_us": gpu * 1e3, "cpu_us_per_frame": med(cpu)}
        details[str(n)] = res
        rep.add(
            f"batch N={n}: gather kernel GPU us (vs per-frame copies)",
            res["gather"]["gpu_us"],
            "us",
            res["copies"]["gpu_us"],
            "per-frame copy_",
        )
        rep.add(
            f"batch N={n}: gather CPU us/frame (vs copies)",
            res["gather"]["cpu_us_per_frame"],
            "us",
            res["copies"]["cpu_us_per_frame"],
            "per-frame copy_",
        )
        rep.add(
            f"batch N={n}: fused gather+pre GPU us (vs copies+pre)",
            res["fused"]["gpu_us"],
            "us",
            res["copies+pre"]["gpu_us"],
            "copies + preprocess kernel",
        )
        rep.add(
            f"batch N={n}: fused CPU us/frame (vs copies+pre)",
            res["fused"]["cpu_us_per_frame"],
            "us",
            res["copies+pre"]["cpu_us_per_frame"],
            "copies + preprocess kernel",
        )
        if not gather_ok or fused_err > 1e-2:
            rep.errors[f"batch N={n}"] = f"mismatch: gather_equal={gather_ok} fused_max_abs_diff={fused_err}"
    rep.details["batch"] = details
    # Host cost of one gather_frames call (N=8) against a bare cupy launch of the same kernel.
    from streamgpu.gpu import kernels

    offs8 = [s * FRAME_NBYTES for s in range(0, 64, 8)]
    out8 = torch.empty((8, FRAME_NBYTES), dtype=torch.uint8, device="cuda")
    args = (
        kernels.np.uint64(ring.data_ptr()),
        kernels.np.uint64(out8.data_ptr()),
        kernels._pack_offsets([o >> 8 for o in offs8]),
        kernels.np.int64(FRAME_NBYTES),
    )
    grid = (-(-FRAME_NBYTES // 16 // 1024), 8)
    call, bare = [], []
    for i in range(600):
        if i % 50 == 0:
            torch.cuda.synchronize()
        t0 = time.perf_counter_ns()
        gather_frames(ring, offs8, FRAME_NBYTES, out8, stream)
        t1 = time.perf_counter_ns()
        kernels._launch("gather_frames", 0, grid, args, stream)
        t2 = time.perf_counter_ns()
        call.append((t1 - t0) / 1e3)
        bare.append((t2 - t1) / 1e3)
    torch.cuda.synchronize()
    rep.add(
        "gather_frames host us/call N=8 (vs bare cupy launch)", med(call[100:]), "us", med(bare[100:]), "bare launch"
    )


# ---------------------------------------------------------------- 3. completion bridges


def _set(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class PollBridge:
    """(a) query() every loop iteration via call_soon while events are pending; nothing when idle."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.waiters: list[tuple[Any, asyncio.Future[None]]] = []
        self.scheduled = False

    def wait(self, event: Any, expected_s: float = 0.0) -> asyncio.Future[None]:
        fut = self.loop.create_future()
        self.waiters.append((event, fut))
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self.poll)
        return fut

    def poll(self) -> None:
        keep = []
        for ev, fut in self.waiters:
            if fut.done():
                continue
            if ev.query():
                fut.set_result(None)
            else:
                keep.append((ev, fut))
        self.waiters = keep
        self.scheduled = bool(keep)
        if keep:
            self.loop.call_soon(self.poll)

    def close(self) -> None:
        for _, fut in self.waiters:
            fut.cancel()


class HostFuncBridge:
    """(b) cudaLaunchHostFunc (through cupy) -> call_soon_threadsafe; the driver thread takes the GIL."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        import cupy

        self.loop = loop
        self.cupy = cupy
        self.streams: dict[int, Any] = {}

    def submit(self, stream: torch.cuda.Stream) -> asyncio.Future[None]:
        fut = self.loop.create_future()
        ext = self.streams.get(stream.cuda_stream)
        if ext is None:
            ext = self.streams[stream.cuda_stream] = self.cupy.cuda.ExternalStream(stream.cuda_stream)
        ext.launch_host_func(self._callback, fut)
        return fut

    def _callback(self, fut: asyncio.Future[None]) -> None:
        self.loop.call_soon_threadsafe(_set, fut)

    def close(self) -> None:
        pass


class ThreadBridge:
    """(c) one waiter thread blocking in event.synchronize() (blocking-sync events)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.q: queue.SimpleQueue[tuple[Any, asyncio.Future[None]] | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self.run, name="event-waiter", daemon=True)
        self.thread.start()

    def wait(self, event: Any, expected_s: float = 0.0) -> asyncio.Future[None]:
        fut = self.loop.create_future()
        self.q.put((event, fut))
        return fut

    def run(self) -> None:
        while (item := self.q.get()) is not None:
            ev, fut = item
            ev.synchronize()
            self.loop.call_soon_threadsafe(_set, fut)

    def close(self) -> None:
        self.q.put(None)
        self.thread.join()


# a and d run twice, interleaved, to show the run-to-run spread.
DESIGNS = ("a_poll", "d_hybrid", "b_hostfunc", "c_thread", "a_poll#2", "d_hybrid#2")


async def _bridge_design(design: str, quick: bool) -> dict[str, Any]:
    design = design.split("#")[0]
    loop = asyncio.get_running_loop()
    stream = torch.cuda.Stream()
    blocking = design == "c_thread"
    bridge: Any
    if design == "a_poll":
        bridge = PollBridge(loop)
    elif design == "b_hostfunc":
        bridge = HostFuncBridge(loop)
    elif design == "c_thread":
        bridge = ThreadBridge(loop)
    else:
        bridge = CompletionBridge(loop)

    def completion(ev: torch.cuda.Event, expected_s: float = 0.0) -> asyncio.Future[None]:
        if design == "b_hostfunc":
            return bridge.submit(stream)
        ev.record(stream)
        return bridge.wait(ev, expected_s)

    torch.cuda.set_stream(stream)  # once: a per-launch stream context would add ~2 us to every op

    async def one_task(x: torch.Tensor, iters: int, lat: list[float] | None) -> None:
        ev = torch.cuda.Event(blocking=blocking)
        for _ in range(iters):
            t0 = time.perf_counter()
            x.add_(1)  # the tiny kernel
            await completion(ev)
            if lat is not None:
                lat.append((time.perf_counter() - t0) * 1e6)

    x = torch.zeros(1, device="cuda")
    res: dict[str, Any] = {}
    # Latency, one waiter.
    await one_task(x, 200, None)
    n_lat = 1000 if quick else 3000
    lat: list[float] = []
    c0 = time.process_time()
    await one_task(x, n_lat, lat)
    cpu_per = (time.process_time() - c0) / n_lat * 1e6
    res.update(p50_us=pct(lat, 0.5), p99_us=pct(lat, 0.99), cpu_us_per_completion=cpu_per)

    # Throughput: 64 waiter tasks x 100 completions.
    xs = [torch.zeros(1, device="cuda") for _ in range(64)]
    await asyncio.gather(*(one_task(xi, 10, None) for xi in xs))
    t0, c0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*(one_task(xi, 100, None) for xi in xs))
    wall = time.perf_counter() - t0
    res.update(per_s=6400 / wall, cpu_us_per_completion_64=(time.process_time() - c0) / 6400 * 1e6)

    # Idle: armed, nothing pending.
    torch.cuda.synchronize()
    await asyncio.sleep(0.05)
    t0, c0 = time.perf_counter(), time.process_time()
    await asyncio.sleep(1.0)
    res["idle_cpu_pct"] = (time.process_time() - c0) / (time.perf_counter() - t0) * 100

    # CPU while one 20 ms kernel is in flight (the hybrid is told the expected duration).
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    timer = Timer(stream)
    cpu_frac, overshoot = [], []
    ev = torch.cuda.Event(blocking=blocking)
    for _ in range(5):
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.cuda.stream(stream):
            start.record(stream)
            timer.hold(20_000)
            end.record(stream)
        await completion(ev, expected_s=0.020)
        wall = time.perf_counter() - t0
        cpu_frac.append((time.process_time() - c0) / wall * 100)
        overshoot.append(wall * 1e3 - start.elapsed_time(end))
    res.update(long_job_cpu_pct=med(cpu_frac), long_job_overshoot_ms=med(overshoot))
    # Same without the hint: the hybrid spins for spin_s, then polls every slow_poll_s.
    cpu_frac, overshoot = [], []
    for _ in range(5):
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.cuda.stream(stream):
            start.record(stream)
            timer.hold(20_000)
            end.record(stream)
        await completion(ev)
        wall = time.perf_counter() - t0
        cpu_frac.append((time.process_time() - c0) / wall * 100)
        overshoot.append(wall * 1e3 - start.elapsed_time(end))
    res.update(nohint_cpu_pct=med(cpu_frac), nohint_overshoot_ms=med(overshoot))
    bridge.close()
    torch.cuda.set_stream(torch.cuda.default_stream())
    return res


def bench_bridge(rep: Report, quick: bool) -> None:
    print("completion bridges", flush=True)
    try:
        import uvloop

        new_loop: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
        loop_name = "uvloop"
    except ImportError:
        new_loop, loop_name = asyncio.new_event_loop, "asyncio"
    results: dict[str, Any] = {"loop": loop_name}
    launch = _launch_cost()
    results["launch_record_cpu_us"] = launch
    for design in DESIGNS:
        loop = new_loop()
        try:
            results[design] = loop.run_until_complete(_bridge_design(design, quick))
        except Exception:
            rep.errors[f"bridge {design}"] = traceback.format_exc(limit=3)
        finally:
            loop.close()
        print(f"  {design}: {results.get(design)}", flush=True)
    rep.details["bridge"] = results
    best = results.get("d_hybrid") or {}
    base = results.get("b_hostfunc") or {}
    polled = results.get("a_poll") or {}
    if best:
        rep.add(
            "bridge hybrid p50 us (vs host func)",
            best["p50_us"],
            "us",
            base.get("p50_us"),
            "host func",
            "<= 25",
            best["p50_us"] <= 25,
        )
        rep.add(
            "bridge hybrid p99 us (vs host func)",
            best["p99_us"],
            "us",
            base.get("p99_us"),
            "host func",
            "<= 60",
            best["p99_us"] <= 60,
        )
        rep.add(
            "bridge hybrid completions/s, 64x100 (vs host func)",
            best["per_s"],
            "1/s",
            base.get("per_s"),
            "host func",
            ">= 40000",
            best["per_s"] >= 40000,
        )
        rep.add(
            "bridge hybrid loop CPU us/completion (vs launch+record only)",
            best["cpu_us_per_completion"],
            "us",
            launch,
            "launch+record",
        )
        rep.add(
            "bridge hybrid idle CPU %",
            best["idle_cpu_pct"],
            "%",
            polled.get("idle_cpu_pct"),
            "plain poll",
            "<= 2",
            best["idle_cpu_pct"] <= 2,
        )
        rep.add(
            "bridge hybrid CPU % during 20 ms job (vs plain poll)",
            best["long_job_cpu_pct"],
            "%",
            polled.get("long_job_cpu_pct"),
            "plain poll",
        )


def _launch_cost() -> float:
    """Host microseconds of the tiny kernel launch + event record alone (part of every completion)."""
    stream = torch.cuda.Stream()
    x = torch.zeros(1, device="cuda")
    ev = torch.cuda.Event()
    torch.cuda.set_stream(stream)
    for _ in range(200):
        x.add_(1)
        ev.record(stream)
    torch.cuda.synchronize()
    ts = []
    for i in range(2000):
        t0 = time.perf_counter_ns()
        x.add_(1)
        ev.record(stream)
        ts.append((time.perf_counter_ns() - t0) / 1e3)
        if i % 100 == 0:
            stream.synchronize()
    torch.cuda.synchronize()
    torch.cuda.set_stream(torch.cuda.default_stream())
    return med(ts)


# ---------------------------------------------------------------- 4. pre-processing


def bench_preprocess(rep: Report, quick: bool) -> None:
    print("pre-processing", flush=True)
    stream = torch.cuda.Stream()
    timer = Timer(stream)
    reps = 30 if quick else 100
    n, (h, w, c) = 64, FRAME_HWC
    inputs = [torch.randint(0, 256, (n, h, w, c), dtype=torch.uint8, device="cuda") for _ in range(6)]
    src = torch.empty(256 * MiB, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)

    def d2d(i: int) -> None:
        with torch.cuda.stream(stream):
            dst.copy_(src)

    d2d_gbps = 2 * src.numel() / (med(timer.gpu_times(d2d, 20)) * 1e-3) / 1e9
    mean_t = torch.tensor(MEAN, device="cuda").view(1, c, 1, 1)
    std_t = torch.tensor(STD, device="cuda").view(1, c, 1, 1)
    res: dict[str, Any] = {"d2d_GBps": d2d_gbps}
    for dtype, cl in ((torch.float16, True), (torch.float16, False), (torch.float32, False)):
        fmt = torch.channels_last if cl else torch.contiguous_format
        outs = [torch.empty((n, c, h, w), dtype=dtype, device="cuda", memory_format=fmt) for _ in range(6)]

        def fused(i: int, dtype: torch.dtype = dtype, cl: bool = cl, outs: list[torch.Tensor] = outs) -> None:
            preprocess_image(inputs[i % 6], MEAN, STD, dtype, cl, out=outs[i % 6], stream=stream)

        m, sd = mean_t.to(dtype), std_t.to(dtype)

        def eager(
            i: int,
            dtype: torch.dtype = dtype,
            fmt: torch.memory_format = fmt,
            m: torch.Tensor = m,
            sd: torch.Tensor = sd,
        ) -> None:
            with torch.cuda.stream(stream):
                y = inputs[i % 6].permute(0, 3, 1, 2).to(dtype)
                y = (y / 255 - m) / sd
                y.contiguous(memory_format=fmt)

        fused(0)
        torch.cuda.synchronize()
        ref = ((inputs[0].double() / 255 - mean_t.double().view(c)) / std_t.double().view(c)).permute(0, 3, 1, 2)
        err = ((outs[0].double() - ref).abs().max() / ref.abs().max()).item()
        t_fused = med(timer.gpu_times(fused, reps))
        t_eager = med(timer.gpu_times(eager, reps))
        nbytes = inputs[0].numel() * (1 + torch.finfo(dtype).bits // 8)
        gbps = nbytes / (t_fused * 1e-3) / 1e9
        name = f"{'fp16' if dtype == torch.float16 else 'fp32'} {'channels_last' if cl else 'NCHW'}"
        res[name] = {"fused_us": t_fused * 1e3, "eager_us": t_eager * 1e3, "GBps": gbps, "max_rel_err": err}
        rep.add(f"preprocess N=64 {name}: fused GB/s (vs D2D copy)", gbps, "GB/s", d2d_gbps, "D2D copy r+w")
        rep.add(f"preprocess N=64 {name}: fused us (vs eager torch)", t_fused * 1e3, "us", t_eager * 1e3, "eager torch")
        if err > 2e-3:
            rep.errors[f"preprocess {name}"] = f"max relative error {err}"
    rep.details["preprocess"] = res


# ---------------------------------------------------------------- 5. CUDA graphs


def bench_graphs(rep: Report, quick: bool) -> None:
    print("CUDA graphs (ResNet-50 fp16 channels_last)", flush=True)
    from streamgpu.models.resnet import resnet50

    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    model = resnet50().eval().to(device="cuda", dtype=torch.float16)
    model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch's stubs omit it
    reps = 30 if quick else 100
    res: dict[str, Any] = {}
    stream = torch.cuda.Stream()
    for bs in (1, 8):
        xs = [
            torch.randn(bs, 3, 224, 224, device="cuda", dtype=torch.float16).contiguous(
                memory_format=torch.channels_last
            )
            for _ in range(4)
        ]
        with torch.inference_mode(), torch.cuda.stream(stream):
            for i in range(10):
                model(xs[i % 4])
            stream.synchronize()
            eager = []
            for i in range(reps):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record(stream)
                model(xs[i % 4])
                e.record(stream)
                e.synchronize()
                eager.append(s.elapsed_time(e))
            static_in = xs[0].clone()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                static_out = model(static_in)
            for _ in range(5):
                graph.replay()
            stream.synchronize()
            replay = []
            for i in range(reps):
                static_in.copy_(xs[i % 4])
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record(stream)
                graph.replay()
                e.record(stream)
                e.synchronize()
                replay.append(s.elapsed_time(e))
            fresh = torch.randn_like(static_in)
            static_in.copy_(fresh)
            graph.replay()
            got = static_out.float().clone()
            want = model(fresh).float()
            stream.synchronize()
        rel = ((got - want).norm() / want.norm()).item()
        res[str(bs)] = {"eager_ms": med(eager), "graph_ms": med(replay), "rel_err": rel}
        target = "<= 1.2 ms" if bs == 1 else "-"
        rep.add(
            f"ResNet-50 bs{bs} graph replay ms (vs eager)",
            med(replay),
            "ms",
            med(eager),
            "eager",
            target,
            med(replay) <= 1.2 if bs == 1 else None,
        )
        rep.add(f"ResNet-50 bs{bs} graph vs eager output rel err", rel, "", None, "", "<= 1e-2", rel <= 1e-2)
    rep.details["graphs"] = res


# ---------------------------------------------------------------- main


def print_table(rep: Report) -> None:
    print(f"\n=== bench_gpu on {rep.device} ===")
    head = f"{'figure':<62} {'value':>11} {'baseline':>11} {'ratio':>7} {'target':>10} {'met?':>5}"
    print(head)
    print("-" * len(head))
    for r in rep.rows:
        base = "-" if r.baseline is None else f"{r.baseline:.4g}"
        ratio = "-" if r.ratio is None else f"{r.ratio:.3g}"
        met = "-" if r.met is None else ("yes" if r.met else "NO")
        print(f"{r.figure:<62} {r.value:>7.4g} {r.unit:<3} {base:>11} {ratio:>7} {r.target:>10} {met:>5}")
    batch = rep.details.get("batch", {}).get("32")
    if batch:
        faster = "gather kernel" if batch["gather"]["gpu_us"] < batch["copies"]["gpu_us"] else "per-frame copies"
        fused = "fused gather+pre" if batch["fused"]["gpu_us"] < batch["copies+pre"]["gpu_us"] else "copies + pre"
        print(f"default batch assembly (GPU time at N=32): {faster}; with pre-processing: {fused}")
    bridge = rep.details.get("bridge", {})
    if bridge:
        print(
            f"bridge designs ({bridge.get('loop')}; "
            f"launch+record alone {bridge.get('launch_record_cpu_us', 0):.1f} us):"
        )
        print(
            f"  {'design':<11} {'p50 us':>7} {'p99 us':>7} {'CPU us/op':>9} {'per s':>8}"
            f" {'idle %':>7} {'20ms job CPU % hint/none':>25}"
        )
        for d in DESIGNS:
            r = bridge.get(d)
            if r:
                print(
                    f"  {d:<11} {r['p50_us']:>7.1f} {r['p99_us']:>7.1f} {r['cpu_us_per_completion']:>9.1f}"
                    f" {r['per_s']:>8.0f} {r['idle_cpu_pct']:>7.2f}"
                    f" {r['long_job_cpu_pct']:>17.1f} / {r['nohint_cpu_pct']:>5.1f}"
                )
    for k, v in rep.errors.items():
        print(f"ERROR {k}: {v.strip().splitlines()[-1]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    out_dir = os.environ.get("OUT")
    parser.add_argument("--json", default=str(Path(out_dir) / "bench_gpu.json") if out_dir else None)
    parser.add_argument("--quick", action="store_true", help="fewer repeats (smoke run)")
    parser.add_argument("--only", nargs="*", choices=["h2d", "batch", "bridge", "preprocess", "graphs"])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu: no usable CUDA device here (torch.cuda.is_available() is False); run it on a GPU machine.")
        return 2
    rep = Report(device=torch.cuda.get_device_name())
    rep.details["versions"] = {"torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import cupy

        rep.details["versions"]["cupy"] = cupy.__version__
    except ImportError:
        pass
    print(f"device: {rep.device}", flush=True)
    sections: dict[str, Callable[[Report, bool], None]] = {
        "h2d": bench_h2d,
        "batch": bench_batch,
        "bridge": bench_bridge,
        "preprocess": bench_preprocess,
        "graphs": bench_graphs,
    }
    t_all = time.perf_counter()
    for name, fn in sections.items():
        if args.only and name not in args.only:
            continue
        t0 = time.perf_counter()
        try:
            fn(rep, args.quick)
        except Exception:
            rep.errors[name] = traceback.format_exc()
            print(rep.errors[name], flush=True)
        rep.details.setdefault("seconds", {})[name] = time.perf_counter() - t0
    rep.details["seconds"]["total"] = time.perf_counter() - t_all
    print_table(rep)
    if args.json:
        doc = {
            "device": rep.device,
            "rows": [asdict(r) | {"ratio": r.ratio} for r in rep.rows],
            "details": rep.details,
            "errors": rep.errors,
        }
        Path(args.json).write_text(json.dumps(doc, indent=2, default=str))
        print(f"wrote {args.json}")
    return 1 if rep.errors else 0


if __name__ == "__main__":
    sys.exit(main())
