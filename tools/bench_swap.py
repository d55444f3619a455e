"""Model swaps under steady load: GPU idle gap at each swap, failed frames, p99 during swaps, memory after unload.

A streamgpu server runs in this process; a closed-loop producer (another
process, ``--connections`` x ``--window`` frames in flight) streams frames to
model ``m`` the whole time. Phases:

1. steady: ``--steady-s`` seconds without swaps (the p99 and inter-batch gap baseline);
2. memory: load a second copy of the model under another name, then unload it;
   device memory allocated before the load vs after the unload;
3. swaps: ``--swaps`` times, a new version of ``m`` (alternating two weight
   files) is loaded, warmed and captured while the old one serves, swapped in
   between two batches, the old one freed after its last batch.

Figures (each a ratio or a comparison inside this one run):

* idle gap at a swap: the first new-version batch's device start minus the
  last old-version batch's device end, from CUDA event timestamps (the backend's
  per-batch trace); negative = the two overlapped on the GPU. Compared with the
  gap between consecutive batches in steady state;
* frames refused or failed over the whole run (target 0);
* p99 latency of frames sent while a swap was in progress vs steady state (target within 20 %);
* device memory allocated after unload vs before load (target within 1 %).

    python tools/bench_swap.py                          # H100: ResNet-50 fp16, 100 swaps
    python tools/bench_swap.py --device cpu --model builtin:small --swaps 3 --steady-s 2 --shape 64,64,3
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import multiprocessing
import multiprocessing.connection
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

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


class LoopWatch:
    """Ticks on the loop every ``period_s``: how late each tick ran (the loop's lag) and when the version of
    ``name`` that new batches launch on changed (a swap's switch), both on ``time.monotonic``."""

    def __init__(self, server: Any, name: str, period_s: float = 0.001) -> None:
        self._server, self._name, self._period = server, name, period_s
        self.lags: list[tuple[float, float]] = []  # (tick, seconds late)
        self.switches: list[float] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        serving = self._server.serving(self._name)
        while True:
            before = time.monotonic()
            await asyncio.sleep(self._period)
            now = time.monotonic()
            self.lags.append((now, now - before - self._period))
            current = self._server.serving(self._name)
            if current is not serving:
                serving = current
                self.switches.append(now)

    def lag_p99_ms(self, windows: list[tuple[float, float]]) -> float:
        return percentile([lag for t, lag in self.lags if any(a <= t <= b for a, b in windows)], 99) * 1e3


def batch_ms(trace: list[BatchTrace], size: int) -> float:
    """Median device time of the traced batches of ``size`` frames."""
    return percentile([(b.end_s - b.start_s) for b in trace if b.size == size], 50) * 1e3


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
    base = ModelSpec(name="m", source=versions[0], arch=arch, input_shape=shape, precision=args.precision,
                     max_batch_size=args.max_batch, compile=args.compile)  # fmt: skip
    cfg = Config(listeners=[ListenerSpec(port=0)], device=args.device, models=[base], shutdown_timeout_s=30,
                 ingest_workers=args.ingest_workers, max_payload_bytes=1 << 20)  # fmt: skip
    server = Server(cfg)
    await server.start()
    assert server.backend is not None
    device, device_name = server.backend.name, server.backend.device_name
    trace: list[BatchTrace] = []
    server.backend.trace = trace

    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=producer, args=(server.port, shape, args.connections, args.window, stop, send))
    proc.start()
    loop = asyncio.get_running_loop()
    assert await loop.run_in_executor(None, receive.recv) == "ready"
    await asyncio.sleep(args.warmup_s)

    watch = LoopWatch(server, "m")
    watch.start()
    steady_from = time.monotonic()
    steady_trace_from = len(trace)
    await asyncio.sleep(args.steady_s)
    steady_to = time.monotonic()
    steady_trace = trace[steady_trace_from:]

    memory_before = device_memory(device)
    await server.load_model(replace(base, name="extra", source=versions[1]))
    memory_loaded = device_memory(device)
    await server.unload_model("extra")
    memory_after = device_memory(device)

    windows: list[tuple[float, float]] = []
    swaps: list[dict[str, Any]] = []
    swaps_trace_from = len(trace)
    for i in range(args.swaps):
        old = server.serving("m")
        start = time.monotonic()
        await server.swap_model("m", replace(base, source=versions[(i + 1) % len(versions)]))
        end = time.monotonic()
        new = server.serving("m")
        windows.append((start, end))
        swaps.append({"old": old, "new": new, "seconds": end - start})
        await asyncio.sleep(args.between_s)  # the new version's first batches are traced
    memory_end = device_memory(device)
    watch.stop()
    stop.set()
    records: list[tuple[float, float, int]] = await loop.run_in_executor(None, receive.recv)
    proc.join()
    await server.stop()

    # GPU idle gap at each swap, from the backend's per-batch device timestamps.
    first_start: dict[int, float] = {}
    last_end: dict[int, float] = {}
    for batch in trace:
        key = id(batch.model)
        first_start[key] = min(first_start.get(key, batch.start_s), batch.start_s)
        last_end[key] = max(last_end.get(key, batch.end_s), batch.end_s)
    gaps = []  # one device (the first instance of each version)
    for swap in swaps:
        old_id, new_id = id(swap["old"][0]), id(swap["new"][0])
        if old_id in last_end and new_id in first_start:
            gaps.append(first_start[new_id] - last_end[old_id])
    steady = [lat for sent, lat, status in records if steady_from <= sent < steady_to and status == 0]
    during = [lat for sent, lat, status in records if status == 0 and any(a <= sent <= b for a, b in windows)]
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
        "p99_steady_ms": percentile(steady, 99) * 1e3, "p99_during_swaps_ms": percentile(during, 99) * 1e3,
        "frames_during_swaps": len(during),
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
    }  # fmt: skip
    result["p99_ratio"] = result["p99_during_swaps_ms"] / result["p99_steady_ms"]
    if memory_before:
        result["memory_ratio"] = (memory_after or 0) / memory_before
    return result


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
        ("p99 sent while loading / switch to freed", f"{r['p99_while_loading_ms']:.2f} ms / "
                                                     f"{r['p99_switch_to_freed_ms']:.2f} ms "
                                                     f"(switch to freed: {r['switch_to_freed_s_p50'] * 1e3:.0f} ms)"),
        ("loop lag p99 (1 ms ticks)", "steady {steady:.2f} ms, loading {loading:.2f} ms, switch to freed "
                                      "{switch_to_freed:.2f} ms".format(**r["loop_lag_p99_ms"])),
        (f"device ms per batch of {r['batch_size_common']}", "steady {steady:.2f}, during swaps {swaps:.2f}"
                                                             .format(**r["batch_ms_p50"])),
        ("device memory", mem),
        ("one swap (load+warm+capture+switch+free)", f"{r['swap_seconds_p50']:.2f} s median"),
    ]  # fmt: skip
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


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
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--window", type=int, default=16, help="frames in flight per connection")
    parser.add_argument("--warmup-s", type=float, default=3.0)
    parser.add_argument("--steady-s", type=float, default=10.0)
    parser.add_argument("--between-s", type=float, default=0.05, help="pause after each swap")
    parser.add_argument("--ingest-workers", type=int, default=0, help="the server's ingest_workers (0: one process)")
    parser.add_argument("--loop", default="auto")
    parser.add_argument("--json", default="bench_swap.json", help="where to write the figures")
    args = parser.parse_args()
    from streamgpu.loops import new_event_loop

    loop = new_event_loop(args.loop)
    try:
        result = loop.run_until_complete(bench(args))
    finally:
        loop.close()
    print(table(result))
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
