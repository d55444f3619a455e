"""Controlled spatial sharing on a GPU: a model given a share of the SMs runs its CUDA graphs on that
share alone (slower alone, by about the share), with the same results; a share changed while a producer
streams (a swap to the same model with a new sm_share) fails no frame, and /metrics shows the new share."""

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
from streamgpu.gpu.cuda import CudaBackend, _replay_ms
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
            assert f"{model.sms} SMs of" in model.description and model.sms == 16, model.description
    # 16 of 132 SMs: far slower than the whole GPU (a graph captured outside the share would not be).
    assert times[0.125] > 2 * times[0.0], times
    err = (torch.linalg.norm(outs[0.125] - outs[0.0]) / torch.linalg.norm(outs[0.0])).item()
    assert err < 1e-2, err
    backend.close()
    ring.close()


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
            expected = total if not share else min(total, max(8, round(share * total / 8) * 8))
            assert list(sms.values()) == [expected] and list(gauge.values()) == [expected], (share, sms, gauge)
        await conn.close()
