"""What slows the scheduling loop while other work runs in its process: one kind at a time, beside steady load.

A streamgpu server runs in this process and a closed-loop producer (another process, ``--connections`` x
``--window`` frames in flight; ``bench_swap.ProducerProcess``) streams frames to model ``m`` the whole time. For
each kind of work in ``--kinds``, a steady window of ``--window-s`` seconds, then the same time with that work
running in a background thread (or, for ``swaps``, real swaps of ``m``). Printed per window: the p50 and p99
of the frames sent in it, and the interfering window's p50 and p99 against the steady window just before.

Kinds (``cuda`` ones need a GPU):

* ``python``: pure Python, flat out; ``python-paced``: the same, paced as a load is (the loader thread's
  ``_yielding`` at ``--share`` of the time);
* ``gpu-graph`` (cuda): the model's graph at its largest batch replayed back to back on a low-priority stream;
* ``pinned`` (cuda): page-locked host memory allocated and freed (``cudaHostAlloc`` / ``cudaFreeHost``);
* ``paced-wait``: a thread that only waits (sleeps) inside the loader's pacing (``_yielding``): what the pacing's
  watch on Python calls alone costs the loop (a profile function, its way until Python 3.12, ran every thread's
  code instrumented there: the loop's per-frame path 1.6-1.8x slower);
* ``process``, ``process-paced``: pure Python flat out in a process of its own (niced as the weights reader is),
  or paced to run ``--share`` of the time in 1 ms turns: what another busy CPU costs the loop;
* ``reader``: the model's weight files read back to back by the process that reads in-place swaps' weights
  (``models.weights.WeightsReader``, kept; this process's thread only waits on it): what a process beside the
  loop costs it;
* ``pageable-copy``, ``pinned-copy`` (cuda): a buffer of the model's weights' size copied to the device back to
  back on a side stream, from pageable memory (as an in-place swap stages its weights) or page-locked memory;
* ``swaps``: ``--swaps`` real swaps of ``m`` (the server's ``loader_share``: ``--share``).

    PYTHONPATH=$PWD python3 tools/bench_interference.py               # ResNet-50 fp16 on the GPU, every kind
    PYTHONPATH=$PWD python3 tools/bench_interference.py --device cpu --model builtin:small --shape 32,32,3 \\
        --kinds python-paced,swaps --window-s 1

docs/BENCHMARKS.md ("What slows the loop while a model loads") has the figures of the diagnostic this grew from.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_swap import ProducerProcess, percentile, weights

KINDS = (
    "python",
    "python-paced",
    "paced-wait",
    "gpu-graph",
    "pinned",
    "process",
    "process-paced",
    "reader",
    "pageable-copy",
    "pinned-copy",
    "swaps",
)
CUDA_KINDS = ("gpu-graph", "pinned", "pageable-copy", "pinned-copy")


def python_work(until: float) -> None:
    """Pure Python until ``until`` (monotonic s), in small function calls (where a pacing hook can pause it)."""
    while time.monotonic() < until:
        _add(200)


def _add(n: int) -> int:
    total = 0
    for i in range(n):
        total += i
    return total


def paced(work: Callable[[float], None], share: float) -> Callable[[float], None]:
    """``work`` paced as a model load is while frames are served (``ModelManager``'s ``_yielding``), at the GIL
    switch interval a load sets (``LOADING_SWITCH_INTERVAL_S``)."""
    from streamgpu.models import manager

    def run(until: float) -> None:
        with (
            manager.loading_switch_interval(),
            manager._yielding(manager.LOADING_RUN_S, manager.loading_pause_s(share), lambda: True),
        ):
            work(until)

    return run


def wait_work(until: float) -> None:
    """Sleeps until ``until`` (monotonic s), 10 ms at a time."""
    while time.monotonic() < until:
        time.sleep(0.01)


def graph_work(spec: Any) -> Callable[[float], None]:
    """A copy of the model (``spec``: its settings, fp16) as a CUDA graph at ``spec.max_batch_size``, replayed
    back to back on a low-priority stream (its own copy: the serving model's graphs are the serving path's)."""
    import torch

    from streamgpu.models.loader import load_module

    gpu = torch.device("cuda", 0)
    stream = torch.cuda.Stream(gpu, priority=0)
    module = load_module(spec).to(gpu, torch.float16).eval()
    module = module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # (as the backend does)
    h, w, c = spec.input_shape
    x = torch.zeros((spec.max_batch_size, c, h, w), dtype=torch.float16, device=gpu)
    x = x.contiguous(memory_format=torch.channels_last)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.stream(stream):
        for _ in range(3):
            module(x)
        stream.synchronize()
        graph.capture_begin(capture_error_mode="thread_local")  # the loop launches its batches meanwhile
        try:
            module(x)
        finally:
            graph.capture_end()
    stream.synchronize()

    def run(until: float) -> None:
        with torch.cuda.stream(stream):
            while time.monotonic() < until:
                graph.replay()
                stream.synchronize()

    return run


def pinned_work(until: float) -> None:
    """8 MiB of page-locked memory allocated and freed (torch's host cache emptied each time), every 1 ms."""
    import torch

    while time.monotonic() < until:
        block = torch.empty(8 << 20, dtype=torch.uint8, pin_memory=True)
        del block
        torch._C._host_emptyCache()
        time.sleep(0.001)


_SPIN = """
import os, sys, time
until, run_s, pause_s = map(float, sys.argv[1:])
os.nice(10)
while time.monotonic() < until:
    turn = time.monotonic() + run_s
    while time.monotonic() < turn:
        pass
    time.sleep(pause_s)
"""


def process_work(share: float) -> Callable[[float], None]:
    """Pure Python in a process of its own until ``until`` (the monotonic clock is the machine's), in 1 ms turns
    with pauses that leave it ``share`` of the time (1: flat out)."""

    def run(until: float) -> None:
        run_s = 0.001
        subprocess.run([sys.executable, "-c", _SPIN, str(until), str(run_s), str(run_s * (1 / share - 1))], check=True)

    return run


def reader_work(module: Any, versions: list[Any]) -> Callable[[float], None]:
    """``versions`` (specs of ``module``'s architecture) read in turn by a kept ``WeightsReader`` laid out as
    ``module`` (the serving instance), until the window ends. Blocking: the reader's start and a first read
    (torch's import: seconds) come before the windows."""
    from streamgpu.models.weights import WeightsLayout, WeightsReader

    layout, reader = WeightsLayout.of(module), WeightsReader()
    reader.read(versions[0], layout).close()

    def run(until: float) -> None:
        reads = 0
        try:
            while time.monotonic() < until:
                reader.read(versions[reads % len(versions)], layout).close()
                reads += 1
        finally:
            reader.close()

    return run


def copy_work(nbytes: int, pinned: bool) -> Callable[[float], None]:
    """``nbytes`` of host memory (page-locked or not) copied to the device back to back on a side stream."""
    import torch

    gpu = torch.device("cuda", 0)
    stream = torch.cuda.Stream(gpu, priority=0)
    host = torch.ones(nbytes, dtype=torch.uint8, pin_memory=pinned)
    device = torch.empty(nbytes, dtype=torch.uint8, device=gpu)

    def run(until: float) -> None:
        with torch.cuda.stream(stream):
            while time.monotonic() < until:
                device.copy_(host, non_blocking=pinned)
                stream.synchronize()

    return run


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    """The windows, with the loader's pacing of ``--run-ms`` and ``--switch-interval-us`` (the manager reads both
    when a load starts, so python-paced and real swaps alike), given back after."""
    from streamgpu.models import manager

    if args.run_ms is not None and not args.run_ms > 0:  # (0: pause_s 0, so the load would run unpaced)
        raise SystemExit(f"--run-ms must be > 0, got {args.run_ms:g}")
    # a load only ever shortens the interval in force (``manager.loading_switch_interval``): a longer one would not run
    longest_us = sys.getswitchinterval() * 1e6
    if args.switch_interval_us is not None and not 0 < args.switch_interval_us <= longest_us:
        raise SystemExit(f"--switch-interval-us must be > 0 and at most {longest_us:g} (this process's switch "
                         f"interval), got {args.switch_interval_us:g}")  # fmt: skip
    with contextlib.ExitStack() as pacing:
        if args.run_ms is not None:
            pacing.enter_context(mock.patch.object(manager, "LOADING_RUN_S", args.run_ms / 1e3))
        if args.switch_interval_us is not None:
            pacing.enter_context(mock.patch.object(manager, "LOADING_SWITCH_INTERVAL_S", args.switch_interval_us / 1e6))
        return await _windows(args, manager.LOADING_RUN_S, manager.LOADING_SWITCH_INTERVAL_S)


async def _windows(args: argparse.Namespace, run_s: float, interval_s: float) -> dict[str, Any]:
    from streamgpu.config import Config, ListenerSpec
    from streamgpu.models.spec import ModelSpec
    from streamgpu.server import Server

    kinds = [k for k in args.kinds.split(",") if k]
    kinds = kinds or [k for k in KINDS if args.device == "cuda" or k not in CUDA_KINDS]
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise SystemExit(f"--kinds: unknown {', '.join(unknown)}; choose from {', '.join(KINDS)}")
    if args.device == "cpu" and set(kinds) & set(CUDA_KINDS):
        raise SystemExit(f"--kinds {', '.join(set(kinds) & set(CUDA_KINDS))} need --device cuda")
    shape = tuple(int(d) for d in args.shape.split(","))
    arch = args.model.partition(":")[2]
    versions = weights(tempfile.mkdtemp(prefix="bench_interference-"), arch)
    base = ModelSpec(name="m", source=versions[0], arch=arch, input_shape=shape, precision=args.precision,
                     max_batch_size=args.max_batch, compile="off")  # fmt: skip
    cfg = Config(listeners=[ListenerSpec(port=0)], device=args.device, models=[base], shutdown_timeout_s=30,
                 ingest_workers=args.ingest_workers, max_payload_bytes=1 << 20, loader_share=args.share)  # fmt: skip
    server = Server(cfg)
    await server.start()
    frames_from = ProducerProcess(server.port, shape, args.connections, args.window)
    await frames_from.start()
    await asyncio.sleep(args.warmup_s)
    loop = asyncio.get_running_loop()
    work: dict[str, Callable[[float], None]] = {
        "python": python_work, "python-paced": paced(python_work, args.share), "pinned": pinned_work,
        "paced-wait": paced(wait_work, args.share),
        "process": process_work(1.0), "process-paced": process_work(args.share),
    }  # fmt: skip
    if "gpu-graph" in kinds:
        work["gpu-graph"] = graph_work(replace(base, source=versions[1]))
    serving = server.serving("m")
    assert serving is not None
    if "reader" in kinds:
        specs = [replace(base, source=v) for v in versions]
        work["reader"] = await loop.run_in_executor(None, reader_work, serving[0].module, specs)
    weights_bytes = sum(t.numel() * t.element_size() for t in serving[0].module.state_dict().values())
    for kind in ("pageable-copy", "pinned-copy"):
        if kind in kinds:
            work[kind] = copy_work(weights_bytes, pinned=kind == "pinned-copy")
    windows: list[tuple[str, float, float]] = []
    for i, kind in enumerate(kinds):
        start = time.monotonic()
        await asyncio.sleep(args.window_s)
        windows.append(("steady", start, time.monotonic()))
        start = time.monotonic()
        if kind == "swaps":
            for k in range(args.swaps):
                await server.swap_model("m", replace(base, source=versions[(i + k + 1) % len(versions)]))
        else:
            await loop.run_in_executor(None, work[kind], start + args.window_s)
        windows.append((kind, start, time.monotonic()))
    records = await frames_from.stop()
    await server.stop()
    rows = []
    for name, a, b in windows:
        latencies = [lat for sent, lat, status in records if a <= sent < b and status == 0]
        rows.append({"window": name, "seconds": b - a, "frames": len(latencies),
                     "p50_ms": percentile(latencies, 50) * 1e3, "p99_ms": percentile(latencies, 99) * 1e3})  # fmt: skip
    return {
        "device": server.backend.device_name if server.backend is not None else args.device,
        "model": args.model, "shape": list(shape), "ingest_workers": args.ingest_workers, "share": args.share,
        "run_ms": run_s * 1e3, "switch_interval_us": interval_s * 1e6,
        "frames_failed_or_refused": sum(1 for _, _, status in records if status != 0), "windows": rows,
    }  # fmt: skip


def table(result: dict[str, Any]) -> str:
    """Each interfering window against the steady one before it."""
    lines = [
        f"{result['device']}, {result['model']} {result['shape']}, ingest_workers {result['ingest_workers']}, "
        f"share {result['share']:g}, loader runs {result['run_ms']:g} ms at a time, switch interval "
        f"{result['switch_interval_us']:g} us; frames refused or failed: {result['frames_failed_or_refused']}",
        "window | seconds | frames | p50 ms | p99 ms | p50 / steady | p99 / steady",
    ]
    steady: dict[str, Any] | None = None
    for row in result["windows"]:
        ratios = ""
        if row["window"] == "steady":
            steady = row
        elif steady is not None:
            ratios = f" | {row['p50_ms'] / steady['p50_ms']:.2f}x | {row['p99_ms'] / steady['p99_ms']:.2f}x"
        lines.append(f"{row['window']} | {row['seconds']:.1f} | {row['frames']} | {row['p50_ms']:.2f} | "
                     f"{row['p99_ms']:.2f}{ratios}")  # fmt: skip
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--model", default="builtin:resnet50", help="builtin:ARCH (two weight files are made)")
    parser.add_argument("--precision", default="fp16")
    parser.add_argument("--shape", default="224,224,3", help="frame shape H,W,C (uint8)")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--kinds", default="", help=f"comma-separated, of {', '.join(KINDS)} (default: every kind the "
                        "device can run)")  # fmt: skip
    parser.add_argument("--share", type=float, default=1 / 3,
                        help="python-paced: the share of the time the work runs; swaps: the server's "
                        "loader_share")  # fmt: skip
    parser.add_argument("--swaps", type=int, default=3, help="swaps in the swaps window")
    parser.add_argument("--run-ms", type=float, default=None,
                        help="python-paced and swaps: how long the loader runs between pauses (default: the server's "
                        "LOADING_RUN_S)")  # fmt: skip
    parser.add_argument("--switch-interval-us", type=float, default=None,
                        help="python-paced and swaps: the GIL switch interval while loading, at most the process's "
                        "(default: the server's LOADING_SWITCH_INTERVAL_S)")  # fmt: skip
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--window", type=int, default=16, help="frames in flight per connection")
    parser.add_argument("--warmup-s", type=float, default=3.0)
    parser.add_argument("--window-s", type=float, default=3.0, help="each steady and interfering window")
    parser.add_argument("--ingest-workers", type=int, default=0)
    parser.add_argument("--json", default="", help="also write the figures here")
    args = parser.parse_args()
    from streamgpu.loops import new_event_loop

    result = new_event_loop("auto").run_until_complete(bench(args))
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
