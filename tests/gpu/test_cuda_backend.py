"""The CUDA backend on a GPU: batches against eager, and slot lifetimes against the reads of the ring."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from streamgpu import client
from streamgpu.config import Config, ListenerSpec
from streamgpu.gpu import cuda, kernels
from streamgpu.gpu.cuda import CudaBackend
from streamgpu.memory import Slot
from streamgpu.models.builtin import build_builtin
from streamgpu.models.preprocess import preprocess_torch
from streamgpu.models.spec import ModelSpec
from streamgpu.server import Server

sys.path.insert(0, str(Path(__file__).parent))  # the helper beside this file, whatever pytest's import mode
from ring_batches import RingBatches

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _eager(spec: ModelSpec, frames: np.ndarray) -> torch.Tensor:
    """The model's output for ``frames``, eagerly in fp32 with torch pre-processing."""
    with torch.inference_mode():
        module = build_builtin(spec.source.removeprefix("builtin:")).cuda().eval()
        return module(preprocess_torch(torch.from_numpy(frames).cuda(), spec, torch.float32)).float().cpu()


def _relative_error(got: np.ndarray, expected: torch.Tensor) -> float:
    return (torch.linalg.norm(torch.from_numpy(got) - expected) / torch.linalg.norm(expected)).item()


@pytest.mark.asyncio(loop_factories=["uvloop"])
@pytest.mark.parametrize("kernels_on", [True, False], ids=["one replay", "separate launches"])
async def test_graph_batches_match_eager_at_every_size_idle_or_not(kernels_on: bool) -> None:
    """Batches of 1, 3 (padded to bucket 4) and 8 frames, each launched on an idle model (the one-replay
    graph reads the ring) and then two at once (the second is gathered into device memory first, the
    table pointing there), after a larger batch left stale addresses and rows behind."""
    spec = ModelSpec(source="builtin:resnet18", precision="fp32", batch_buckets=(1, 4, 8), max_batch_size=8,
                     compile="off")  # fmt: skip
    backend = CudaBackend(asyncio.get_running_loop(), Config(device="cuda", cuda_kernels=kernels_on))
    ring = RingBatches(backend, 64 * (spec.frame_nbytes + 256))
    model = backend.load(spec, build_builtin("resnet18"))
    assert model.graphs, model.description
    assert (model.addresses is not None) == kernels_on, model.description
    staged = 0
    stage = backend._stage

    def counted(*args: Any) -> None:
        nonlocal staged
        staged += 1
        stage(*args)

    backend._stage = counted  # type: ignore[method-assign,assignment]
    rng = np.random.default_rng(7)
    for n in (8, 1, 3, 8, 3):
        frames = rng.integers(0, 256, (2, n, *spec.input_shape), dtype=np.uint8)
        alone = await ring.run(model, frames[0])
        assert _relative_error(alone, _eager(spec, frames[0])) < 1e-3, n
        before = staged
        both = await asyncio.gather(ring.run(model, frames[0]), ring.run(model, frames[1]))
        for got, sent in zip(both, frames, strict=True):
            assert _relative_error(got, _eager(spec, sent)) < 1e-3, n
        # One replay: the first of two reads the ring, the second (its model busy) is gathered first.
        assert staged - before == (1 if kernels_on else 2), "the batch launched beside another was not gathered"
    assert ring.pool.slots_in_use == 0
    backend.close()
    ring.close()


