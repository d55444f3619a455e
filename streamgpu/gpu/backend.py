"""The device backend interface, and picking one by name (``auto``, ``cuda``, ``cpu``).

Everything above this interface (transports, ring, scheduler, replies) is the
same for every backend. A backend owns host memory for the ring, turns a
model module into a ``DeviceModel`` (blocking; called off the loop), and
launches batches asynchronously: ``launch`` returns at once with a
``BatchRun`` whose futures resolve on the loop.
"""

from __future__ import annotations

import abc
import asyncio
import logging
from dataclasses import dataclass

import numpy as np
from torch import nn

from streamgpu.memory import PinnedRing, Slot
from streamgpu.models.spec import ModelSpec

log = logging.getLogger(__name__)

BACKENDS = ("auto", "cuda", "cpu")


@dataclass(eq=False)
class BatchRun:
    """One launched batch.

    ``copied`` resolves once the frames' ring slots have been read (they may be
    released then); ``done`` resolves with the host results, one row per frame.
    ``service_s`` is set before ``done`` resolves: how long the device spent on
    the batch (pre-processing + model + results back), measured on the device.
    """

    size: int
    copied: asyncio.Future[None]
    done: asyncio.Future[np.ndarray]
    service_s: float | None = None


class DeviceModel(abc.ABC):
    """A model placed on a backend's device, ready to run batches."""

    spec: ModelSpec

    @property
    @abc.abstractmethod
    def description(self) -> str:
        """One line for logs: precision, graphs, device."""


class Backend(abc.ABC):
    """A place to run models: ``cuda`` (torch + cupy) or ``cpu``."""

    name: str
    device_name: str

    @abc.abstractmethod
    def allocate_host(self, nbytes: int) -> np.ndarray:
        """A 1-D uint8 host buffer for the ring (page-locked where that helps DMA)."""

    @abc.abstractmethod
    def load(self, spec: ModelSpec, module: nn.Module) -> DeviceModel:
        """Place, convert and warm a model (graph capture included). Blocking: call off the loop."""

    @abc.abstractmethod
    def launch(self, model: DeviceModel, ring: PinnedRing, slots: list[Slot], expected_s: float = 0.0) -> BatchRun:
        """Start one batch over the frames in ``slots``; returns at once, never blocks the loop.

        ``expected_s`` is the scheduler's estimate of when the batch completes
        (seconds from now), so completion can be awaited without spinning.
        """

    @abc.abstractmethod
    def close(self) -> None:
        """Release the backend's threads and handles (pending futures are cancelled)."""


def cuda_usable() -> bool:
    """Whether a CUDA device can actually be used (not just whether torch was built with CUDA)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return False
        torch.cuda.init()
        return torch.cuda.device_count() > 0
    except Exception as exc:  # a broken driver raises here: treat as no GPU, say why
        log.info("CUDA not usable: %s", exc)
        return False


def create_backend(
    name: str, loop: asyncio.AbstractEventLoop, device_index: int = 0, cuda_kernels: bool = True
) -> Backend:
    """The backend called ``name``; ``auto`` is cuda when a GPU is usable, else cpu.

    ``cuda_kernels=False`` makes the cuda backend use per-frame copies and torch ops
    instead of streamgpu's cupy kernels.
    """
    if name not in BACKENDS:
        raise ValueError(f"device must be one of {BACKENDS}, got {name!r}")
    if name == "auto":
        name = "cuda" if cuda_usable() else "cpu"
    if name == "cuda":
        if not cuda_usable():
            raise RuntimeError("device 'cuda' requested but no usable CUDA device was found (use --device cpu)")
        from streamgpu.gpu.cuda import CudaBackend

        return CudaBackend(loop, device_index, cuda_kernels)
    from streamgpu.gpu.cpu import CpuBackend

    return CpuBackend(loop)
