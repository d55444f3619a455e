"""Hostile WebSocket peers of ``/v1/stream`` (review): what one socket may cost the server."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import numpy as np
import pytest

from streamgpu.frame import Outcome
from streamgpu.protocol import wire
from streamgpu.protocol.wire import FrameHeader, Status
from streamgpu.server import Server
from streamgpu.web import stream as ws_stream
from tests.web.test_stream import config, frame_message, frames, next_reply, url


def held(send: Callable[..., Awaitable[None]], until: asyncio.Event) -> Callable[..., Awaitable[None]]:
    """``send`` that waits for ``until`` first: the peer's window is full."""

    async def stuck(data: Any, *a: Any, **kw: Any) -> None:
        await until.wait()
        await send(data, *a, **kw)

    return stuck


def sockets_of(server: Server) -> set[Any]:
    http = next(listener for listener in server._listeners if listener.kind == "http")
    return http._runner.app[ws_stream._SOCKETS]  # type: ignore[attr-defined]


@pytest.mark.asyncio
@pytest.mark.parametrize("bound", ["messages", "bytes"])
async def test_a_producer_that_never_reads_its_replies_is_not_read_further(
    bound: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A WebSocket producer that sends frames and never reads its replies: its unsent replies stay bounded
    in number (``MAX_QUEUED``) and in bytes (``ws_send_queue_bytes``: big results times a message count
    could be gigabytes) - its frames are no longer read, as on TCP - and none is dropped, instead of
    growing a reply per frame without end."""
    if bound == "messages":
        monkeypatch.setattr(ws_stream, "MAX_QUEUED", 8)
    async with Server(config(max_frames_per_connection=4)) as server, aiohttp.ClientSession() as session:
        async with session.ws_connect(url(server)) as ws:
            batch = frames(40, seed=3)
            await ws.send_bytes(frame_message(batch[0], stream_id=0, sequence=0))
            reply_bytes = len((await asyncio.wait_for(ws.receive(), 10)).data)  # each OK reply's size
            (sock,) = sockets_of(server)
            if bound == "bytes":
                sock.max_bytes = 3 * reply_bytes  # three replies' worth, far fewer than MAX_QUEUED
            unblock = asyncio.Event()
            sock.ws.send_bytes = held(sock.ws.send_bytes, unblock)
            for i, f in enumerate(batch[1:], start=1):
                await ws.send_bytes(frame_message(f, stream_id=0, sequence=i))
            peak = peak_bytes = 0
            for _ in range(150):  # 1.5 s: every frame read would be answered by then
                assert sock.out_bytes == sum(map(len, sock.out))
                peak, peak_bytes = max(peak, len(sock.out)), max(peak_bytes, sock.out_bytes)
                await asyncio.sleep(0.01)
            unblock.set()
            got = [await next_reply(ws) for _ in range(len(batch) - 1)]
            assert [h.sequence for h, _ in got] == list(range(1, len(batch)))  # none dropped
        # Queued replies, plus those of the frames already read when the queue filled (at most 4 unanswered).
        if bound == "messages":
            assert peak <= ws_stream.MAX_QUEUED + 4, f"{peak} replies queued for a peer that reads nothing"
        else:
            assert peak_bytes <= sock.max_bytes + 4 * reply_bytes, (
                f"{peak_bytes} bytes queued for a peer that reads nothing"
            )
    assert server.connections == 0 and server.pool.used_bytes == 0


@pytest.mark.asyncio
async def test_a_peer_that_only_sends_control_messages_and_never_reads_is_not_read_further() -> None:
    """Each subscribe message is answered with the ids now watched (~700 bytes for 64 ids, from a 15-byte
    message): a peer that sends them and never reads had the server queue every answer, past
    ``ws_send_queue_bytes`` and ``MAX_QUEUED`` (review: 40 MiB from 2.6 MiB sent). Text messages now wait
    for room as frames do."""
    async with (
        Server(config(ws_send_queue_bytes=4096)) as server,
        aiohttp.ClientSession() as session,
        session.ws_connect(url(server)) as ws,
    ):
        await ws.send_json({"subscribe": list(range(64))})
        await asyncio.wait_for(ws.receive(), 10)
        (sock,) = sockets_of(server)
        unblock = asyncio.Event()
        sock.ws.send_str = held(sock.ws.send_str, unblock)
        answer = 0
        for _ in range(500):
            await ws.send_str('{"subscribe": 0}')
        for _ in range(100):  # 1 s: every message read would be answered by then
            answer = max(answer, max(map(len, sock.out), default=0))
            assert sock.out_bytes <= sock.max_bytes + answer, f"{sock.out_bytes} bytes queued for a deaf peer"
            await asyncio.sleep(0.01)
        assert sock.out_bytes >= sock.max_bytes - answer  # it filled up: the test bounded something
        unblock.set()
    assert server.connections == 0


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


@pytest.mark.asyncio
async def test_a_slow_subscriber_of_big_results_holds_at_most_ws_send_queue_bytes() -> None:
    """A subscriber that reads slowly, of a stream whose results are big (256 KiB each): the server holds
    at most ``ws_send_queue_bytes`` of subscribed results for it, dropping the oldest (counted), and
    the newest still arrives. (The queue was bounded in messages: 1024 of them, here 50 MiB.)"""
    bound = 1 << 20
    async with Server(config(ws_send_queue_bytes=bound)) as server, aiohttp.ClientSession() as session:
        async with session.ws_connect(url(server)) as ws:
            await ws.send_str('{"subscribe": [5]}')
            assert (await asyncio.wait_for(ws.receive(), 5)).data == '{"subscribed": [5]}'
            (sock,) = sockets_of(server)
            received: list[int] = []

            async def slow_reader() -> None:
                while True:
                    msg = await ws.receive()
                    if msg.type is not aiohttp.WSMsgType.BINARY:
                        return
                    parsed = wire.decode_reply(msg.data)
                    assert parsed is not None and parsed[0].payload_len == big.nbytes
                    received.append(parsed[0].sequence)
                    await asyncio.sleep(0.01)

            big = np.arange(1 << 16, dtype=np.float32)  # 256 KiB
            reading = asyncio.ensure_future(slow_reader())
            published, peak = 200, 0
            for seq in range(published):  # 50 MiB, faster than it reads
                server.admission.stream_results.publish(
                    FrameHeader(5, seq, "default", 0, (1,), 0), Outcome(Status.OK, result=big)
                )
                queued = sum(map(len, sock.results))
                assert queued == sock.results_bytes
                peak = max(peak, queued)
                if seq % 5 == 4:
                    await asyncio.sleep(0.005)
            async with asyncio.timeout(20):
                while not received or received[-1] != published - 1:  # the newest is never dropped
                    await asyncio.sleep(0.01)
            reading.cancel()
        assert peak <= bound, f"{peak} bytes of subscribed results queued for one slow socket (bound {bound})"
        assert sock.dropped > 0 and len(received) + sock.dropped == published
        assert received == sorted(received)  # the oldest were dropped, the rest came in order


async def subscribe_and_stop_reading(server: Server, ws: aiohttp.ClientWebSocketResponse) -> None:
    """``ws`` subscribes to stream 5, then reads nothing while 100 results of 256 KiB are published to it."""
    await ws.send_str('{"subscribe": [5]}')
    assert (await asyncio.wait_for(ws.receive(), 5)).data == '{"subscribed": [5]}'
    big = np.zeros(1 << 16, dtype=np.float32)
    for seq in range(100):
        server.admission.stream_results.publish(
            FrameHeader(5, seq, "default", 0, (1,), 0), Outcome(Status.OK, result=big)
        )
        await asyncio.sleep(0.002)


@pytest.mark.asyncio
async def test_a_subscriber_that_reads_nothing_does_not_hold_shutdown_up() -> None:
    """A subscriber that stops reading while big results pile up: at shutdown its close frame cannot be
    drained. Closing every socket waited for that drain, with no bound: ``Server.stop`` never ended."""
    server = Server(config())
    await server.start()
    try:
        async with aiohttp.ClientSession() as session:
            ws = await session.ws_connect(url(server))
            await subscribe_and_stop_reading(server, ws)
            await asyncio.sleep(0.2)
            started = asyncio.get_running_loop().time()
            async with asyncio.timeout(10):
                await server.stop()
            took = asyncio.get_running_loop().time() - started
            assert took < 5, f"shutdown took {took:.1f} s"
            await ws.close()
    finally:
        await server.stop()
    assert server.connections == 0


@pytest.mark.asyncio
async def test_a_subscriber_that_says_goodbye_but_reads_nothing_does_not_keep_its_connection() -> None:
    """A subscriber that stops reading, then sends a close frame: its socket ended, but the connection was
    only closed, which waits for the unsent results to be read, for good. It kept its ``max_connections``
    place (and its buffers), past the server's own stop."""
    async with Server(config()) as server, aiohttp.ClientSession() as session:
        ws = await session.ws_connect(url(server))
        await subscribe_and_stop_reading(server, ws)
        await ws._writer.close(1000, b"")  # (the close frame alone: the client's close() would read)
        async with asyncio.timeout(10):
            while server.admission.stream_results.subscribers(5):
                await asyncio.sleep(0.01)
        give_up = asyncio.get_running_loop().time() + 3 * ws_stream.CLOSE_GRACE_S
        while server.connections and asyncio.get_running_loop().time() < give_up:
            await asyncio.sleep(0.01)
        assert server.connections == 0, "a socket that ended still holds its connection"
        await ws.close()


@pytest.mark.asyncio
async def test_a_peer_cannot_make_the_server_deflate_every_message_for_it() -> None:
    """permessage-deflate was on: any peer that asked for it had every message it gets compressed by the
    server (review: ~9 ms of CPU per 256 KiB result, in the loop's executor threads, 45x an uncompressed
    send), every subscribed result included, a cost on every producer's CPU that one watcher chose."""
    async with (
        Server(config()) as server,
        aiohttp.ClientSession() as session,
        session.ws_connect(url(server), compress=15) as ws,
    ):
        assert ws.compress == 0, "the server agreed to deflate this socket's messages"
        await ws.send_str('{"subscribe": [5]}')
        assert (await asyncio.wait_for(ws.receive(), 5)).data == '{"subscribed": [5]}'


@pytest.mark.asyncio
async def test_a_flood_of_subscribe_and_unsubscribe_messages_is_paced() -> None:
    """A socket that sent ``{"subscribe": [64 ids]}`` and ``{"unsubscribe": ...}`` as fast as their answers came
    (it reads them, so the answer queue never held it) had its control messages handled at once, without end:
    the loop was its own. A TCP producer beside it got 23 frames in 5 s instead of ~2600 (review: p50 1.7 ->
    222 ms). Past a burst, a socket's control messages are now read at most CONTROL_PER_S a second."""
    async with Server(config()) as server, aiohttp.ClientSession() as session:
        ws = await session.ws_connect(url(server))
        ids = list(range(100, 164))
        n = ws_stream.CONTROL_BURST + ws_stream.CONTROL_PER_S // 2
        loop = asyncio.get_running_loop()
        started = loop.time()
        for i in range(n):
            await ws.send_str(json.dumps({"subscribe" if i % 2 == 0 else "unsubscribe": ids}))
        for i in range(n):
            answer = json.loads((await asyncio.wait_for(ws.receive(), 10)).data)
            assert answer == {"subscribed": ids if i % 2 == 0 else []}, answer
        took = loop.time() - started
        least = (n - ws_stream.CONTROL_BURST) / ws_stream.CONTROL_PER_S
        assert took >= 0.8 * least, f"{n} control messages answered in {took:.3f} s (paced: {least:.2f} s at least)"
        await ws.close()
