"""Hostile results-port subscribers (review): what many of them may cost the server."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from streamgpu.config import Config, ListenerSpec
from streamgpu.models.spec import ModelSpec
from streamgpu.server import Server

SPEC = ModelSpec(input_shape=(8, 8, 3), max_batch_size=4, batch_buckets=(1, 4))


@pytest.mark.xfail(
    strict=True,
    reason="results-port subscribers are not capped (no max_connections place, no setting): each lagging one "
    "holds up to SUBSCRIBER_BUFFER (1 MiB) and every result line is written to each on the loop, so N idle "
    "subscribers cost N MiB and O(N) loop work per result, slowing every producer",
)
@pytest.mark.asyncio
async def test_results_subscribers_past_max_connections_are_refused() -> None:
    cfg = Config(listeners=[ListenerSpec(port=0)], device="cpu", models=[SPEC], max_connections=2, results_port=0)
    async with Server(cfg) as server:
        assert server.results_address is not None
        conns = [await asyncio.open_connection(*server.results_address) for _ in range(8)]
        try:
            closed = 0
            for reader, _ in conns:
                with contextlib.suppress(TimeoutError):
                    closed += await asyncio.wait_for(reader.read(), 0.2) == b""
            assert closed >= 6, f"{8 - closed} results subscribers held with max_connections=2"
        finally:
            for _, writer in conns:
                writer.close()
