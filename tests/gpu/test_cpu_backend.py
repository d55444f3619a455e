"""The CPU backend: results, device-measured service time, and a worker faster than submit()."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from streamgpu.config import Config
from streamgpu.gpu.cpu import CpuBackend
from streamgpu.memory import SlotPool
from streamgpu.models.builtin import build_builtin
from streamgpu.models.preprocess import preprocess_torch
from streamgpu.models.spec import ModelSpec

SPEC = ModelSpec(input_shape=(16, 16, 3))


class InstantExecutor(concurrent.futures.Executor):
    """Runs the work inside submit(): the worker thread finishing before submit() returns."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:
            future.set_exception(exc)
        return future


@pytest.mark.asyncio
@pytest.mark.parametrize("instant", [False, True])
async def test_batch_results_and_service_time(instant: bool) -> None:
    loop = asyncio.get_running_loop()
    backend = CpuBackend(loop, Config(device="cpu"))
    host = np.zeros(1 << 16, np.uint8)
    backend.attach_host(host)
    ring = SlotPool(host)
    model = backend.load(SPEC, build_builtin("small"))
    if instant:
        model.worker = InstantExecutor()
    frames = np.random.default_rng(3).integers(0, 256, (3, *SPEC.input_shape), dtype=np.uint8)
    slots = []
    for frame in frames:
        slot = ring.reserve(SPEC.frame_nbytes)
        assert slot is not None
        ring.array(slot)[:] = frame.reshape(-1)
        slots.append(slot)
    run = backend.launch(model, slots)
    await run.copied
    results = await run.done
    assert isinstance(results, np.ndarray)
    assert run.service_s is not None and run.service_s > 0
    with torch.inference_mode():
        expected = build_builtin("small")(preprocess_torch(torch.from_numpy(frames), SPEC, torch.float32)).numpy()
    np.testing.assert_allclose(results, expected, rtol=1e-4, atol=1e-4)
    backend.close()
