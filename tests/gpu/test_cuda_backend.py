"""The CUDA backend on a GPU: graph replay against eager, and slot lifetimes against copy events."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from streamgpu import client
from streamgpu.config import Config
from streamgpu.gpu.cuda import CudaBackend
from streamgpu.models.builtin import build_builtin
from streamgpu.models.spec import ModelSpec
from streamgpu.server import Server

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.asyncio(loop_factories=["uvloop"])
@pytest.mark.parametrize("n", [1, 3, 8])
async def test_graph_replay_matches_eager_on_fresh_random_frames(n: int) -> None:
    spec = ModelSpec(source="builtin:resnet18", precision="fp32", batch_buckets=(1, 4, 8), max_batch_size=8)
    backend = CudaBackend(asyncio.get_running_loop())
    model = backend.load(spec, build_builtin("resnet18"))
    assert model.graphs, model.description
    frames = torch.randint(0, 256, (n, *spec.input_shape), dtype=torch.uint8, device="cuda")
    with torch.cuda.stream(model.stream), torch.inference_mode():
        replayed = model.forward(frames).float().clone()  # bucket 1, 4 (padded) or 8
        eager = model.module(model.prepare_input(frames)).float()
    model.stream.synchronize()
    err = (torch.linalg.norm(replayed - eager) / torch.linalg.norm(eager)).item()
    assert err < 1e-4, err
    backend.close()


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_no_slot_is_released_before_its_copy_completed() -> None:
    spec = ModelSpec(input_shape=(64, 64, 3), max_batch_size=4)
    async with Server(Config(port=0, device="cuda", models=[spec])) as server:
        backend = server.backend
        assert isinstance(backend, CudaBackend)
        conn = await client.connect("127.0.0.1", server.port)
        frames = np.random.default_rng(1).integers(0, 256, (4, *spec.input_shape), dtype=np.uint8)
        # Hold the copy stream behind ~1 s of matrix products on another stream.
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            a = torch.randn(8192, 8192, device="cuda")
            for _ in range(60):
                torch.mm(a, a)
            gate = torch.cuda.Event()
            gate.record(side)
        backend.copy_stream.wait_event(gate)
        held = torch.cuda.Event()
        held.record(backend.copy_stream)
        futs = [conn.submit(f, stream_id=i) for i, f in enumerate(frames)]
        await asyncio.sleep(0.2)
        assert not held.query(), "the copy stream was not held: the test proves nothing"
        assert server.ring.slots_in_use == 4  # the copies cannot have run yet, so every slot is still held
        replies = await asyncio.gather(*futs)
        assert all(r.ok for r in replies)
        assert server.ring.slots_in_use == 0
        await conn.close()
