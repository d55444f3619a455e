"""The CPU backend: results, device-measured service time, and a worker faster than submit()."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from streamgpu.config import Config
from streamgpu.gpu.cpu import CpuBackend
from streamgpu.memory import HostSegment, SlotPool
from streamgpu.models.builtin import build_builtin
from streamgpu.models.preprocess import preprocess_torch
from streamgpu.models.spec import ModelSpec
from streamgpu.models.weights import HostWeights, WeightsLayout, write_weights

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


class KeepsItsOutput(torch.nn.Module):
    """Returns one buffer it keeps and writes again at every call (the batch's mean pixel, per frame)."""

    def __init__(self) -> None:
        super().__init__()
        self.out = torch.nn.Buffer(torch.zeros(64, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.out[: len(x)]
        out[:] = x.float().mean(dim=(1, 2, 3)).unsqueeze(1)
        return out


@pytest.mark.asyncio
async def test_a_batchs_results_are_its_own_when_the_module_reuses_its_output() -> None:
    """A batch's results stay as they were once the next batch has run: sinks write them out later, without a
    copy (``BatchRun``), so the backend must not hand out a buffer the module writes again."""
    spec = ModelSpec(input_shape=(2, 2, 1), preprocess="none", max_batch_size=4, batch_buckets=(4,))
    backend = CpuBackend(asyncio.get_running_loop(), Config(device="cpu"))
    host = np.zeros(1 << 16, np.uint8)
    backend.attach_host(host)
    ring = SlotPool(host)
    model = backend.load(spec, KeepsItsOutput())
    results = []
    for value in (10, 20):
        slot = ring.reserve(spec.frame_nbytes)
        assert slot is not None
        ring.array(slot)[:] = value
        run = backend.launch(model, [slot])
        await run.copied
        results.append(await run.done)
        ring.release(slot)
    assert [float(np.asarray(r)[0, 0]) for r in results] == [10.0, 20.0]
    backend.close()


@pytest.mark.asyncio
async def test_new_weights_are_staged_in_memory_of_their_own_paired_with_the_serving_tensors() -> None:
    """Staged from the reader's shared buffer (values in the serving tensors' dtypes and layouts) into memory of
    the backend's own: the buffer goes once staging returns, and the copy at the swap moves values between tensors
    alike (one that converted there could fail halfway through, a model left on a mix of two versions)."""
    backend = CpuBackend(asyncio.get_running_loop(), Config(device="cpu"))
    model = backend.load(dataclasses.replace(SPEC, precision="fp16"), build_builtin("small"))
    state = build_builtin("small").state_dict()
    layout = WeightsLayout.of(model.module)
    segment = HostSegment.create(layout.nbytes)
    shared = range(segment.buffer.ctypes.data, segment.buffer.ctypes.data + layout.nbytes)
    write_weights("m", layout, state, torch.from_numpy(segment.buffer[: layout.nbytes]))
    with segment, HostWeights("m", layout, [], segment.buffer) as new:
        staged = backend.stage_weights(model, new)
    pairs = [pair for live, values in staged.groups for pair in zip(live, values, strict=True)]
    key_of = {t.data_ptr(): key for key, t in model.module.state_dict().items()}
    assert sorted(key_of[t.data_ptr()] for t, _ in pairs) == sorted(key_of.values())  # the serving tensors
    assert all((v.dtype, v.stride()) == (t.dtype, t.stride()) for t, v in pairs)
    assert not any(v.data_ptr() in shared for _, v in pairs)
    assert all(torch.equal(v, state[key_of[t.data_ptr()]].to(v.dtype)) for t, v in pairs)
    backend.close()
