"""Run frames through ``CudaBackend.launch`` from a page-locked ring, as the server does."""

from __future__ import annotations

import numpy as np

from streamgpu.gpu.cuda import CudaBackend, CudaModel
from streamgpu.memory import HostSegment, Slot, SlotPool
from streamgpu.models.outputs import BatchOutputs


class RingBatches:
    """A ring of ``nbytes`` attached to ``backend``; ``launch`` puts frames in slots and launches them."""

    def __init__(self, backend: CudaBackend, nbytes: int) -> None:
        self.segment = HostSegment.create(nbytes)
        backend.attach_host(self.segment.buffer)
        self.backend = backend
        self.pool = SlotPool(self.segment.buffer)

    def slots(self, frames: np.ndarray) -> list[Slot]:
        slots = []
        for frame in frames:
            slot = self.pool.reserve(frame.nbytes)
            assert slot is not None, "the test ring is too small"
            self.pool.array(slot)[:] = frame.reshape(-1).view(np.uint8)
            slots.append(slot)
        return slots

    async def outputs(self, model: CudaModel, frames: np.ndarray) -> BatchOutputs:
        """One batch of ``frames`` on ``model``; its outputs, one row per frame."""
        slots = self.slots(frames)
        outputs = await self.backend.launch(model, slots).done
        for slot in slots:
            self.pool.release(slot)
        return outputs

    async def run(self, model: CudaModel, frames: np.ndarray) -> np.ndarray:
        """One batch of ``frames`` on a model with one output; that output."""
        outputs = await self.outputs(model, frames)
        assert isinstance(outputs, np.ndarray)
        return outputs

    def close(self) -> None:
        """After ``backend.close()``: free the ring."""
        del self.pool
        self.segment.close()
