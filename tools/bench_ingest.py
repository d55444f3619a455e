"""Ingest benchmarks: one process against ingest worker processes (``ingest_workers``), side by side.

Two parts (``--part``, repeatable; default both):

* ``micro``: the scheduling loop's CPU per frame on the ingest path alone, in
  this process, without a network or a model: (a) one process: frames parsed
  from TCP bytes by ``TcpConnection`` (header decode, admission, slot
  reservation, payload copy standing in for the kernel's), submitted, their
  slots released, their replies encoded and written; (b) workers: the same
  frames arriving as FRAME descriptors (``ingest.channel``), submitted, then a
  RELEASE and a REPLY record each. Runs anywhere (CPU).
* ``saturate``: the trivial model (``builtin:small``) saturated over loopback
  with 3 KB (32x32x3) and 150 KB (224x224x3) frames, from 1 / 4 / 8 / 64
  producers (connections) with the same total in flight, each configuration
  with ``ingest_workers = 0`` and ``= N``. Per row: frames/s, p50, p99, and
  the scheduling loop's CPU per frame (the server's main thread, from /proc,
  over the whole run: approximate). Targets (issue 9): 3 KB >= 100,000
  frames/s, 150 KB >= 25,000 frames/s, 64 producers within 5 % of 1, loop CPU
  per small frame <= 10 us.

    python tools/bench_ingest.py --ingest-workers 8 --device cuda --json out/bench_ingest.json
    python tools/bench_ingest.py --part micro            # anywhere, seconds
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

from bench_e2e import HOST, print_rows, row, server  # noqa: E402

from streamgpu.config import Config, ListenerSpec  # noqa: E402
from streamgpu.frame import Frame, Outcome  # noqa: E402
from streamgpu.ingest import channel  # noqa: E402
from streamgpu.ingest.admission import Admission  # noqa: E402
from streamgpu.ingest.tcp import TcpConnection, TcpListener  # noqa: E402
from streamgpu.ingest.workers import WorkerListener, _Worker  # noqa: E402
from streamgpu.loadgen import CONCURRENCY, Endpoint, LoadLevel, RunConfig, run  # noqa: E402
from streamgpu.memory import HostSegment, SlotPool  # noqa: E402
from streamgpu.models.spec import ModelSpec  # noqa: E402
from streamgpu.protocol import wire  # noqa: E402
from streamgpu.protocol.wire import FrameHeader, Status, Timings  # noqa: E402

SIZES = {"3KB": (32, 32, 3), "150KB": (224, 224, 3)}
PRODUCERS = (1, 4, 8, 64)


# -- micro: the loop's ingest path per frame ----------------------------------------------------


class _Sink:
    """A transport that keeps nothing: what the loop pays is the call, not a kernel copy."""

    def __init__(self) -> None:
        self.bytes = 0

    def write(self, data: bytes) -> None:
        self.bytes += len(data)

    def writelines(self, parts: list[Any]) -> None:
        for p in parts:
            self.bytes += len(p)

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def _finish(frames: list[Frame], result: np.ndarray) -> None:
    """What the batch runner does to a batch's frames once copied, then computed."""
    for frame in frames:
        frame.release_slot()
    timings = Timings(1, 2, 3, 4, 5, len(frames))
    for frame in frames:
        frame.finish(Outcome(Status.OK, result=result, timings=timings))
    frames.clear()


