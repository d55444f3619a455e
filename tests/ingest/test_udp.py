"""The UDP listener over loopback on a real server (CPU backend), with the client's connect_udp."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import socket
import sys
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import numpy as np
import pytest
import pytest_asyncio

from streamgpu import client
from streamgpu.config import Config, ListenerSpec
from streamgpu.errors import ConfigError
from streamgpu.ingest import mmsg as mmsg_area
from streamgpu.ingest import udp as udp_listener
from streamgpu.ingest.udp import UdpListener
from streamgpu.mmsg import SOL_UDP, UDP_SEGMENT
from streamgpu.models.spec import ModelSpec
from streamgpu.protocol import udp, wire
from streamgpu.protocol.udp import ChunkHeader, Kind
from streamgpu.protocol.wire import FrameFlags, FrameHeader, Status
from streamgpu.server import Server


@pytest.fixture(autouse=True)
def small_row_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Coalesced receives split into chunks of the fewest rows (one receive's worth), so that a few frames
    exercise the split across chunks that a server meets with thousands of datagrams per receive call."""
    monkeypatch.setattr(mmsg_area, "GRO_ROWS", mmsg_area.GRO_SEGMENTS)


SHAPE = (24, 24, 3)
SPEC = ModelSpec(input_shape=SHAPE, max_batch_size=8, batch_buckets=(1, 8))
NBYTES = 24 * 24 * 3
GRAM = 512  # small datagrams: a frame is 4 of them


def make_config(**options: Any) -> Config:
    udp_spec = ListenerSpec("udp", "127.0.0.1", 0, {"reassembly_timeout_s": 0.2, **options})
    return Config(listeners=[ListenerSpec("tcp", "127.0.0.1", 0), udp_spec], device="cpu", models=[SPEC])


@pytest_asyncio.fixture
async def server(request: pytest.FixtureRequest) -> AsyncIterator[Server]:
    options = getattr(request, "param", {})
    async with Server(make_config(**options)) as srv:
        yield srv


def udp_port(srv: Server) -> int:
    return srv.addresses[1][1]


def udp_stats(srv: Server) -> dict[str, Any]:
    stats: dict[str, Any] = srv.metrics()["listeners"][1]
    return stats


def frames(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, SHAPE, dtype=np.uint8) for _ in range(n)]


