"""The load generator's run configuration (plain data, picklable for worker processes)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from streamgpu.client import MAX_DEADLINE_S, deadline_to_us
from streamgpu.config import AUTH_TOKEN_ENV
from streamgpu.loadgen import sources
from streamgpu.loadgen.errors import UsageError
from streamgpu.protocol.wire import token_problem

CONCURRENCY = "concurrency"
RATE = "rate"
MAX_STREAMS = 1_000_000  # stream ids 0..N-1, each held in a list by the process that sends on it
MAX_CONCURRENCY = 1_000_000  # frames in flight, each held (future, header, unsent bytes) by the process that sent it


@dataclass(frozen=True)
class Endpoint:
    """A server address."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class LoadLevel:
    """One point of a sweep: ``value`` frames in flight (closed loop) or frames/s (open loop)."""

    mode: str  # CONCURRENCY or RATE
    value: float

    def share(self, index: int, processes: int) -> LoadLevel:
        """This level's part for generator process ``index`` of ``processes``."""
        if self.mode == RATE:
            return replace(self, value=self.value / processes)
        return replace(self, value=float(split_int(int(self.value), index, processes)))


def split_int(total: int, index: int, parts: int) -> int:
    """Part ``index`` of ``total`` split as evenly as possible into ``parts`` ints."""
    return total // parts + (1 if index < total % parts else 0)


