"""Pre-processing in plain torch ops: the CPU path, the CUDA path without cupy, and the reference
for the fused CUDA kernel."""

from __future__ import annotations

import torch

from streamgpu.models.spec import ModelSpec


class TorchPreprocess:
    """Turns a batch of frames ``[N, *input_shape]`` into the model's input, on ``device``.

    ``image``: uint8 NHWC -> ``(x/255 - mean) / std`` as float NCHW. ``none``:
    cast floating inputs to ``dtype``. The mean and std tensors are made once,
    here, at load: making them per batch copies from pageable host memory,
    which waits for the device's current stream, i.e. stalls the event loop
    behind running batches.
    """

    def __init__(self, spec: ModelSpec, dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        self.image = spec.preprocess == "image"
        self.dtype = dtype
        self.mean = torch.tensor(spec.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(spec.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        if self.image:
            x = frames.permute(0, 3, 1, 2).to(torch.float32)
            return ((x / 255.0 - self.mean) / self.std).to(self.dtype)
        if frames.is_floating_point():
            return frames.to(self.dtype)
        return frames


def preprocess_torch(frames: torch.Tensor, spec: ModelSpec, dtype: torch.dtype) -> torch.Tensor:
    """One-off ``TorchPreprocess`` (tests and references; servers build theirs once, at load)."""
    return TorchPreprocess(spec, dtype, frames.device)(frames)