def same(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to float rounding (batch size changes the summation order); one wrong input byte is far off."""
    return a.shape == b.shape and np.allclose(a, b, rtol=1e-4, atol=1e-6)


async def reference(srv: Server, inputs: list[np.ndarray]) -> list[np.ndarray]:
    """Each input's result over TCP (the CPU backend is deterministic per input)."""
    async with await client.connect("127.0.0.1", srv.port) as conn:
        return [(await conn.infer(f)).unwrap() for f in inputs]


async def wait_for(predicate: Any, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        assert loop.time() < end, "condition not reached in time"
        await asyncio.sleep(0.01)


async def holding_connection(srv: Server) -> tuple[client.UdpConnection, list[list[bytes]]]:
    """A UDP connection whose frames are encoded but not sent: each frame's datagrams are collected in the
    list, for the test to send as it likes (in one burst, reordered, as GSO runs, some left out)."""
    conn = await client.connect_udp("127.0.0.1", udp_port(srv), datagram_bytes=GRAM, reply_timeout=5)
    held: list[list[bytes]] = []
    conn._write = lambda encoded: held.append([udp.join(parts) for parts in encoded])  # type: ignore[method-assign]
    return conn, held


def send_burst(conn: client.UdpConnection, held: list[list[bytes]]) -> None:
    """Every held datagram, back to back without yielding to the loop: the listener reads them in one batch."""
    for datagram in [d for message in held for d in message]:
        conn.socket.send(datagram)


class Raw:
    """A hand-made UDP producer: sends what it is given, reads reply headers."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        self.sock.connect(("127.0.0.1", port))

    def send(self, *datagrams: bytes) -> None:
        for d in datagrams:
            self.sock.send(d)

    async def replies(self, quiet: float = 0.3) -> list[wire.ReplyHeader]:
        """The header of every reply that comes until none came for ``quiet`` seconds."""
        loop = asyncio.get_running_loop()
        out: list[wire.ReplyHeader] = []
        while True:
            try:
                data = await asyncio.wait_for(loop.sock_recv(self.sock, 65536), quiet)
            except TimeoutError:
                return out
            ch = udp.decode_chunk_header(data)
            assert ch.kind == Kind.REPLY
            if ch.chunk_index:
                continue  # results are not looked at here: the header in chunk 0 is
            body = data[udp.HEADER_SIZE :]
            head = body[: udp.reply_head_length(body)]
            got = wire.decode_reply(head + bytes(ch.length))
            assert got is not None
            out.append(got[0])

    def close(self) -> None:
        self.sock.close()


def grams(seq: int, frame: np.ndarray | None = None, stream: int = 0, live: bool = False,
          flags: FrameFlags = FrameFlags.NONE) -> list[bytes]:  # fmt: skip
    payload = (frame if frame is not None else np.zeros(SHAPE, np.uint8)).data.cast("B")
    flags |= FrameFlags.LIVE if live else FrameFlags.NONE
    header = FrameHeader(stream, seq, "default", 1, SHAPE, NBYTES, flags=flags)
    return [udp.join(parts) for parts in udp.frame_datagrams(header, payload, GRAM)]


# --- end to end --------------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("server", [{"gro": False}, {"gro": True}], indirect=True, ids=["gro off", "gro on"])
async def test_frames_over_udp_match_tcp_results(server: Server) -> None:
    inputs = frames(6)
    expected = await reference(server, inputs)
    conn = await client.connect_udp("127.0.0.1", udp_port(server), datagram_bytes=GRAM)
    try:
        replies = await asyncio.gather(*(conn.submit(f, stream_id=i % 2) for i, f in enumerate(inputs)))
        for reply, want in zip(replies, expected, strict=True):
            assert reply.ok and same(reply.unwrap(), want)
        big = await conn.infer(inputs[0], sequence=99)  # default datagram size too
        assert big.ok
        assert conn._udp._sender.gso_messages == 7  # each frame's datagrams went as one GSO message (the default)
    finally:
        await conn.close()
    stats = udp_stats(server)
    assert stats["frames"] == 7 and stats["partial_frames"] == 0 and server.pool.slots_in_use == 0
    # Live mode: a newer LIVE frame of the stream gives up an older one still in reassembly.
    raw = Raw(udp_port(server))
    try:
        old, new = grams(1, live=True), grams(2, frames(1)[0], live=True)
        raw.send(*old[:-1], *new)
        answered = await raw.replies()
        assert [(r.sequence, r.status) for r in answered] == [(1, Status.SUPERSEDED), (2, Status.OK)]
        assert server.pool.slots_in_use == 0
    finally:
        raw.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("workers", [0, 2])
async def test_a_model_with_several_outputs_answers_udp_with_the_first_and_says_where_the_rest_are(
    workers: int,
) -> None:
    # The note was a v1 connection's, "connect with protocol version 2": a UDP sender has no HELLO to ask with.
    top = ModelSpec(name="top", input_shape=SHAPE, postprocess="topk:3", max_batch_size=8, batch_buckets=(1, 8))
    udp_spec = ListenerSpec("udp", "127.0.0.1", 0, {"reassembly_timeout_s": 0.2})
    async with Server(Config(listeners=[ListenerSpec("tcp", "127.0.0.1", 0), udp_spec], device="cpu",
                             models=[top], ingest_workers=workers)) as srv:  # fmt: skip
        conn = await client.connect_udp("127.0.0.1", udp_port(srv), datagram_bytes=GRAM, reply_timeout=5)
        try:
            reply = await conn.infer(frames(1)[0], model="top")
        finally:
            await conn.close()
    assert reply.ok and reply.unwrap().shape == (3,) and reply.outputs is None
    assert "a UDP reply carries only the first ('indices')" in reply.message, reply.message
    assert "WebSocket subscribers get all of them" in reply.message and "connect with" not in reply.message


@pytest.mark.asyncio
async def test_frames_flagged_for_subscribers_reach_a_websocket_subscriber_not_the_sender() -> None:
    """FrameFlags.SUBSCRIBERS: every outcome (OK and INCOMPLETE) goes to /v1/stream subscribers of the stream id,
    and no reply datagram to the producer; an unflagged frame of the same stream gets both."""
    cfg = make_config()
    cfg = dataclasses.replace(cfg, listeners=[*cfg.listeners, ListenerSpec("http", "127.0.0.1", 0)])
    async with Server(cfg) as srv, aiohttp.ClientSession() as session:
        inputs = frames(5, seed=5)
        expected = await reference(srv, inputs)
        url = f"ws://127.0.0.1:{srv.addresses[2][1]}/v1/stream"
        async with session.ws_connect(url) as sub:
            await sub.send_str('{"subscribe": [7]}')
            assert await asyncio.wait_for(sub.receive_json(), 5) == {"subscribed": [7]}
            raw = Raw(udp_port(srv))
            try:
                for seq, f in enumerate(inputs[:4]):
                    raw.send(*grams(seq, f, stream=7, flags=FrameFlags.SUBSCRIBERS))
                raw.send(*grams(4, inputs[0], stream=7, flags=FrameFlags.SUBSCRIBERS)[:-1])  # never complete
                raw.send(*grams(5, inputs[4], stream=7))  # no flag: a datagram reply too
                published: dict[int, tuple[wire.ReplyHeader, np.ndarray | None]] = {}
                while len(published) < 6:
                    msg = await asyncio.wait_for(sub.receive(), 5)
                    parsed = wire.decode_reply(msg.data)
                    assert parsed is not None
                    head, payload, _ = parsed
                    result = np.frombuffer(payload, np.float32).copy() if head.payload_len else None
                    assert head.sequence not in published  # each outcome once
                    published[head.sequence] = (head, result)
                answered = await raw.replies()
            finally:
                raw.close()
        assert [(r.sequence, r.status) for r in answered] == [(5, Status.OK)]  # only the unflagged frame
        for seq, want in ((0, 0), (1, 1), (2, 2), (3, 3), (5, 4)):
            head, result = published[seq]
            assert head.status == Status.OK and result is not None and same(result, expected[want])
        assert published[4][0].status == Status.INCOMPLETE and "datagrams missing" in published[4][0].message
        assert udp_stats(srv)["replies_to_subscribers"] == 5


def damage_module() -> ModuleType:
    """tools/soak_udp.py, whose ``Damage`` stands in for a UDP connection's sending: drops, repeats, reorders."""
    spec = importlib.util.spec_from_file_location(
        "soak_udp", Path(__file__).resolve().parents[2] / "tools" / "soak_udp.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["soak_udp"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.asyncio
@pytest.mark.parametrize("server", [{"gro": False}, {"gro": True}], indirect=True, ids=["gro off", "gro on"])
async def test_loss_duplicates_and_reordering(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every complete frame OK with its result, every damaged one INCOMPLETE, each answered exactly once."""
    monkeypatch.setattr(udp_listener, "_RUNS_COPIED", 0)  # every batch placed by the one gathering assignment
    monkeypatch.setattr(udp_listener, "_RUN_LENGTH", 1 << 30)
    inputs = frames(8, seed=1)
    expected = await reference(server, inputs)
    conn = await client.connect_udp("127.0.0.1", udp_port(server), datagram_bytes=GRAM, reply_timeout=5)
    shuffler = damage_module().Damage(conn, loss=0.01, dup=0.01, reorder=16, seed=7)
    monkeypatch.setattr(conn, "_write", shuffler.write)
    n = 300
    replies: dict[tuple[int, int], client.Reply] = {}
    window = asyncio.Semaphore(8)

    async def one(i: int) -> None:
        async with window:
            reply = await conn.submit(inputs[i % len(inputs)], stream_id=i % 3, sequence=i)
        replies[(i % 3, i)] = reply

    try:
        await asyncio.gather(*(one(i) for i in range(n)))
        await asyncio.sleep(0.3)  # duplicate replies, if any, would come now
        unmatched = conn._protocol.unmatched_replies
    finally:
        await conn.close()
    damaged = shuffler.damaged & shuffler.sent  # frames with some datagrams sent, not all
    assert len(damaged) >= 3, "the seed must damage some frames"
    assert len(replies) == n and unmatched == 0
    for (stream, seq), reply in replies.items():
        if (stream, seq) in damaged:
            assert reply.status == Status.INCOMPLETE, (stream, seq, reply.message)
            assert "datagrams missing" in reply.message
        else:
            assert reply.ok, (stream, seq, reply.status, reply.message)
            assert same(reply.unwrap(), expected[seq % len(inputs)])
    stats = udp_stats(server)
    assert stats["incomplete"] == len(damaged) and stats["duplicates"] + stats.get("late", 0) > 0
    assert stats["partial_frames"] == 0 and server.pool.slots_in_use == 0


def test_blocking_client_over_udp() -> None:
    """``connect_udp_sync`` (what scripts and ``streamgpu send`` use) against a server on another thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    srv = Server(make_config())
    asyncio.run_coroutine_threadsafe(srv.start(), loop).result(30)
    try:
        with client.connect_udp_sync("127.0.0.1", udp_port(srv), datagram_bytes=GRAM) as conn:
            reply = conn.infer(frames(1)[0], timeout=10)
            assert reply.ok and reply.unwrap().shape == (1000,)
    finally:
        asyncio.run_coroutine_threadsafe(srv.stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


# --- bounds -----------------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("server", [{"max_partial_frames": 4, "reassembly_timeout_s": 30}], indirect=True)
async def test_flood_of_first_chunks_is_bounded_and_isolated(server: Server) -> None:
    flood = Raw(udp_port(server))
    conn = await client.connect_udp("127.0.0.1", udp_port(server), datagram_bytes=GRAM)
    try:
        inputs = frames(4, seed=2)
        most_slots = 0
        for seq in range(200):
            flood.send(grams(seq)[0])  # chunk 0 only: the rest never comes
            if seq % 20 == 0:
                good = await conn.infer(inputs[seq % 4])  # another producer is not affected
                assert good.ok, good.message
            most_slots = max(most_slots, server.pool.slots_in_use)
        await wait_for(lambda: udp_stats(server).get("evicted", 0) == 196)
        assert most_slots <= 4 + 1  # the flood's 4 partial frames, and at most one frame of the other producer
        assert udp_stats(server)["partial_frames"] == 4 and server.pool.slots_in_use == 4
        answered = await flood.replies()
        assert [r.status for r in answered] == [Status.INCOMPLETE] * 196
        assert sorted(r.sequence for r in answered) == list(range(196))  # the oldest given up, each once
        await conn.close()
        # Shutdown answers the frames still in reassembly, and frees their slots.
        stopping = asyncio.ensure_future(server.stop())
        answered = await flood.replies()
        await stopping
        assert sorted((r.sequence, r.status) for r in answered) == [(s, Status.SHUTTING_DOWN) for s in range(196, 200)]
        assert server.pool.slots_in_use == 0
    finally:
        flood.close()
        await conn.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("server", [{"max_partial_frames": 2, "reassembly_timeout_s": 30}], indirect=True)
@pytest.mark.parametrize("runs_copied", [0, udp_listener._RUNS_COPIED])
async def test_a_frame_given_up_inside_a_batch_writes_nothing(server: Server, runs_copied: int,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Frames 10, 11 and 5 open in one receive batch; opening 5 gives up 10, whose slot 5 then gets.
    10's datagrams in that batch must not be written (they would land in 5's payload); by the one
    gathering assignment (runs_copied 0) and by a slice copy per run."""
    monkeypatch.setattr(udp_listener, "_RUNS_COPIED", runs_copied)
    if not runs_copied:
        monkeypatch.setattr(udp_listener, "_RUN_LENGTH", 1 << 30)
    inputs = frames(3, seed=4)
    expected = await reference(server, inputs[2:])
    conn, held = await holding_connection(server)
    try:
        futures = [conn.submit(f, sequence=seq) for f, seq in zip(inputs, (10, 11, 5), strict=True)]
        a, b, c = held
        for d in (*a[1:], *b[1:], *c[1:]):  # one burst: read in one batch
            conn.socket.send(d)
        await wait_for(lambda: udp_stats(server).get("evicted", 0) == 1)
        conn.socket.send(c[0])
        given_up, done = await futures[0], await futures[2]
        assert given_up.status == Status.INCOMPLETE and done.ok
        assert same(done.unwrap(), expected[0])  # not frame 10's bytes in frame 5's payload
        stats = udp_stats(server)
        assert stats["late"] == len(a) - 1 and stats["receive_calls"] == 2
        futures[1].cancel()  # frame 11 never completes
    finally:
        await conn.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("server", [{"max_partial_frames": 2, "reassembly_timeout_s": 30, "gro": False},
                                    {"max_partial_frames": 2, "reassembly_timeout_s": 30, "gro": True}],
                         indirect=True, ids=["gro off", "gro on"])  # fmt: skip
async def test_frames_whole_in_one_receive_batch_are_not_given_up_for_each_other(server: Server) -> None:
    """Twelve whole frames of one producer read in one receive batch (a producer with many frames in flight
    under load) are all answered OK: each is complete in the batch that opened it, so it never counts
    against max_partial_frames (2), which bounds frames waiting for datagrams still to come."""
    inputs = frames(12, seed=7)
    expected = await reference(server, inputs)
    conn, held = await holding_connection(server)
    try:
        futures = [conn.submit(f) for f in inputs]
        send_burst(conn, held)
        replies = await asyncio.gather(*futures)
        assert [r.status for r in replies] == [Status.OK] * 12
        assert all(same(r.unwrap(), want) for r, want in zip(replies, expected, strict=True))
        stats = udp_stats(server)
        assert stats["receive_calls"] == 1 and stats.get("evicted", 0) == 0 and stats["partial_frames"] == 0
        # Frames still waiting for datagrams are bounded as before: the third gives up the oldest.
        futures = [conn.submit(f, sequence=100 + i) for i, f in enumerate(inputs[:3])]
        for message in held[-3:]:
            for d in message[:-1]:
                conn.socket.send(d)
        await wait_for(lambda: udp_stats(server).get("evicted", 0) == 1)
        assert udp_stats(server)["partial_frames"] == 2 and server.pool.slots_in_use == 2
        first = await futures[0]
        assert first.status == Status.INCOMPLETE
        for f in futures[1:]:
            f.cancel()
    finally:
        await conn.close()


@pytest.mark.asyncio
async def test_a_batch_is_answered_after_the_next_batch_is_launched(server: Server, monkeypatch: Any) -> None:
    """24 frames in one burst make three batches of 8 (two in flight at most): when the first ends, the third
    is launched before the first's replies are sent (on loopback each reply datagram costs the sender its
    delivery, which would keep the GPU waiting); every reply still comes."""
    (listener,) = [x for x in server._listeners if isinstance(x, UdpListener)]
    launched_when_sent: list[int] = []
    flush = listener._flush

    def spy() -> None:
        launched_when_sent.extend([server.metrics()["models"]["default"]["batches"]] * len(listener._replies))
        flush()

    monkeypatch.setattr(listener, "_flush", spy)
    inputs = frames(24, seed=9)
    conn, held = await holding_connection(server)
    try:
        futures = [conn.submit(f) for f in inputs]
        send_burst(conn, held)
        replies = await asyncio.gather(*futures)
    finally:
        await conn.close()
    assert [r.status for r in replies] == [Status.OK] * 24
    assert len(launched_when_sent) == 24 and launched_when_sent[0] == 3, launched_when_sent
    assert udp_stats(server)["reply_datagrams"] == 72 and udp_stats(server)["reply_datagrams_dropped"] == 0


@pytest.mark.asyncio
@pytest.mark.parametrize("server", [{"gro": True, "reassembly_timeout_s": 5, "batch": 64}], indirect=True)
async def test_a_large_receive_is_taken_over_several_loop_iterations(server: Server, monkeypatch: Any) -> None:
    """A coalesced receive call may bring tens of MiB: its chunks of rows are taken one per loop iteration
    once a wake-up's budget is spent (here at once), so GPU completions and launches run in between; nothing
    is lost and no second receive call is needed for the rest."""
    monkeypatch.setattr(udp_listener, "WAKEUP_BUDGET_NS", 0)
    (listener,) = [x for x in server._listeners if isinstance(x, UdpListener)]
    loop = asyncio.get_running_loop()
    iterations = [0]

    def tick() -> None:  # counts loop iterations
        iterations[0] += 1
        if not stop:
            loop.call_soon(tick)

    stop = False
    seen: list[int] = []
    batch = listener._batch

    def spy(n: int) -> None:
        seen.append(iterations[0])
        batch(n)

    monkeypatch.setattr(listener, "_batch", spy)
    inputs = frames(40, seed=11)  # 40 GSO messages of 4 datagrams: one receive call, two chunks of 128 rows
    conn, held = await holding_connection(server)
    try:
        futures = [conn.submit(f) for f in inputs]
        for message in held:
            assert gso_send(conn.socket, message) == 1
        tick()
        replies = await asyncio.gather(*futures)
    finally:
        stop = True
        await conn.close()
    assert [r.status for r in replies] == [Status.OK] * 40
    assert len(seen) == 2 and seen[0] < seen[1], seen  # the second chunk in a later loop iteration
    assert udp_stats(server)["receive_calls"] == 1 and server.pool.slots_in_use == 0


@pytest.mark.asyncio
@pytest.mark.parametrize("server", [{"gro": False, "batch": 1, "max_batches": 1}], indirect=True)
async def test_a_flood_never_makes_more_than_one_continuation_per_iteration(server: Server, monkeypatch: Any) -> None:
    """A wake-up past its budget continues in the next loop iteration; while the socket stays readable its
    reader runs too. That must not add a second continuation each time: with one per wake-up kept alive,
    a flood grew the listener's work per loop iteration by one batch every iteration (the loop starved)."""
    monkeypatch.setattr(udp_listener, "WAKEUP_BUDGET_NS", -1)  # every wake-up is past its budget
    (listener,) = [x for x in server._listeners if isinstance(x, UdpListener)]
    loop = asyncio.get_running_loop()
    iterations = [0]
    stop = False

    def tick() -> None:  # counts loop iterations
        iterations[0] += 1
        if not stop:
            loop.call_soon(tick)

    per_iteration: dict[int, int] = {}
    batch = listener._batch

    def spy(n: int) -> None:
        per_iteration[iterations[0]] = per_iteration.get(iterations[0], 0) + 1
        batch(n)

    monkeypatch.setattr(listener, "_batch", spy)
    raw = Raw(udp_port(server))
    try:
        raw.send(*[b"junk" * 10] * 150)  # a hostile flood: each is a bad datagram, one per receive (batch 1)
        tick()
        await wait_for(lambda: udp_stats(server).get("datagrams", 0) == 150)
    finally:
        stop = True
        raw.close()
    assert udp_stats(server)["bad_header"] == 150
    # The reader and one continuation: at most two receive batches in any loop iteration.
    assert max(per_iteration.values()) <= 2, per_iteration


def chunk(index: int, count: int, offset: int, length: int, body: bytes, seq: int = 0, kind: Kind = Kind.FRAME,
          stream: int = 0) -> bytes:  # fmt: skip
    return udp.encode_chunk_header(ChunkHeader(kind, stream, seq, index, count, offset, length)) + body


@pytest.mark.asyncio
@pytest.mark.parametrize("server", [{"max_datagram_bytes": 1024}], indirect=True)
async def test_bad_datagrams_are_counted_dropped_and_cost_nothing_else(server: Server) -> None:
    raw = Raw(udp_port(server))
    conn = await client.connect_udp("127.0.0.1", udp_port(server), datagram_bytes=GRAM)
    good = grams(50, frames(1)[0])
    n = len(good)
    try:
        disagreeing = grams(60)  # chunk 0 says sequence 61 in its frame header
        head = FrameHeader(0, 61, "default", 1, SHAPE, NBYTES)
        first = udp.decode_chunk_header(disagreeing[0])
        body0 = wire.encode_frame_header(head) + disagreeing[0][udp.HEADER_SIZE + head.wire_size :]
        raw.send(
            b"SGUD\x01",  # truncated: shorter than a chunk header
            chunk(1, n, 480, NBYTES, bytes(2000)),  # oversized: above max_datagram_bytes
            b"XXXX" + good[1][4:],  # bad magic
            chunk(1, n, 480, NBYTES, b"x", kind=Kind.REPLY),  # wrong kind
            chunk(n, n, 480, NBYTES, b"x", seq=70),  # chunk index past the count
            chunk(1, n, NBYTES - 1, NBYTES, b"xy", seq=71),  # offset past the frame
            chunk(0, first.chunk_count, 0, NBYTES, body0, seq=60),  # chunk 0 disagrees: BAD_FRAME
            *disagreeing[1:],  # ... and the rest of that frame is late
            chunk(0, 1, 0, 1 << 30, b"", seq=80),  # too large: TOO_LARGE
            chunk(0, n, 0, NBYTES, b"SGFR\x01", seq=81),  # chunk 0 cut inside its frame header: BAD_FRAME
        )
        late = grams(90)
        raw.send(*late[1:], chunk(0, n + 1, 0, NBYTES, late[0][udp.HEADER_SIZE :], seq=90))  # count disagrees
        answered = {r.sequence: r for r in await raw.replies()}
        assert {seq: r.status for seq, r in answered.items()} == {
            60: Status.BAD_FRAME, 80: Status.TOO_LARGE, 81: Status.BAD_FRAME, 90: Status.INCOMPLETE,
        }  # fmt: skip
        assert "disagrees" in answered[60].message and "shorter" in answered[81].message
        stats = udp_stats(server)
        counted = {k: stats.get(k, 0) for k in ("truncated", "oversized", "bad_header", "bad_chunk", "past_end",
                                                "inconsistent", "too_large", "late")}  # fmt: skip
        assert counted == {"truncated": 2, "oversized": 1, "bad_header": 2, "bad_chunk": 1, "past_end": 1,
                           "inconsistent": 2, "too_large": 1, "late": len(disagreeing) - 1}  # fmt: skip
        raw.send(*good)  # the same producer's next good frame is taken
        reply = await conn.infer(frames(1)[0])  # and so is another producer's
        assert reply.ok
        await wait_for(lambda: udp_stats(server)["frames"] == 2)
        await wait_for(lambda: server.pool.slots_in_use == 0)
        stats = udp_stats(server)
        assert stats["partial_frames"] == 0
        # Every count is one /metrics exports (streamgpu_udp_events_total): none is missed there.
        assert set(stats) <= {"kind", "host", "port", "gro", *udp_listener.GAUGES, *udp_listener.COUNTERS}
    finally:
        raw.close()
        await conn.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("server", [{"allow": ["10.0.0.0/8"]}], indirect=True)
async def test_senders_outside_the_allow_list_are_ignored(server: Server) -> None:
    raw = Raw(udp_port(server))
    try:
        raw.send(*grams(1), *grams(2))
        assert await raw.replies(quiet=0.3) == []
        stats = udp_stats(server)
        assert stats["denied"] == 2 * len(grams(1)) and stats["producers"] == 0 and server.pool.slots_in_use == 0
    finally:
        raw.close()


# --- configuration -------------------------------------------------------------------------


def test_udp_port_adds_a_udp_listener() -> None:
    cfg = Config.load(None, env={"STREAMGPU_UDP_PORT": "7000"}, host="127.0.0.2", device="cpu")
    assert [(ls.kind, ls.host, ls.port) for ls in cfg.listeners] == [("tcp", "127.0.0.2", 7878),
                                                                     ("udp", "127.0.0.2", 7000)]  # fmt: skip


@pytest.mark.parametrize(
    ("options", "extra", "match"),
    [
        ({"batch": 0}, {}, "batch must be an integer"),
        ({"colour": 1}, {}, "unknown options"),
        ({"allow": ["not-a-net"]}, {}, "allow"),
        ({"reassembly_timeout_s": float("inf")}, {}, "reassembly_timeout_s"),
        ({"gro": "yes"}, {}, "gro must be true or false"),
        ({}, {"auth_token": "s3cret", "host": "0.0.0.0"}, "options.allow"),
    ],
)
def test_bad_udp_options_are_named(options: dict[str, Any], extra: dict[str, Any], match: str) -> None:
    extra = dict(extra)
    host = extra.pop("host", "127.0.0.1")
    spec = ListenerSpec("udp", host, 0, options)
    with pytest.raises(ConfigError, match=match):  # by the config, so check-config reports them too
        Config(listeners=[spec], device="cpu", models=[SPEC], **extra)


def gso_send(sock: socket.socket, datagrams: list[bytes], per_send: int = 40) -> int:
    """Send a message's datagrams as generic segmentation offload runs (UDP_SEGMENT), as a GSO producer does:
    one buffer per run, split by the kernel (on loopback, handed whole to a socket that coalesces)."""
    import struct

    sends = 0
    for at in range(0, len(datagrams), per_send):
        run = datagrams[at : at + per_send]
        size = struct.pack("H", len(run[0]))  # every datagram of a message has that size but its last
        sock.sendmsg([b"".join(run)], [(SOL_UDP, UDP_SEGMENT, size)])
        sends += 1
    return sends


@pytest.mark.asyncio
@pytest.mark.parametrize("server", [{"reassembly_timeout_s": 5, "gro": True}], indirect=True)
async def test_coalesced_datagrams_are_split_back_and_every_frame_is_answered(server: Server) -> None:
    """UDP_GRO on the listener (option gro): a GSO producer's runs arrive as one receive each, their headers
    read as rows and their bodies placed from where they landed; more datagrams in one receive call than the
    rows hold go a chunk of rows at a time. A duplicate run and a run out of order cost nothing but counts;
    every frame gets its own result."""
    if not udp_stats(server)["gro"]:
        pytest.skip("this kernel does not coalesce UDP datagrams (UDP_GRO)")
    inputs = frames(12, seed=21)
    expected = await reference(server, inputs)
    conn, held = await holding_connection(server)
    try:
        futures = [conn.submit(f, stream_id=i % 3) for i, f in enumerate(inputs)]
        sends = 0
        for i, grams_ in enumerate(held):
            if i == 5:  # a duplicate run, then the frame's runs in reverse order
                sends += gso_send(conn.socket, grams_[:2], per_send=2)
                sends += gso_send(conn.socket, grams_[2:], per_send=2) + gso_send(conn.socket, grams_[:2], per_send=2)
            else:
                sends += gso_send(conn.socket, grams_)
        replies = await asyncio.gather(*futures)
        for reply, want in zip(replies, expected, strict=True):
            assert reply.ok and same(reply.unwrap(), want), reply
        stats = udp_stats(server)
        total = sum(len(g) for g in held) + 2
        assert stats["datagrams"] == total and stats["duplicates"] == 2, stats
        assert stats["receive_calls"] <= sends < total, stats  # coalesced: fewer receives than datagrams
    finally:
        await conn.close()
    assert server.pool.slots_in_use == 0


def placed_payloads(server: Server, monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The payload bytes of every frame the UDP listener submits, read from its ring slot as submitted."""
    (listener,) = [x for x in server._listeners if isinstance(x, UdpListener)]
    admission = listener.admission
    placed: list[bytes] = []
    submit_many = admission.submit_many

    def spy(frames: list[Any]) -> None:
        placed.extend(bytes(admission.pool.view(frame.slot)) for frame in frames)
        submit_many(frames)

    monkeypatch.setattr(admission, "submit_many", spy)
    return placed


async def coalesced_round(server: Server, monkeypatch: pytest.MonkeyPatch, runs_copied: int, senders: int,
                          per_sender: int, messages: Callable[[list[list[bytes]]], list[list[bytes]]]
                          ) -> dict[str, Any]:  # fmt: skip
    """``senders`` producers each submit ``per_sender`` distinct frames; ``messages(held)`` turns one producer's
    frames (a list of datagrams each) into the GSO messages it sends (lists of datagrams). The producers'
    messages are sent interleaved, in one burst (read by as few receive calls as the listener's batch allows).
    Every frame must be answered with its result and every payload placed byte for byte."""
    if not udp_stats(server)["gro"]:
        pytest.skip("this kernel does not coalesce UDP datagrams (UDP_GRO)")
    monkeypatch.setattr(udp_listener, "_RUNS_COPIED", runs_copied)  # 0: every batch placed by the gathering copy
    if not runs_copied:
        monkeypatch.setattr(udp_listener, "_RUN_LENGTH", 1 << 30)
    inputs = frames(senders * per_sender, seed=33)
    expected = await reference(server, inputs)
    placed = placed_payloads(server, monkeypatch)
    conns: list[Any] = []
    futures: list[Any] = []
    sends: list[list[tuple[socket.socket, list[bytes]]]] = []
    try:
        for s in range(senders):
            conn = await client.connect_udp("127.0.0.1", udp_port(server), datagram_bytes=GRAM, reply_timeout=5)
            conns.append(conn)
            held: list[list[bytes]] = []

            def hold(encoded: Any, held: list[list[bytes]] = held) -> None:
                held.append([udp.join(parts) for parts in encoded])

            conn._write = hold  # type: ignore[method-assign]
            futures.extend(conn.submit(f, stream_id=s) for f in inputs[s * per_sender : (s + 1) * per_sender])
            assert all(len(grams) == 4 and len(grams[3]) < GRAM for grams in held)  # the last chunk is short
            sends.append([(conn.socket, m) for m in messages(held)])
        total = 0
        for k in range(max(len(m) for m in sends)):  # the producers' messages interleaved
            for theirs in sends:
                if k < len(theirs):
                    sock, message = theirs[k]
                    total += len(message)
                    gso_send(sock, message, per_send=len(message))
        replies = await asyncio.gather(*futures)
        for reply, want in zip(replies, expected, strict=True):
            assert reply.ok and same(reply.unwrap(), want), reply
        assert sorted(placed) == sorted(f.tobytes() for f in inputs)  # every payload byte where it belongs
        stats = udp_stats(server)
        assert stats["datagrams"] == total and stats.get("duplicates", 0) == 0, stats
        assert stats["receive_calls"] < sum(len(m) for m in sends), stats  # several messages per receive call
    finally:
        for conn in conns:
            await conn.close()
    assert server.pool.slots_in_use == 0
    return stats


def mixed_runs(held: list[list[bytes]]) -> list[list[bytes]]:
    """Frames four at a time: (a) one run with chunk 0 second and the short chunk last; (b) chunks 1 and 2
    (consecutive: one strided copy) as one run before a run of chunk 0 and the short chunk; (c, d) two
    frames' chunks interleaved in one run, chunk 0 of d inside it, then their two short chunks as one run."""
    out: list[list[bytes]] = []
    for j in range(0, len(held), 4):
        a, b, c, d = held[j : j + 4]
        out += [[a[1], a[0], a[2], a[3]], [b[1], b[2]], [b[0], b[3]]]
        out += [[c[0], d[0], c[1], c[2], d[1], d[2]], [c[3], d[3]]]
    return out


def lone_datagrams(held: list[list[bytes]]) -> list[list[bytes]]:
    """A plain producer: every datagram a message of its own, in order."""
    return [[g] for grams in held for g in grams]


@pytest.mark.asyncio
@pytest.mark.parametrize("server", [{"reassembly_timeout_s": 5, "gro": True, "batch": 4}], indirect=True)
@pytest.mark.parametrize("runs_copied", [0, udp_listener._RUNS_COPIED])
@pytest.mark.parametrize("senders, messages", [(3, mixed_runs), (1, lone_datagrams)], ids=["mixed", "lone"])
async def test_coalesced_bodies_are_placed_byte_for_byte_from_where_they_landed(
    server: Server, runs_copied: int, senders: int, messages: Callable[[list[list[bytes]]], list[list[bytes]]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """With gro, chunk bodies are copied straight from the coalesced receive buffers. ``mixed``: three
    producers' runs, interleaved, with chunk 0 inside a run, runs out of order, two frames' chunks mixed in
    one run and short last segments; ``lone``: a plain producer's datagrams, a receive each (consecutive ones
    a receive buffer apart, placed as runs all the same). Each frame's payload is checked byte for byte, by
    a strided copy per run and by the gathering copy (runs_copied 0)."""
    await coalesced_round(server, monkeypatch, runs_copied, senders=senders, per_sender=8, messages=messages)


def shuffled_message(held: list[list[bytes]]) -> list[list[bytes]]:
    """Every frame's full-size chunks shuffled into one GSO message, then every frame's short chunk in another."""
    full = [g for grams in held for g in grams[:3]]
    order = np.random.default_rng(len(full)).permutation(len(full)).tolist()
    return [[full[i] for i in order], [grams[3] for grams in held]]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "server", [{"reassembly_timeout_s": 5, "gro": True, "batch": 4, "max_partial_frames": 64}], indirect=True
)
async def test_a_shuffled_coalesced_message_is_placed_byte_for_byte_a_chunk_of_rows_at_a_time(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two producers each send 20 frames as one GSO message of their 60 full-size chunks shuffled (chunk 0s
    anywhere in it) and one of their 20 short chunks: a receive call takes 160 datagrams, more than the 128
    rows, so the second chunk of rows points into receives past the first; the shuffle makes the listener
    place by its gathering copy (too many runs). Every payload is checked byte for byte."""
    stats = await coalesced_round(server, monkeypatch, udp_listener._RUNS_COPIED, senders=2, per_sender=20,
                                  messages=shuffled_message)  # fmt: skip
    assert stats["receive_calls"] == 1, stats  # all four receives in one call: it was split into two chunks


@pytest.mark.asyncio
async def test_without_recvmmsg_the_fallback_receive_places_every_payload_byte_for_byte(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where recvmmsg is missing the packet area is filled one recvmsg_into at a time (and gro cannot apply):
    frames sent in order and reordered are placed byte for byte all the same."""
    monkeypatch.setattr(mmsg_area, "HAVE_RECVMMSG", False)
    async with Server(make_config(reassembly_timeout_s=5, gro=True)) as srv:
        assert udp_stats(srv)["gro"] is False
        inputs = frames(6, seed=8)
        expected = await reference(srv, inputs)
        placed = placed_payloads(srv, monkeypatch)
        conn, held = await holding_connection(srv)
        try:
            futures = [conn.submit(f) for f in inputs]
            for i, grams_ in enumerate(held):
                for g in grams_[::-1] if i % 2 else grams_:
                    conn.socket.send(g)
            replies = await asyncio.gather(*futures)
        finally:
            await conn.close()
        for reply, want in zip(replies, expected, strict=True):
            assert reply.ok and same(reply.unwrap(), want), reply
        assert sorted(placed) == sorted(f.tobytes() for f in inputs)


@pytest.mark.asyncio
async def test_a_kernel_without_udp_gro_gets_one_datagram_per_row(monkeypatch: pytest.MonkeyPatch) -> None:
    """``gro = true`` is the default; where the socket refuses UDP_GRO the listener receives plainly."""
    monkeypatch.setattr(udp_listener, "enable_gro", lambda sock: False)
    async with Server(make_config(reassembly_timeout_s=5)) as srv:
        assert udp_stats(srv)["gro"] is False
        inputs = frames(4, seed=9)
        expected = await reference(srv, inputs)
        conn = await client.connect_udp("127.0.0.1", udp_port(srv), datagram_bytes=GRAM, reply_timeout=5)
        try:
            replies = await asyncio.gather(*(conn.submit(f) for f in inputs))
        finally:
            await conn.close()
        for reply, want in zip(replies, expected, strict=True):
            assert reply.ok and same(reply.unwrap(), want), reply


@pytest.mark.asyncio
@pytest.mark.parametrize("server", [{"gro": False}, {"gro": True}], indirect=True, ids=["gro off", "gro on"])
async def test_chunks_that_overlap_and_leave_a_hole_are_refused(server: Server) -> None:
    """Chunks whose bytes add up to the length but overlap leave a hole in the slot, holding an earlier frame's
    bytes (another producer's): the frame is answered BAD_FRAME, not run on them."""
    raw = Raw(udp_port(server))
    try:
        for seq, together in ((1, True), (2, False)):  # whole in one receive batch, and over several
            d = [udp.decode_chunk_header(g) for g in grams(seq)]
            assert len(d) == 4 and d[1].offset < d[2].offset
            body = bytes(d[2].offset - d[1].offset)
            twin = chunk(2, 4, d[1].offset, NBYTES, body, seq=seq)  # chunk 1's bytes again: chunk 2's are missing
            sent = [grams(seq)[0], chunk(1, 4, d[1].offset, NBYTES, body, seq=seq), twin, grams(seq)[3]]
            if together:
                raw.send(*sent)
            else:
                for datagram in sent:
                    raw.send(datagram)
                    await asyncio.sleep(0.02)
            answered = await raw.replies()
            assert [(r.sequence, r.status) for r in answered] == [(seq, Status.BAD_FRAME)], answered
            assert "overlap" in answered[0].message
        assert udp_stats(server)["inconsistent"] == 2 and "frames" not in udp_stats(server)
        raw.send(*grams(3))  # the producer's next good frame is taken
        assert [(r.sequence, r.status) for r in await raw.replies()] == [(3, Status.OK)]
        await wait_for(lambda: server.pool.slots_in_use == 0)
    finally:
        raw.close()


@pytest.mark.asyncio
async def test_datagrams_past_max_connections_are_dropped_and_counted_as_such() -> None:
    cfg = dataclasses.replace(make_config(), max_connections=1)
    async with Server(cfg) as srv:
        first, second = Raw(udp_port(srv)), Raw(udp_port(srv))
        try:
            first.send(*grams(1))  # the one producer there is room for
            assert [(r.sequence, r.status) for r in await first.replies()] == [(1, Status.OK)]
            second.send(*grams(2))
            assert await second.replies() == []  # dropped, never answered
            stats = udp_stats(srv)
            assert (stats.get("too_many_producers"), stats.get("denied", 0)) == (len(grams(2)), 0)
            assert srv.pool.slots_in_use == 0 and stats["producers"] == 1
        finally:
            first.close()
            second.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("server", [{"datagram_bytes": 512}], indirect=True)
async def test_a_refusal_too_long_for_one_reply_datagram_is_cut_and_costs_no_other_frame(server: Server) -> None:
    """The message of an UNKNOWN_MODEL quotes the name: 255 control characters make it over 1,000 bytes, more than
    a 512-byte reply datagram holds. The refusal goes out cut; the frames read in the same batch are taken."""
    hostile, other = Raw(udp_port(server)), Raw(udp_port(server))
    try:
        name = "\x01" * 255
        head = wire.encode_frame_header(FrameHeader(0, 1, name, 1, (1,), 1))
        hostile.send(chunk(0, 1, 0, 1, head + b"x", seq=1))
        other.send(*grams(2))  # the same receive batch
        refused, answered = await hostile.replies(), await other.replies()
        assert [(r.sequence, r.status) for r in refused] == [(1, Status.UNKNOWN_MODEL)]
        assert refused[0].message.startswith("no model named")
        assert [(r.sequence, r.status) for r in answered] == [(2, Status.OK)]
        await wait_for(lambda: server.pool.slots_in_use == 0)
    finally:
        hostile.close()
        other.close()
