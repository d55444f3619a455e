"""Controlled spatial sharing on a GPU: a model given a share of the SMs runs its CUDA graphs on that
share alone (slower alone, by about the share), with the same results; two models' shares hold different
SMs, so neither slows the other; shares that do not fit are refused at load; a share changed while a
producer streams (a swap to the same model with a new sm_share) fails no frame, and /metrics shows the
new share."""

from __future__ import annotations

import asyncio
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from streamgpu import client
from streamgpu.config import Config, ListenerSpec
from streamgpu.errors import DeviceUnavailableError
from streamgpu.gpu.cuda import CudaBackend, CudaModel, _replay_ms
from streamgpu.gpu.shares import GROUP_SMS, groups_for, shareable_groups
from streamgpu.models.builtin import build_builtin
from streamgpu.models.spec import ModelSpec
from streamgpu.server import Server
from streamgpu.web.metrics import registry_for

sys.path.insert(0, str(Path(__file__).parent.parent))  # the CPU tests' helpers, whatever pytest's import mode
sys.path.insert(0, str(Path(__file__).parent))
from ring_batches import RingBatches
from test_lifecycle import SHAPE, Producer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_a_shared_model_runs_on_its_share_of_the_sms() -> None:
    backend = CudaBackend(asyncio.get_running_loop(), Config(device="cuda"))
    ring = RingBatches(backend, 40 * (224 * 224 * 3 + 256))
    frames = np.random.default_rng(2).integers(0, 256, (32, 224, 224, 3), dtype=np.uint8)
    times, outs = {}, {}
    for share in (0.0, 0.125):
        spec = ModelSpec(source="builtin:resnet50", precision="fp16", batch_buckets=(32,), max_batch_size=32,
                         compile="off", sm_share=share)  # fmt: skip
        model = backend.load(spec, build_builtin("resnet50"))
        assert model.graphs, model.description
        times[share] = min(_replay_ms(model.graphs[32].graph, model.stream) for _ in range(3))
        outs[share] = torch.from_numpy(await ring.run(model, frames))
        if share:
            assert f"{model.sms} SMs of" in model.description, model.description
            assert model.sms == groups_for(share, shareable_groups(0)) * GROUP_SMS, model.sms
    # 8 of 132 SMs: far slower than the whole GPU (a graph captured outside the share would not be).
    assert times[0.125] > 2 * times[0.0], times
    err = (torch.linalg.norm(outs[0.125] - outs[0.0]) / torch.linalg.norm(outs[0.0])).item()
    assert err < 1e-2, err
    backend.close()
    ring.close()


@pytest.mark.asyncio(loop_factories=["uvloop"])
@pytest.mark.parametrize("compile_mode", ["on", "auto"])
async def test_a_compiled_model_in_a_share_is_served_compiled_on_its_share(compile_mode: str) -> None:
    # Compiled inside its share, the model's compiled kernels were loaded with the device's primary context made
    # current, the share's context was "not the current one on leaving it", and the model was served uncompiled
    # (2.2x slower at batch 8 on the H100's half; docs/BENCHMARKS.md).
    backend = CudaBackend(asyncio.get_running_loop(), Config(device="cuda"))
    ring = RingBatches(backend, 40 * (224 * 224 * 3 + 256))
    frames = np.random.default_rng(3).integers(0, 256, (32, 224, 224, 3), dtype=np.uint8)
    times, outs = {}, {}
    for share in (0.0, 0.125):
        spec = ModelSpec(source="builtin:resnet18", precision="fp16", batch_buckets=(8, 32), max_batch_size=32,
                         compile=compile_mode, sm_share=share)  # fmt: skip
        model = backend.load(spec, build_builtin("resnet18"))
        assert model.compile_note.startswith("compiled"), model.description
        assert sorted(model.graphs) == [8, 32], model.description
        times[share] = min(_replay_ms(model.graphs[32].graph, model.stream) for _ in range(3))
        outs[share] = torch.from_numpy(await ring.run(model, frames))
        backend.unload(model)
    assert times[0.125] > 2 * times[0.0], times  # its compiled graph runs on its 16 SMs, not on all
    err = (torch.linalg.norm(outs[0.125] - outs[0.0]) / torch.linalg.norm(outs[0.0])).item()
    assert err < 1e-2, err
    backend.close()
    ring.close()


_SMID = r"""
extern "C" __global__ void smid(int* out) {
    unsigned int id;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(id));
    if (threadIdx.x == 0) out[blockIdx.x] = id;
    long long start = clock64();  // stay a while, so that the blocks spread over every SM the stream may use
    while (clock64() - start < 20000) {}
}
"""


def sms_used(stream: torch.cuda.Stream) -> set[int]:
    """The SMs that the blocks of a kernel launched on ``stream`` ran on."""
    import cupy as cp

    out = cp.full(4096, -1, dtype=cp.int32)
    cp.RawKernel(_SMID, "smid")((out.size,), (128,), (out,), stream=cp.cuda.ExternalStream(stream.cuda_stream))
    stream.synchronize()
    return set(out.get().tolist())


