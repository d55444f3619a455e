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
import cProfile
import json
import os
import pstats
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

from bench_e2e import HOST, print_rows, row, server  # noqa: E402

from streamgpu.config import Config, ListenerSpec  # noqa: E402
from streamgpu.frame import Frame, finish_ok, release_slots  # noqa: E402
from streamgpu.gpu.backend import Backend, BatchRun, DeviceModel  # noqa: E402
from streamgpu.gpu.bridge import CompletionBridge  # noqa: E402
from streamgpu.ingest import channel  # noqa: E402
from streamgpu.ingest import worker as worker_process  # noqa: E402
from streamgpu.ingest.admission import Admission  # noqa: E402
from streamgpu.ingest.tcp import TcpConnection, TcpListener  # noqa: E402
from streamgpu.ingest.workers import WorkerListener, _Worker  # noqa: E402
from streamgpu.loadgen import CONCURRENCY, Endpoint, LoadLevel, RunConfig, run  # noqa: E402
from streamgpu.loops import freeze_heap, new_event_loop, thaw_heap, tune_malloc  # noqa: E402
from streamgpu.memory import HostSegment, SlotPool  # noqa: E402
from streamgpu.models.spec import ModelSpec  # noqa: E402
from streamgpu.protocol import wire  # noqa: E402
from streamgpu.protocol.wire import FrameHeader  # noqa: E402
from streamgpu.scheduler.runner import BatchRunner  # noqa: E402
from streamgpu.scheduler.scheduler import Scheduler  # noqa: E402

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
    """What the batch runner does to a batch's frames once copied, then computed (``scheduler.runner``)."""
    release_slots(frames)
    timings = np.tile(np.arange(1, 7, dtype=np.int64), (len(frames), 1))
    finish_ok(frames, np.broadcast_to(result, (len(frames), *result.shape)), None, timings)
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
    worker.data_received(channel.opened(1, 0, 255, channel.OPEN_TCP, "tcp:w0/1"))
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


async def micro_worker_process(shape: tuple[int, ...], total: int, batch: int) -> float:
    """An ingest worker's CPU per frame, without the kernel's part: TCP bytes parsed and admitted, FRAME
    records packed, then REPLY records decoded, replies encoded and written (one loop iteration per batch)."""
    spec = ModelSpec(input_shape=shape)
    cfg = Config(models=[spec], ring_bytes=64 << 20, max_payload_bytes=1 << 20)
    segment = HostSegment.create(cfg.ring_bytes)
    chan = worker_process._Channel(cfg)
    chan.connection_made(_Sink())  # type: ignore[arg-type]
    admission = worker_process._WorkerAdmission(cfg, SlotPool(segment.buffer), {spec.name: spec}, chan.submit)
    admission.channel = chan
    admission.stream_results = worker_process._ForwardingHub(chan)
    listener = worker_process._WorkerTcpListener(ListenerSpec(port=0), admission, chan, 0, 0)
    await listener.start()
    conn = TcpConnection(listener)
    conn.connection_made(_Sink())  # type: ignore[arg-type]
    _feed(conn, wire.encode_hello(wire.Hello(wire.VERSION, "")))
    payload = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8).tobytes()
    data = b"".join(wire.encode_frame_header(FrameHeader(0, seq, "default", 1, shape, len(payload))) + payload
                    for seq in range(batch))  # fmt: skip
    rounds = total // batch
    # The scheduling process's REPLIES records (its work, not the worker's): made before the clock starts.
    rows, timings = np.zeros((batch, 1000), np.float32), np.ones((batch, 6), np.int64)
    replies = [
        b"".join(channel.encode_ok(range(1 + r * batch, 1 + (r + 1) * batch), rows, timings)) for r in range(rounds)
    ]  # (bytes, as the worker reads them from its socket)
    start = time.thread_time()
    for r in range(rounds):
        _feed(conn, data)
        chan.data_received(replies[r])
        await asyncio.sleep(0)  # the loop iteration's end: records up and replies out, one write each
    elapsed = time.thread_time() - start
    segment.close()
    return elapsed / (rounds * batch) * 1e6


