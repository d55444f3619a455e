"""Controlled spatial sharing on a GPU: a model given a share of the SMs runs its CUDA graphs on that
share alone (slower alone, by about the share), with the same results."""

from __future__ import annotations

import asyncio

import pytest
import torch

from streamgpu.config import Config
from streamgpu.gpu.cuda import CudaBackend, _replay_ms
from streamgpu.models.builtin import build_builtin
from streamgpu.models.spec import ModelSpec

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_a_shared_model_runs_on_its_share_of_the_sms() -> None:
    backend = CudaBackend(asyncio.get_running_loop(), Config(device="cuda"))
    frames = torch.randint(0, 256, (32, 224, 224, 3), dtype=torch.uint8, device="cuda")
    times, outs = {}, {}
    for share in (0.0, 0.125):
        spec = ModelSpec(source="builtin:resnet50", precision="fp16", batch_buckets=(32,), max_batch_size=32,
                         compile="off", sm_share=share)  # fmt: skip
        model = backend.load(spec, build_builtin("resnet50"))
        assert model.graphs, model.description
        times[share] = min(_replay_ms(model.graphs[32].graph, model.stream) for _ in range(3))
        with torch.cuda.stream(model.stream), torch.inference_mode():
            outs[share] = model.forward(frames)[0].float().clone()
        model.stream.synchronize()
        if share:
            assert f"{model.share_sms} SMs of" in model.description and model.share_sms == 16, model.description
    # 16 of 132 SMs: far slower than the whole GPU (a graph captured outside the share would not be).
    assert times[0.125] > 2 * times[0.0], times
    err = (torch.linalg.norm(outs[0.125] - outs[0.0]) / torch.linalg.norm(outs[0.0])).item()
    assert err < 1e-2, err
    backend.close()
