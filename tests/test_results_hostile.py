"""Hostile results-port subscribers (review): what many of them may cost the server."""

from __future__ import annotations

import asyncio
import contextlib
import json

import numpy as np
import pytest

from streamgpu import client
from streamgpu.config import Config, ListenerSpec
from streamgpu.models.spec import ModelSpec
from streamgpu.protocol.wire import Status
from streamgpu.server import Server

SPEC = ModelSpec(input_shape=(8, 8, 3), max_batch_size=4, batch_buckets=(1, 4))


@pytest.mark.asyncio
async def test_results_subscribers_past_max_connections_are_refused() -> None:
    cfg = Config(listeners=[ListenerSpec(port=0)], device="cpu", models=[SPEC], max_connections=2, results_port=0)
    async with Server(cfg) as server:
        assert server.results_address is not None
        conns = [await asyncio.open_connection(*server.results_address) for _ in range(8)]
        try:
            # Each subscriber costs a buffer and a write per result on the loop: past the cap one is told
            # why (one JSON line) and closed; the first two stay.
            refused = []
            for reader, _ in conns:
                with contextlib.suppress(TimeoutError):
                    refused.append(await asyncio.wait_for(reader.read(), 0.2))
            assert len(refused) == 6, f"{8 - len(refused)} results subscribers held with max_connections=2"
            for said in refused:
                assert json.loads(said)["error"].startswith("too many results subscribers (2"), said
            assert server.results.stats()["outlets"][0]["refused"] == 6
        finally:
            for _, writer in conns:
                writer.close()


@pytest.mark.asyncio
async def test_a_results_port_nobody_reads_costs_no_frame_a_record() -> None:
    """A results port with no subscriber connected: the tap makes no JSON record per frame (at high frame
    rates that was loop time taken from every producer for lines that went nowhere)."""
    cfg = Config(listeners=[ListenerSpec(port=0)], device="cpu", models=[SPEC], results_port=0)
    async with Server(cfg) as server:
        conn = await client.connect("127.0.0.1", server.port)
        try:
            frame = np.zeros(SPEC.input_shape, np.uint8)
            assert all(r.status is Status.OK for r in await asyncio.gather(*(conn.submit(frame) for _ in range(8))))
            assert server.results.published == 0  # no line was made for a port nobody reads
            assert server.results_address is not None
            reader, writer = await asyncio.open_connection(*server.results_address)
            async with asyncio.timeout(5):
                while not server.results.wanted:
                    await asyncio.sleep(0.01)
            assert (await conn.submit(frame)).status is Status.OK
            assert b'"status"' in await asyncio.wait_for(reader.readline(), 5)  # a subscriber gets lines again
            assert server.results.published == 1
            writer.close()
        finally:
            await conn.close()