def part_micro(args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    for label, shape in SIZES.items():
        tcp = min(micro_tcp(shape, args.micro_frames, args.micro_batch) for _ in range(3))
        workers = min(asyncio.run(micro_workers(shape, args.micro_frames, args.micro_batch)) for _ in range(3))
        process = min(asyncio.run(micro_worker_process(shape, args.micro_frames, args.micro_batch)) for _ in range(3))
        rows.append({"frame": label, "batch": args.micro_batch, "tcp_us_per_frame": round(tcp, 2),
                     "workers_us_per_frame": round(workers, 2), "ratio": round(workers / tcp, 3),
                     "worker_process_us_per_frame": round(process, 2)})  # fmt: skip
    print_rows("CPU per frame, ingest path only (no model, no scheduler), best of 3: the scheduling loop's in one "
               "process (tcp) and with workers (workers), and an ingest worker's own", rows)  # fmt: skip
    return {"rows": rows}


# -- loop: the whole scheduling-loop path in worker mode, with a backend that costs nothing ---------


class _NullModel(DeviceModel):
    def __init__(self, spec: ModelSpec, outputs: int) -> None:
        self.spec = spec
        self.device = 0
        self.rows = np.zeros((spec.max_batch_size, outputs), np.float32)

    @property
    def description(self) -> str:
        return f"{self.spec.name} (null)"


class _Done:
    """An event that has always completed (the bridge polls it once)."""

    @staticmethod
    def query() -> bool:
        return True


class _NullBackend(Backend):
    """The CUDA backend's loop-side shape (a bridge wait and a notification, a result future, rows copied out) with
    no device."""

    name = "null"

    def __init__(self, loop: asyncio.AbstractEventLoop, config: Config) -> None:
        self._loop = loop
        self.devices = ["null"]
        self.bridge = CompletionBridge(loop)

    def attach_host(self, buffer: np.ndarray) -> None:
        pass

    def load(self, spec: ModelSpec, module: Any, device: int = 0) -> DeviceModel:
        raise NotImplementedError

    def launch(self, model: DeviceModel, slots: list[Any], expected_s: float = 0.0) -> BatchRun:
        assert isinstance(model, _NullModel)
        n = len(slots)
        copied = self.bridge.wait(_Done)
        result: asyncio.Future[Any] = self._loop.create_future()
        run = BatchRun(n, copied, result)

        def deliver(error: BaseException | None) -> None:
            run.service_s = 1e-5
            result.set_result(model.rows[:n].copy())

        self.bridge.notify(_Done, deliver, expected_s)
        return run

    def close(self) -> None:
        self.bridge.close()


class _Feeder:
    """The worker processes' side, closed loop: keeps ``in_flight`` FRAME descriptors in the server.

    It is the channel transport of the ``_Worker`` under test: each write (one
    loop iteration's RELEASE and REPLY records) schedules a top-up, as a worker
    would send the next frames once its producers got their replies. Its own
    cost is a slice of pre-packed records per loop iteration.
    """

    def __init__(self, worker: Any, records: bytes, in_flight: int, total: int, keep: bool) -> None:
        self.worker = worker
        self.records = records
        self.in_flight = in_flight
        self.left = total
        self.keep = keep
        self.written: list[bytes] = []
        self.bytes = 0
        self.scheduled = False
        self.loop = asyncio.get_running_loop()
        self.done = self.loop.create_future()

    def top_up(self) -> None:
        self.scheduled = False
        n = min(self.in_flight - self.worker.in_server, self.left)
        if n > 0:
            self.left -= n
            self.worker.data_received(self.records[: n * channel.UP.size])
        elif not self.left and not self.worker.in_server and not self.done.done():
            self.done.set_result(None)

    def writelines(self, data: list[bytes | memoryview]) -> None:
        self.bytes += sum(len(part) for part in data)
        if self.keep:
            self.written.append(b"".join(data))
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self.top_up)

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


