"""Models while serving on the cuda backend: swaps under a streaming producer (graphs captured beside the
serving version, or new weights copied into the serving one), memory back after unload, several outputs and
top-k from CUDA graphs, a static batch refused."""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from streamgpu import client
from streamgpu.config import Config, ListenerSpec
from streamgpu.errors import ModelLoadError
from streamgpu.models.builtin import SmallConvNet
from streamgpu.models.preprocess import preprocess_torch
from streamgpu.models.spec import ModelSpec
from streamgpu.server import Server

sys.path.insert(0, str(Path(__file__).parent.parent))  # the CPU tests' helpers, whatever pytest's import mode
from test_lifecycle import (
    FEATURES,
    Detector,
    Linear,
    Producer,
    export,
    frames,
    spec,
    tensor_spec,
    value,
    versioned,
)  # fmt: skip

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


TICK_S = 2e-4


def config(*models: ModelSpec) -> Config:
    return Config(listeners=[ListenerSpec(port=0)], device="cuda", models=list(models))


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_swaps_under_load_lose_nothing_and_unload_gives_the_memory_back(tmp_path: Path) -> None:
    async with Server(config(spec(versioned(tmp_path, 1), precision="fp32"))) as srv:
        conn = await client.connect("127.0.0.1", srv.port)
        producer = Producer(conn, window=16)
        task = asyncio.create_task(producer.run())
        await asyncio.sleep(0.2)
        for version in (2, 3, 4):
            await srv.swap_model("m", spec(versioned(tmp_path, version), precision="fp32"))
            await asyncio.sleep(0.1)
        producer.running = False
        await task
        for replies in producer.replies.values():
            values = [value(r) for r in replies]
            assert values == sorted(values) and set(values) == {1.0, 2.0, 3.0, 4.0}
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        await srv.load_model(spec("builtin:resnet18", name="extra", arch=""))
        assert torch.cuda.memory_allocated() > before + (5 << 20)
        await srv.unload_model("extra")
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() <= before * 1.01
        await conn.close()


def random_weights(tmp: Path, seed: int) -> tuple[str, nn.Module]:
    """A ``state_dict:`` source of the small net whose every tensor is random (batch-norm statistics too: a
    tensor the swap missed would show), and the module."""
    torch.manual_seed(seed)
    module = SmallConvNet().eval()
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, nn.BatchNorm2d):
                assert sub.running_mean is not None and sub.running_var is not None
                assert sub.num_batches_tracked is not None
                sub.running_mean.uniform_(-0.5, 0.5)
                sub.running_var.uniform_(0.5, 1.5)
                sub.weight.uniform_(0.5, 1.5)
                # integers, copied bit for bit through a float view (-1: a NaN's bits as a float64)
                sub.num_batches_tracked.fill_(-1 if seed % 2 else 2**53 + seed)
    path = tmp / f"random{seed}.pt"
    torch.save(module.state_dict(), path)
    return f"state_dict:{path}", module


