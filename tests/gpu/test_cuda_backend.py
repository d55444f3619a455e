"""The CUDA backend on a GPU: graph replay against eager, and slot lifetimes against copy events."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from streamgpu import client
from streamgpu.config import Config, ListenerSpec
from streamgpu.gpu import cuda, kernels
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
    spec = ModelSpec(source="builtin:resnet18", precision="fp32", batch_buckets=(1, 4, 8), max_batch_size=8,
                     compile="off")  # fmt: skip
    backend = CudaBackend(asyncio.get_running_loop(), Config(device="cuda"))
    model = backend.load(spec, build_builtin("resnet18"))
    assert model.graphs, model.description
    frames = torch.randint(0, 256, (n, *spec.input_shape), dtype=torch.uint8, device="cuda")
    with torch.cuda.stream(model.stream), torch.inference_mode():
        replayed = model.forward(frames)[0].float().clone()  # bucket 1, 4 (padded) or 8
        eager = model.module(model.prepare_input(frames)).float()
    model.stream.synchronize()
    err = (torch.linalg.norm(replayed - eager) / torch.linalg.norm(eager)).item()
    assert err < 1e-4, err
    backend.close()


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_no_slot_is_released_before_its_copy_completed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The delay sits inside the copy: the gather itself is held ~1 s behind a sleep kernel on the copy
    stream. An implementation that recorded its copy event before the gather (or released slots on
    launch) frees the slots at once and fails here; gating the stream before the launch would not."""
    spec = ModelSpec(input_shape=(64, 64, 3), max_batch_size=4)
    real_gather = kernels.gather_frames
    copies_started: list[torch.cuda.Event] = []

    def slow_gather(
        ring: torch.Tensor, offsets: list[int], nbytes: int, out: torch.Tensor, stream: torch.cuda.Stream
    ) -> None:
        with torch.cuda.stream(stream):
            started = torch.cuda.Event()
            started.record(stream)
            copies_started.append(started)
            torch.cuda._sleep(2_000_000_000)  # ~1 s of GPU cycles before the slots are read
        real_gather(ring, offsets, nbytes, out, stream)

    monkeypatch.setattr(cuda.kernels, "gather_frames", slow_gather)
    # The copy is held back for a second or more: not a batch the watchdog should answer.
    config = Config(listeners=[ListenerSpec(port=0)], device="cuda", models=[spec], watchdog_min_s=60)
    async with Server(config) as server:
        backend = server.backend
        assert isinstance(backend, CudaBackend) and backend.use_kernels, "needs cupy: the gather kernel path"
        conn = await client.connect("127.0.0.1", server.port)
        frames = np.random.default_rng(1).integers(0, 256, (4, *spec.input_shape), dtype=np.uint8)
        futs = [conn.submit(f, stream_id=i) for i, f in enumerate(frames)]
        await asyncio.sleep(0.3)
        assert copies_started and copies_started[0].query(), "no copy was launched: the test proves nothing"
        assert server.pool.slots_in_use == 4  # the gather has not read them yet, so every slot is still held
        replies = await asyncio.gather(*futs)
        assert all(r.ok for r in replies)
        assert server.pool.slots_in_use == 0
        await conn.close()


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_a_compiled_model_serves_what_the_uncompiled_one_does() -> None:
    backend = CudaBackend(asyncio.get_running_loop(), Config(device="cuda"))
    frames = torch.randint(0, 256, (8, 224, 224, 3), dtype=torch.uint8, device="cuda")
    outs = {}
    for mode in ("off", "on", "auto"):
        spec = ModelSpec(source="builtin:resnet18", precision="fp16", batch_buckets=(1, 8), max_batch_size=8,
                         compile=mode)  # fmt: skip
        model = backend.load(spec, build_builtin("resnet18"))
        assert model.graphs and model.compile_note.startswith({"off": "not", "on": "compiled", "auto": ""}[mode])
        assert model.description.count("compiled") == 1, model.description  # says which, and for auto why
        with torch.cuda.stream(model.stream), torch.inference_mode():
            outs[mode] = model.forward(frames)[0].float().clone()
        model.stream.synchronize()
    for mode in ("on", "auto"):
        err = (torch.linalg.norm(outs[mode] - outs["off"]) / torch.linalg.norm(outs["off"])).item()
        assert err < 1e-2, (mode, err)  # fp16: different kernels, same model
    backend.close()
