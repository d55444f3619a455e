"""The CUDA backend: async DMA from the pinned ring, CUDA graphs, events bridged to the loop.

Per batch, on the loop thread and without blocking, for an image model with CUDA graphs and the
fused pre-processing kernel (the common case):

1. the batch's frame addresses (a small table) are copied to the device on the model's compute
   stream, and its bucket's graph is replayed: pre-processing that reads each frame where the
   table says, the model, the outputs in the dtypes they are returned in. While another batch of
   the model is on the GPU, the frames are first gathered from the ring into device memory on the
   copy stream (overlapping that batch) and the table points there; with none, the graph reads
   the page-locked ring directly, as there is nothing to overlap a separate copy with;
2. the results are copied into a page-locked host buffer and ``done`` is recorded;
3. the completion bridge resolves ``copied`` and ``done`` on the loop.

Other models (torch pre-processing, eager) gather on the copy stream, then
pre-process, replay or run the model, and copy the results back, each as its own launch.
Every model has its own compute stream, so models interleave on the GPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import math
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from streamgpu.config import Config
from streamgpu.errors import DeviceUnavailableError
from streamgpu.gpu import driver, kernels
from streamgpu.gpu.backend import Backend, BatchRun, BatchTrace, DeviceModel, StagedWeights
from streamgpu.gpu.bridge import CompletionBridge, Done
from streamgpu.gpu.setup import cupy_package
from streamgpu.gpu.shares import GreenContext, Share, SmShares
from streamgpu.loops import helper_threads
from streamgpu.memory import Slot
from streamgpu.models.outputs import BatchOutputs, ModelHead, host_dtype, model_input, warm_up
from streamgpu.models.preprocess import TorchPreprocess
from streamgpu.models.spec import ModelSpec
from streamgpu.models.weights import HostWeights, PackedWeights, pack_weights, takes_weights_in_place

log = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Eager runs before a capture (lazy allocations and kernel loads; compiling, for a compiled module). An
# uncompiled module has run at every bucket already (warm_up): one run of the graph's step is enough, and a
# swap's Python beside the models serving is the shorter (each run is milliseconds of it, 6 buckets a load).
_GRAPH_WARMUP = 3
_GRAPH_WARMUP_WARMED = 1
_COMPILE_MIN_GAIN = 0.03  # compile = "auto" keeps the compiled model if its graph is at least this much faster
# Dynamo compiles once per input shape (a bucket) and per device, and counts all of them against one
# limit per code object (8 by default), past which it silently runs eagerly.
_RECOMPILE_LIMIT = 256
# Frames this large go by DMA copies: at 6 MiB the copy engine reached 0.98 of the pinned
# peak against the gather kernel's 0.93 (H100, docs/BENCHMARKS.md), and it leaves the SMs
# to the models. Below, one gather launch per batch wins on GPU time and on loop CPU.
COPY_ENGINE_FROM = 4 * 1024 * 1024


# Stream priorities: torch clamps to the device's range, so these are its highest and lowest.
_SERVING_PRIORITY = -100
_LOADING_PRIORITY = 0


# Past this share of a GPU's memory added to torch's cache (freed, not given back) since it was last given back, an
# unload gives it back even with other models serving (``ProcessCache``): a stall then, instead of at every swap.
CACHED_SHARE = 0.125


def _cached(gpu: torch.device) -> int:
    """Bytes torch's allocator holds on ``gpu`` but not in a tensor (host-side counters: no device call)."""
    return torch.cuda.memory_reserved(gpu) - torch.cuda.memory_allocated(gpu)


class ProcessCache:
    """When freed models' memory goes back from torch's caching allocator to the devices (``empty_cache``).

    Giving memory back (cudaFree) waits for everything running on the device and holds every launch meanwhile,
    other models' batches too. The allocator is one per process and ``empty_cache`` empties it on every GPU,
    whichever backend freed the blocks: so the models counted are all of the process's (servers embedded side by
    side included), and the cache is measured against what it held right after it was last given back, which
    is the free memory inside the graph pools of models still serving (no ``empty_cache`` gives that back)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # loader threads of several backends
        self._models = 0  # loaded, by every CudaBackend of the process, on any GPU
        self._floor: dict[torch.device, int] = {}  # per GPU seen: cached bytes after the last empty_cache

    def loaded(self, gpu: torch.device) -> None:
        with self._lock:
            self._models += 1
            self._floor.setdefault(gpu, 0)

    def dropped(self, count: int) -> None:
        """``count`` models left unfreed by a backend that closed (a server stopped): no longer counted."""
        with self._lock:
            self._models -= count

    def freed(self, gpu: torch.device, total: int, give_back: bool = True) -> bool:
        """A model on ``gpu`` (``total`` bytes) was freed: give the cache back if no model is left in the process,
        or if the cache on ``gpu`` grew by more than ``CACHED_SHARE`` of ``total`` since it was last given back.
        ``give_back`` False: only count it (its release failed: a lost context has nothing to give back).
        Returns whether it was given back."""
        with self._lock:
            self._models -= 1
            if not give_back or (self._models and _cached(gpu) - self._floor[gpu] <= CACHED_SHARE * total):
                return False
            torch.cuda.empty_cache()  # the freed graph pools and blocks go back to the devices
            self._floor = {seen: _cached(seen) for seen in self._floor}
            return True


PROCESS_CACHE = ProcessCache()


@dataclass(frozen=True, eq=False)
class ModelStreams:
    """A model's streams (see ``CudaModel``). The backend takes them back when the model is freed
    and gives them to the next model it loads: torch keeps a cuBLAS workspace (~33 MiB) for every
    stream it has run a matrix multiply on, for the life of the process, so fresh streams per load
    would grow device memory with every swap."""

    serve: torch.cuda.Stream
    capture: torch.cuda.Stream
    # A model in an SM share gathers its frames on a stream of its share: on the GPU's copy stream
    # (the primary context, every SM) another model's gather kernel would run on this one's SMs.
    copy: torch.cuda.Stream | None = None

    @classmethod
    def make(cls, gpu: torch.device, share: Share | None = None) -> ModelStreams:
        """Streams on ``gpu``, or inside ``share``'s green context (its work then runs on the share's SMs)."""
        if share is not None:
            serve, capture, copy = (
                torch.cuda.ExternalStream(share.context.stream(highest_priority=high), device=gpu)
                for high in (True, False, True)
            )
            return cls(serve, capture, copy)
        serving, loading = (torch.cuda.Stream(gpu, priority=p) for p in (_SERVING_PRIORITY, _LOADING_PRIORITY))
        return cls(serving, loading)

    def warm(self) -> None:
        """Run the matrix multiplies that make torch allocate these streams' cuBLAS workspaces now (the
        loader thread's, as a load would), so that the model that takes them allocates none."""
        with torch.cuda.stream(self.capture), torch.inference_mode():
            for dtype in (torch.float16, torch.float32):
                x = torch.ones((8, 8), dtype=dtype, device=self.capture.device)
                torch.nn.functional.linear(x, x, x[0])  # cublasLt (with a bias) and cuBLAS (below)
                torch.mm(x, x.t())
        self.capture.synchronize()