@pytest.mark.parametrize(
    ("settings", "packed"),
    [({}, True), ({"cuda_graphs": False}, True), ({"compile": "on"}, True), ({}, False)],
    ids=["graphs", "eager (launcher thread)", "compiled graphs", "graphs, weights not packed"],
)
@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_new_weights_copied_in_place_reach_every_batch_after_the_swap_and_none_runs_on_a_mix(
    tmp_path: Path, settings: dict[str, object], packed: bool
) -> None:
    """Each reply under a streaming producer matches one version's eager outputs for its frame whole (a copy
    in the middle of its batch would match neither), versions never go back per stream, and the graphs
    captured with the first weights run the second ones without being captured again. ``packed``: the first
    version is loaded with ``weights_in_place`` too, so its weights lie in one buffer, copied over whole at a
    swap; else they are copied tensor by tensor."""
    sources, modules = zip(*(random_weights(tmp_path, seed) for seed in (1, 2)), strict=True)
    versions = [spec(source, precision="fp32", weights_in_place=True, **settings) for source in sources]
    data = frames(16)  # the producer's
    with torch.inference_mode():
        x = preprocess_torch(torch.from_numpy(data), versions[0], torch.float32)
        expected = [module(x).numpy() for module in modules]
    assert np.abs(expected[0] - expected[1]).max() > 0.5  # the versions tell apart
    async with Server(config(replace(versions[0], weights_in_place=packed))) as srv:
        (model,) = srv.serving("m") or []
        graphs = dict(getattr(model, "graphs", {}))
        conn = await client.connect("127.0.0.1", srv.port)
        producer = Producer(conn, streams=1, window=16)
        task = asyncio.create_task(producer.run())
        await asyncio.sleep(0.3)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        for version in (versions[1], versions[0], versions[1]):
            await srv.swap_model("m", version)
            await asyncio.sleep(0.2)
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() <= before * 1.01  # the staged copies went
        producer.running = False
        await task
        assert srv.serving("m") == [model] and model.weights_version == 3
        assert getattr(model, "graphs", {}) == graphs  # (not captured again)
        served = model.module.state_dict()
        buffer = getattr(model, "packed", None)
        assert (buffer is not None) == packed
        if buffer is not None:  # every tensor the module runs still a view of its one buffer
            span = (buffer.buffer.data_ptr(), buffer.buffer.data_ptr() + buffer.buffer.numel())
            assert all(span[0] <= tensor.data_ptr() < span[1] for tensor in served.values())
        for key, tensor in modules[1].state_dict().items():  # the last version's, every tensor, bits of integers too
            if tensor.dtype == torch.int64:
                assert served[key].item() == tensor.item(), key
            else:
                torch.testing.assert_close(served[key].cpu(), tensor, atol=0, rtol=0, msg=key)
        (replies,) = producer.replies.values()
        producer.check()
        first = replies[0].sequence
        ran_on = []
        for reply in replies:
            assert reply.ok and reply.result is not None, (reply.status, reply.message)
            want = [e[(reply.sequence - first) % 16] for e in expected]
            errors = [float(np.abs(reply.result - w).max()) for w in want]
            assert min(errors) < 2e-2, errors  # one version's outputs whole (TF32 convolutions: not exact)
            ran_on.append(int(np.argmin(errors)))
        changes = [i for i in range(1, len(ran_on)) if ran_on[i] != ran_on[i - 1]]
        assert ran_on[0] == 0 and len(changes) == 3, changes  # 1, 2, 1, 2: each swap once, never back
        await conn.close()


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_a_model_freed_beside_another_holds_none_of_its_launches(tmp_path: Path) -> None:
    # An unload called torch.cuda.empty_cache: its cudaFree waited for the whole device and held every launch
    # meanwhile, the loop's too. At a swap under load that left the GPU idle for 15 ms between the two
    # versions' batches (H100, tools/bench_swap.py). Now memory goes back to the device only when no other model
    # is loaded on it (or the cache grows past CACHED_SHARE of the GPU).
    async with Server(config(spec(versioned(tmp_path, 1), precision="fp32"))) as srv:
        conn = await client.connect("127.0.0.1", srv.port)
        for version in (2, 3, 4, 5, 6):
            await srv.swap_model("m", spec(versioned(tmp_path, version), precision="fp32"))
            assert value(await conn.infer(frames(1)[0], model="m")) == version
        serving = srv.serving("m")
        assert serving is not None and "graphs [" in serving[0].description  # (captured in the cached memory)

        await srv.load_model(spec("builtin:resnet18", name="extra", arch=""))
        busy = torch.cuda.Stream()
        with torch.cuda.stream(busy):  # one block on one SM for ~0.5 s: "m" runs beside it
            torch.cuda._sleep(10**9)
        unloading = asyncio.ensure_future(srv.unload_model("extra"))
        await asyncio.sleep(0.05)  # the unload has started (the loader thread is free)
        started = asyncio.get_running_loop().time()
        reply = await conn.infer(frames(1)[0], model="m")
        took = asyncio.get_running_loop().time() - started
        await unloading
        assert value(reply) == 6
        assert took < 0.2, f"a frame of a serving model took {took * 1e3:.0f} ms while another was freed"
        assert not busy.query()  # (the GPU was still busy when the frame came back)
        torch.cuda.synchronize()
        await conn.close()


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_freeing_a_model_lets_the_loop_run_while_the_driver_destroys_its_graphs(tmp_path: Path) -> None:
    # The last reference to a CUDA graph dropped destroys it in the driver with the GIL held: freeing ResNet-50's
    # graphs on the loader thread held the loop 1.6-2.2 ms at 6 buckets, 8.4-10.4 ms at 32 (H100), against 0.4-0.8 ms
    # now: ``CudaModel.release`` resets each graph first, which gives the GIL up meanwhile.
    async with Server(config(spec(versioned(tmp_path, 1), precision="fp32"))) as srv:
        await srv.load_model(ModelSpec(name="extra", source="builtin:resnet50", precision="fp16", compile="off",
                                       batch_buckets=tuple(range(1, 33))))  # fmt: skip
        lags: list[float] = []
        unloading = asyncio.ensure_future(srv.unload_model("extra"))
        while not unloading.done():  # (sleeping in the selector: the GIL is free for the loader thread meanwhile)
            started = time.perf_counter()
            await asyncio.sleep(TICK_S)
            lags.append(time.perf_counter() - started - TICK_S)
        await unloading
        assert max(lags) < 2e-3, f"the loop waited {max(lags) * 1e3:.1f} ms while a model's graphs were freed"


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_tuple_dict_and_topk_outputs_from_graphs_and_a_static_batch_refused(tmp_path: Path) -> None:
    models = [tensor_spec(export(Detector(True), tmp_path / "d.pt2"), "dict", precision="fp32"),
              spec("builtin:small", name="top", arch="", postprocess="topk:3", precision="fp32")]  # fmt: skip
    x = np.random.default_rng(3).standard_normal((5, FEATURES)).astype(np.float32)
    async with Server(config(*models)) as srv:
        conn = await client.connect("127.0.0.1", srv.port)
        replies = await asyncio.gather(*(conn.submit(row, model="dict") for row in x))
        for i, reply in enumerate(replies):
            assert isinstance(reply.outputs, dict), (reply.status, reply.message)
            np.testing.assert_allclose(reply.outputs["boxes"], x[i, :4] * 2, rtol=1e-5)
            np.testing.assert_array_equal(reply.outputs["labels"], (x[i, :2] > 0).astype(np.int64))
        reply = await conn.infer(frames(1)[0], model="top")
        assert isinstance(reply.outputs, dict) and reply.outputs["indices"].shape == (3,)
        assert np.all(np.diff(reply.outputs["scores"]) <= 0)
        static = tmp_path / "static.pt2"
        torch.export.save(torch.export.export(Linear(), (torch.zeros(1, FEATURES),)), str(static))
        with pytest.raises(ModelLoadError, match="fails at batch size 2"):
            await srv.load_model(tensor_spec(f"export:{static}", "static"))
        assert (await conn.infer(x[0], model="dict")).ok
        await conn.close()
