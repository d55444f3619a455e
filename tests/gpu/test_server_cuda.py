"""The end-to-end test on a GPU: a real server on the cuda backend over loopback."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from streamgpu import client
from streamgpu.config import Config, ListenerSpec
from streamgpu.models.builtin import build_builtin
from streamgpu.models.preprocess import preprocess_torch
from streamgpu.models.spec import ModelSpec
from streamgpu.server import Server

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def reference(frames: np.ndarray, spec: ModelSpec, dtype: torch.dtype) -> np.ndarray:
    """The model called directly on the same input, on the GPU, in the served precision."""
    module = build_builtin(spec.source.split(":")[1]).cuda().to(dtype)
    with torch.inference_mode():
        x = preprocess_torch(torch.from_numpy(frames).cuda(), spec, dtype)
        return module(x).float().cpu().numpy()


@pytest.mark.asyncio(loop_factories=["uvloop"])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
async def test_1000_frames_over_8_streams_match_the_direct_call(precision: str) -> None:
    spec = ModelSpec(precision=precision)
    frames = np.random.default_rng(11).integers(0, 256, (1024, *spec.input_shape), dtype=np.uint8)
    dtype = torch.float32 if precision == "fp32" else torch.float16
    expected = reference(frames, spec, dtype)
    async with Server(Config(listeners=[ListenerSpec(port=0)], device="cuda", models=[spec])) as server:
        conns = [await client.connect("127.0.0.1", server.port) for _ in range(4)]
        futs = [conns[i % 4].submit(f, stream_id=i % 8) for i, f in enumerate(frames)]
        replies = await asyncio.gather(*futs)
        for conn in conns:
            await conn.close()
        assert server.pool.slots_in_use == 0
        batch_sizes = server.metrics()["models"]["default"]["batch_sizes"]
    got = np.stack([r.unwrap() for r in replies])
    assert all(r.ok for r in replies)
    tol = 1e-3 if precision == "fp32" else 3e-2  # fp16 / different batch-size kernels
    err = np.linalg.norm(got - expected) / np.linalg.norm(expected)
    assert err < tol, f"relative error {err:.2e} (batch sizes {batch_sizes})"
    assert max(batch_sizes) > 1
