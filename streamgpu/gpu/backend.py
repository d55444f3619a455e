"""The device backend interface, and building one from the config (``auto``, ``cuda``, ``cpu``).

Everything above this interface (listeners, slots, scheduler, replies) is the
same for every backend. A backend pins the host memory frames land in
(``attach_host``), turns a model module into a ``DeviceModel`` (blocking;
called off the loop), and launches batches asynchronously: ``launch`` returns
at once with a ``BatchRun`` whose futures resolve on the loop.
"""

from __future__ import annotations

import abc
import asyncio
import importlib
import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from streamgpu.config import Config
from streamgpu.errors import ConfigError, DeviceUnavailableError
from streamgpu.gpu import BACKENDS
from streamgpu.memory import Slot
from streamgpu.models.outputs import BatchOutputs, OutputLayout
from streamgpu.models.spec import ModelSpec
from streamgpu.models.weights import HostWeights

log = logging.getLogger(__name__)


@dataclass(eq=False)
class BatchRun:
    """One launched batch.

    ``copied`` resolves once the frames' slots have been read (they may be
    released then); ``done`` resolves with the host results, one row per frame
    (one array, or a tuple or dict of arrays for a model with several outputs),
    the batch's own: the backend never writes them again (sinks may write them
    out later without a copy).
    ``service_s`` is set before ``done`` resolves: how long the device spent on
    the batch (pre-processing + model + results back), measured on the device.
    """

    size: int
    copied: asyncio.Future[None]
    done: asyncio.Future[BatchOutputs]
    service_s: float | None = None


@dataclass(frozen=True, slots=True)
class BatchTrace:
    """When one batch ran on the device (seconds on the backend's own clock): kept only while tracing."""

    model: DeviceModel
    size: int
    start_s: float
    end_s: float
    weights_version: int = 0  # the model's ``weights_version`` when the batch was launched


