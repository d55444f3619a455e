"""The loop never waits for the GPU: ``launch()`` returns at once while the device is busy.

Each variant makes both the copy stream and the model's compute stream busy
for ~0.3 s, then times one ``launch()`` on the loop. A launch that waited for
the device (a pageable host-to-device copy of pre-processing constants, a
cudaMalloc or cudaHostAlloc for buffers, an eager model's kernels launched
from the loop, a model in an SM share whose launches block in its green
context) would take a large part of that time.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import numpy as np
import pytest
import torch

from streamgpu.config import Config
from streamgpu.memory import HostSegment, SlotPool
from streamgpu.models.builtin import build_builtin
from streamgpu.models.preprocess import preprocess_torch
from streamgpu.models.spec import ModelSpec

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

BUSY_CYCLES = 600_000_000  # ~0.3 s of GPU clock
VARIANTS = {
    "graphs, fused kernels": ({"precision": "fp16"}, True),
    "graphs, torch pre-processing, bf16": ({"precision": "bf16"}, False),
    "eager (no graphs)": ({"precision": "fp16", "cuda_graphs": False}, True),
    "eager, torch pre-processing": ({"precision": "fp32", "cuda_graphs": False}, False),
    "graphs, in an SM share": ({"precision": "fp16", "sm_share": 0.5}, True),
}


@pytest.mark.asyncio(loop_factories=["uvloop"])
@pytest.mark.parametrize("variant", list(VARIANTS))
async def test_launch_returns_while_the_gpu_is_busy(variant: str) -> None:
    from streamgpu.gpu.cuda import CudaBackend

    settings, kernels = VARIANTS[variant]
    spec = ModelSpec(source="builtin:resnet18", max_batch_size=8, batch_buckets=(1, 8), **settings)  # type: ignore[arg-type]
    backend = CudaBackend(asyncio.get_running_loop(), Config(device="cuda", cuda_kernels=kernels, models=[spec]))
    segment = HostSegment.create(16 * (spec.frame_nbytes + 256))
    backend.attach_host(segment.buffer)
    pool = SlotPool(segment.buffer)
    model = backend.load(spec, build_builtin("resnet18"))
    frames = np.random.default_rng(5).integers(0, 256, (4, *spec.input_shape), dtype=np.uint8)
    slots = []
    for frame in frames:
        slot = pool.reserve(spec.frame_nbytes)
        assert slot is not None
        pool.array(slot)[:] = frame.reshape(-1)
        slots.append(slot)
    await backend.launch(model, slots).done  # the first batch may load kernels: not timed
    launched_on: list[int] = []  # threads that ran the module's Python (eager models only)
    forward = model.module.forward

    def spy(*args: Any, **kwargs: Any) -> Any:
        launched_on.append(threading.get_ident())
        return forward(*args, **kwargs)

    model.module.forward = spy

    for stream in (backend.copy_streams[model.device], model.stream):
        with torch.cuda.stream(stream):
            torch.cuda._sleep(BUSY_CYCLES)
    busy = torch.cuda.Event()
    busy.record(model.stream)
    runs = []
    for _ in range(2):  # on an idle model, then with its first batch in flight (another path for one-replay models)
        start = time.perf_counter()
        runs.append(backend.launch(model, slots))
        took = time.perf_counter() - start
        assert took < 0.01, f"launch() took {took * 1e3:.1f} ms while the GPU was busy: it waited on the device"
    assert not busy.query(), "the GPU finished its busy work during launch(): the test proves nothing"

    results, again = [await run.done for run in runs]
    assert isinstance(results, np.ndarray) and isinstance(again, np.ndarray)
    np.testing.assert_allclose(again, results, rtol=1e-3, atol=1e-3)  # the same frames, each path
    if not spec.cuda_graphs:  # an eager model's kernel launches are milliseconds of CPU: never on the loop
        assert launched_on and threading.get_ident() not in launched_on
    with torch.inference_mode():
        module = build_builtin("resnet18").cuda().eval()
        expected = module(preprocess_torch(torch.from_numpy(frames).cuda(), spec, torch.float32)).float().cpu()
    err = (torch.linalg.norm(torch.from_numpy(results) - expected) / torch.linalg.norm(expected)).item()
    assert err < (2e-2 if spec.precision == "bf16" else 5e-3), err
    backend.close()
    del pool
    segment.close()