async def loop_path(shape: tuple[int, ...], total: int, in_flight: int, producers: int,
                    profile: cProfile.Profile | None = None, keep: bool = False,
                    max_batch: int = 32) -> dict[str, Any]:  # fmt: skip
    """Drive ``total`` frames through the scheduling loop's real worker-mode path; loop CPU per frame.

    FRAME descriptors in (``_Worker.data_received``) -> ``Admission.submit`` ->
    ``Scheduler`` (queue, batch choice) -> ``BatchRunner`` -> a null backend
    (bridge waits on events that are always complete) -> frames finished ->
    RELEASE and REPLY records out (``_Worker._flush``). ``producers``
    connections, ``in_flight`` frames in the server at a time, batches of up to ``max_batch``.
    """
    loop = asyncio.get_running_loop()
    spec = ModelSpec(input_shape=shape, max_batch_size=max_batch)
    cfg = Config(models=[spec], ring_bytes=64 << 20, max_payload_bytes=1 << 20, ingest_workers=1)
    segment = HostSegment.create(cfg.ring_bytes)
    backend = _NullBackend(loop, cfg)
    runner: list[BatchRunner] = []

    def run_batch(model: DeviceModel, frames: list[Frame], expected_s: float) -> Awaitable[float | None]:
        return runner[0].run(model, frames, expected_s)  # (as the server passes it: launched when called)

    scheduler = Scheduler(loop, run_batch, cfg.max_inflight_batches)
    runner.append(BatchRunner(backend, scheduler))
    scheduler.add_model([_NullModel(spec, 1000)])
    pool = SlotPool(segment.buffer)
    admission = Admission(cfg, pool, {spec.name: spec}, scheduler.submit, scheduler.submit_many)
    listener = WorkerListener(cfg.listeners[0], admission, segment, 1)
    lent = pool.reserve(cfg.worker_ring_bytes)
    assert lent is not None
    worker = _Worker(listener, 0, lent)
    nbytes = int(np.prod(shape))
    records = b"".join(channel.UP.pack(channel.FRAME, 0, 0, 0, 0, 0, 1 + k % producers, k, lent.offset, nbytes,
                                       k % producers, 0, k, 0, 0, 0, 0) for k in range(in_flight))  # fmt: skip
    feeder = _Feeder(worker, records, in_flight, total, keep)
    worker.connection_made(feeder)  # type: ignore[arg-type]
    worker.data_received(
        b"".join(channel.opened(1 + p, 0, 255, channel.OPEN_TCP, f"tcp:w0/{1 + p}") for p in range(producers))
    )
    await asyncio.sleep(0)
    metrics = scheduler.metrics_for(spec.name)
    freeze_heap()  # the collector's settings of a running server
    try:
        start, t0 = time.thread_time(), time.perf_counter()
        if profile is not None:
            profile.enable()
        feeder.top_up()
        await feeder.done
        if profile is not None:
            profile.disable()
        cpu, wall = time.thread_time() - start, time.perf_counter() - t0
    finally:
        thaw_heap()
    backend.close()
    segment.close()
    if metrics.completed != total:
        raise RuntimeError(f"{metrics.completed} of {total} frames completed: {scheduler.metrics()}")
    return {
        "us_per_frame": cpu / total * 1e6, "frames_per_s": total / wall, "batches": metrics.batches,
        "mean_batch": total / max(metrics.batches, 1), "written": feeder.written, "bytes_out": feeder.bytes,
    }  # fmt: skip


def part_loop(args: argparse.Namespace) -> dict[str, Any]:
    """The scheduling loop's CPU per frame, whole worker-mode path, best of N; then a cProfile stage split.
    This process's C library is set as a server process's is (``tune_malloc``)."""
    tune_malloc()
    from profile_loop import breakdown

    rows = []
    splits = {}
    for label, shape in SIZES.items():
        if label not in args.sizes.split(","):
            continue
        runs = []
        for _ in range(args.loop_runs):
            run = loop_path(shape, args.loop_frames, args.loop_in_flight, args.loop_producers, max_batch=args.max_batch)
            runs.append(new_event_loop("auto").run_until_complete(run))
        best = min(runs, key=lambda r: r["us_per_frame"])
        profile = cProfile.Profile()
        new_event_loop("auto").run_until_complete(
            loop_path(
                shape,
                args.loop_frames // 4,
                args.loop_in_flight,
                args.loop_producers,
                profile,
                max_batch=args.max_batch,
            )
        )
        stages = breakdown(profile)
        scale = best["us_per_frame"] / max(sum(stages.values()), 1e-12)
        splits[label] = {k: round(v * scale, 2) for k, v in sorted(stages.items(), key=lambda kv: -kv[1])}
        raw: dict[Any, Any] = pstats.Stats(profile).stats  # type: ignore[attr-defined]
        top = sorted(raw.items(), key=lambda kv: -kv[1][2])[:15]
        rows.append({"frame": label, "in_flight": args.loop_in_flight, "producers": args.loop_producers,
                     "mean_batch": round(best["mean_batch"], 1), "loop_us_per_frame": round(best["us_per_frame"], 2),
                     "frames_per_s": round(best["frames_per_s"])})  # fmt: skip
        splits[label + " top functions"] = {f"{Path(f[0]).name}:{f[1]}({f[2]})": round(v[2] * scale, 2)
                                            for f, v in top}  # fmt: skip
    print_rows("scheduling loop CPU per frame, whole worker-mode path (descriptors in -> scheduler -> null backend "
               f"-> RELEASE/REPLY out), best of {args.loop_runs}", rows)  # fmt: skip
    for label, split in splits.items():
        print(f"{label} (us per frame, cProfile split scaled to the unprofiled figure)")
        for stage, us in split.items():
            print(f"  {stage} | {us}")
    return {"rows": rows, "stages": splits}


