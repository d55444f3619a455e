"""WebSocket streams (``/v1/stream``): TCP frames and replies over WebSocket messages, and subscribers
that receive every result published for a stream id, from any front end."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import numpy as np
import pytest
import pytest_asyncio

from streamgpu import client
from streamgpu.config import Config, ListenerSpec
from streamgpu.frame import Outcome
from streamgpu.ingest.hub import Origin, ResultHub
from streamgpu.models.spec import ModelSpec
from streamgpu.protocol import wire
from streamgpu.protocol.wire import FrameHeader, ReplyFlags, ReplyHeader, Status
from streamgpu.server import Server
from streamgpu.web import stream as ws_stream
from tests.test_server import record_withdrawals, slow_batches

SPEC = ModelSpec(input_shape=(16, 16, 3), max_batch_size=8, batch_buckets=(1, 4, 8))


def config(**kw: Any) -> Config:
    base: dict[str, Any] = dict(
        listeners=[ListenerSpec(port=0), ListenerSpec(kind="http", port=0)], device="cpu", models=[SPEC]
    )
    base.update(kw)
    return Config(**base)


@pytest_asyncio.fixture
async def server() -> AsyncIterator[Server]:
    async with Server(config()) as srv:
        yield srv
    assert srv.pool.used_bytes == 0


def url(server: Server, query: str = "") -> str:
    return f"ws://127.0.0.1:{server.addresses[1][1]}/v1/stream{query}"


def frame_message(frame: np.ndarray, stream_id: int, sequence: int, model: str = "default") -> bytes:
    header = FrameHeader(stream_id, sequence, model, wire.dtype_code(frame.dtype), frame.shape, frame.nbytes, 1234)
    return wire.encode_frame_header(header) + frame.tobytes()


async def next_reply(ws: aiohttp.ClientWebSocketResponse) -> tuple[ReplyHeader, np.ndarray | None]:
    msg = await asyncio.wait_for(ws.receive(), 10)
    assert msg.type is aiohttp.WSMsgType.BINARY, msg
    parsed = wire.decode_reply(msg.data)
    assert parsed is not None and parsed[2] == len(msg.data)  # one whole reply per message
    header, payload, _ = parsed
    if not header.payload_len:
        return header, None
    return header, np.frombuffer(payload, wire.DTYPES[header.dtype_code]).reshape(header.shape)


def frames(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *SPEC.input_shape), dtype=np.uint8)


async def tcp_replies(server: Server, batch: np.ndarray, stream_id: int) -> list[client.Reply]:
    conn = await client.connect("127.0.0.1", server.port)
    try:
        return list(await asyncio.gather(*(conn.submit(f, stream_id=stream_id) for f in batch)))
    finally:
        await conn.close()


@pytest.mark.asyncio
async def test_websocket_producer_gets_tcp_replies_in_order_per_stream(server: Server) -> None:
    batch = frames(8, seed=1)
    expected = [r.unwrap() for r in await tcp_replies(server, batch, 0)]
    async with aiohttp.ClientSession() as session, session.ws_connect(url(server)) as ws:
        for i, f in enumerate(batch):
            await ws.send_bytes(frame_message(f, stream_id=i % 2, sequence=i // 2))
        seen: dict[int, list[int]] = {0: [], 1: []}
        for _ in batch:
            header, result = await next_reply(ws)
            assert header.status == Status.OK and header.timestamp_ns == 1234
            seen[header.stream_id].append(header.sequence)
            assert result is not None
            np.testing.assert_allclose(result, expected[header.sequence * 2 + header.stream_id], rtol=1e-5, atol=1e-5)
        assert seen == {0: [0, 1, 2, 3], 1: [0, 1, 2, 3]}
        # A refused frame costs only itself; the socket goes on.
        await ws.send_bytes(frame_message(np.zeros((4, 4, 3), np.uint8), stream_id=5, sequence=0))
        header, _ = await next_reply(ws)
        assert header.status == Status.BAD_FRAME and "takes uint8 [16, 16, 3]" in header.message
        await ws.send_bytes(frame_message(batch[0], stream_id=5, sequence=1, model="nope"))
        assert (await next_reply(ws))[0].status == Status.UNKNOWN_MODEL
        await ws.send_bytes(frame_message(batch[0], stream_id=5, sequence=2))
        assert (await next_reply(ws))[0].status == Status.OK
        # A message that is not one whole frame: a connection reply, then the socket closes.
        await ws.send_bytes(frame_message(batch[0], stream_id=5, sequence=3)[:-1])
        header, _ = await next_reply(ws)
        assert header.flags & ReplyFlags.CONNECTION and header.status == Status.BAD_FRAME
        assert "payload bytes" in header.message
        assert (await asyncio.wait_for(ws.receive(), 5)).type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    for _ in range(100):
        if server.pool.used_bytes == 0:
            break
        await asyncio.sleep(0.01)
    assert server.pool.used_bytes == 0


@pytest.mark.asyncio
async def test_subscriber_receives_every_result_of_its_stream_from_tcp_and_websocket(server: Server) -> None:
    async with aiohttp.ClientSession() as session, session.ws_connect(url(server)) as sub:
        await sub.send_str('{"subscribe": [7]}')
        assert await asyncio.wait_for(sub.receive_json(), 5) == {"subscribed": [7]}
        watched, other = frames(5, seed=2), frames(3, seed=3)
        replies, _ = await asyncio.gather(tcp_replies(server, watched, 7), tcp_replies(server, other, 8))
        got = [await next_reply(sub) for _ in watched]
        assert [h.stream_id for h, _ in got] == [7] * len(watched)
        assert sorted(h.sequence for h, _ in got) == list(range(len(watched)))
        by_seq = {h.sequence: r for h, r in got}
        for reply in replies:
            np.testing.assert_array_equal(by_seq[reply.sequence], reply.unwrap())  # the same result, not a rerun
        # A WebSocket producer's frames of stream 7 reach the subscriber too.
        async with session.ws_connect(url(server)) as producer:
            await producer.send_bytes(frame_message(watched[0], stream_id=7, sequence=99))
            own, _ = await next_reply(producer)
        header, result = await next_reply(sub)
        assert (header.stream_id, header.sequence, own.sequence) == (7, 99, 99)
        np.testing.assert_array_equal(result, by_seq[0])  # the same frame as the TCP producer's sequence 0
        await sub.send_str('{"unsubscribe": 7}')
        assert await asyncio.wait_for(sub.receive_json(), 5) == {"subscribed": []}
        await tcp_replies(server, watched[:2], 7)
        await sub.send_str('{"subscribe": [8]}')  # the next message is the answer: nothing of 7 came between
        assert await asyncio.wait_for(sub.receive_json(), 5) == {"subscribed": [8]}
        # The last: 4 MB of ids is refused unparsed (parsing a message of up to max_payload_bytes blocks the loop).
        for bad, needle in [("nonsense", "Expecting value"), ('{"subscribe": "x"}', "stream ids"),
                            ('{"watch": 1}', "expected"), ('{"subscribe": [-1]}', "stream ids"),
                            ("[" * 10_000, "nested too deeply"),
                            ('{"subscribe": [' + "8," * 2_000_000 + "8]}", "too long")]:  # fmt: skip
            await sub.send_str(bad)
            assert needle in (await asyncio.wait_for(sub.receive_json(), 5))["error"]
        assert server.admission.stream_results.subscribers(8) == 1
    for _ in range(100):  # the subscriber's close ends its subscriptions
        if server.admission.stream_results.subscribers(8) == 0:
            break
        await asyncio.sleep(0.01)
    assert server.admission.stream_results.subscribers(8) == 0


@pytest.fixture
def encodings(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sequence numbers of the results encoded for WebSockets, one per encoding."""
    encoded: list[int] = []
    encode = ws_stream._encode

    def counted(header: FrameHeader, outcome: Outcome) -> bytes:
        encoded.append(header.sequence)
        return encode(header, outcome)

    monkeypatch.setattr(ws_stream, "_encode", counted)
    return encoded