@pytest.mark.asyncio(loop_factories=["uvloop"])
@pytest.mark.parametrize("reader", ["the graph", "the gather kernel"])
async def test_no_slot_is_released_before_the_ring_was_read(reader: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The delay sits inside the read: whatever reads the slots (the one-replay graph of an idle model,
    or the gather kernel on the copy stream) is held ~1 s behind a sleep kernel on its stream. An
    implementation that recorded its event before the read (or released slots on launch) frees the
    slots at once and fails here; gating the stream before the launch would not."""
    reads_started: list[torch.cuda.Event] = []

    def held(stream: torch.cuda.Stream) -> None:
        with torch.cuda.stream(stream):
            started = torch.cuda.Event()
            started.record(stream)
            reads_started.append(started)
            torch.cuda._sleep(2_000_000_000)  # ~1 s of GPU cycles before the slots are read

    if reader == "the graph":
        spec = ModelSpec(input_shape=(64, 64, 3), max_batch_size=4)
        real_replay = kernels.enqueue_replay

        def slow_replay(device: int, stream: int, *args: Any) -> None:
            held(torch.cuda.ExternalStream(stream))
            real_replay(device, stream, *args)

        monkeypatch.setattr(cuda.kernels, "enqueue_replay", slow_replay)
        count = 1  # one batch, on an idle model: read by its graph
    else:
        spec = ModelSpec(input_shape=(64, 64, 3), max_batch_size=4, precision="bf16")  # torch pre-processing
        real_gather = kernels.gather_frames

        def slow_gather(
            ring: torch.Tensor, offsets: list[int], nbytes: int, out: torch.Tensor, stream: torch.cuda.Stream
        ) -> None:
            held(stream)
            real_gather(ring, offsets, nbytes, out, stream)

        monkeypatch.setattr(cuda.kernels, "gather_frames", slow_gather)
        count = 4
    # The read is held back for a second or more: not a batch the watchdog should answer.
    config = Config(listeners=[ListenerSpec(port=0)], device="cuda", models=[spec], watchdog_min_s=60)
    async with Server(config) as server:
        backend = server.backend
        assert isinstance(backend, CudaBackend) and backend.use_kernels, "needs cupy: the kernel paths"
        conn = await client.connect("127.0.0.1", server.port)
        frames = np.random.default_rng(1).integers(0, 256, (count, *spec.input_shape), dtype=np.uint8)
        futs = [conn.submit(f, stream_id=i) for i, f in enumerate(frames)]
        await asyncio.sleep(0.3)
        assert reads_started and reads_started[0].query(), "no read was launched: the test proves nothing"
        assert server.pool.slots_in_use == count  # not read yet, so every slot is still held
        replies = await asyncio.gather(*futs)
        assert all(r.ok for r in replies)
        assert server.pool.slots_in_use == 0
        await conn.close()


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_a_compiled_model_serves_what_the_uncompiled_one_does() -> None:
    backend = CudaBackend(asyncio.get_running_loop(), Config(device="cuda"))
    ring = RingBatches(backend, 16 * (224 * 224 * 3 + 256))
    frames = np.random.default_rng(3).integers(0, 256, (8, 224, 224, 3), dtype=np.uint8)
    outs = {}
    for mode in ("off", "on", "auto"):
        spec = ModelSpec(source="builtin:resnet18", precision="fp16", batch_buckets=(1, 8), max_batch_size=8,
                         compile=mode)  # fmt: skip
        model = backend.load(spec, build_builtin("resnet18"))
        assert model.graphs and model.compile_note.startswith({"off": "not", "on": "compiled", "auto": ""}[mode])
        assert model.description.count("compiled") == 1, model.description  # says which, and for auto why
        outs[mode] = await ring.run(model, frames)
    for mode in ("on", "auto"):
        err = _relative_error(outs[mode], torch.from_numpy(outs["off"]))
        assert err < 1e-2, (mode, err)  # fp16: different kernels, same model
    backend.close()
    ring.close()


@pytest.mark.asyncio(loop_factories=["uvloop"])
@pytest.mark.parametrize("graphs", ["off", "capture failed"])
async def test_a_compiled_model_without_graphs_is_compiled_at_load_for_every_batch_size(
    graphs: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without graphs a compiled model ran each batch at its own size, and dynamo compiled it again for every
    # new size (seconds each), on the launcher thread, while the batch's frames waited.
    if graphs == "capture failed":

        def fails(model: cuda.CudaModel) -> None:
            raise RuntimeError("planted capture failure")

        monkeypatch.setattr(cuda.CudaModel, "capture", fails)
    torch._dynamo.reset()  # no compiled code of another test's model (dynamo would reuse it at a size seen)
    backend = CudaBackend(asyncio.get_running_loop(), Config(device="cuda"))
    ring = RingBatches(backend, 16 * (224 * 224 * 3 + 256))
    spec = ModelSpec(source="builtin:resnet18", precision="fp16", batch_buckets=(1, 4, 8), max_batch_size=8,
                     compile="on", cuda_graphs=graphs != "off")  # fmt: skip
    model = backend.load(spec, build_builtin("resnet18"))
    assert not model.graphs and model.compile_note == "compiled", model.description
    frames = np.random.default_rng(5).integers(0, 256, (8, 224, 224, 3), dtype=np.uint8)
    compiled = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    outs = {n: await ring.run(model, frames[:n]) for n in (1, 2, 3, 5, 7, 8)}
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == compiled, "compiled again while serving"
    expected = _eager(spec, frames)
    for n, out in outs.items():
        assert out.shape == (n, 1000), (n, out.shape)
        assert _relative_error(out, expected[:n]) < 1e-2, n
    assert "batches padded to [1, 4, 8]" in model.description, model.description
    backend.close()
    ring.close()


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_one_replay_with_several_outputs_odd_frames_and_a_bad_offset() -> None:
    """The raw downloads put each output where it belongs (top-k indices int32 and scores float32: the same
    bytes per row, so swapped ones would pass a shape check); frames whose pixels do not load four at a
    time are gathered first and served right; an offset outside the ring is refused before the device
    reads anything, and the model serves on."""
    backend = CudaBackend(asyncio.get_running_loop(), Config(device="cuda"))
    ring = RingBatches(backend, 64 * (224 * 224 * 3 + 256))
    rng = np.random.default_rng(11)

    topk = ModelSpec(name="topk", source="builtin:resnet18", precision="fp32", batch_buckets=(1, 4), max_batch_size=4,
                     compile="off", postprocess="topk:5")  # fmt: skip
    ranked = backend.load(topk, build_builtin("resnet18"))
    assert ranked.addresses is not None and ranked.reads_ring, ranked.description
    frames = rng.integers(0, 256, (3, *topk.input_shape), dtype=np.uint8)
    got = await ring.outputs(ranked, frames)
    assert isinstance(got, dict) and got["indices"].dtype == np.int32, got
    logits = _eager(topk, frames).numpy()
    # Each index's eager logit is its score, and the scores are the eager top five (near-ties may swap
    # two indices between fp32 kernels; indices and scores swapped, or rows misplaced, would fail).
    np.testing.assert_allclose(np.take_along_axis(logits, got["indices"], 1), got["scores"], rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(got["scores"], -np.sort(-logits, axis=1)[:, :5], rtol=1e-3, atol=1e-3)

    odd = ModelSpec(name="odd", source="builtin:resnet18", precision="fp32", input_shape=(15, 15, 3),
                    batch_buckets=(1, 4), max_batch_size=4, compile="off")  # fmt: skip
    model = backend.load(odd, build_builtin("resnet18"))
    assert model.addresses is not None and not model.reads_ring, model.description  # 225 pixels
    odd_frames = rng.integers(0, 256, (3, *odd.input_shape), dtype=np.uint8)
    assert _relative_error(await ring.run(model, odd_frames), _eager(odd, odd_frames)) < 1e-3

    for offset in (ring.segment.buffer.nbytes, 100):  # past the end; not 256-aligned
        outside = Slot(ring.pool, offset, topk.frame_nbytes, 0)
        with pytest.raises(ValueError, match=r"multiple of 256|overruns the ring"):
            backend.launch(ranked, [outside])
    again = await ring.outputs(ranked, frames[:1])
    assert isinstance(again, dict)
    np.testing.assert_allclose(again["scores"], got["scores"][:1], rtol=1e-3, atol=1e-3)
    backend.close()
    ring.close()
