"""Pre-processing in plain torch ops: the CPU path and the reference for the fused CUDA kernel."""

from __future__ import annotations

import torch

from streamgpu.models.spec import ModelSpec


def preprocess_torch(frames: torch.Tensor, spec: ModelSpec, dtype: torch.dtype) -> torch.Tensor:
    """Turn a batch of frames ``[N, *input_shape]`` into the model's input.

    ``image``: uint8 NHWC -> ``(x/255 - mean) / std`` as float NCHW (channels-last
    memory, which convolutions prefer). ``none``: cast floating inputs to ``dtype``.
    """
    if spec.preprocess == "image":
        mean = torch.tensor(spec.mean, dtype=torch.float32, device=frames.device).view(1, -1, 1, 1)
        std = torch.tensor(spec.std, dtype=torch.float32, device=frames.device).view(1, -1, 1, 1)
        x = frames.permute(0, 3, 1, 2).to(torch.float32)
        return ((x / 255.0 - mean) / std).to(dtype)
    if frames.is_floating_point():
        return frames.to(dtype)
    return frames