@pytest.mark.asyncio
async def test_a_result_is_encoded_once_for_all_subscribers_of_its_stream(server: Server, encodings: list[int]) -> None:
    """Each subscriber encoded its own copy of every result: sixteen subscribers of one stream, sixteen encodings
    (and copies of the result) per frame on the loop."""
    watched = frames(5, seed=7)
    async with aiohttp.ClientSession() as session, contextlib.AsyncExitStack() as stack:
        subs = [await stack.enter_async_context(session.ws_connect(url(server))) for _ in range(4)]
        for sub in subs:
            await sub.send_str('{"subscribe": 7}')
            assert await asyncio.wait_for(sub.receive_json(), 5) == {"subscribed": [7]}
        replies = await tcp_replies(server, watched, 7)
        got = [[(await asyncio.wait_for(sub.receive_bytes(), 10)) for _ in watched] for sub in subs]
    assert all(messages == got[0] for messages in got)  # every subscriber the same messages, in the same order
    assert sorted(wire.decode_reply(m)[0].sequence for m in got[0]) == [r.sequence for r in replies]  # type: ignore[index]
    assert sorted(encodings) == list(range(len(watched)))  # one encoding per result, not one per subscriber


@pytest.mark.asyncio
async def test_a_websocket_producers_reply_is_encoded_once_with_its_subscribers(
    server: Server, encodings: list[int]
) -> None:
    """A WebSocket producer's frame whose stream id was watched was encoded twice: once for the producer's own
    reply, once more for the subscribers, the same bytes built (and the result copied) twice on the loop."""
    watched = frames(3, seed=8)
    async with aiohttp.ClientSession() as session, contextlib.AsyncExitStack() as stack:
        sub = await stack.enter_async_context(session.ws_connect(url(server)))
        await sub.send_str('{"subscribe": 7}')
        assert await asyncio.wait_for(sub.receive_json(), 5) == {"subscribed": [7]}
        producer = await stack.enter_async_context(session.ws_connect(url(server)))
        for i, frame in enumerate(watched):
            await producer.send_bytes(frame_message(frame, stream_id=7, sequence=i))
        own = [await asyncio.wait_for(producer.receive_bytes(), 10) for _ in watched]
        seen = [await asyncio.wait_for(sub.receive_bytes(), 10) for _ in watched]
    assert [wire.decode_reply(m)[0].status for m in own] == [Status.OK] * len(watched)  # type: ignore[index]
    assert own == seen  # the producer and its subscriber got the same bytes, in the same order
    assert encodings == list(range(len(watched)))  # one encoding per frame, not one for each side