@dataclass(eq=False)
class StagedWeights:
    """A new version's weights beside a serving model's (``Backend.stage_weights``), by dtype: in each group
    ``live[i]`` takes ``staged[i]``'s values at the swap, ``staged`` on the model's device in ``live``'s dtype and
    layout. (One dtype a group: ``torch._foreach_copy_`` copies a list in a few launches only then, one launch a
    tensor otherwise, milliseconds on the loop for a ResNet-50.)"""

    groups: list[tuple[list[torch.Tensor], list[torch.Tensor]]]

    @classmethod
    def by_dtype(cls, live: list[torch.Tensor], staged: list[torch.Tensor]) -> StagedWeights:
        groups: dict[torch.dtype, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for target, value in zip(live, staged, strict=True):
            group = groups.setdefault(target.dtype, ([], []))
            group[0].append(target)
            group[1].append(value)
        return cls(list(groups.values()))

    def copy(self) -> None:
        """Copy every staged tensor into its live one (on the current stream, for a device's)."""
        with torch.inference_mode():  # the weights were made in it (a load), and only there take in-place writes
            for live, staged in self.groups:
                torch._foreach_copy_(live, staged)


class DeviceModel(abc.ABC):
    """A model placed on one of a backend's devices, ready to run batches."""

    spec: ModelSpec
    module: nn.Module  # what its batches run (its weights: ``Backend.stage_weights``)
    layout: OutputLayout = OutputLayout("tensor")  # the structure of its outputs, known after the load
    device: int  # position in ``Backend.devices``
    sms: int | None = None  # streaming multiprocessors its kernels may use (a GPU's share); None: not a GPU
    # In-place swaps so far (``Backend.swap_weights``): with the model object, which weights a batch ran on
    weights_version: int = 0

    @property
    @abc.abstractmethod
    def description(self) -> str:
        """One line for logs: precision, graphs, device."""


class Backend(abc.ABC):
    """A place to run models, built with ``(loop, config)`` (see ``create_backend``)."""

    name: str
    # A list to append one BatchTrace per completed batch to (benchmarks: the GPU idle gap at a
    # swap); None, the default, costs nothing per batch.
    trace: list[BatchTrace] | None = None
    devices: list[str]  # one name per device batches can be placed on ("cuda:0 (NVIDIA H100 ...)")
    data_path: str = ""  # how frames reach the model, and why this way (logged at start)

    @property
    def device_name(self) -> str:
        """The devices, for logs."""
        return ", ".join(self.devices)

    @abc.abstractmethod
    def __init__(self, loop: asyncio.AbstractEventLoop, config: Config) -> None: ...

    @abc.abstractmethod
    def attach_host(self, buffer: np.ndarray) -> None:
        """Use ``buffer`` (the 1-D uint8 host segment that slots address) for every launch.

        The cuda backend page-locks it (cudaHostRegister) so the device reads it
        directly. Blocking: call off the loop, once, before the first launch.
        """

    @abc.abstractmethod
    def load(self, spec: ModelSpec, module: nn.Module, device: int = 0) -> DeviceModel:
        """Place, convert and warm a model on ``devices[device]`` (graph capture included).

        Blocking: call off the loop. ``module`` becomes the device's (it may be moved in place):
        load a fresh one per device.
        """

    def unload(self, model: DeviceModel) -> None:  # noqa: B027 - optional: a backend may leave it to the GC
        """Free what ``model`` holds on the device, once no batch of it is in flight. Blocking: call off the loop."""

    @abc.abstractmethod
    def launch(self, model: DeviceModel, slots: list[Slot], expected_s: float = 0.0) -> BatchRun:
        """Start one batch over the frames in ``slots``; returns at once, never blocks the loop.

        ``expected_s`` is the scheduler's estimate of when the batch completes
        (seconds from now), so completion can be awaited without spinning.
        """

    # Whether a new version of a serving model's architecture can take its weights in place (below)
    swaps_weights_in_place: bool = False

    def stage_weights(self, model: DeviceModel, weights: HostWeights) -> StagedWeights:
        """A copy of ``weights`` (a new version's, in host memory, each value in its live tensor's dtype and layout:
        ``models.weights.WeightsReader``) on ``model``'s device, paired with ``model``'s tensors, for
        ``swap_weights``. Once it returns ``weights`` may go. Blocking: call off the loop (the loader thread)."""
        raise NotImplementedError(f"the {self.name} backend swaps no weights in place")

    def swap_weights(self, model: DeviceModel, staged: StagedWeights) -> asyncio.Future[None]:
        """On the loop, between two batches: copy ``staged`` into ``model``'s weights, after every batch of it
        launched so far and before any launched later (none runs on a mix of the two), and count
        ``model.weights_version`` up. The future resolves once the copy is done (``staged`` may go then)."""
        raise NotImplementedError(f"the {self.name} backend swaps no weights in place")

    def memory(self) -> dict[str, dict[str, int]]:
        """Per device name: memory in bytes, ``allocated``, ``reserved``, ``total`` (empty: none to report)."""
        return {}

    def device_error(self, device: int) -> str | None:
        """Why ``devices[device]`` can run nothing more (a sticky error: its context is lost), or None.

        Asked after a batch failed; never blocks.
        """
        return None

    @abc.abstractmethod
    def close(self) -> None:
        """Release the backend's threads, handles and host registration (pending futures are cancelled)."""


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


def create_backend(loop: asyncio.AbstractEventLoop, config: Config) -> Backend:
    """The backend ``config.device`` names; ``auto`` is cuda when a GPU is usable, else cpu."""
    name = config.device
    if name == "auto":
        name = "cuda" if cuda_usable() else "cpu"
        if name == "cpu" and config.devices != (0,):  # GPUs asked for by index: not served on the host unsaid
            raise DeviceUnavailableError(
                f"devices {list(config.devices)} name GPUs, but no usable CUDA device was found: serve on a GPU "
                "machine, or on the CPU with device = 'cpu' (--device cpu)"
            )
    elif name == "cuda" and not cuda_usable():
        raise DeviceUnavailableError("device 'cuda' requested but no usable CUDA device was found (use --device cpu)")
    try:
        module, _, cls_name = BACKENDS[name].partition(":")
    except KeyError:
        raise ConfigError(f"device must be one of {['auto', *BACKENDS]}, got {name!r}") from None
    cls: type[Backend] = getattr(importlib.import_module(module), cls_name)
    return cls(loop, config)
