"""Hostile WebSocket peers of ``/v1/stream`` (review): what one socket may cost the server."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from streamgpu.frame import Outcome
from streamgpu.protocol.wire import FrameHeader, Status
from streamgpu.server import Server
from streamgpu.web import stream as ws_stream
from tests.web.test_stream import config, frame_message, frames, next_reply, url


def sockets_of(server: Server) -> set[Any]:
    http = next(listener for listener in server._listeners if listener.kind == "http")
    return http._runner.app[ws_stream._SOCKETS]  # type: ignore[attr-defined]


@pytest.mark.asyncio
async def test_a_producer_that_never_reads_its_replies_is_not_read_further(monkeypatch: pytest.MonkeyPatch) -> None:
    """A WebSocket producer that sends frames and never reads its replies: its outgoing queue stays
    bounded (its frames are no longer read, as on TCP), instead of growing a reply per frame without end."""
    monkeypatch.setattr(ws_stream, "MAX_QUEUED", 8)
    async with Server(config(max_frames_per_connection=4)) as server, aiohttp.ClientSession() as session:
        async with session.ws_connect(url(server)) as ws:
            batch = frames(40, seed=3)
            await ws.send_bytes(frame_message(batch[0], stream_id=0, sequence=0))
            await next_reply(ws)
            (sock,) = sockets_of(server)
            unblock = asyncio.Event()
            send = sock.ws.send_bytes

            async def stuck(data: bytes, *a: Any, **kw: Any) -> None:  # the peer's window is full
                await unblock.wait()
                await send(data, *a, **kw)

            sock.ws.send_bytes = stuck
            for i, f in enumerate(batch[1:], start=1):
                await ws.send_bytes(frame_message(f, stream_id=0, sequence=i))
            peak = 0
            for _ in range(150):  # 1.5 s: every frame read would be answered by then
                peak = max(peak, len(sock.out))
                await asyncio.sleep(0.01)
            unblock.set()
            got = [await next_reply(ws) for _ in range(len(batch) - 1)]
            assert [h.sequence for h, _ in got] == list(range(1, len(batch)))
        # Queued replies, plus those of the frames already read when the queue filled (at most 4 unanswered).
        assert peak <= ws_stream.MAX_QUEUED + 4, f"{peak} replies queued for a peer that reads nothing"
    assert server.connections == 0 and server.pool.used_bytes == 0


@pytest.mark.asyncio
async def test_a_flood_of_subscribed_results_does_not_evict_the_sockets_own_replies(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A socket that produces and subscribes, reading slowly: the subscribed results past ``MAX_QUEUED`` are
    dropped, never the replies to its own frames (a reply lost is a frame lost to its producer)."""
    monkeypatch.setattr(ws_stream, "MAX_QUEUED", 8)
    async with Server(config()) as server, aiohttp.ClientSession() as session:
        async with session.ws_connect(url(server)) as ws:
            await ws.send_str('{"subscribe": [5]}')
            assert (await asyncio.wait_for(ws.receive(), 5)).data == '{"subscribed": [5]}'
            (sock,) = sockets_of(server)
            unblock, entered = asyncio.Event(), asyncio.Event()
            send = sock.ws.send_bytes

            async def stuck(data: bytes, *a: Any, **kw: Any) -> None:
                entered.set()
                await unblock.wait()
                await send(data, *a, **kw)

            sock.ws.send_bytes = stuck
            header = FrameHeader(5, 0, "default", 0, (1,), 0, 0)
            server.admission.stream_results.publish(header, Outcome(Status.OK))  # the writer is stuck on it
            await asyncio.wait_for(entered.wait(), 5)
            await ws.send_bytes(frame_message(frames(1, seed=4)[0], stream_id=0, sequence=0))
            async with asyncio.timeout(5):
                while not sock.out:  # its frame answered, its reply queued
                    await asyncio.sleep(0.01)
            for _ in range(20):  # another producer's stream 5, faster than this socket reads
                server.admission.stream_results.publish(header, Outcome(Status.OK))
            unblock.set()
            own: list[Any] = []
            async with asyncio.timeout(5):
                while not own:
                    reply, _ = await next_reply(ws)
                    if reply.stream_id == 0:
                        own.append(reply)
            assert own[0].status is Status.OK
        assert sock.dropped >= 20 - ws_stream.MAX_QUEUED
