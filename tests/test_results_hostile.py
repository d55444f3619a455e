"""Hostile results-port subscribers (review): what many of them may cost the server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os

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


@pytest.mark.asyncio
@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (every write: ENOSPC)")
async def test_a_results_file_on_a_full_disk_costs_no_frame_nor_the_shutdown(caplog: pytest.LogCaptureFixture) -> None:
    """A results file whose disk is full: every line raised (a traceback per frame from the fan-out, another per
    loop iteration from the flush), and ``Server.stop`` raised ENOSPC from the file's close, which skipped the
    rest of the release (the backend, the ring, the loader's threads were left)."""
    cfg = Config(listeners=[ListenerSpec(port=0)], device="cpu", models=[SPEC], results_file="/dev/full")
    server = Server(cfg)
    await server.start()
    try:
        conn = await client.connect("127.0.0.1", server.port)
        frame = np.zeros(SPEC.input_shape, np.uint8)
        for _ in range(3):  # (loop iterations apart: each flush fails)
            assert all(r.status is Status.OK for r in await asyncio.gather(*(conn.submit(frame) for _ in range(20))))
        await conn.close()
    finally:
        await server.stop()
    assert server.backend is None, "the release stopped at the results file"
    outlet = server.results.stats()["outlets"][0]
    assert outlet["dropped"] > 0 and "No space left on device" in outlet["error"], outlet
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(said) <= 2 and all("results_file '/dev/full'" in m for m in said), said  # (at a write, at close)


@pytest.mark.asyncio
async def test_a_results_subscriber_that_sends_without_end_is_closed_with_an_error() -> None:
    """What a subscriber sends is ignored, but it was read, all of it, on the loop: one subscriber sending
    garbage as fast as it could (GB/s over loopback) took a third of the frames of a producer beside it
    (review: 2604 frames in 5 s -> 799, p50 1.7 -> 5.2 ms)."""
    cfg = Config(listeners=[ListenerSpec(port=0)], device="cpu", models=[SPEC], results_port=0)
    async with Server(cfg) as server:
        assert server.results_address is not None
        reader, writer = await asyncio.open_connection(*server.results_address)
        said = asyncio.ensure_future(reader.readline())  # (read as it comes: the write side ends in a reset)
        sent = 0
        with contextlib.suppress(ConnectionError):
            async with asyncio.timeout(10):
                while sent < 64 * 1024 * 1024 and not said.done():
                    writer.write(b"x" * 65536)
                    sent += 65536
                    await writer.drain()
                    await asyncio.sleep(0)
        assert sent < 16 * 1024 * 1024, f"{sent} bytes of garbage read from a results subscriber"
        line = await asyncio.wait_for(said, 5)
        assert json.loads(line)["error"].startswith("results subscribers send nothing"), line
        assert server.results.stats()["outlets"][0]["subscribers"] == 0
        writer.close()
