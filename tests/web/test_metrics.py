"""``GET /metrics`` read by prometheus_client's own parser: the counters match what was sent."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from streamgpu import client
from streamgpu.config import Config, ListenerSpec
from streamgpu.models.spec import ModelSpec
from streamgpu.protocol.wire import Status
from streamgpu.server import Server
from streamgpu.web.app import create_app

SPEC = ModelSpec(input_shape=(16, 16, 3), max_batch_size=8, batch_buckets=(1, 8))
TOKEN = "s3cret"


def config() -> Config:
    return Config(listeners=[ListenerSpec(port=0)], device="cpu", models=[SPEC], auth_token=TOKEN)


@pytest_asyncio.fixture
async def web_server() -> AsyncIterator[tuple[Server, TestClient]]:
    async with Server(config()) as server, TestClient(TestServer(create_app(server))) as http:
        yield server, http


async def scrape(http: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} from /metrics, parsed by prometheus_client."""
    response = await http.get("/metrics")
    assert response.status == 200 and response.headers["Content-Type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(await response.text()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def replies(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], model: str, status: str) -> float:
    return samples.get(("streamgpu_replies_total", (("model", model), ("status", status))), 0.0)


@pytest.mark.asyncio
async def test_counters_match_what_was_sent(web_server: tuple[Server, TestClient]) -> None:
    server, http = web_server
    frame = np.zeros(SPEC.input_shape, np.uint8)
    conn = await client.connect("127.0.0.1", server.port, token=TOKEN)
    oks = await asyncio.gather(*(conn.infer(frame, stream_id=i % 3) for i in range(7)))
    bad = [await conn.infer(np.zeros((4, 4, 3), np.uint8)) for _ in range(3)]
    unknown = [await conn.infer(frame, model=f"random-{i}") for i in range(2)]
    assert all(r.ok for r in oks) and {r.status for r in bad} == {Status.BAD_FRAME}
    assert {r.status for r in unknown} == {Status.UNKNOWN_MODEL}
    for _ in range(2):
        with pytest.raises(client.HandshakeError):
            await client.connect("127.0.0.1", server.port, token="wrong")

    samples = await scrape(http)
    assert replies(samples, "default", "OK") == 7
    assert replies(samples, "default", "BAD_FRAME") == 3
    assert replies(samples, "", "UNKNOWN_MODEL") == 2  # no label per made-up model name
    assert replies(samples, "", "UNAUTHORIZED") == 2
    assert not any(dict(labels).get("model", "").startswith("random") for _, labels in samples)
    model = (("model", "default"),)
    assert samples[("streamgpu_request_duration_seconds_count", model)] == 7
    assert samples[("streamgpu_queue_duration_seconds_count", model)] == 7
    batches = samples[("streamgpu_batch_size_count", model)]
    assert samples[("streamgpu_transfer_duration_seconds_count", model)] == batches
    assert samples[("streamgpu_batch_size_sum", model)] == 7 and 1 <= batches <= 7
    assert samples[("streamgpu_request_duration_seconds_bucket", (("le", "+Inf"), *model))] == 7
    assert samples[("streamgpu_request_duration_seconds_sum", model)] > 0
    assert samples[("streamgpu_queue_length", model)] == 0
    assert samples[("streamgpu_connections", ())] == 1
    assert samples[("streamgpu_ring_used_bytes", ())] == 0
    assert samples[("streamgpu_ring_capacity_bytes", ())] == server.pool.capacity
    await conn.close()


@pytest.mark.asyncio
async def test_two_servers_in_one_process_keep_their_own_counts() -> None:
    async with (
        Server(config()) as one,
        Server(config()) as two,
        TestClient(TestServer(create_app(one))) as http1,
        TestClient(TestServer(create_app(two))) as http2,
    ):
        conn = await client.connect("127.0.0.1", one.port, token=TOKEN)
        assert (await conn.infer(np.zeros(SPEC.input_shape, np.uint8))).ok
        await conn.close()
        assert replies(await scrape(http1), "default", "OK") == 1
        assert replies(await scrape(http2), "default", "OK") == 0