@dataclass
class RunConfig:
    """Everything a run needs; the CLI builds one, tests may build one directly."""

    endpoints: list[Endpoint]  # one, or two with --compare (the second is compared with the first)
    levels: list[LoadLevel]
    transport: str = "tcp"
    loss: float = 0.0  # datagram transports: fraction of datagrams dropped on the sending side
    token: str = ""
    connect_timeout_s: float = 10.0
    model: str = "default"
    shape: tuple[int, ...] = (224, 224, 3)
    dtype: str = "uint8"
    images: list[str] = field(default_factory=list)
    video: str | None = None
    seed: int = 0
    streams: int | None = None  # total over processes; default one per process
    connections: int = 1  # per process and endpoint
    deadline_s: float | None = None
    priority: int = 0
    live: bool = False
    distribution: str = "constant"  # or "poisson" (open loop)
    warmup_s: float = 1.0
    window_s: float = 5.0
    stability_pct: float = 10.0
    max_windows: int = 10
    stable_windows: int = 3
    duration_s: float | None = None  # one fixed window instead of windows until stable
    count: int | None = None  # measure exactly this many frames per level instead
    max_outstanding: int = 10_000  # open loop: frames in flight before the sender waits
    max_lag_s: float = 0.01  # open loop: p99 send lag above this is "behind schedule"
    drain_timeout_s: float = 10.0
    processes: int = 1
    loop: str = "auto"
    # perf_analyzer's --percentile: judge stability (and the threshold) by this latency percentile, not the mean
    percentile: float | None = None
    # perf_analyzer's --latency-threshold: stop the sweep after a level whose latency exceeds this
    latency_threshold_s: float | None = None

    @property
    def total_streams(self) -> int:
        return self.streams if self.streams is not None else self.processes

    @property
    def np_dtype(self) -> np.dtype:
        return sources.parse_dtype(self.dtype)

    @property
    def frame_bytes(self) -> int:
        return math.prod(self.shape) * self.np_dtype.itemsize

    def validate(self) -> None:
        """Raise UsageError for a configuration that cannot run."""

        def positive(name: str, value: float | None, *, allow_zero: bool = False) -> None:
            if value is not None and (value < 0 or (value == 0 and not allow_zero) or math.isnan(value)):
                raise UsageError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")

        if not self.endpoints:
            raise UsageError("no endpoint given")
        if not self.levels:
            raise UsageError("no load level given")
        for lv in self.levels:
            if lv.mode not in (CONCURRENCY, RATE):  # anything else ran as an open loop, reported under its name
                raise UsageError(f"a load level's mode must be {CONCURRENCY!r} or {RATE!r}, got {lv.mode!r}")
            positive(f"{lv.mode} level", lv.value)
            if lv.mode == CONCURRENCY and (lv.value != int(lv.value) or lv.value < self.processes):
                raise UsageError(
                    f"concurrency must be a whole number >= --processes ({self.processes}), got {lv.value:g}"
                )
            if lv.mode == CONCURRENCY and lv.value > MAX_CONCURRENCY:  # it submitted them all at once, till OOM
                raise UsageError(f"concurrency must be at most {MAX_CONCURRENCY}, got {lv.value:g}")
        for name, v in (("--processes", self.processes), ("--connections", self.connections),
                        ("--streams", self.streams), ("--window", self.window_s), ("--max-windows", self.max_windows),
                        ("--duration", self.duration_s), ("--count", self.count), ("--deadline", self.deadline_s),
                        ("--max-outstanding", self.max_outstanding), ("--connect-timeout", self.connect_timeout_s),
                        ("--stability", self.stability_pct)):  # fmt: skip
            positive(name, v)
        positive("--warmup", self.warmup_s, allow_zero=True)
        positive("--latency-threshold", self.latency_threshold_s)
        if self.percentile is not None and not 0 < self.percentile <= 100:
            raise UsageError(f"--percentile must be in (0, 100], got {self.percentile:g}")
        if self.streams is not None and self.streams > MAX_STREAMS:
            raise UsageError(f"--streams must be at most {MAX_STREAMS} (each process lists its stream ids), "
                             f"got {self.streams}")  # fmt: skip
        if self.deadline_s is not None:
            try:
                deadline_to_us(self.deadline_s)  # as each frame's submit will (the header's u32 of microseconds)
            except ValueError:
                raise UsageError(f"--deadline-ms must be at most {MAX_DEADLINE_S * 1e3:.3f} ms, "
                                 f"got {self.deadline_s * 1e3:g}") from None  # fmt: skip
        if self.total_streams < self.processes:
            raise UsageError(f"--streams ({self.total_streams}) must be at least --processes ({self.processes})")
        if self.count is not None and self.count < self.processes:
            raise UsageError(f"--count ({self.count}) must be at least --processes ({self.processes})")
        if self.count is not None and self.duration_s is not None:
            raise UsageError("give --duration or --count, not both")
        if self.seed < 0:  # numpy's generators take no negative seed
            raise UsageError(f"--seed must be >= 0, got {self.seed}")
        if not 0 <= self.priority <= 255:
            raise UsageError(f"--priority must be 0..255, got {self.priority}")
        if self.distribution not in ("constant", "poisson"):
            raise UsageError(f"--request-distribution must be constant or poisson, got {self.distribution!r}")
        if self.images and self.video:
            raise UsageError("give --images or --video, not both")
        if (why := token_problem(self.token)) is not None:
            raise UsageError(f"--token (or ${AUTH_TOKEN_ENV}) {why}")
        if not 1 <= len(self.model.encode()) <= 255:
            raise UsageError("--model must be 1..255 bytes")
        try:
            sources.parse_shape("x".join(map(str, self.shape)))  # --shape's rule, for a RunConfig made in code
            sources.parse_dtype(self.dtype)
        except ValueError as exc:
            raise UsageError(str(exc)) from None

    def judged_latency(self) -> str:
        """The latency figure stability and --latency-threshold use: ``mean``, or ``pP`` with --percentile."""
        return "mean" if self.percentile is None else f"p{self.percentile:g}"

    def frames(self) -> list[np.ndarray]:
        """The frames to cycle through, from the configured source."""
        try:
            if self.video:
                return sources.from_video(self.video, self.shape, self.np_dtype)
            if self.images:
                return sources.from_images(self.images, self.shape, self.np_dtype)
            return sources.synthetic(self.shape, self.np_dtype, seed=self.seed)
        except (MemoryError, ValueError):  # numpy: no memory for one frame, or more bytes than an array can hold
            shape = "x".join(map(str, self.shape))
            raise UsageError(f"--shape {shape}: a {self.dtype} frame is {self.frame_bytes} bytes, too large to "
                             "build in this process's memory; use a smaller --shape") from None  # fmt: skip