@pytest.mark.asyncio
async def test_a_socket_closing_withdraws_its_queued_frames_and_only_then(monkeypatch: pytest.MonkeyPatch) -> None:
    """A socket that closes with every frame answered looks for none of its producer's queued frames (a token's
    other connections may hold thousands, ~0.15 us each); one that closes with frames queued has them answered
    at once, their slots freed."""
    slow_batches(monkeypatch, 0.5)
    withdrawn = record_withdrawals(monkeypatch)
    one = ModelSpec(input_shape=SPEC.input_shape, max_batch_size=1, batch_buckets=(1,))
    batch = frames(4, seed=6)
    async with Server(config(models=[one], max_inflight_batches=1)) as server, aiohttp.ClientSession() as session:
        async with session.ws_connect(url(server)) as ws:
            await ws.send_bytes(frame_message(batch[0], stream_id=1, sequence=0))
            assert (await next_reply(ws))[0].status == Status.OK
        async with session.ws_connect(url(server)) as ws:
            for i in range(1, 4):  # one runs, two wait behind it
                await ws.send_bytes(frame_message(batch[i], stream_id=1, sequence=i))
            while server.metrics()["frames_in_flight"] < 3:
                await asyncio.sleep(0.01)
        for _ in range(100):
            if server.metrics()["models"]["default"]["abandoned"] == 2:
                break
            await asyncio.sleep(0.01)
        assert server.metrics()["models"]["default"]["abandoned"] == 2
        assert len(withdrawn) == 1, "the socket closing with its frames answered withdrew too"


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_token_checked_before_the_upgrade() -> None:
    async with Server(config(auth_token="s3cret")) as server, aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await session.ws_connect(url(server))
        assert info.value.status == 401
        plain = url(server, "?token=s3cret").replace("ws://", "http://")
        async with session.get(plain) as response:  # no upgrade asked: the protocol's JSON error all the same
            assert response.status == 400 and "WebSocket" in (await response.json())["error"]
        async with session.ws_connect(url(server, "?token=s3cret")) as ws:
            await ws.send_bytes(frame_message(frames(1, seed=4)[0], stream_id=1, sequence=0))
            assert (await next_reply(ws))[0].status == Status.OK


