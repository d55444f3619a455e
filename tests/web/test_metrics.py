"""``GET /metrics`` read by prometheus_client's own parser: the counters match what was sent."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import socket
from collections.abc import AsyncIterator

import numpy as np
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from streamgpu import client
from streamgpu.config import Config, ListenerSpec
from streamgpu.models.spec import ModelSpec
from streamgpu.protocol import udp, wire
from streamgpu.protocol.wire import FrameHeader, Status
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
async def test_garbage_collector_pauses_are_timed_by_generation(
    heap_owned_by_the_server: None, web_server: tuple[Server, TestClient]
) -> None:
    """A collection stops the loop: /metrics shows how often and how long, per generation."""
    _, http = web_server
    before = await scrape(http)
    gc.collect()  # a full collection
    gc.collect(0)
    after = await scrape(http)

    def count(generation: str, samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> float:
        return samples[("streamgpu_gc_pause_seconds_count", (("generation", generation),))]

    assert count("2", after) >= count("2", before) + 1 and count("0", after) >= count("0", before) + 1
    assert after[("streamgpu_gc_pause_seconds_sum", (("generation", "2"),))] > 0
    assert count("1", after) == after[("streamgpu_gc_pause_seconds_bucket", (("generation", "1"), ("le", "+Inf")))]


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


async def counts_reach(http: TestClient, expected: dict[tuple[str, str], float]) -> None:
    """/metrics' reply counters become ``expected`` (and no other reply is counted) within 5 s: a worker's
    REPLIED records and a UDP datagram's answer come a moment after the producer's last reply."""
    counted: dict[tuple[str, str], float] = {}
    total = 0.0
    for _ in range(100):
        samples = await scrape(http)
        counted = {key: replies(samples, *key) for key in expected}
        total = sum(v for (name, _), v in samples.items() if name == "streamgpu_replies_total")
        if counted == expected and total == sum(expected.values()):
            return
        await asyncio.sleep(0.05)
    assert (counted, total) == (expected, sum(expected.values()))


def reply_status(message: bytes) -> Status:
    parsed = wire.decode_reply(message)
    assert parsed is not None
    return Status(parsed[0].status)


FRAME, WRONG = np.zeros(SPEC.input_shape, np.uint8), np.zeros((4, 4, 3), np.uint8)


@pytest.mark.asyncio
async def test_udp_and_websocket_refusals_are_counted_like_tcp_ones() -> None:
    # A front end that answers a frame itself counts the reply where TCP does (Admission.replied).
    cfg = Config(listeners=[ListenerSpec(port=0), ListenerSpec("udp", port=0)], device="cpu", models=[SPEC],
                 auth_token=TOKEN)  # fmt: skip
    async with Server(cfg) as server, TestClient(TestServer(create_app(server))) as http:
        udp_port = server.addresses[1][1]
        # over UDP: 1 OK, 3 BAD_FRAME, 2 UNKNOWN_MODEL, and one TOO_LARGE at a frame's first datagram
        conn = await client.connect_udp("127.0.0.1", udp_port)
        got = [(await conn.infer(f)).status for f in (FRAME, WRONG, WRONG, WRONG)]
        got += [(await conn.infer(FRAME, model=m)).status for m in ("nope", "nada")]
        await conn.close()
        too_large = udp.encode_chunk_header(udp.ChunkHeader(udp.Kind.FRAME, 0, 9, 0, 1, 0, 1 << 30))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(too_large, ("127.0.0.1", udp_port))
        # over a WebSocket: 1 BAD_FRAME, then a message that is not a frame (a connection reply, BAD_FRAME)
        async with http.ws_connect(f"/v1/stream?token={TOKEN}") as ws:
            head = FrameHeader(0, 0, "default", wire.dtype_code(WRONG.dtype), WRONG.shape, WRONG.nbytes)
            await ws.send_bytes(wire.encode_frame_header(head) + WRONG.tobytes())
            got.append(reply_status(await ws.receive_bytes(timeout=10)))
            await ws.send_bytes(b"not a frame")
            got.append(reply_status(await ws.receive_bytes(timeout=10)))
        assert got == [Status.OK, *[Status.BAD_FRAME] * 3, *[Status.UNKNOWN_MODEL] * 2, *[Status.BAD_FRAME] * 2]
        await counts_reach(http, {("default", "OK"): 1, ("default", "BAD_FRAME"): 3 + 1, ("", "UNKNOWN_MODEL"): 2,
                                  ("", "TOO_LARGE"): 1, ("", "BAD_FRAME"): 1})  # fmt: skip
        # The UDP listener's own counts, by port: 1 frame taken (5 refused at chunk 0), 1 at its first datagram.
        samples = await scrape(http)
        port = str(udp_port)
        events = {dict(labels)["event"]: value for (name, labels), value in samples.items()
                  if name == "streamgpu_udp_events_total" and dict(labels)["port"] == port}  # fmt: skip
        assert events["frames"] == 1 and events["too_large"] == 1 and events["incomplete"] == 0
        assert events["datagrams"] >= 7 and events["reply_datagrams"] >= 7
        where = (("host", "127.0.0.1"), ("port", port))  # (the listener's configured host)
        assert samples[("streamgpu_udp_partial_frames", where)] == 0
        assert samples[("streamgpu_udp_producers", where)] == 2
        status = await (await http.get("/v1/status")).json()
        (listener,) = status["udp_listeners"]
        assert listener["port"] == udp_port and listener["frames"] == 1 and listener["too_large"] == 1


@pytest.mark.asyncio
async def test_ingest_worker_refusals_are_counted_like_tcp_ones() -> None:
    # The worker process answers refused frames and handshakes itself: REPLIED records bring them here.
    cfg = Config(listeners=[ListenerSpec(port=0)], device="cpu", models=[SPEC], auth_token=TOKEN, ingest_workers=1)
    async with Server(cfg) as server, TestClient(TestServer(create_app(server))) as http:
        conn = await client.connect("127.0.0.1", server.port, token=TOKEN)
        got = [(await conn.infer(f)).status for f in (FRAME, WRONG, WRONG)] + [
            (await conn.infer(FRAME, model="nope")).status]  # fmt: skip
        await conn.close()
        for _ in range(2):
            with pytest.raises(client.HandshakeError):
                await client.connect("127.0.0.1", server.port, token="wrong")
        assert got == [Status.OK, Status.BAD_FRAME, Status.BAD_FRAME, Status.UNKNOWN_MODEL]
        await counts_reach(http, {("default", "OK"): 1, ("default", "BAD_FRAME"): 2, ("", "UNKNOWN_MODEL"): 1,
                                  ("", "UNAUTHORIZED"): 2})  # fmt: skip


@pytest.mark.asyncio
async def test_udp_counts_of_ingest_workers_reach_metrics() -> None:
    # With ingest workers, UDP is received in the worker processes: their refusals come up as REPLIED
    # records and the listener's counts as STATS records, summed over the workers by port.
    cfg = Config(listeners=[ListenerSpec(port=0), ListenerSpec("udp", port=0)], device="cpu", models=[SPEC],
                 auth_token=TOKEN, ingest_workers=2)  # fmt: skip
    async with Server(cfg) as server, TestClient(TestServer(create_app(server))) as http:
        udp_port = server.addresses[1][1]
        conns = [await client.connect_udp("127.0.0.1", udp_port) for _ in range(4)]
        got = [(await conn.infer(f)).status for conn in conns for f in (FRAME, WRONG)]
        for conn in conns:
            await conn.close()
        assert got == [Status.OK, Status.BAD_FRAME] * 4
        await counts_reach(http, {("default", "OK"): 4, ("default", "BAD_FRAME"): 4})
        port, where = str(udp_port), (("host", "127.0.0.1"), ("port", str(udp_port)))
        async with asyncio.timeout(10):  # workers report their counts once per sweep period
            while True:
                samples = await scrape(http)
                events = {dict(labels)["event"]: value for (name, labels), value in samples.items()
                          if name == "streamgpu_udp_events_total" and dict(labels)["port"] == port}  # fmt: skip
                if events.get("frames") == 4 and samples.get(("streamgpu_udp_producers", where)) == 4:
                    break
                await asyncio.sleep(0.05)
        assert events["datagrams"] >= 8 and events["reply_datagrams"] >= 8 and events["incomplete"] == 0
        assert samples[("streamgpu_udp_partial_frames", where)] == 0
        status = await (await http.get("/v1/status")).json()
        (listener,) = status["udp_listeners"]
        assert listener["port"] == udp_port and listener["frames"] == 4 and listener["ingest_workers"] == 2


@pytest.mark.asyncio
async def test_ingest_workers_alive_and_restarts_reach_metrics() -> None:
    # A worker that died (and its replacement, or the replacement that keeps failing to start) was only in
    # the log: an operator scraping /metrics could not see capacity lost.
    cfg = Config(listeners=[ListenerSpec(port=0)], device="cpu", models=[SPEC], auth_token=TOKEN, ingest_workers=2)
    async with Server(cfg) as server, TestClient(TestServer(create_app(server))) as http:
        samples = await scrape(http)
        assert samples[("streamgpu_ingest_workers", ())] == 2
        assert samples[("streamgpu_ingest_workers_alive", ())] == 2
        assert samples[("streamgpu_ingest_worker_restarts_total", ())] == 0
        (listener,) = server._listeners
        os.kill(listener.pids[0], signal.SIGKILL)  # type: ignore[attr-defined]
        async with asyncio.timeout(10):  # it is replaced once its range is free (nothing reads it here)
            while (await scrape(http)).get(("streamgpu_ingest_worker_restarts_total", ())) != 1:
                await asyncio.sleep(0.05)
            while (await scrape(http))[("streamgpu_ingest_workers_alive", ())] != 2:
                await asyncio.sleep(0.05)