class _Graph:
    """One captured bucket: its graph, the tensors it reads and writes, and what the one-replay path
    needs per batch without asking torch (the instantiated graph, each output's address and row size)."""

    def __init__(self, graph: torch.cuda.CUDAGraph, static_in: torch.Tensor, static_out: list[torch.Tensor]) -> None:
        self.graph = graph
        self.static_in = static_in
        self.static_out = static_out  # contiguous, in the dtypes results are returned in (``host_dtype``)
        self.exec_handle = int(graph.raw_cuda_graph_exec())  # cudaGraphExec_t, valid while ``graph`` lives
        self.outputs = [(out.data_ptr(), out[0].nbytes) for out in static_out]


@dataclass(eq=False)
class BatchBuffers:
    """What one batch in flight uses: device staging for its frames, the page-locked host buffers
    its results come back into, (one-replay models) the page-locked table of its frames' addresses
    that is copied to the device before the replay, and its events."""

    staged: torch.Tensor  # [max_batch, frame_nbytes] uint8, device
    host: list[torch.Tensor]  # per output: [max_batch, *shape], page-locked
    addresses: torch.Tensor  # [1 + max_batch] int64, page-locked: frame count, then each frame's address
    staged_rows: np.ndarray  # int64 device address of each row of ``staged``
    copied: driver.Event  # recorded after the frames were gathered into ``staged``
    # Timed: the batch's device time, which the scheduler's latency estimates need (the loop notices
    # completion later than it happens).
    started: driver.Event
    done: driver.Event  # recorded after the results were copied into ``host``

    @property
    def address_table(self) -> np.ndarray:
        return self.addresses.numpy()


class BufferPool:
    """Per-batch buffers, allocated at load and reused.

    Allocating on the loop would stall it: page-locked memory (cudaHostAlloc)
    and a caching-allocator miss (cudaMalloc) can wait for the whole device. A
    model gets one set per batch it may have in flight, plus one; a set returns
    to the pool once its batch's results have been copied out (not on failure:
    the device may still be writing it, and recording its events). Reusing a
    set's events is safe for the same reason: its last batch has completed.
    """

    def __init__(self, frame_nbytes: int, outputs: list[tuple[tuple[int, ...], torch.dtype]], max_batch: int,
                 count: int, device: torch.device) -> None:  # fmt: skip
        def make() -> BatchBuffers:
            staged = torch.empty((max_batch, frame_nbytes), dtype=torch.uint8, device=device)
            ordinal = device.index or 0
            return BatchBuffers(
                staged,
                [torch.empty((max_batch, *shape), dtype=dtype, pin_memory=True) for shape, dtype in outputs],
                torch.zeros(1 + max_batch, dtype=torch.int64, pin_memory=True),
                staged.data_ptr() + np.arange(max_batch, dtype=np.int64) * frame_nbytes,
                driver.Event(ordinal),
                driver.Event(ordinal, timing=True),
                driver.Event(ordinal, timing=True),
            )

        self._make = make
        self._free = [self._make() for _ in range(count)]
        self._count = count
        self._held: list[BatchBuffers] = []
        self._warned = False

    def take(self) -> BatchBuffers:
        if self._free:
            return self._free.pop()
        if not self._warned:  # only after failed batches kept theirs: correct, but this may stall the loop
            log.warning("all %d batch buffer sets in use; allocating another", self._count)
            self._warned = True
        return self._make()

    def give_back(self, buffers: BatchBuffers) -> None:
        self._free.append(buffers)

    def hold(self, buffers: BatchBuffers) -> None:
        """Keep a failed batch's set, never to reuse it: the device may still write it, and the results
        are copied with raw calls that tell torch's page-locked allocator nothing, so a set let go now could
        be handed out again under a pending copy. Held sets go with the pool (the model's streams are
        synchronized first, on unload)."""
        self._held.append(buffers)


@dataclass(eq=False)
class _StagedOnDevice(StagedWeights):
    """Staged weights, and the event recorded after they were copied into the model's. ``whole``: the model's
    packed weights and the new ones laid out alike (``groups`` empty), copied over them in one copy."""

    copied: driver.Event
    whole: tuple[PackedWeights, torch.Tensor] | None = None