# -- saturate: servers over loopback ---------------------------------------------------------------


def serve(
    out: Path,
    name: str,
    shape: tuple[int, ...],
    workers: int,
    device: str,
    max_batch: int,
    max_inflight: int = 2,
    loop_cpu: int = -1,
) -> Any:
    toml = "\n".join([
        "[server]", "port = 0", f'device = "{device}"', f"ingest_workers = {workers}",
        "ring_bytes = 1073741824", "max_payload_bytes = 16777216", f"max_inflight_batches = {max_inflight}",
        f"loop_cpu = {loop_cpu}", "",
        "[[models]]", 'name = "default"', 'source = "builtin:small"', f"input_shape = {list(shape)}",
        f"max_batch_size = {max_batch}",
    ])  # fmt: skip
    path = Path(tempfile.mkdtemp()) / f"{name}.toml"
    path.write_text(toml + "\n")
    cmd = [sys.executable, "-m", "streamgpu", "serve", "--config", str(path)]
    return server(cmd, out / f"server_{name}.log", r"listening on [\d.]+:(\d+)")


def _stat_fields(path: str) -> list[str] | None:
    """The fields after the command name of a /proc ``stat`` file (a process's or a thread's); None when gone."""
    try:
        with open(path) as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _cpu_of(fields: list[str]) -> float:
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def stat_cpu(path: str) -> float:
    """User + system CPU seconds from a /proc ``stat`` file (a process's or a thread's); 0 when it is gone."""
    fields = _stat_fields(path)
    return 0.0 if fields is None else _cpu_of(fields)


def main_thread_cpu(pid: int) -> float:
    return stat_cpu(f"/proc/{pid}/task/{pid}/stat")