def load_shared(backend: CudaBackend, name: str, share: float, model: str = "small") -> CudaModel:
    spec = ModelSpec(name=name, source=f"builtin:{model}", precision="fp16", batch_buckets=(32,), max_batch_size=32,
                     compile="off", sm_share=share, **({"input_shape": SHAPE} if model == "small" else {}))  # fmt: skip
    return backend.load(spec, build_builtin(model))


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_two_models_shares_hold_different_sms_and_one_that_does_not_fit_is_refused() -> None:
    backend = CudaBackend(asyncio.get_running_loop(), Config(device="cuda"))
    a, b = load_shared(backend, "a", 0.5), load_shared(backend, "b", 0.5)
    used = {m.spec.name: sms_used(m.stream) for m in (a, b)}
    # torch's own green contexts gave every share the device's first SMs: both halves were one half.
    assert not used["a"] & used["b"], sorted(used["a"] & used["b"])
    half = groups_for(0.5, shareable_groups(0)) * GROUP_SMS  # 56 SMs on the H100 (7 of its 15 groups)
    assert len(used["a"]) == a.sms == half and len(used["b"]) == b.sms == half, {k: len(v) for k, v in used.items()}
    with pytest.raises(DeviceUnavailableError, match=r"sm_share 0.25 .*other models' shares.*add up to at most 1.0"):
        load_shared(backend, "c", 0.25)
    backend.unload(a)
    backend.unload(b)
    # Four quarters, two of them unloaded: the free groups lie apart, and a half takes them all the same.
    quarters = [load_shared(backend, name, 0.25) for name in "cdef"]
    backend.unload(quarters[0])
    backend.unload(quarters[2])
    g = load_shared(backend, "g", 0.5)
    assert g.share is not None and g.share.groups != tuple(range(g.share.groups[0], g.share.groups[-1] + 1))
    used_g = sms_used(g.stream)
    assert len(used_g) == g.sms == half, len(used_g)
    for quarter in (quarters[1], quarters[3]):
        assert not used_g & sms_used(quarter.stream), quarter.spec.name
    backend.close()


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_a_model_in_its_share_is_not_slowed_by_another_in_the_other_half() -> None:
    backend = CudaBackend(asyncio.get_running_loop(), Config(device="cuda"))
    a, b = (load_shared(backend, name, 0.5, "resnet50") for name in ("a", "b"))
    graph_a, graph_b = a.graphs[32].graph, b.graphs[32].graph
    alone = min(_replay_ms(graph_a, a.stream) for _ in range(3))
    with torch.cuda.stream(b.stream):
        for _ in range(int(30 * 3 * alone / _replay_ms(graph_b, b.stream, reps=3)) + 10):  # B busy throughout
            graph_b.replay()
    beside = _replay_ms(graph_a, a.stream, reps=30)
    assert not b.stream.query(), "B finished before A's timing did: queue more of it"
    b.stream.synchronize()
    # Sharing SMs, A took 2.5x as long with B beside it (H100); on SMs of its own, memory bandwidth and
    # L2 are what the two still share.
    assert beside < 1.3 * alone, (beside, alone)
    backend.close()


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_a_share_changed_while_a_producer_streams_fails_no_frame() -> None:
    total = torch.cuda.get_device_properties(0).multi_processor_count
    first = ModelSpec(name="m", source="builtin:small", input_shape=SHAPE, max_batch_size=4, batch_buckets=(1, 2, 4),
                      compile="off", sm_share=0.5)  # fmt: skip
    async with Server(Config(listeners=[ListenerSpec(port=0)], device="cuda", models=[first])) as srv:
        registry = registry_for(srv)
        conn = await client.connect("127.0.0.1", srv.port)
        producer = Producer(conn, window=16)
        task = asyncio.create_task(producer.run())
        await asyncio.sleep(0.2)
        seen = []
        for share in (0.25, 0.0, 0.5):
            await srv.swap_model("m", replace(first, sm_share=share))
            await asyncio.sleep(0.1)
            text = generate_latest(registry).decode()
            gauge = {s.labels["device"]: s.value for f in text_string_to_metric_families(text)
                     if f.name == "streamgpu_model_sms" for s in f.samples}  # fmt: skip
            seen.append((share, srv.metrics()["models"]["m"]["sms"], gauge))
        producer.running = False
        await task
        replies = producer.check()
        assert len(replies) > 100 and all(r.ok for r in replies), {r.status for r in replies}
        for share, sms, gauge in seen:
            expected = total if not share else groups_for(share, shareable_groups(0)) * GROUP_SMS
            assert list(sms.values()) == [expected] and list(gauge.values()) == [expected], (share, sms, gauge)
        await conn.close()
