"""Where the event loop's time goes, per frame: loop CPU per frame, then a breakdown by stage.

Runs a streamgpu server in this process (its loop on the main thread) and
drives it with the load generator in other processes, closed loop. Two
windows:

1. unprofiled: CPU time of the loop thread (``time.thread_time``) over the
   frames completed, i.e. the loop's real cost per frame;
2. under cProfile: each function's own time, grouped into stages by the
   module it lives in (C functions by the module that called them), scaled
   so the stages add up to the unprofiled per-frame cost.

The profiler slows the loop, so the breakdown is a proportion, not a timing.

    python tools/profile_loop.py --model builtin:small --concurrency 64 --processes 4

It also prints the garbage collector's collections and pauses per second in the unprofiled window,
and the batches seen: mean size, each stage's p50, and the
scheduler's estimate of a batch's device time at the commonest sizes (the
completion bridge sleeps on it before it polls).

With ``--ingest-workers N`` the server runs N ingest worker processes: the
figures are then the scheduling loop's alone (the workers' CPU is reported
apart, as ``workers_cpu_per_frame_us``, from /proc). With ``--transport
udp`` the frames come over UDP to a UDP listener (``gro`` on, the default).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import cProfile
import json
import os
import pstats
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from streamgpu.config import Config, ListenerSpec
from streamgpu.loops import GC_PAUSES, new_event_loop, tune_malloc
from streamgpu.models.spec import ModelSpec
from streamgpu.server import Server

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

from bench_ingest import stat_cpu  # noqa: E402 - the tools directory is put on the path just above

# Stage of a function, from the file it is defined in (first match wins).
STAGES = [
    ("ingest/tcp.py", "ingest: TCP parse + reply write"),
    ("ingest/udp.py", "ingest: UDP reassembly + reply send"),
    ("ingest/mmsg.py", "ingest: UDP receive (recvmmsg)"),
    ("protocol/udp.py", "ingest: UDP reassembly + reply send"),
    ("ingest/workers.py", "ingest: worker descriptors in, replies out"),
    ("ingest/channel.py", "ingest: worker descriptors in, replies out"),
    ("ingest/admission.py", "admission + producer accounting"),
    ("memory/pool.py", "slot pool"),
    ("scheduler/runner.py", "batch runner (finish frames)"),
    ("scheduler/", "scheduler (queue, batch choice)"),
    ("gpu/bridge.py", "completion bridge"),
    ("gpu/", "launch (copies, kernels, graphs)"),
    ("protocol/wire.py", "wire encode/decode"),
    ("protocol/ordering.py", "reply order"),
    ("frame.py", "frame/outcome"),
]


def stage_of(filename: str) -> str:
    for fragment, stage in STAGES:
        if fragment in filename.replace(os.sep, "/") and "streamgpu" in filename:
            return stage
    return ""


def breakdown(profile: cProfile.Profile) -> dict[str, float]:
    """Own time per stage; C functions and library code go to the stage of their first streamgpu caller."""
    stats = pstats.Stats(profile)
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    totals: collections.Counter[str] = collections.Counter()
    for func, (_cc, _nc, tottime, _ct, callers) in raw.items():
        stage = stage_of(func[0])
        if not stage:  # attribute to callers in proportion to the time they spent in it
            weights = {caller: c[2] for caller, c in callers.items()} if callers else {}
            caller_stages = [(stage_of(c[0]), w) for c, w in weights.items() if stage_of(c[0])]
            total_w = sum(w for _, w in caller_stages)
            if total_w > 0:
                for s, w in caller_stages:
                    totals[s] += tottime * w / total_w
                continue
            stage = "event loop + other"
        totals[stage] += tottime
    return dict(totals)


def processes_cpu(pids: list[int]) -> float:
    """User + system CPU seconds of processes (the ingest workers), from /proc/PID/stat."""
    return sum(stat_cpu(f"/proc/{pid}/stat") for pid in pids)


def start_load(port: int, args: argparse.Namespace, seconds: float) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable, str(ROOT / "tools" / "loadgen.py"), "-u", f"127.0.0.1:{port}",
        "--concurrency-range", str(args.concurrency), "--processes", str(args.processes),
        "--streams", str(4 * args.processes), "--shape", args.shape, "--duration", str(seconds),
        "--warmup", "0", "--quiet", "-i", args.transport,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    shape = tuple(int(d) for d in args.shape.split("x"))
    sizes = {"max_batch_size": args.max_batch} if args.max_batch else {}  # buckets up to it: ModelSpec.buckets
    spec = ModelSpec(source=args.model, input_shape=shape, **sizes)
    config = Config(
        listeners=[ListenerSpec(args.transport, "127.0.0.1", 0)], device=args.device, models=[spec],
        log_level="WARNING", ingest_workers=args.ingest_workers, max_payload_bytes=16 << 20,
        devices=tuple(int(d) for d in args.devices.split(",")),
    )  # fmt: skip
    async with Server(config) as server:
        load = start_load(server.port, args, args.seconds * 2 + args.warmup + 1)
        await asyncio.sleep(args.warmup)

        def completed() -> int:
            return int(server.metrics()["models"]["default"]["completed"])

        pids = [pid for listener in server._listeners for pid in getattr(listener, "pids", [])]
        gc0 = [(h.count, h.sum) for h in GC_PAUSES.by_generation]
        n0, cpu0, t0, w0 = completed(), time.thread_time(), time.perf_counter(), processes_cpu(pids)
        await asyncio.sleep(args.seconds)
        n1, cpu1, t1, w1 = completed(), time.thread_time(), time.perf_counter(), processes_cpu(pids)
        gc1 = [(h.count, h.sum) for h in GC_PAUSES.by_generation]
        batches = batches_seen(server.metrics()["models"]["default"])
        profile = cProfile.Profile()
        profile.enable()
        await asyncio.sleep(args.seconds)
        profile.disable()
        if args.pstats:
            profile.dump_stats(args.pstats)
        n2 = completed()
        await asyncio.get_running_loop().run_in_executor(None, load.wait)  # the loop keeps serving
    frames = n1 - n0
    us_per_frame = (cpu1 - cpu0) / max(frames, 1) * 1e6
    stages = breakdown(profile)
    scale = us_per_frame / max(sum(stages.values()), 1e-12)
    raw: dict[Any, Any] = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    top = sorted(raw.items(), key=lambda kv: -kv[1][2])[:20]
    functions = {f"{Path(f[0]).name}:{f[1]}({f[2]})": v[2] * scale for f, v in top}
    return {
        "frames_per_s": frames / (t1 - t0),
        "loop_busy": (cpu1 - cpu0) / (t1 - t0),
        "loop_us_per_frame": us_per_frame,
        "ingest_workers": args.ingest_workers,
        "workers_cpu_per_frame_us": (w1 - w0) / max(frames, 1) * 1e6,
        "profiled_frames": n2 - n1,
        # Per generation: collections per second and milliseconds of pause per second (the loop stood still)
        "gc_per_s": {
            str(g): {
                "collections": round((b[0] - a[0]) / (t1 - t0), 1),
                "pause_ms": round((b[1] - a[1]) / (t1 - t0) * 1e3, 2),
            }
            for g, (a, b) in enumerate(zip(gc0, gc1, strict=True))
        },
        "stages_us_per_frame": {k: v * scale for k, v in sorted(stages.items(), key=lambda kv: -kv[1])},
        "top_functions_us_per_frame": functions,
        "device": server.backend.device_name if server.backend else args.device,
        "batches": batches,
    }


def batches_seen(model: dict[str, Any]) -> dict[str, Any]:
    """A model's batches so far: mean size, each stage's percentiles (us), and the scheduler's estimate of
    a batch's device time at the most common sizes (ms; the completion bridge sleeps on it)."""
    sizes = model["batch_sizes"]
    count = max(sum(sizes.values()), 1)
    common = sorted(sizes, key=lambda n: -sizes[n])[:3]
    estimates = model["batch_latency_ms"]
    return {
        "mean_size": sum(n * k for n, k in sizes.items()) / count,
        **{stage: model[f"{stage}_us"] for stage in ("queue_wait", "transfer", "compute")},
        "estimate_ms": {device: {n: known.get(n) for n in common} for device, known in estimates.items()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:small")
    parser.add_argument("--shape", default="224x224x3")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--concurrency", type=int, default=64, help="frames in flight in all (over the generators)")
    parser.add_argument("--processes", type=int, default=4, help="generator processes")
    parser.add_argument("--seconds", type=float, default=4.0, help="each window")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--ingest-workers", type=int, default=0, help="ingest worker processes (0: one process)")
    parser.add_argument("--transport", default="tcp", choices=["tcp", "udp"], help="how frames come (default tcp)")
    parser.add_argument("--devices", default="0", help="GPUs, comma-separated (default 0)")
    parser.add_argument("--max-batch", type=int, default=0, help="the model's max_batch_size (default: the model's)")
    parser.add_argument("--json", default="")
    parser.add_argument("--pstats", default="", help="also write the profiled window's pstats to this file")
    args = parser.parse_args()
    tune_malloc()  # this process serves: its allocator set as ``streamgpu serve`` sets its own
    loop = new_event_loop("auto")
    try:
        report = loop.run_until_complete(measure(args))
    finally:
        loop.close()
    print(f"{args.model} {args.shape}, {args.processes} x {args.concurrency} in flight, {report['device']}, "
          f"ingest_workers {args.ingest_workers}")  # fmt: skip
    print(f"frames/s {report['frames_per_s']:.0f}; loop busy {report['loop_busy']:.0%}; "
          f"loop CPU per frame {report['loop_us_per_frame']:.1f} us; "
          f"workers' CPU per frame {report['workers_cpu_per_frame_us']:.1f} us")  # fmt: skip
    print(
        "garbage collector per second (the loop stands still): "
        + "; ".join(
            f"generation {g}: {v['collections']} collections, {v['pause_ms']} ms" for g, v in report["gc_per_s"].items()
        )
    )
    seen = report["batches"]
    print(f"batches: mean {seen['mean_size']:.1f} frames; " + "; ".join(
        f"{stage} p50 {seen[stage].get('p50', 0):.0f} us" for stage in ("queue_wait", "transfer", "compute")
    ) + f"; estimated device ms at the commonest sizes: {seen['estimate_ms']}")  # fmt: skip
    print("stage | us per frame")
    for stage, us in report["stages_us_per_frame"].items():
        print(f"{stage} | {us:.1f}")
    print("top functions (own time) | us per frame")
    for name, us in list(report["top_functions_us_per_frame"].items())[:12]:
        print(f"{name} | {us:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
