"""The end-to-end test on a GPU: a real server on the cuda backend over loopback."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from streamgpu import client
from streamgpu.config import Config, ListenerSpec
from streamgpu.gpu.backend import BatchTrace
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


@pytest.mark.asyncio(loop_factories=["uvloop"])
@pytest.mark.parametrize("instances", [1, 2])
async def test_two_instances_run_batches_side_by_side_on_one_gpu(instances: int) -> None:
    """``instances = 2``: two copies of the model on GPU 0, each on streams of its own, so their batches
    overlap on the device (one copy: never), with the results of the direct call."""
    spec = ModelSpec(source="builtin:resnet50", precision="fp16", max_batch_size=4, instances=instances)
    frames = np.random.default_rng(12).integers(0, 256, (192, *spec.input_shape), dtype=np.uint8)
    expected = reference(frames, spec, torch.float16)
    cfg = Config(listeners=[ListenerSpec(port=0)], device="cuda", models=[spec], max_inflight_batches=1)
    async with Server(cfg) as server:
        assert server.backend is not None
        copies = server.serving(spec.name)
        assert copies is not None and len({id(m) for m in copies}) == instances
        trace: list[BatchTrace] = []
        server.backend.trace = trace
        conns = [await client.connect("127.0.0.1", server.port) for _ in range(4)]
        replies = await asyncio.gather(*(conns[i % 4].submit(f, stream_id=i % 8) for i, f in enumerate(frames)))
        for conn in conns:
            await conn.close()
    got = np.stack([r.unwrap() for r in replies])
    err = np.linalg.norm(got - expected) / np.linalg.norm(expected)
    assert err < 3e-2, f"relative error {err:.2e}"
    overlapping = sum(a.start_s < b.start_s < a.end_s for a in trace for b in trace if a.model is not b.model)
    assert {id(b.model) for b in trace} == {id(m) for m in copies}
    assert (overlapping > 0) == (instances > 1), f"{overlapping} batches started while another copy's ran"