def test_result_hub_publishes_by_stream_id_and_drops_a_broken_watcher() -> None:
    hub = ResultHub()
    seen: list[tuple[int, int]] = []
    header = FrameHeader(3, 1, "m", 1, (1,), 1)
    hub.publish(header, Outcome(Status.OK))  # nobody watches: nothing happens
    sub = hub.subscribe(3, lambda h, o: seen.append((h.stream_id, h.sequence)))

    def broken(h: FrameHeader, o: Outcome) -> None:
        raise RuntimeError("watcher bug")

    hub.subscribe(3, broken)
    hub.subscribe(4, lambda h, o: seen.append((-1, -1)))
    hub.publish(header, Outcome(Status.OK))
    hub.publish(header._replace(sequence=2), Outcome(Status.OK))
    assert seen == [(3, 1), (3, 2)] and hub.subscribers(3) == 1  # the broken one was unsubscribed
    assert hub.watched(3) and not hub.watched(5)
    sub.cancel()
    sub.cancel()
    assert hub.subscribers(3) == 0 and not hub.watched(3)


def test_an_encoding_is_made_once_per_publication_and_encoder() -> None:
    hub = ResultHub()
    made: list[tuple[str, int]] = []

    def encoder(name: str) -> Callable[[FrameHeader, Outcome], bytes]:
        def encode(h: FrameHeader, o: Outcome) -> bytes:
            made.append((name, h.sequence))
            return f"{name}{h.sequence}".encode()

        return encode

    a, b = encoder("a"), encoder("b")
    got: list[bytes] = []
    for _ in range(3):
        hub.subscribe(3, lambda h, o: got.extend((hub.encoded(a, h, o), hub.encoded(b, h, o))))
    inner = FrameHeader(4, 9, "m", 1, (1,), 1)
    hub.subscribe(4, lambda h, o: got.append(hub.encoded(a, h, o)))
    # A watcher that publishes another stream's outcome in its callback: each publication has its own encodings.
    hub.subscribe(3, lambda h, o: hub.publish(inner, Outcome(Status.OK)) if h.sequence == 1 else None)
    hub.subscribe(3, lambda h, o: got.append(hub.encoded(a, h, o)))
    header = FrameHeader(3, 1, "m", 1, (1,), 1)
    hub.publish(header, Outcome(Status.OK))
    hub.publish(header._replace(sequence=2), Outcome(Status.OK))
    assert made == [("a", 1), ("b", 1), ("a", 9), ("a", 2), ("b", 2)]
    assert got == [b"a1", b"b1"] * 3 + [b"a9", b"a1"] + [b"a2", b"b2"] * 3 + [b"a2"]
    assert hub.encoded(a, header, Outcome(Status.OK)) == b"a1" and made[-1] == ("a", 1)  # outside: encoded afresh


def test_a_tap_gets_every_stream_id_with_its_origin() -> None:
    hub = ResultHub()
    seen: list[tuple[int, str, str]] = []
    assert not hub.watched(3) and not hub.watching
    tap = hub.tap(lambda h, o, origin: seen.append((h.stream_id, origin.source, origin.stream)))
    assert hub.watched(3) and hub.watched(4) and hub.watching
    hub.publish(FrameHeader(3, 1, "m", 1, (1,), 1), Outcome(Status.OK), Origin("raw", "raw:9000/1"))
    hub.publish(FrameHeader(4, 1, "m", 1, (1,), 1), Outcome(Status.BAD_FRAME))
    tap.cancel()
    assert not hub.watching  # (a batch then asks about none of its frames)
    one = hub.subscribe(7, lambda h, o: None)
    assert hub.watching
    one.cancel()
    assert not hub.watching
    hub.publish(FrameHeader(5, 1, "m", 1, (1,), 1), Outcome(Status.OK))
    assert seen == [(3, "raw", "raw:9000/1"), (4, "", "")] and hub.published == 3


@pytest.mark.asyncio
async def test_a_subscription_to_a_stream_id_of_thousands_of_digits_names_the_ids_range(server: Server) -> None:
    # {"subscribe": 111...1 (5000 digits)} was answered with Python's "Exceeds the limit (4300 digits) for integer
    # string conversion ... use sys.set_int_max_str_digits()"; one of 4000 digits was already out of range
    async with aiohttp.ClientSession() as session, session.ws_connect(url(server)) as sub:
        for ids in ("1" * 5000, f"[7, {'9' * 5000}]", "9" * 4000):
            await sub.send_str(f'{{"subscribe": {ids}}}')
            error = (await asyncio.wait_for(sub.receive_json(), 5))["error"]
            assert error.startswith("stream ids must be integers 0..4294967295 (one, or a list)"), error
            assert "sys.set_int_max_str_digits" not in error
        await sub.send_str('{"subscribe": [7]}')  # the socket still serves
        assert await asyncio.wait_for(sub.receive_json(), 5) == {"subscribed": [7]}