def micro_tcp(shape: tuple[int, ...], total: int, batch: int) -> float:
    spec = ModelSpec(input_shape=shape)
    cfg = Config(models=[spec], ring_bytes=64 << 20, max_payload_bytes=1 << 20)
    segment = HostSegment.create(cfg.ring_bytes)
    submitted: list[Frame] = []
    admission = Admission(cfg, SlotPool(segment.buffer), {spec.name: spec}, submitted.append)
    listener = TcpListener(ListenerSpec(port=0), admission)
    deferred: list[Any] = []
    listener.defer = deferred.append  # one flush per connection per loop iteration, as call_soon gives
    conn = TcpConnection(listener)
    conn.connection_made(_Sink())  # type: ignore[arg-type]
    _feed(conn, wire.encode_hello(wire.Hello(wire.VERSION, "")))
    payload = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8).tobytes()
    result = np.zeros(1000, np.float32)
    chunks = []
    for seq in range(batch):
        header = FrameHeader(0, seq, "default", 1, shape, len(payload))
        chunks.append(wire.encode_frame_header(header) + payload)
    data = b"".join(chunks)
    start = time.thread_time()
    for _ in range(total // batch):
        _feed(conn, data)
        _finish(submitted, result)
        for callback in deferred:
            callback()
        deferred.clear()
    elapsed = time.thread_time() - start
    segment.close()
    return elapsed / (total // batch * batch) * 1e6


def _feed(conn: TcpConnection, data: bytes) -> None:
    """Deliver ``data`` as the event loop would: into the buffers ``get_buffer`` hands out."""
    view = memoryview(data)
    while view:
        buf = conn.get_buffer(len(view))
        n = min(len(buf), len(view))
        buf[:n] = view[:n]
        conn.buffer_updated(n)
        view = view[n:]


async def micro_workers(shape: tuple[int, ...], total: int, batch: int) -> float:
    spec = ModelSpec(input_shape=shape)
    cfg = Config(models=[spec], ring_bytes=64 << 20, max_payload_bytes=1 << 20, ingest_workers=1)
    segment = HostSegment.create(cfg.ring_bytes)
    submitted: list[Frame] = []
    pool = SlotPool(segment.buffer)
    admission = Admission(cfg, pool, {spec.name: spec}, submitted.append)
    listener = WorkerListener(cfg.listeners[0], admission, segment, 1)
    lent = pool.reserve(cfg.worker_ring_bytes)
    assert lent is not None
    worker = _Worker(listener, 0, lent)
    worker.connection_made(_Sink())  # type: ignore[arg-type]
    nbytes = int(np.prod(shape))
    worker.data_received(channel.up(channel.OPEN, 1, 0, 255))
    result = np.zeros(1000, np.float32)
    # The worker packs the records (not the loop), and this process only echoes fids: pack them once.
    records = b"".join(channel.UP.pack(channel.FRAME, 0, 0, 0, 0, 0, 1, k, lent.offset, nbytes, 0, 0, k, 0, 0, 0, 0)
                       for k in range(batch))  # fmt: skip
    start = time.thread_time()
    for _ in range(total // batch):
        worker.data_received(records)
        _finish(submitted, result)
        worker._flush()
    elapsed = time.thread_time() - start
    segment.close()
    return elapsed / (total // batch * batch) * 1e6


def part_micro(args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    for label, shape in SIZES.items():
        tcp = min(micro_tcp(shape, args.micro_frames, args.micro_batch) for _ in range(3))
        workers = min(asyncio.run(micro_workers(shape, args.micro_frames, args.micro_batch)) for _ in range(3))
        rows.append({"frame": label, "batch": args.micro_batch, "tcp_us_per_frame": round(tcp, 2),
                     "workers_us_per_frame": round(workers, 2), "ratio": round(workers / tcp, 3)})  # fmt: skip
    print_rows("scheduling loop CPU per frame, ingest path only (no model, no scheduler), best of 3", rows)
    return {"rows": rows}


# -- saturate: servers over loopback ---------------------------------------------------------------


def serve(out: Path, name: str, shape: tuple[int, ...], workers: int, device: str) -> Any:
    toml = "\n".join([
        "[server]", "port = 0", f'device = "{device}"', f"ingest_workers = {workers}",
        "ring_bytes = 1073741824", "max_payload_bytes = 16777216", "",
        "[[models]]", 'name = "default"', 'source = "builtin:small"', f"input_shape = {list(shape)}",
    ])  # fmt: skip
    path = Path(tempfile.mkdtemp()) / f"{name}.toml"
    path.write_text(toml + "\n")
    cmd = [sys.executable, "-m", "streamgpu", "serve", "--config", str(path)]
    return server(cmd, out / f"server_{name}.log", r"listening on [\d.]+:(\d+)")


def main_thread_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/task/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_pid(name: str) -> int:
    """The pid of this process's child serving config ``name`` (the server, not its workers)."""
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read()
            except OSError:
                continue
            if ppid == me and f"{name}.toml".encode() in cmdline:
                return int(entry)
    raise RuntimeError(f"server process for {name} not found")


def part_saturate(out: Path, args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    sizes = {k: v for k, v in SIZES.items() if k in args.sizes.split(",")}
    producers_list = [int(p) for p in args.producers.split(",")]
    for label, shape in sizes.items():
        for workers in (0, args.ingest_workers):
            name = f"{label}_w{workers}"
            with serve(out, name, shape, workers, args.device) as port:
                pid = server_pid(name)
                for producers in producers_list:
                    procs = min(producers, args.generators)
                    cfg = RunConfig(
                        endpoints=[Endpoint(HOST, port)], levels=[LoadLevel(CONCURRENCY, args.in_flight)],
                        shape=shape, processes=procs, connections=producers // procs, streams=producers,
                        warmup_s=1.0, window_s=args.window, max_windows=4, stable_windows=2, stability_pct=15,
                    )  # fmt: skip
                    cpu0, t0 = main_thread_cpu(pid), time.perf_counter()
                    result = run(cfg).results[0]
                    cpu1, t1 = main_thread_cpu(pid), time.perf_counter()
                    r = row(f"{label} workers={workers} producers={producers}", result)
                    frames = max(result.throughput * (t1 - t0), 1.0)
                    r["loop_us_per_frame~"] = round((cpu1 - cpu0) / frames * 1e6, 2)
                    rows.append(r)
    print_rows(f"builtin:small saturated, {args.in_flight} in flight in total, ingest_workers 0 vs "
               f"{args.ingest_workers}", rows)  # fmt: skip
    summary = []
    for label in sizes:
        for workers in (0, args.ingest_workers):
            mine = [r for r in rows if r["config"].startswith(f"{label} workers={workers} ")]
            best = max(r["frames_per_s"] for r in mine)
            spread = mine[-1]["frames_per_s"] / max(mine[0]["frames_per_s"], 1e-9)
            summary.append({"frame": label, "ingest_workers": workers, "best_frames_per_s": best,
                            f"{producers_list[-1]}_vs_{producers_list[0]}_producers": round(spread, 3),
                            "loop_us_per_frame~": min(r["loop_us_per_frame~"] for r in mine)})  # fmt: skip
    print_rows("summary (targets: 3KB >= 100000/s, 150KB >= 25000/s, 64 vs 1 within 5 %, loop <= 10 us)", summary)
    return {"rows": rows, "summary": summary}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", action="append", choices=["micro", "saturate"], help="default: both")
    parser.add_argument("--ingest-workers", type=int, default=8, help="N for the side-by-side runs")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--in-flight", type=int, default=256, help="frames in flight, in total")
    parser.add_argument("--generators", type=int, default=8, help="load generator processes at most")
    parser.add_argument("--window", type=float, default=3.0)
    parser.add_argument("--sizes", default=",".join(SIZES), help="frame sizes to run (3KB, 150KB)")
    parser.add_argument("--producers", default=",".join(map(str, PRODUCERS)), help="producer counts")
    parser.add_argument("--micro-frames", type=int, default=32768)
    parser.add_argument("--micro-batch", type=int, default=32, help="frames per read / per batch in the micro part")
    parser.add_argument("--out", default="out/bench_ingest")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"args": vars(args)}
    parts = args.part or ["micro", "saturate"]
    if "micro" in parts:
        report["micro"] = part_micro(args)
    if "saturate" in parts:
        report["saturate"] = part_saturate(out, args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
