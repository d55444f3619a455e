"""/metrics and the status JSON on the cuda backend: GPU memory per device, the data path named."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from streamgpu import client
from streamgpu.config import Config, ListenerSpec
from streamgpu.models.spec import ModelSpec
from streamgpu.server import Server
from streamgpu.web.app import create_app

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_gpu_memory_gauges_and_data_path() -> None:
    spec = ModelSpec(input_shape=(32, 32, 3))
    config = Config(listeners=[ListenerSpec(port=0)], device="cuda", models=[spec])
    async with Server(config) as server, TestClient(TestServer(create_app(server))) as http:
        conn = await client.connect("127.0.0.1", server.port)
        assert (await conn.infer(np.zeros(spec.input_shape, np.uint8))).ok
        await conn.close()
        text = await (await http.get("/metrics")).text()
        memory = {
            (s.labels["device"], s.labels["kind"]): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == "streamgpu_gpu_memory_bytes"
        }
        assert memory[("cuda:0", "total")] == torch.cuda.get_device_properties(0).total_memory
        assert 0 < memory[("cuda:0", "allocated")] <= memory[("cuda:0", "reserved")]
        status = await (await http.get("/v1/status")).json()
        assert status["device"].startswith("cuda:0") and status["data_path"].startswith(("cupy kernels", "torch"))
        assert status["gpu_memory"]["cuda:0"]["total"] > 0