class CudaModel(DeviceModel):
    """A model on one GPU with its own compute stream and one CUDA graph per batch bucket."""

    def __init__(
        self, spec: ModelSpec, module: nn.Module, gpu: torch.device, device: int, use_kernels: bool,
        streams: ModelStreams, share: Share | None = None,
    ) -> None:  # fmt: skip
        self.spec = spec
        self.gpu = gpu
        self.device = device
        self.dtype = torch.float16 if spec.precision == "auto" else _DTYPES[spec.precision]
        self.module = on_device(module, gpu, self.dtype)
        if spec.preprocess == "image":
            self.module = self.module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        # A model that may take new versions' weights in place has them in one buffer (before its graphs are
        # captured): a swap is then one copy of ~30 us (ResNet-50), not ~100 us of grouped copies launched
        # over ~200 us of the loop (docs/BENCHMARKS.md)
        self.packed = pack_weights(self.module) if takes_weights_in_place(spec) else None
        self.head = ModelHead(self.module, spec)
        # A share of the SMs (a green context, no other model's): kernels on its streams, and graphs
        # captured inside it, run on those SMs alone, so this model cannot crowd out another (and vice versa).
        self.share = share
        # Batches run on ``stream`` (high priority); loading work (warm-up, compile timing, graph
        # capture) runs on ``capture_stream`` (low priority), so a model being loaded beside serving
        # ones takes only the SMs they leave. A graph captured there replays on ``stream``. With a
        # share, both streams are the share's.
        self.streams = streams
        self.stream, self.capture_stream = streams.serve, streams.capture
        self.graphs: dict[int, _Graph] = {}
        self.buckets: list[int] = []
        # A compiled model served without graphs runs its batches padded to these sizes, each compiled at
        # load (``compile_buckets``); empty otherwise.
        self.padded_buckets: tuple[int, ...] = ()
        # One-replay models (see ``capture``): the device table of the running batch's frame addresses
        # that their graphs read, and the graph for each batch size.
        self.addresses: torch.Tensor | None = None
        self.graph_for: list[_Graph] = []
        # Whether its graphs may read frames straight from the page-locked ring: frames whose pixels load
        # four at a time (H * W % 4 == 0) and below the copy engine's size (see COPY_ENGINE_FROM).
        h, w = (spec.input_shape[0], spec.input_shape[1]) if len(spec.input_shape) == 3 else (0, 1)
        self.reads_ring = spec.frame_nbytes < COPY_ENGINE_FROM and (h * w) % 4 == 0
        self.in_flight = 0  # batches launched and not delivered
        self.graph_error = ""
        # What batches run: the module, or its compiled form (choose_compiled).
        self.runs: Callable[[torch.Tensor], list[torch.Tensor]] = self.head
        self.compile_note = "not compiled"
        self.buffers: BufferPool | None = None  # set by CudaBackend.load
        self.preprocess = TorchPreprocess(spec, self.dtype, gpu)  # constants made here, not per batch
        self.fused_preprocess = (
            use_kernels
            and spec.preprocess == "image"
            and self.dtype in (torch.float16, torch.float32)
            and spec.input_shape[2] <= kernels.MAX_CHANNELS
        )

    @contextlib.contextmanager
    def in_share(self) -> Iterator[None]:
        """Make the model's green context current on this thread (graph capture, eager launches)."""
        with self.share.context.current() if self.share is not None else contextlib.nullcontext():
            yield

    @property
    def sms(self) -> int:  # type: ignore[override]
        """SMs this model may use (all of the GPU's without a share)."""
        if self.share is not None:
            return self.share.sms
        return torch.cuda.get_device_properties(self.gpu).multi_processor_count

    @property
    def description(self) -> str:
        mode = f"graphs {sorted(self.graphs)}" if self.graphs else f"eager ({self.graph_error or 'graphs off'})"
        if self.padded_buckets:
            mode += f", batches padded to {list(self.padded_buckets)}"
        if self.share is not None:
            mode += f", {self.sms} SMs of {torch.cuda.get_device_properties(self.gpu).multi_processor_count}"
        pre = "fused kernel" if self.fused_preprocess else "torch ops"
        if self.addresses is not None:
            pre += " in the graph (one replay per batch)"
        return (f"{self.spec.name} ({self.spec.source}, {self.dtype}, {self.gpu}, {mode}, {self.compile_note}, "
                f"pre-processing {pre})")  # fmt: skip

    def prepare_input(self, frames: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The model's input for ``frames``, written into ``out`` (a graph's static input) if given."""
        spec = self.spec
        if self.fused_preprocess:
            stream = torch.cuda.current_stream(self.gpu)  # the serving stream, or the capture stream at load
            return kernels.preprocess_image(frames, spec.mean, spec.std, self.dtype, True, out, stream)
        x = self.preprocess(frames)
        if spec.preprocess == "image":
            x = x.contiguous(memory_format=torch.channels_last)
        if out is None:
            return x
        return out.copy_(x)

    def warm_up(self) -> list[torch.Tensor]:
        """Run eagerly at every bucket (a model that cannot take a batch size fails here, with a
        ``ModelLoadError`` naming it); returns the outputs at ``max_batch_size``."""

        def run(n: int) -> list[torch.Tensor]:
            shape = (n, *self.spec.input_shape)
            frames = torch.zeros(shape, device=self.gpu).to(_torch_dtype(self.spec.frame_dtype))
            x = self.prepare_input(frames)
            with self.in_share():
                return self.head.record(x)

        with torch.cuda.stream(self.capture_stream), torch.inference_mode():
            outs = warm_up(self.spec, run, model_input(self.spec, self.dtype))
        self.capture_stream.synchronize()
        return outs

    def _example_frames(self, n: int) -> torch.Tensor:
        """``n`` frames of varied values. Not from the random generator: while a graph is being
        captured the device's generator is in capture mode, and a random op on a stream that is not
        capturing fails ("Offset increment outside graph capture")."""
        count = n * math.prod(self.spec.input_shape)
        frames = (torch.arange(count, device=self.gpu) * 7919 % 251).view(n, *self.spec.input_shape)
        return frames.to(_torch_dtype(self.spec.frame_dtype))

    def _example(self, n: int) -> torch.Tensor:
        """A model input for ``n`` frames (see ``_example_frames``)."""
        return self.prepare_input(self._example_frames(n))

    def _capture(
        self, step: Callable[[], list[torch.Tensor]], static_in: torch.Tensor, pool: Any, warmups: int = _GRAPH_WARMUP
    ) -> _Graph:
        """A graph of ``step`` (which reads ``static_in``), captured on the capture stream after ``warmups`` runs."""
        # Inside the share: a graph runs on the SMs of the context it was captured in, whatever stream
        # replays it. The pre-processing kernel may run in there too: it was loaded at warm-up, outside,
        # and cupy launches it without switching devices (loading it inside would make the device's
        # primary context current and unbalance the share's push and pop).
        with self.in_share():
            for _ in range(warmups):
                step()
            self.capture_stream.synchronize()
            # Not torch.cuda.graph(): its __enter__ synchronizes the whole device and empties the
            # allocator caches (device and pinned host), which would stall the models serving beside;
            # thread-local mode lets the loop thread launch their batches meanwhile.
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.stream(self.capture_stream):
                graph.capture_begin(pool=pool, capture_error_mode="thread_local")
                try:
                    static_out = step()
                finally:
                    graph.capture_end()
        return _Graph(graph, static_in, static_out)

    def _returned(self, outputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """``outputs`` contiguous and in the dtypes results are returned in (inside a graph: no
        conversion per batch, and whole rows to copy back)."""
        return [out.to(host_dtype(out.dtype)).contiguous() for out in outputs]

    def choose_compiled(self) -> None:
        """``spec.compile``: compile the module with inductor and, for "auto", keep it only if its
        graph at the largest bucket replays faster than the module's. Falls back with a warning."""
        spec = self.spec
        if spec.compile == "off" or (spec.compile == "auto" and not spec.cuda_graphs):
            return  # auto decides by replaying graphs; without graphs only "on" compiles
        dynamo = torch._dynamo.config
        dynamo.recompile_limit = max(dynamo.recompile_limit, _RECOMPILE_LIMIT)
        log.info("model %s: compiling with torch.compile for %s (seconds per batch bucket; cached on disk for "
                 "the next start; compile = \"off\" skips it)", spec.name, self.gpu)  # fmt: skip
        compiled = torch.compile(self.head, dynamic=False)
        try:
            with torch.cuda.stream(self.capture_stream), torch.inference_mode():
                if spec.compile == "on":
                    compiled(self._example(1))  # (outside the share: see capture)
                    self.runs, self.compile_note = compiled, "compiled"
                    return
                size = max(spec.buckets())
                pool = torch.cuda.graph_pool_handle()
                x = self._example(size)
                compiled(x)  # (outside the share: see capture)
                plain = self._capture(lambda: self.head(x), x, pool)
                fast = self._capture(lambda: compiled(x), x, pool)
        except Exception as exc:  # an op inductor cannot compile, no triton, ...
            self._serve_uncompiled(exc)
            return
        plain_ms, fast_ms = (min(_replay_ms(g.graph, self.capture_stream) for _ in range(3)) for g in (plain, fast))
        keep = fast_ms < plain_ms * (1 - _COMPILE_MIN_GAIN)
        if keep:
            self.runs = compiled
        self.compile_note = ("compiled" if keep else "not compiled: no faster") + (
            f" ({fast_ms:.2f} vs {plain_ms:.2f} ms at batch {size})"
        )
        log.info("model %s: %s the compiled graph: %.3f ms against %.3f ms uncompiled at batch %d", spec.name,
                 "keeping" if keep else "not keeping", fast_ms, plain_ms, size)  # fmt: skip

    def compile_buckets(self) -> None:
        """A compiled model served without graphs (``cuda_graphs = false``, or a capture that failed): compile
        it at every bucket now. Dynamo compiles once per input shape, seconds each; at serve time that would be
        on the launcher thread, a batch size at a time, under load. Batches then run padded to the next bucket
        (``rows_for``). If a bucket fails to compile, the model is served uncompiled, with a warning."""
        buckets = self.spec.buckets()
        try:
            with torch.cuda.stream(self.capture_stream), torch.inference_mode():
                for bucket in buckets:
                    self.runs(self._example(bucket))  # outside the share, as in capture
            self.capture_stream.synchronize()
        except Exception as exc:
            self._serve_uncompiled(exc)
            return
        self.padded_buckets = buckets

    def _serve_uncompiled(self, exc: Exception) -> None:
        """The compile failed with ``exc``: batches run the module as it is, and the log says why."""
        self.runs, self.compile_note = self.head, "not compiled: compile failed"
        log.warning("model %s: torch.compile failed, serving it uncompiled: %s: %s", self.spec.name,
                    type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")  # fmt: skip

    def rows_for(self, n: int) -> int:
        """Rows a batch of ``n`` frames runs as: the next bucket for a compiled model without graphs (the
        extra rows hold stale frames, their outputs dropped), else ``n``."""
        return next((b for b in self.padded_buckets if b >= n), n)

    def capture(self) -> None:
        """Warm up and capture one graph per bucket (largest first, one shared memory pool).

        With the fused pre-processing kernel, a graph holds the whole batch:
        pre-processing from the frame addresses in ``addresses``, the model, and its outputs in the
        returned dtypes; a batch is then one small copy and one replay (``CudaBackend.launch``).
        Otherwise a graph holds the model, fed by a separate pre-processing launch (``forward``).

        Captured in thread-local mode, without a device-wide synchronize: the loop thread keeps
        launching the batches of models already serving (and querying their events) meanwhile.
        """
        spec = self.spec
        pool = torch.cuda.graph_pool_handle()
        one_replay = self.fused_preprocess
        with torch.cuda.stream(self.capture_stream), torch.inference_mode():
            if one_replay:
                self.addresses = torch.zeros(1 + spec.max_batch_size, dtype=torch.int64, device=self.gpu)
            for bucket in sorted(spec.buckets(), reverse=True):
                if self.addresses is not None:
                    frames = self._example_frames(bucket)  # what the table points at until capture ends
                    table = [bucket] + [frames.data_ptr() + i * spec.frame_nbytes for i in range(bucket)]
                    self.addresses[: 1 + bucket].copy_(torch.tensor(table, dtype=torch.int64))
                    h, w, c = spec.input_shape  # written by the graph's pre-processing:
                    static_in = torch.empty((bucket, c, h, w), dtype=self.dtype, device=self.gpu,
                                            memory_format=torch.channels_last)  # fmt: skip
                else:
                    static_in = self._example(bucket)

                def step(static_in: torch.Tensor = static_in) -> list[torch.Tensor]:
                    if self.addresses is not None:
                        kernels.preprocess_table(self.addresses, spec.mean, spec.std, True, static_in,
                                                 self.capture_stream)  # fmt: skip
                    return self._returned(self.runs(static_in))

                if self.runs is not self.head:
                    # Dynamo compiles for each new shape: outside the share, as the pre-processing kernel is
                    # loaded (see _capture); its kernels, loaded outside, run inside.
                    step()
                warmups = _GRAPH_WARMUP_WARMED if self.runs is self.head else _GRAPH_WARMUP
                graph = self.graphs[bucket] = self._capture(step, static_in, pool, warmups)
                # The first replay of a graph uploads it to the device (milliseconds for a large one):
                # done here, so that it is not in a served batch's latency.
                graph.graph.replay()
            if self.addresses is not None:
                self.addresses.zero_()  # no frames: a stray replay reads nothing freed
            self.capture_stream.synchronize()  # ``frames`` may be freed now
        self.buckets = sorted(self.graphs)
        if self.addresses is not None:
            self.graph_for = [
                self.graphs[next(b for b in self.buckets if b >= n)] for n in range(spec.max_batch_size + 1)
            ]

    def forward(self, frames: torch.Tensor) -> list[torch.Tensor]:
        """Run on the current (compute) stream; returns the [n, ...] outputs (models whose graphs
        take the frames' addresses instead run through ``CudaBackend.launch`` only)."""
        assert self.addresses is None, "a one-replay model runs from frame addresses, not a frames tensor"
        n = frames.shape[0]
        bucket = next((b for b in self.buckets if b >= n), None)
        if bucket is None:
            x = self.prepare_input(frames)
            with self.in_share():
                return self.runs(x)
        g = self.graphs[bucket]
        self.prepare_input(frames, out=g.static_in[:n])
        g.graph.replay()  # in its share, if it has one: captured there
        return [out[:n] for out in g.static_out]

    def release(self) -> None:
        """Drop every device tensor this model holds (graphs, their pool, buffers, weights).

        Each graph is reset before it is dropped: ``reset`` lets go of the GIL while the driver destroys the
        graph, where the last reference dropped would destroy it holding the GIL, and the loop's batches wait."""
        for captured in self.graphs.values():
            captured.graph.reset()
        self.graphs.clear()
        self.buckets = []
        self.graph_for = []
        self.addresses = None
        self.buffers = None
        self.packed = None
        self.module = nn.Identity()
        self.head = self.runs = ModelHead(self.module, self.spec)


class CudaBackend(Backend):
    name = "cuda"

    def __init__(self, loop: asyncio.AbstractEventLoop, config: Config) -> None:
        self._loop = loop
        self._max_inflight = config.max_inflight_batches
        # Eager models (graph capture failed or off) launch dozens of kernels per batch, milliseconds
        # of CPU: that happens on this one thread, never on the loop.
        self._launcher = helper_threads("streamgpu-launch")
        count = torch.cuda.device_count()
        missing = [i for i in config.devices if i >= count]
        if missing:
            raise DeviceUnavailableError(f"devices {missing} do not exist: this machine has {count} GPU(s)")
        self.gpus = [torch.device("cuda", i) for i in config.devices]
        self.devices = [f"cuda:{d.index} ({torch.cuda.get_device_name(d)})" for d in self.gpus]
        # Per GPU: its copy stream (copies of batch k+1 overlap compute of batch k), and an idle
        # stream whose query() reports a sticky error without waiting for anything.
        self.copy_streams = [torch.cuda.Stream(d, priority=_SERVING_PRIORITY) for d in self.gpus]
        self._probes = [torch.cuda.Stream(d) for d in self.gpus]
        # Weights of a model being loaded go to the GPU on this stream: while models serve, a load
        # never queues behind (or in front of) their copies and batches.
        self.load_streams = [torch.cuda.Stream(d, priority=_LOADING_PRIORITY) for d in self.gpus]
        # The streams of freed models, for the next load: per GPU (its position), and per green context
        # for models with an sm_share. One spare is made (and warmed) at a GPU's first load, so that a
        # swap or a load beside it allocates no stream resources.
        self._spare_streams: dict[int | GreenContext, list[ModelStreams]] = {i: [] for i in range(len(self.gpus))}
        self._shares = SmShares()  # models with an sm_share: SMs no other model's share holds
        self._loaded = 0  # models loaded and not freed: ``close`` takes those left off the process's count
        self._spare_made = [False for _ in self.gpus]
        self._trace_epochs: dict[int, driver.Event] = {}  # per GPU: trace times count from it (``_mark_epoch``)
        self._total_memory = [torch.cuda.get_device_properties(d).total_memory for d in self.gpus]
        self._bridge = CompletionBridge(loop)
        # One gather launch per batch instead of a copy per frame: 7x less loop CPU per frame
        # and 1.8x less GPU time at 32 frames on the H100 (docs/GPU_NOTES.md).
        use_kernels = config.cuda_kernels
        self.use_kernels = use_kernels and importlib.util.find_spec("cupy") is not None
        if self.use_kernels:
            self.data_path = ("cupy kernels: one graph replay per batch for image models (pre-processing inside, "
                              "frames read from the ring), else one gather launch per batch")  # fmt: skip
        elif not use_kernels:
            self.data_path = "torch: one async copy per frame, torch pre-processing (cuda_kernels = false)"
        else:
            package = cupy_package() or "the cupy build"
            self.data_path = (
                "torch: one async copy per frame, torch pre-processing (slower): cupy is not installed; "
                f"`streamgpu setup-gpu` installs {package} for torch's CUDA {torch.version.cuda}"
            )
            log.warning("cupy is not installed: %s", self.data_path)
        self._host: torch.Tensor | None = None  # the registered host segment, as a uint8 CPU tensor
        self._host_address = 0  # its address on the devices

    def memory(self) -> dict[str, dict[str, int]]:
        # Counters the caching allocator keeps on the host: no device call, no synchronisation.
        return {
            f"cuda:{gpu.index}": {
                "allocated": torch.cuda.memory_allocated(gpu),
                "reserved": torch.cuda.memory_reserved(gpu),
                "total": total,
            }
            for gpu, total in zip(self.gpus, self._total_memory, strict=True)
        }

    def attach_host(self, buffer: np.ndarray) -> None:
        # Page-lock the segment in place (it is shared memory that ingest workers may map too), once
        # for every GPU (portable), and map it into their address space (with unified addressing the
        # host pointer is valid on each), so the gather kernel reads slots directly.
        cudart = torch.cuda.cudart()
        flags = 1 | 2  # cudaHostRegisterPortable | cudaHostRegisterMapped
        err = cudart.cudaHostRegister(buffer.ctypes.data, buffer.nbytes, flags)
        if err != cudart.cudaError.success:
            raise DeviceUnavailableError(f"cannot page-lock {buffer.nbytes} bytes of host memory for the GPU: {err}")
        self._host = torch.from_numpy(buffer)
        if self.use_kernels:  # where the one-replay graphs read frames from (the same address, with UVA)
            self._host_address = kernels.mapped_address(buffer.ctypes.data)

    def load(self, spec: ModelSpec, module: nn.Module, device: int = 0) -> CudaModel:
        gpu = self.gpus[device]
        with torch.cuda.device(gpu), torch.inference_mode():  # scoped: this runs in the loader thread
            share = self._shares.take(spec.name, gpu.index or 0, spec.sm_share) if spec.sm_share else None
            spare = self._spares(device, share)
            try:
                streams = spare.pop() if spare else ModelStreams.make(gpu, share)
            except BaseException:
                if share is not None:
                    self._shares.give_back(share)
                raise
            try:
                with torch.cuda.stream(self.load_streams[device]):
                    model = CudaModel(spec, module, gpu, device, self.use_kernels, streams, share)
                self.load_streams[device].synchronize()
                self._prepare(model)
            except BaseException:
                streams.capture.synchronize()  # nothing of the failed load is left queued on them
                streams.serve.synchronize()
                spare.append(streams)
                if share is not None:
                    self._shares.give_back(share)
                raise
            PROCESS_CACHE.loaded(gpu)
            self._loaded += 1
            if not self._spare_made[device]:
                self._spare_made[device] = True
                try:
                    spare_set = ModelStreams.make(gpu)
                    spare_set.warm()
                except BaseException:  # the load fails whole: its share, streams and memory go back
                    self.unload(model)
                    raise
                self._spare_streams[device].append(spare_set)
        return model

    def _prepare(self, model: CudaModel) -> None:
        """Warm-up at every bucket, compile choice, graphs, gather kernel and batch buffers."""
        spec, gpu = model.spec, model.gpu
        # Every bucket, eagerly, max_batch_size included: a static batch fails here, not under load.
        outs = model.warm_up()
        assert model.head.layout is not None
        model.layout = model.head.layout
        model.choose_compiled()
        if spec.cuda_graphs:
            try:
                model.capture()
            except Exception as exc:  # data-dependent control flow etc.: serve eagerly, say why
                model.graphs.clear()
                model.buckets = []
                model.graph_for = []
                model.addresses = None
                model.graph_error = f"capture failed: {exc}"
                log.warning("model %s: CUDA graph capture failed, running eagerly: %s", spec.name, exc)
        if model.runs is not model.head and not model.graphs:
            model.compile_buckets()
        with torch.cuda.stream(model.stream):
            if self.use_kernels and spec.frame_nbytes < COPY_ENGINE_FROM:
                # Compile and load the gather kernel here: loading a module can wait for the
                # whole device, which must not happen on the loop at the first batch.
                scratch = torch.zeros(spec.frame_nbytes, dtype=torch.uint8, pin_memory=True)
                staged = torch.empty((1, spec.frame_nbytes), dtype=torch.uint8, device=gpu)
                kernels.gather_frames(scratch, [0], spec.frame_nbytes, staged, model.stream)
        outputs = [(tuple(out.shape[1:]), host_dtype(out.dtype)) for out in outs]
        model.buffers = BufferPool(spec.frame_nbytes, outputs, spec.max_batch_size, self._max_inflight + 1, gpu)
        model.stream.synchronize()

    def unload(self, model: DeviceModel) -> None:
        """Free ``model``; its memory goes back to torch's caching allocator, and from there to the device
        only by ``PROCESS_CACHE``'s rule: giving memory back (cudaFree) waits for the whole device and holds
        every launch meanwhile, the loop's too (a serving model's frame waited 453 ms behind an unload with
        0.5 s of other work queued on the GPU, H100, tests/gpu/test_lifecycle_cuda.py). The next load reuses
        the cached blocks; torch also gives the cache back by itself when one of its own allocations would not
        fit otherwise."""
        assert isinstance(model, CudaModel)
        released = False
        with torch.cuda.device(model.gpu):
            try:
                model.stream.synchronize()  # its last batch has been delivered; nothing of it is queued
                model.capture_stream.synchronize()
                model.release()
                released = True
            finally:  # (a lost context raises above: the model is gone all the same, counted so, its share free)
                self._spares(model.device, model.share).append(model.streams)
                if model.share is not None:
                    self._shares.give_back(model.share)
                self._loaded -= 1
                PROCESS_CACHE.freed(model.gpu, self._total_memory[model.device], give_back=released)

    swaps_weights_in_place = True

    def stage_weights(self, model: DeviceModel, weights: HostWeights) -> StagedWeights:
        assert isinstance(model, CudaModel)
        load_stream = self.load_streams[model.device]
        with torch.cuda.device(model.gpu), torch.cuda.stream(load_stream), torch.inference_mode():
            # One copy of the whole buffer (the values already in the serving tensors' dtypes and layouts, channels-last
            # convolutions included, so that the swap copies them flat); each value a view into it
            staged = weights.buffer.to(model.gpu)
            packed = model.packed
            if packed is not None and packed.layout == weights.layout:  # the swap: one copy of the buffer
                weights.keep(packed, staged)
                groups, whole = [], (packed, staged)
            else:
                pairs = weights.pairs(model.module, staged)
                # Integer tensors (batch-norm counters) copied as floats of their size, bit for bit: torch's
                # multi-tensor copy takes no integer list, and copied one launch each, 53 of them held a ResNet-50's
                # swap ~1 ms
                groups = StagedWeights.by_dtype([_as_float_bits(live) for live, _ in pairs],
                                                [_as_float_bits(value) for _, value in pairs]).groups  # fmt: skip
                # The swap's copy kernels, launched once here: a kernel's first launch in the process loads it,
                # which waits for the device (17-19 ms of loop and GPU idle at the first swap on an H200)
                for _, values in groups:
                    torch._foreach_copy_([torch.empty_like(value) for value in values[:2]], values[:2])
                whole = None
            copied = driver.Event(model.gpu.index or 0)
        load_stream.synchronize()
        return _StagedOnDevice(groups, copied, whole)

    def swap_weights(self, model: DeviceModel, staged: StagedWeights) -> asyncio.Future[None]:
        assert isinstance(model, CudaModel) and isinstance(staged, _StagedOnDevice)
        stream, drv = model.stream, driver.the_driver()

        def copy() -> None:
            # On the model's stream, where its batches run in the order launched: between two of them
            if staged.whole is not None:
                packed, values = staged.whole
                with drv.on_device(model.gpu.index or 0):  # (the raw call: no torch context to enter)
                    drv.memcpy_async(packed.buffer.data_ptr(), values.data_ptr(), values.numel(), stream.cuda_stream)
            else:
                with torch.cuda.device(model.gpu), torch.cuda.stream(stream):
                    staged.copy()
            staged.copied.record(stream.cuda_stream)

        model.weights_version += 1
        if model.graphs:  # its batches are enqueued on the loop, as this is: now is between two of them
            copy()
            return self._bridge.wait(staged.copied, queue=stream.cuda_stream)
        return asyncio.ensure_future(self._copy_off_loop(copy, staged))

    async def _copy_off_loop(self, copy: Callable[[], None], staged: _StagedOnDevice) -> None:
        """An eager model's batches are enqueued by the launcher thread, in the order launched (``_compute_off_loop``):
        its weights' copy is enqueued there too, after the batches launched before it and before those after."""
        await self._loop.run_in_executor(self._launcher, copy)
        await self._bridge.wait(staged.copied)

    def _spares(self, device: int, share: Share | None) -> list[ModelStreams]:
        """The idle streams for a model on ``device``, in ``share`` if it has one."""
        return self._spare_streams.setdefault(device if share is None else share.context, [])

    def launch(self, model: DeviceModel, slots: list[Slot], expected_s: float = 0.0) -> BatchRun:
        assert isinstance(model, CudaModel) and self._host is not None and model.buffers is not None
        if model.addresses is not None:
            return self._launch_replay(model, slots, expected_s)
        n = len(slots)
        if self.trace is not None:
            self._mark_epoch(model.device)
        buffers = model.buffers.take()
        queued = False
        try:
            self._stage(model, slots, buffers, n)
            queued = True
            if model.graphs:
                self._enqueue_compute(model, buffers, n)
        except Exception:
            self._failed_launch(model, buffers, queued)
            raise
        # Waited on in the order recorded (the copy before the compute), as the bridge's queues take them.
        copied = self._bridge.wait(buffers.copied, queue=self._copy_stream(model).cuda_stream)
        run, deliver = self._run(model, buffers, n, copied)
        if model.graphs:
            self._bridge.notify(buffers.done, deliver, expected_s, queue=model.stream.cuda_stream)
        else:
            asyncio.ensure_future(self._compute_off_loop(model, buffers, n)).add_done_callback(
                lambda f: deliver(asyncio.CancelledError() if f.cancelled() else f.exception())
            )
        return run

    @staticmethod
    def _failed_launch(model: CudaModel, buffers: BatchBuffers, queued: bool) -> None:
        """A launch raised: its set goes back if it was refused before anything was queued (the offset checks
        come first; a failed gather launch leaves its writes ahead of the next batch's on the copy stream),
        else it is held, never reused: the device may still write it."""
        assert model.buffers is not None
        (model.buffers.hold if queued else model.buffers.give_back)(buffers)

    def _stage(self, model: CudaModel, slots: list[Slot], buffers: BatchBuffers, n: int) -> None:
        """Copy the frames from their ring slots into ``buffers.staged`` (device) on the copy stream, then
        record ``buffers.copied``."""
        nbytes = model.spec.frame_nbytes
        copy_stream = self._copy_stream(model)
        staged = buffers.staged[:n]
        assert self._host is not None
        if self.use_kernels and nbytes < COPY_ENGINE_FROM:  # the stream is explicit: no torch context to enter
            kernels.gather_frames(self._host, [slot.offset for slot in slots], nbytes, staged, copy_stream)
        else:
            with torch.inference_mode(), torch.cuda.device(model.gpu), torch.cuda.stream(copy_stream):
                for i, slot in enumerate(slots):
                    staged[i].copy_(self._host[slot.offset : slot.offset + nbytes], non_blocking=True)
        buffers.copied.record(copy_stream.cuda_stream)

    def _copy_stream(self, model: CudaModel) -> torch.cuda.Stream:
        return model.streams.copy or self.copy_streams[model.device]

    def _launch_replay(self, model: CudaModel, slots: list[Slot], expected_s: float) -> BatchRun:
        """A batch of a one-replay model (``CudaModel.capture``): its frame addresses to the device,
        one graph replay, its results back, all on the model's stream (the hot path: no torch
        context is entered)."""
        assert model.buffers is not None and model.addresses is not None and self._host is not None
        n = len(slots)
        if self.trace is not None:
            self._mark_epoch(model.device)
        graph = model.graph_for[n]
        buffers = model.buffers.take()
        table = buffers.address_table
        table[0] = n
        stream = model.stream.cuda_stream
        gathered = model.in_flight or not model.reads_ring
        queued = False
        try:
            if gathered:
                # Another batch of this model is on the GPU: copy this one into device memory on the copy
                # stream now, overlapping that batch, and let the graph read it there. (Frames too large to
                # read well from inside the graph always go this way: see ``CudaModel.reads_ring``.)
                # ``started`` comes before the wait, as it comes before the ring reads on the other way, so
                # that the device time the scheduler learns from is measured alike on both.
                self._stage(model, slots, buffers, n)
                queued = True
                buffers.started.record(stream)
                driver.the_driver().wait_event(stream, buffers.copied)
                table[1 : n + 1] = buffers.staged_rows[:n]
            else:
                # Nothing of it on the GPU, so nothing to overlap a copy with: the graph reads the frames
                # straight from the page-locked ring, and the slots are read once the batch is done.
                offsets = table[1 : n + 1]
                offsets[:] = [slot.offset for slot in slots]
                # What the ring slots give the device to read.
                kernels.check_offsets(offsets, model.spec.frame_nbytes, self._host.numel())
                offsets += self._host_address
                queued = True
                buffers.started.record(stream)
            downloads = [
                (host.data_ptr(), out, n * row_nbytes)
                for host, (out, row_nbytes) in zip(buffers.host, graph.outputs, strict=True)
            ]
            upload = (model.addresses.data_ptr(), buffers.addresses.data_ptr(), (n + 1) * 8)
            kernels.enqueue_replay(model.gpu.index or 0, stream, upload, graph.exec_handle, downloads)
            buffers.done.record(stream)
        except Exception:
            self._failed_launch(model, buffers, queued)
            raise
        # Waited on in the order recorded (the copy before the compute), as the bridge's queues take them.
        # Not gathered: the graph reads the slots, so they are free once the batch is done (deliver says so).
        copied = self._bridge.wait(buffers.copied, queue=self._copy_stream(model).cuda_stream) if gathered else None
        run, deliver = self._run(model, buffers, n, copied)
        self._bridge.notify(buffers.done, deliver, expected_s, queue=stream)
        return run

    def _run(
        self, model: CudaModel, buffers: BatchBuffers, n: int, copied: asyncio.Future[None] | None
    ) -> tuple[BatchRun, Done]:
        """The launched batch's ``BatchRun`` (``copied``, or a future ``deliver`` resolves), and ``deliver``:
        what takes its results from ``buffers`` once the batch is done (or failed), called from the bridge's
        poll, so that the batch's frames are answered in the loop iteration that found it done."""
        result: asyncio.Future[BatchOutputs] = self._loop.create_future()
        reads_ring = copied is None  # its copy is its run: its own ``copied``, which ``deliver`` resolves
        copied = self._loop.create_future() if copied is None else copied
        run = BatchRun(n, copied, result)
        model.in_flight += 1
        traced = self.trace is not None  # a batch launched before tracing began has no epoch to be timed from
        weights_version = model.weights_version if traced else 0

        def deliver(error: BaseException | None) -> None:
            model.in_flight -= 1
            failed = error is not None  # then not known to be done on the device
            if isinstance(error, asyncio.CancelledError):
                result.cancel()
                copied.cancel()
            elif error is not None and not result.done():
                result.set_exception(error)
                if reads_ring:  # the same failure (the runner awaits it first); else the bridge asks the copy's event
                    copied.set_exception(error)
                    copied.exception()  # (a copy of ``result``'s error: not logged as never retrieved)
            elif not result.done():
                try:  # a raise here would reach the loop's handler and leave the batch unanswered
                    run.service_s = buffers.started.elapsed_ms(buffers.done) / 1e3  # both complete: no wait
                    # Small (n x outputs): copied so that the buffers go back now (and the results are the
                    # batch's own, as BatchRun says).
                    rows = model.layout.assemble([host[:n].numpy().copy() for host in buffers.host])
                    if traced and self.trace is not None:
                        self._trace(model, n, buffers, weights_version)
                except Exception as exc:
                    result.set_exception(exc)
                else:
                    result.set_result(rows)
            if not failed and not copied.done():
                # ``done`` follows the copy on the device, so the copy is complete; its waiter may not have been
                # asked yet (the bridge asks none behind a stream's first pending event), and the set's next
                # batch would record ``copied`` again under it.
                copied.set_result(None)
            pool = model.buffers  # None: unloaded meanwhile (a shutdown out of time)
            if pool is not None:
                # A failed batch's set is held, never reused: the device may still write it.
                (pool.hold if failed else pool.give_back)(buffers)

        return run, deliver

    def _enqueue_compute(self, model: CudaModel, buffers: BatchBuffers, n: int) -> None:
        """On the model's stream, after the copy: pre-process, run, results back to the host buffer."""
        spec = model.spec
        stream = model.stream.cuda_stream
        with torch.inference_mode(), torch.cuda.device(model.gpu), torch.cuda.stream(model.stream):
            driver.the_driver().wait_event(stream, buffers.copied)
            buffers.started.record(stream)
            rows = model.rows_for(n)  # staged holds max_batch_size rows
            frames = buffers.staged[:rows].view(_torch_dtype(spec.frame_dtype)).view(rows, *spec.input_shape)
            for host, value in zip(buffers.host, model.forward(frames), strict=True):
                host[:n].copy_(value[:n].to(host.dtype), non_blocking=True)  # graphs return these dtypes already
            buffers.done.record(stream)

    async def _compute_off_loop(self, model: CudaModel, buffers: BatchBuffers, n: int) -> None:
        """Eager models: enqueue from the launcher thread, then wait for ``done`` on the loop (only once
        it is recorded: until then it still reads as its previous batch's, or as complete if it has none)."""
        await self._loop.run_in_executor(self._launcher, self._enqueue_compute, model, buffers, n)
        await self._bridge.wait(buffers.done)

    def _mark_epoch(self, device: int) -> None:
        """At the first traced launch on ``device``: record the event trace times count from, on an idle
        stream, before anything of the batch is queued (so before it starts)."""
        if device not in self._trace_epochs:
            epoch = self._trace_epochs[device] = driver.Event(self.gpus[device].index or 0, timing=True)
            epoch.record(self._probes[device].cuda_stream)

    def _trace(self, model: CudaModel, n: int, buffers: BatchBuffers, weights_version: int) -> None:
        """Record when the batch ran, in seconds since the device's epoch (``_mark_epoch``; all complete)."""
        assert self.trace is not None
        epoch = self._trace_epochs[model.device]
        started, ended = epoch.elapsed_ms(buffers.started) / 1e3, epoch.elapsed_ms(buffers.done) / 1e3
        self.trace.append(BatchTrace(model, n, started, ended, weights_version))

    def device_error(self, device: int) -> str | None:
        try:
            self._probes[device].query()  # an idle stream: only a lost context makes this raise
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    def close(self) -> None:
        # A stopped server frees no model (its memory goes with the objects): left counted, the process would
        # never again have "no model loaded", and an unload would never give the cache back by that rule.
        PROCESS_CACHE.dropped(self._loaded)
        self._loaded = 0
        self._bridge.close()
        self._launcher.shutdown(wait=True)  # a launch in progress finishes enqueuing first
        if self._host is not None:
            # Batches still on the devices may read the segment: let them finish before unregistering.
            for device, gpu in enumerate(self.gpus):
                if self.device_error(device) is None:  # a lost context has nothing left to wait for
                    torch.cuda.synchronize(gpu)
            torch.cuda.cudart().cudaHostUnregister(self._host.data_ptr())
            self._host = None


def on_device(module: nn.Module, gpu: torch.device, dtype: torch.dtype) -> nn.Module:
    """``module`` moved to ``gpu`` (floating parameters, buffers and constants in ``dtype``), including
    what ``Module.to`` leaves behind in a torch.export program: its lifted constants (plain tensor
    attributes) and the CPU device written into its graph, by ``_assert_tensor_metadata`` checks (which
    also pin the dtype it was exported in; dropped, they compute nothing) and factory ops' ``device=``."""
    module = module.to(device=gpu, dtype=dtype)
    for sub in module.modules():
        held = set(sub._parameters) | set(sub._buffers)
        for name, value in list(vars(sub).items()):
            if isinstance(value, torch.Tensor) and name not in held:
                setattr(sub, name, value.to(gpu, dtype) if value.is_floating_point() else value.to(gpu))
        if isinstance(sub, torch.fx.GraphModule):
            _retarget_graph(sub, gpu)
    return module


def _retarget_graph(module: torch.fx.GraphModule, gpu: torch.device) -> None:
    def moved(arg: Any) -> Any:
        return gpu if isinstance(arg, torch.device) and arg.type == "cpu" else arg

    graph = module.graph
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten._assert_tensor_metadata.default:
            if not node.users:
                graph.erase_node(node)
            continue
        node.args = torch.fx.node.map_aggregate(node.args, moved)
        node.kwargs = torch.fx.node.map_aggregate(node.kwargs, moved)
    graph.lint()
    module.recompile()


# Integer dtypes and the floating ones of their size whose multi-tensor copy computes in that same type (a load
# and a store: the bits move as they are). Not int16 through float16: torch's half copy computes in float32, and the
# conversions may quiet a signalling NaN's bits. Others are copied one launch each. (The GPU test checks int64's.)
_FLOAT_OF_SIZE = {torch.int64: torch.float64, torch.int32: torch.float32}


def _as_float_bits(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` viewed as floats of its element size if it is of an integer dtype that has one, else itself."""
    float_dtype = _FLOAT_OF_SIZE.get(tensor.dtype)
    return tensor if float_dtype is None else tensor.view(float_dtype)


def _replay_ms(graph: torch.cuda.CUDAGraph, stream: torch.cuda.Stream, reps: int = 20) -> float:
    """Mean milliseconds per replay of ``graph`` on ``stream`` (device time, from events)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.cuda.stream(stream):
        graph.replay()
        start.record(stream)
        for _ in range(reps):
            graph.replay()
        end.record(stream)
    end.synchronize()
    return start.elapsed_time(end) / reps


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype=dtype)).dtype
