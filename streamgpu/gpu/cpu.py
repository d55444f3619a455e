"""The CPU backend: the same data path, with the host as the device.

Each model instance has one dedicated worker thread that runs its batches
(never a thread per request), so model compute never blocks the event loop,
and the copies of a model (``ModelSpec.instances``) run batches side by side,
as the scheduler expects of them. The "transfer" is one gather of the
frames out of the ring into a contiguous batch; the slots are released as
soon as it is done, exactly as after a host-to-device copy.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from streamgpu.config import Config
from streamgpu.gpu.backend import Backend, BatchRun, BatchTrace, DeviceModel, StagedWeights
from streamgpu.loops import helper_threads
from streamgpu.memory import Slot
from streamgpu.models.outputs import BatchOutputs, ModelHead, host_dtype, model_input, warm_up
from streamgpu.models.preprocess import TorchPreprocess
from streamgpu.models.spec import ModelSpec
from streamgpu.models.weights import HostWeights


class CpuModel(DeviceModel):
    def __init__(self, spec: ModelSpec, module: nn.Module) -> None:
        self.spec = spec
        self.device = 0
        self.module = module
        self.dtype = torch.float32 if spec.precision in ("auto", "fp32") else _DTYPES[spec.precision]
        if self.dtype != torch.float32:
            self.module = module.to(self.dtype)
        self.head = ModelHead(self.module, spec)
        self.preprocess = TorchPreprocess(spec, self.dtype)
        # Its own thread: in one shared by a model's copies, a copy's batch would wait for another's while the
        # scheduler (its estimates, the watchdog) counts on it running beside them
        self.worker: concurrent.futures.Executor = helper_threads("streamgpu-cpu")

    @property
    def description(self) -> str:
        return f"{self.spec.name} ({self.spec.source}, {self.dtype}, cpu, eager)"

    def tensors(self, batch: np.ndarray, record: bool = False) -> list[torch.Tensor]:
        """The model's outputs (postprocess included) for ``batch``, one row of raw frame bytes per frame;
        ``record``: note their structure (the load's warm-up)."""
        frames = torch.from_numpy(batch.view(self.spec.frame_dtype).reshape(len(batch), *self.spec.input_shape))
        with torch.inference_mode():
            x = self.preprocess(frames)
            return self.head.record(x) if record else self.head(x)

    def run(self, batch: np.ndarray) -> BatchOutputs:
        # Copied: the results are the batch's own (BatchRun), also from a module that returns a buffer it keeps
        return self.layout.assemble([t.to(host_dtype(t.dtype), copy=True).numpy() for t in self.tensors(batch)])


_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class CpuBackend(Backend):
    name = "cpu"
    data_path = "the CPU backend: batches run on the host, in one worker thread per model instance"

    def __init__(self, loop: asyncio.AbstractEventLoop, config: Config) -> None:
        self._loop = loop
        self.devices = ["cpu"]  # one host "device", whatever Config.devices says (those are GPUs)
        self._models: set[CpuModel] = set()  # loaded and not unloaded: their threads end with the backend
        self._pending_copies: set[asyncio.Future[None]] = set()
        self._host: np.ndarray | None = None

    def attach_host(self, buffer: np.ndarray) -> None:
        self._host = buffer  # host memory is the device's: nothing to pin

    def load(self, spec: ModelSpec, module: nn.Module, device: int = 0) -> CpuModel:
        model = CpuModel(spec, module)
        # Every bucket, max_batch_size included: a model that cannot take a batch fails here, not under load.
        warm_up(spec, lambda n: model.tensors(np.zeros((n, spec.frame_nbytes), np.uint8), record=True),
                model_input(spec, model.dtype))  # fmt: skip
        assert model.head.layout is not None
        model.layout = model.head.layout
        self._models.add(model)
        return model

    def unload(self, model: DeviceModel) -> None:
        assert isinstance(model, CpuModel)
        self._models.discard(model)
        model.worker.shutdown(wait=False)  # (no batch of it is in flight)

    swaps_weights_in_place = True

    def stage_weights(self, model: DeviceModel, weights: HostWeights) -> StagedWeights:
        # A copy of its own (the shared buffer goes after this): values already in the live tensors' dtypes and
        # layouts, so the copy at the swap only moves them, and cannot fail halfway through
        pairs = weights.pairs(model.module, weights.buffer.clone())
        return StagedWeights.by_dtype([live for live, _ in pairs], [value for _, value in pairs])

    def swap_weights(self, model: DeviceModel, staged: StagedWeights) -> asyncio.Future[None]:
        assert isinstance(model, CpuModel)
        model.weights_version += 1
        # The model's one thread runs its batches in the order launched: the copy comes between two of them
        return asyncio.wrap_future(model.worker.submit(staged.copy), loop=self._loop)

    def launch(self, model: DeviceModel, slots: list[Slot], expected_s: float = 0.0) -> BatchRun:
        assert isinstance(model, CpuModel) and self._host is not None
        loop = self._loop
        copied: asyncio.Future[None] = loop.create_future()
        self._pending_copies.add(copied)
        copied.add_done_callback(self._pending_copies.discard)
        host = self._host
        views = [host[slot.offset : slot.offset + slot.nbytes] for slot in slots]
        # Created before the work is submitted: the worker may finish before submit() returns.
        run = BatchRun(len(slots), copied, loop.create_future())

        trace = self.trace
        weights_version = model.weights_version

        def work() -> BatchOutputs:
            started = time.perf_counter()
            try:
                batch = np.stack(views)
            except BaseException as exc:
                loop.call_soon_threadsafe(_settle, copied, exc)
                raise
            loop.call_soon_threadsafe(_settle, copied, None)
            result = model.run(batch)
            ended = time.perf_counter()
            run.service_s = ended - started  # set before done resolves on the loop
            if trace is not None:
                trace.append(BatchTrace(model, len(views), started, ended, weights_version))  # list.append: thread-safe
            return result

        asyncio.wrap_future(model.worker.submit(work), loop=loop).add_done_callback(
            functools.partial(_forward, run.done)
        )
        return run

    def close(self) -> None:
        while self._models:  # (a load the server stopped waiting for may still add one, in the loader thread)
            self._models.pop().worker.shutdown(wait=False, cancel_futures=True)
        for copied in list(self._pending_copies):  # work that will never start: nobody waits forever
            copied.cancel()
        self._host = None  # the ring can be unmapped (a copy still running holds a view of its own)


def _forward(target: asyncio.Future[BatchOutputs], source: asyncio.Future[BatchOutputs]) -> None:
    if target.done():
        return
    if source.cancelled():
        target.cancel()
    elif (exc := source.exception()) is not None:
        target.set_exception(exc)
    else:
        target.set_result(source.result())


def _settle(future: asyncio.Future[Any], error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
