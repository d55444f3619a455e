"""Fire-and-forget UDP frames for the server's subscribers (``UdpConnection.send``, the SUBSCRIBERS flag):
the results reach subscribers of the stream id, no reply datagram comes back, nothing is kept per frame."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys
import threading
from typing import Any

import aiohttp
import numpy as np
import pytest

from streamgpu import client
from streamgpu.config import ListenerSpec
from streamgpu.frame import Outcome
from streamgpu.protocol import udp, wire
from streamgpu.protocol.wire import FrameHeader, Status
from streamgpu.server import Server
from tests.ingest.test_udp import GRAM, SHAPE, frames, make_config, reference, same, udp_port, udp_stats


async def published(sub: aiohttp.ClientWebSocketResponse, n: int) -> dict[int, tuple[wire.ReplyHeader, np.ndarray]]:
    """The next ``n`` REPLY messages of a /v1/stream subscriber, by sequence (each sequence once)."""
    out: dict[int, tuple[wire.ReplyHeader, np.ndarray]] = {}
    while len(out) < n:
        msg = await asyncio.wait_for(sub.receive(), 5)
        parsed = wire.decode_reply(msg.data)
        assert parsed is not None
        head, payload, _ = parsed
        assert head.sequence not in out
        out[head.sequence] = (head, np.frombuffer(payload, np.float32).copy())
    return out


@pytest.mark.asyncio
async def test_sent_frames_reach_a_websocket_subscriber_and_no_reply_comes_back() -> None:
    cfg = make_config()
    cfg = dataclasses.replace(cfg, listeners=[*cfg.listeners, ListenerSpec("http", "127.0.0.1", 0)])
    async with Server(cfg) as srv, aiohttp.ClientSession() as session:
        inputs = frames(6, seed=11)
        expected = await reference(srv, inputs)
        async with session.ws_connect(f"ws://127.0.0.1:{srv.addresses[2][1]}/v1/stream") as sub:
            await sub.send_str('{"subscribe": [7]}')
            assert await asyncio.wait_for(sub.receive_json(), 5) == {"subscribed": [7]}
            conn = await client.connect_udp("127.0.0.1", udp_port(srv), datagram_bytes=GRAM)
            try:
                scratch = np.empty(SHAPE, np.uint8)  # one buffer for every frame: send() is done with it on return
                seqs = []
                for f in inputs:
                    scratch[...] = f
                    seqs.append(conn.send(scratch, stream_id=7, live=False))
                seqs.append(conn.send(np.zeros((8, 8, 3), np.uint8), stream_id=7))  # not the model's shape
                assert seqs == list(range(7))  # sequence numbers advance as submit's do
                assert conn.in_flight == 0 and not conn._protocol.pending  # nothing kept per frame
                got = await published(sub, 7)
                await asyncio.sleep(0.3)  # a reply datagram, had one been sent, would be here by now
                assert conn.datagrams_received == 0 and conn.unmatched_replies == 0
                assert not conn._udp._partial and conn.datagrams_dropped == 0
                for seq, want in enumerate(expected):
                    head, result = got[seq]
                    assert head.status == Status.OK and same(result, want), seq
                assert got[6][0].status == Status.BAD_FRAME  # the refusal goes to the subscribers too
                # The stream goes on with submit(): the next sequence number, answered by datagram as usual.
                reply = await conn.infer(inputs[0], stream_id=7)
                assert reply.sequence == 7 and reply.ok and same(reply.unwrap(), expected[0])
                assert conn.datagrams_received > 0 and (await published(sub, 1))[7][0].status == Status.OK
            finally:
                await conn.close()
        assert udp_stats(srv)["replies_to_subscribers"] == 7 and srv.pool.slots_in_use == 0


@pytest.mark.asyncio
async def test_bad_frames_and_a_closed_connection_raise_and_use_no_sequence_number() -> None:
    async with Server(make_config()) as srv:
        conn = await client.connect_udp("127.0.0.1", udp_port(srv), datagram_bytes=GRAM)
        f = frames(1)[0]
        try:
            with pytest.raises(ValueError, match="complex64"):
                conn.send(f.astype(np.complex64))
            with pytest.raises(TypeError, match="numpy array"):
                conn.send(f.tolist())
            with pytest.raises(ValueError, match="at most 8"):
                conn.send(np.zeros((1,) * 9, np.uint8))
            with pytest.raises(ValueError, match=f"at most {udp.MAX_CHUNKS}"):
                conn.send(np.zeros(udp.MAX_CHUNKS * GRAM, np.uint8))  # more datagrams than a message may have
            with pytest.raises(ValueError, match="stream_id"):
                conn.send(f, stream_id=-1)
            with pytest.raises(ValueError, match="deadline"):
                conn.send(f, deadline=0)
            waiting = conn.submit(f, stream_id=2)  # 2/0 waits for its reply
            with pytest.raises(ValueError, match="already in flight"):
                conn.send(f, stream_id=2, sequence=0)
            assert conn.datagrams_sent == len(
                udp.frame_datagrams(FrameHeader(2, 0, "default", 1, SHAPE, f.nbytes), f.data.cast("B"), GRAM)
            )  # only submit's went out
            assert conn.send(f) == 0 and conn.send(f, stream_id=2) == 1  # no refused send took a number
            assert conn.send(np.zeros((24, 0, 3), np.uint8)) == 1  # no bytes: sent (the server refuses it)
            assert (await waiting).ok
        finally:
            await conn.close()
        with pytest.raises(client.ConnectionClosedError, match="closed by the client"):
            conn.send(f)
        assert conn.in_flight == 0


def test_blocking_send_from_another_thread() -> None:
    """``connect_udp_sync(...).send``: returns the sequence number once sent, raises at the call; a hub
    subscriber (what the WebSocket and results sink use) gets every result."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    srv = Server(make_config())
    asyncio.run_coroutine_threadsafe(srv.start(), loop).result(30)
    seen: list[tuple[int, Outcome]] = []
    all_seen = threading.Event()

    def watch(header: FrameHeader, outcome: Outcome) -> None:
        kept = None if outcome.result is None else outcome.result.copy()  # the result's buffer is reused after
        seen.append((header.sequence, outcome._replace(result=kept)))
        if len(seen) == 4:
            all_seen.set()

    loop.call_soon_threadsafe(srv.admission.stream_results.subscribe, 5, watch)
    inputs = frames(4, seed=12)
    try:
        expected = asyncio.run_coroutine_threadsafe(reference(srv, inputs), loop).result(30)
        with client.connect_udp_sync("127.0.0.1", udp_port(srv), datagram_bytes=GRAM) as conn:
            assert isinstance(conn, client.SyncUdpConnection)
            with pytest.raises(ValueError, match="complex128"):
                conn.send(inputs[0].astype(np.complex128), stream_id=5)
            assert [conn.send(f, stream_id=5) for f in inputs] == [0, 1, 2, 3]
            assert all_seen.wait(10)
            assert conn.in_flight == 0 and conn.datagrams_received == 0
        with pytest.raises(client.ConnectionClosedError):
            conn.send(inputs[0], stream_id=5)
        conn._closed = False  # as if close() ran in another thread after send() checked: its loop is gone
        with pytest.raises(client.ConnectionClosedError):
            conn.send(inputs[0], stream_id=5)
        for seq, outcome in seen:
            assert outcome.status == Status.OK and outcome.result is not None and same(outcome.result, expected[seq])
        assert sorted(seq for seq, _ in seen) == [0, 1, 2, 3]
    finally:
        asyncio.run_coroutine_threadsafe(srv.stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


async def run_send(argv: list[str], stdin: bytes) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "streamgpu", "send", *argv, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONPATH": os.getcwd()},
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(stdin), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.asyncio(loop_factories=["uvloop"])  # the subprocess is what is tested
async def test_send_command_to_subscribers_read_on_the_results_port() -> None:
    cfg = dataclasses.replace(make_config(), results_port=0, results_top_k=0)  # lines with whole results
    async with Server(cfg) as srv:
        inputs = frames(3, seed=13)
        expected = await reference(srv, inputs)
        address = srv.results_address
        assert address is not None
        reader, writer = await asyncio.open_connection(*address)
        try:
            await asyncio.sleep(0.1)  # the subscriber is registered before the frames come
            argv = ["--transport", "udp", "--subscribers", "--port", str(udp_port(srv)), "--stream-id", "9",
                    "--shape", "24,24,3"]  # fmt: skip
            code, out, err = await run_send(argv, b"".join(f.tobytes() for f in inputs))
            assert code == 0, err
            assert out == "" and "3 frames for the subscribers of stream 9: 6 datagrams sent\n" in err  # 2 per frame
            lines: list[dict[str, Any]] = []
            while len(lines) < 3:
                line = json.loads(await asyncio.wait_for(reader.readline(), 10))
                if line["stream_id"] == 9:  # not the reference's TCP frames
                    lines.append(line)
        finally:
            writer.close()
        assert sorted(line["seq"] for line in lines) == [0, 1, 2]
        for line in lines:
            assert line["source"] == "udp" and line["status"] == "OK"
            assert same(np.asarray(line["result"], np.float32), expected[line["seq"]])
        assert udp_stats(srv)["replies_to_subscribers"] == 3