def machine_cpu() -> float:
    """The whole machine's busy CPU seconds since boot, all CPUs summed, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:8]]  # user .. softirq; steal and guest after
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # less idle and iowait


class CpuShares:
    """Cores busy over the last ``span_s`` of a run: the server's main thread (its event loop), its ingest
    workers and the whole machine (the load generators count their own); /proc sampled
    every 0.1 s in a thread, so the generators' start-up and warm-up, when the server idles, do not
    dilute them. Where the machine is near all its cores busy, the loop shares its core with the rest."""

    def __init__(self, pid: int, span_s: float) -> None:
        self._pid, self._span = pid, span_s
        self._samples: list[tuple[float, dict[str, float]]] = []
        self.cores = len(os.sched_getaffinity(0))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> dict[str, float]:
        return {"loop": main_thread_cpu(self._pid), "workers": children_cpu(self._pid), "machine": machine_cpu()}

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self._samples.append((time.perf_counter(), self._sample()))

    def __enter__(self) -> CpuShares:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def busy(self, part: str) -> float:
        """Cores ``part`` kept busy, on average, over the span (1.0: one core all the time)."""
        end_t, end = self._samples[-1]
        start_t, start = next(s for s in self._samples if s[0] >= end_t - self._span)
        return (end[part] - start[part]) / max(end_t - start_t, 1e-9)


def children_cpu(pid: int) -> float:
    """CPU seconds (user + system) of process ``pid``'s live children: a server's ingest workers."""
    total = 0.0
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat_fields(f"/proc/{entry}/stat")) is not None and int(fields[1]) == pid:
            total += _cpu_of(fields)  # (fields[1]: its parent)
    return total


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
    depths = [int(d) for d in str(args.max_inflight_batches).split(",")]
    worker_counts = [args.ingest_workers] if args.workers_only else [0, args.ingest_workers]
    loop_cpus = [int(c) for c in args.loop_cpu.split(",")]
    servers = [(label, workers, depth, cpu) for label in sizes for workers in worker_counts for depth in depths
               for cpu in loop_cpus]  # fmt: skip
    for label, workers, depth, cpu in servers:
        name = f"{label}_w{workers}_d{depth}_c{cpu}"
        with serve(out, name, sizes[label], workers, args.device, args.max_batch, depth, cpu) as port:
            pid = server_pid(name)
            for producers in producers_list:
                procs = min(producers, args.generators)
                cfg = RunConfig(
                    endpoints=[Endpoint(HOST, port)], levels=[LoadLevel(CONCURRENCY, args.in_flight)],
                    shape=sizes[label], processes=procs, connections=producers // procs, streams=producers,
                    warmup_s=1.0, window_s=args.window, max_windows=4, stable_windows=2, stability_pct=15,
                )  # fmt: skip
                cpus = os.sched_getaffinity(0)
                if cpu >= 0:  # the generator processes (started by run) keep off the loop's CPU too
                    os.sched_setaffinity(0, cpus - {cpu})
                try:
                    with CpuShares(pid, span_s=2 * args.window) as shares:  # the last two windows: the measured
                        result = run(cfg).results[0]
                finally:
                    os.sched_setaffinity(0, cpus)
                r = row(f"{label} workers={workers} inflight_batches={depth} loop_cpu={cpu} producers={producers}",
                        result)  # fmt: skip
                rate = max(result.throughput, 1.0)
                r["loop_busy"] = round(shares.busy("loop"), 3)
                r["loop_us_per_frame"] = round(shares.busy("loop") / rate * 1e6, 2)
                r["workers_us_per_frame"] = round(shares.busy("workers") / rate * 1e6, 1)
                r["generators_us_per_frame"] = round(result.cpu_cores / rate * 1e6, 1)
                r["machine_busy"] = f"{shares.busy('machine'):.1f} of {shares.cores}"
                rows.append(r)
    print_rows(f"builtin:small saturated, {args.in_flight} in flight in total, ingest_workers "
               f"{' vs '.join(map(str, worker_counts))}, max_inflight_batches {' vs '.join(map(str, depths))}",
               rows)  # fmt: skip
    summary = []
    for label, workers, depth, cpu in servers:
        config = f"{label} workers={workers} inflight_batches={depth} loop_cpu={cpu} "
        mine = [r for r in rows if r["config"].startswith(config)]
        best = max(r["frames_per_s"] for r in mine)
        spread = mine[-1]["frames_per_s"] / max(mine[0]["frames_per_s"], 1e-9)
        summary.append({"frame": label, "ingest_workers": workers, "max_inflight_batches": depth, "loop_cpu": cpu,
                        "best_frames_per_s": best,
                        f"{producers_list[-1]}_vs_{producers_list[0]}_producers": round(spread, 3),
                        "loop_busy": max(r["loop_busy"] for r in mine),
                        "loop_us_per_frame": min(r["loop_us_per_frame"] for r in mine)})  # fmt: skip
    print_rows("summary (targets: 3KB >= 100000/s, 150KB >= 25000/s, 64 vs 1 within 5 %, loop <= 10 us)", summary)
    return {"rows": rows, "summary": summary}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--part", action="append", choices=["micro", "loop", "saturate"], help="default: micro and saturate"
    )
    parser.add_argument("--ingest-workers", type=int, default=8, help="N for the side-by-side runs")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--in-flight", type=int, default=256, help="frames in flight, in total")
    parser.add_argument("--generators", type=int, default=8, help="load generator processes at most")
    parser.add_argument("--window", type=float, default=3.0)
    parser.add_argument("--max-batch", type=int, default=32, help="saturate, loop: the model's max_batch_size")
    parser.add_argument(
        "--max-inflight-batches",
        default="2",
        help="saturate: the server's setting; a comma-separated list runs a server for each",
    )
    parser.add_argument("--workers-only", action="store_true", help="saturate: skip the ingest_workers = 0 servers")
    parser.add_argument(
        "--loop-cpu",
        default="-1",
        help="saturate: the servers' loop_cpu (the generators then keep off it); a comma-separated list runs each",
    )
    parser.add_argument("--sizes", default=",".join(SIZES), help="frame sizes to run (3KB, 150KB)")
    parser.add_argument("--producers", default=",".join(map(str, PRODUCERS)), help="producer counts")
    parser.add_argument("--micro-frames", type=int, default=32768)
    parser.add_argument("--micro-batch", type=int, default=32, help="frames per read / per batch in the micro part")
    parser.add_argument("--loop-frames", type=int, default=65536, help="frames per run of the loop part")
    parser.add_argument("--loop-in-flight", type=int, default=256, help="frames in the server in the loop part")
    parser.add_argument("--loop-producers", type=int, default=8, help="connections in the loop part")
    parser.add_argument("--loop-runs", type=int, default=5, help="runs of the loop part (the best is reported)")
    parser.add_argument("--out", default="out/bench_ingest")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"args": vars(args)}
    parts = args.part or ["micro", "saturate"]
    if "micro" in parts:
        report["micro"] = part_micro(args)
    if "loop" in parts:
        report["loop"] = part_loop(args)
    if "saturate" in parts:
        report["saturate"] = part_saturate(out, args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
