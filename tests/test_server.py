"""A real server on loopback (CPU backend): results, bad inputs, backpressure, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import socket
import struct
import time
from collections.abc import AsyncIterator

import numpy as np
import pytest
import pytest_asyncio
import torch

from streamgpu import client
from streamgpu.config import Config, ListenerSpec, TokenSpec
from streamgpu.ingest.tcp import TcpListener
from streamgpu.models.builtin import build_builtin
from streamgpu.models.outputs import BatchOutputs
from streamgpu.models.preprocess import preprocess_torch
from streamgpu.models.spec import ModelSpec
from streamgpu.protocol import wire
from streamgpu.protocol.wire import Status
from streamgpu.scheduler.scheduler import Scheduler
from streamgpu.server import Server
from tests.test_isolation import until

SPEC = ModelSpec(input_shape=(64, 64, 3), max_batch_size=16, batch_buckets=(1, 4, 16))
FRAME_BYTES = SPEC.frame_nbytes


def config(**kw: object) -> Config:
    base: dict[str, object] = dict(
        listeners=[ListenerSpec(port=0)], device="cpu", models=[SPEC], shutdown_timeout_s=20.0
    )
    base.update(kw)
    return Config(**base)  # type: ignore[arg-type]


@pytest_asyncio.fixture
async def server() -> AsyncIterator[Server]:
    async with Server(config()) as srv:
        yield srv
    assert srv.pool.slots_in_use == 0


def reference(frames: np.ndarray) -> np.ndarray:
    module = build_builtin("small")
    with torch.inference_mode():
        return module(preprocess_torch(torch.from_numpy(frames), SPEC, torch.float32)).numpy()


def slow_batches(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """Every batch of the CPU backend takes ``seconds`` more (in its worker thread, as a slow model would)."""
    from streamgpu.gpu.cpu import CpuModel

    original = CpuModel.run

    def slow(self: CpuModel, batch: np.ndarray) -> BatchOutputs:
        time.sleep(seconds)
        return original(self, batch)

    monkeypatch.setattr(CpuModel, "run", slow)


def record_withdrawals(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """The producers ``Scheduler.withdraw`` is called for from here on, in order (it still withdraws)."""
    withdrawn: list[object] = []
    withdraw = Scheduler.withdraw

    def spy(self: Scheduler, producer: object) -> None:
        withdrawn.append(producer)
        withdraw(self, producer)  # type: ignore[arg-type]

    monkeypatch.setattr(Scheduler, "withdraw", spy)
    return withdrawn


def random_frames(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *SPEC.input_shape), dtype=np.uint8)


@pytest.mark.asyncio
async def test_a_model_with_two_instances_runs_batches_on_both_with_the_same_results(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``instances = 2``: two copies of the model on the device, each taking batches (here the next batch
    goes to the idle copy while the other's runs); every result is the model's, in order per stream."""
    slow_batches(monkeypatch, 0.05)
    two = ModelSpec(name=SPEC.name, input_shape=SPEC.input_shape, max_batch_size=4, instances=2)
    frames = random_frames(48, seed=8)
    expected = reference(frames)
    async with Server(config(models=[two])) as srv:
        copies = srv.serving(SPEC.name)
        assert copies is not None and len(copies) == 2 and copies[0] is not copies[1]
        conn = await client.connect("127.0.0.1", srv.port)
        replies = await asyncio.gather(*(conn.submit(f, stream_id=i % 4) for i, f in enumerate(frames)))
        await conn.close()
        estimates = srv.metrics()["models"][SPEC.name]["batch_latency_ms"]
    for i, reply in enumerate(replies):
        assert reply.ok and reply.result is not None, reply.message
        np.testing.assert_allclose(reply.result, expected[i], rtol=1e-4, atol=1e-4)
    assert set(estimates) == {"cpu #1", "cpu #2"} and all(estimates.values())  # both ran batches


@pytest.mark.asyncio
@pytest.mark.parametrize("instances", [1, 2])
async def test_a_second_instances_batch_on_the_cpu_runs_beside_the_first_within_its_watchdog(
    monkeypatch: pytest.MonkeyPatch, instances: int
) -> None:
    """The scheduler gives a second copy's batch the time of one batch (it runs beside the first's): the CPU
    backend ran every copy's batches in its one thread, so that batch waited its turn there, passed its
    watchdog and was answered INTERNAL_ERROR, and the device was taken out of service meanwhile."""
    slow_batches(monkeypatch, 0.3)
    one = ModelSpec(name=SPEC.name, input_shape=SPEC.input_shape, max_batch_size=1, instances=instances)
    frames = random_frames(2, seed=9)
    async with Server(config(models=[one], max_inflight_batches=1, watchdog_factor=1.0, watchdog_min_s=0.5)) as srv:
        conn = await client.connect("127.0.0.1", srv.port)
        for frame in frames:  # one batch on each copy: they measure it
            assert (await conn.submit(frame)).ok
        replies = await asyncio.gather(*(conn.submit(f, stream_id=i) for i, f in enumerate(frames)))
        await conn.close()
        assert [r.status for r in replies] == [Status.OK, Status.OK], [r.message for r in replies]
        assert srv.metrics()["devices"][0]["healthy"]


@pytest.mark.asyncio
async def test_1000_frames_over_8_streams_match_the_model(server: Server) -> None:
    frames = random_frames(1024, seed=1)
    expected = reference(frames)

    async def producer(conn_index: int, conn: client.Connection) -> list[tuple[int, client.Reply]]:
        sent = []
        for i in range(conn_index, len(frames), 4):
            stream = conn_index * 2 + (i // 4) % 2  # 4 connections x 2 streams = 8 streams
            sent.append((i, conn.submit(frames[i], stream_id=stream)))
        return [(i, await fut) for i, fut in sent]

    conns = [await client.connect("127.0.0.1", server.port) for _ in range(4)]
    results = await asyncio.gather(*(producer(k, c) for k, c in enumerate(conns)))
    for conn in conns:
        await conn.close()
    replies = [pair for chunk in results for pair in chunk]
    assert len(replies) == len(frames)
    for i, reply in replies:
        assert reply.ok, reply.message
        assert reply.result is not None
        np.testing.assert_allclose(reply.result, expected[i], rtol=1e-4, atol=1e-4)
        assert reply.timings.batch_size >= 1 and reply.timings.total_us >= reply.timings.compute_us
    per_stream: dict[int, list[int]] = {}
    for _, reply in sorted(replies, key=lambda p: p[1].received_ns):
        per_stream.setdefault(reply.stream_id, []).append(reply.sequence)
    assert len(per_stream) == 8
    assert all(seqs == sorted(seqs) for seqs in per_stream.values())  # in order per stream
    metrics = server.metrics()["models"]["default"]
    assert metrics["completed"] == len(frames) and max(metrics["batch_sizes"]) > 1


@pytest.mark.asyncio
async def test_bad_frames_cost_only_themselves(server: Server) -> None:
    good = await client.connect("127.0.0.1", server.port)
    bad = await client.connect("127.0.0.1", server.port)
    frame = random_frames(1, seed=2)[0]
    background = [good.submit(frame, stream_id=1) for _ in range(20)]
    wrong_shape = await bad.infer(np.zeros((8, 8, 3), np.uint8))
    wrong_dtype = await bad.infer(np.zeros(SPEC.input_shape, np.float32))
    unknown = await bad.infer(frame, model="no-such-model")
    assert (wrong_shape.status, wrong_dtype.status, unknown.status) == (
        Status.BAD_FRAME, Status.BAD_FRAME, Status.UNKNOWN_MODEL,
    )  # fmt: skip
    assert "takes uint8 [64, 64, 3]" in wrong_shape.message
    assert (await bad.infer(frame)).ok  # the same connection goes on
    assert all(r.ok for r in await asyncio.gather(*background))
    await good.close()
    await bad.close()


def raw_connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(wire.encode_hello(wire.Hello()))
    welcome = sock.recv(4096)
    assert wire.decode_welcome(welcome) is not None
    return sock


def read_reply(sock: socket.socket) -> wire.ReplyHeader:
    buf = b""
    while True:
        parsed = wire.decode_reply(buf)
        if parsed is not None:
            return parsed[0]
        chunk = sock.recv(65536)
        assert chunk, "server closed before a whole reply"
        buf += chunk


@pytest.mark.asyncio
async def test_garbage_and_oversize_over_a_raw_socket(server: Server) -> None:
    loop = asyncio.get_running_loop()
    good = await client.connect("127.0.0.1", server.port)

    def garbage() -> tuple[wire.ReplyHeader, bytes]:
        with raw_connect(server.port) as sock:
            sock.sendall(b"\x00garbage" * 50)
            reply = read_reply(sock)
            return reply, sock.recv(10)  # b"" once the server closed

    reply, rest = await loop.run_in_executor(None, garbage)
    assert reply.flags & wire.ReplyFlags.CONNECTION and reply.status == Status.BAD_FRAME and rest == b""

    def oversize() -> wire.ReplyHeader:
        with raw_connect(server.port) as sock:
            n = server.config.max_payload_bytes + 1
            sock.sendall(wire.encode_frame_header(wire.FrameHeader(3, 9, "default", 1, (n,), n)))
            sock.sendall(b"\0" * n)  # the server reads and drops it, then answers
            return read_reply(sock)

    reply = await loop.run_in_executor(None, oversize)
    assert (reply.stream_id, reply.sequence, reply.status) == (3, 9, Status.TOO_LARGE)
    assert (await good.infer(random_frames(1, 3)[0])).ok
    await good.close()


@pytest.mark.asyncio
async def test_truncated_frame_then_disconnect_leaks_nothing(server: Server) -> None:
    def truncated() -> None:
        with raw_connect(server.port) as sock:
            h = wire.FrameHeader(0, 0, "default", 1, SPEC.input_shape, FRAME_BYTES)
            sock.sendall(wire.encode_frame_header(h) + b"\1" * (FRAME_BYTES // 2))

    await asyncio.get_running_loop().run_in_executor(None, truncated)
    for _ in range(200):
        if server.pool.slots_in_use == 0 and server.metrics()["connections"] == 0:
            break
        await asyncio.sleep(0.01)
    assert server.pool.slots_in_use == 0


@pytest.mark.asyncio
async def test_small_ring_backpressure_answers_everything() -> None:
    # Room for 3 frames: producers outrun the model, so reading pauses and resumes many times. (No batch of
    # more frames than the ring holds: the config refuses one.)
    cfg = config(ring_bytes=3 * (FRAME_BYTES + 256), max_payload_bytes=FRAME_BYTES,
                 models=[dataclasses.replace(SPEC, max_batch_size=3)])  # fmt: skip
    async with Server(cfg) as srv:
        conns = [await client.connect("127.0.0.1", srv.port) for _ in range(3)]
        frames = random_frames(60, seed=4)
        futs = [conns[i % 3].submit(f, stream_id=i % 3) for i, f in enumerate(frames)]
        replies = await asyncio.gather(*futs)
        assert all(r.ok for r in replies)
        np.testing.assert_allclose(np.stack([r.unwrap() for r in replies]), reference(frames), rtol=1e-4, atol=1e-4)
        assert srv.pool.used_bytes == 0
        for conn in conns:
            await conn.close()


@pytest.mark.asyncio
async def test_graceful_shutdown_answers_every_accepted_frame() -> None:
    srv = Server(config())
    await srv.start()
    port = srv.port
    conn = await client.connect("127.0.0.1", port)
    frames = random_frames(400, seed=5)
    futs = [conn.submit(f, stream_id=i % 4) for i, f in enumerate(frames)]
    while srv.metrics()["models"]["default"]["accepted"] < 50:  # frames are in the server's hands
        await asyncio.sleep(0.001)
    await srv.stop()
    statuses: list[Status] = []
    for fut in futs:
        with contextlib.suppress(ConnectionError):  # never read by the server: the producer sees it close
            statuses.append((await fut).status)
    metrics = srv.metrics()["models"]["default"]
    assert statuses.count(Status.OK) == metrics["completed"] == metrics["accepted"] >= 50
    assert set(statuses) <= {Status.OK, Status.SHUTTING_DOWN}
    assert srv.pool.slots_in_use == 0
    with pytest.raises(ConnectionError):
        await client.connect("127.0.0.1", port, timeout=2)
    await conn.close()


@pytest.mark.asyncio
async def test_auth_token_is_required_when_configured() -> None:
    async with Server(config(auth_token="s3cret")) as srv:
        with pytest.raises(client.HandshakeError) as info:
            await client.connect("127.0.0.1", srv.port, token="nope")
        assert info.value.status == Status.UNAUTHORIZED
        conn = await client.connect("127.0.0.1", srv.port, token="s3cret")
        assert (await conn.infer(random_frames(1, 6)[0])).ok
        await conn.close()


def test_reply_header_layout_is_64_bytes() -> None:
    assert wire.REPLY_HEADER_SIZE == 64 and struct.calcsize("<4sBBBBHHIQQQIIIIIHH") == 64


@pytest.mark.asyncio
async def test_a_stalled_producer_is_dropped_and_others_flow_meanwhile() -> None:
    # Room for 4 frames; A takes one slot and stalls mid-payload. The others keep flowing
    # (its slot costs only its own bytes), and A is dropped when its payload budget is spent.
    cfg = config(ring_bytes=4 * (FRAME_BYTES + 256), max_payload_bytes=FRAME_BYTES, receive_timeout_s=0.3,
                 models=[dataclasses.replace(SPEC, max_batch_size=4)])  # fmt: skip
    async with Server(cfg) as srv:
        loop = asyncio.get_running_loop()
        stalled = await loop.run_in_executor(None, raw_connect, srv.port)
        header = wire.encode_frame_header(wire.FrameHeader(0, 0, "default", 1, SPEC.input_shape, FRAME_BYTES))
        stalled.sendall(header + b"\1" * (FRAME_BYTES // 2))
        conn = await client.connect("127.0.0.1", srv.port)
        replies = await asyncio.wait_for(asyncio.gather(*(conn.submit(f) for f in random_frames(20, seed=8))), 10)
        assert all(r.ok for r in replies)
        reason = await loop.run_in_executor(None, read_reply, stalled)
        assert reason.status == Status.RECEIVE_TIMEOUT and "did not arrive within" in reason.message
        assert reason.flags & wire.ReplyFlags.CONNECTION
        stalled.close()
        await conn.close()


@pytest.mark.asyncio
async def test_shutdown_timeout_answers_frames_still_running(monkeypatch: pytest.MonkeyPatch) -> None:

    slow_batches(monkeypatch, 1.0)
    srv = Server(config())
    await srv.start()
    conn = await client.connect("127.0.0.1", srv.port)
    futs = [conn.submit(f) for f in random_frames(3, seed=9)]
    while srv.metrics()["frames_in_flight"] < 3:
        await asyncio.sleep(0.01)
    await srv.stop(timeout=0.2)
    statuses = [(await fut).status for fut in futs]
    assert statuses == [Status.SHUTTING_DOWN] * 3
    assert srv.pool.slots_in_use == 0 and srv.metrics()["frames_in_flight"] == 0
    await conn.close()


@pytest.mark.asyncio
async def test_framing_lost_while_streaming_still_delivers_the_replies_already_written(server: Server) -> None:
    """Regression (review): closing with unread input made the kernel reset the connection and drop the
    replies queued ahead of the connection reply; the server now shuts its side and drains first."""
    loop = asyncio.get_running_loop()
    (listener,) = server._listeners
    assert isinstance(listener, TcpListener)
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a slow reader on a real network

    def produce() -> None:
        frames = random_frames(40, seed=11)
        sock.sendall(wire.encode_hello(wire.Hello()))
        for i, f in enumerate(frames):
            h = wire.FrameHeader(0, i, "default", 1, SPEC.input_shape, FRAME_BYTES)
            sock.sendall(wire.encode_frame_header(h) + f.tobytes())

    def read() -> tuple[list[wire.ReplyHeader], str]:
        buf = b""
        end = "EOF"
        try:
            while chunk := sock.recv(65536):
                buf += chunk
        except OSError as exc:
            end = repr(exc)
        welcome = wire.decode_welcome(buf)
        assert welcome is not None
        buf = buf[welcome[1] :]
        got = []
        while parsed := wire.decode_reply(buf):
            got.append(parsed[0])
            buf = buf[parsed[2] :]
        return got, end

    try:
        await loop.run_in_executor(None, produce)
        # all answered; most replies wait in the server's send queue
        await until(lambda: answered(server) == 40, 10, "the 40 frames to be answered")
        sock.setblocking(False)
        tail = b"XXXX" + b"\0" * 300_000  # framing lost, and the producer keeps streaming
        with contextlib.suppress(BlockingIOError):
            sock.send(tail)
        sock.setblocking(True)
        # Once the server has taken the bad header (it drains; with the regression, it closed and so reset the
        # connection), the replies it had queued are on their way or lost: only then does the reader take more
        # at a time (the 160 KiB of replies take 3.5 s through a 4 KiB window, 1.5 s then).
        await until(lambda: all(conn._is_closed() for conn in listener._connections), 10, "the framing loss")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        got, end = await loop.run_in_executor(None, read)
    finally:
        sock.close()
    assert end == "EOF", end
    assert [r.sequence for r in got[:-1]] == list(range(40)) and all(r.status == Status.OK for r in got[:-1])
    assert got[-1].flags & wire.ReplyFlags.CONNECTION and got[-1].status == Status.BAD_FRAME


def answered(server: Server) -> int:
    """Frames of the default model answered (none left in flight), or -1."""
    metrics = server.metrics()
    return int(metrics["models"]["default"]["completed"]) if metrics["frames_in_flight"] == 0 else -1


@pytest.mark.asyncio
async def test_a_failed_start_closes_the_listeners_it_had_opened() -> None:
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    first_port = free.getsockname()[1]
    free.close()
    srv = Server(config(listeners=[ListenerSpec(port=first_port), ListenerSpec(port=blocker.getsockname()[1])]))
    with pytest.raises(OSError):
        await srv.start()
    blocker.close()
    with pytest.raises(ConnectionError):
        await client.connect("127.0.0.1", first_port, timeout=2)


@pytest.mark.asyncio
async def test_a_closed_connections_queued_frames_free_their_slots_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """They used to hold their slots until their turn came (here: after a 1.5 s batch), to be dropped then."""
    slow_batches(monkeypatch, 1.5)
    one = ModelSpec(name=SPEC.name, input_shape=SPEC.input_shape, max_batch_size=1)
    async with Server(config(models=[one], max_inflight_batches=1)) as srv:
        busy = await client.connect("127.0.0.1", srv.port)
        running = busy.submit(random_frames(1, seed=4)[0])
        while srv.metrics()["frames_in_flight"] < 1:
            await asyncio.sleep(0.01)
        gone = await client.connect("127.0.0.1", srv.port)
        queued = [gone.submit(f) for f in random_frames(4, seed=5)]
        while srv.metrics()["frames_in_flight"] < 5:
            await asyncio.sleep(0.01)
        held = srv.pool.slots_in_use
        started = time.perf_counter()
        await gone.close()
        while srv.pool.slots_in_use > held - 4 and time.perf_counter() - started < 1.0:
            await asyncio.sleep(0.01)
        assert srv.pool.slots_in_use == held - 4, f"{srv.pool.slots_in_use} slots held, {held} before the close"
        assert srv.metrics()["models"][SPEC.name]["abandoned"] == 4
        assert (await running).status == Status.OK
        for fut in queued:
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await fut
        await busy.close()
    assert srv.pool.slots_in_use == 0


@pytest.mark.asyncio
@pytest.mark.parametrize("workers", [0, 1])
async def test_a_tokens_connection_closing_with_its_frames_answered_looks_for_none(
    monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    """A token's connections share one producer: one closing with every frame answered had the scheduler look
    through all the token's queued frames for its own (the other connections' thousands, ~0.15 us each)."""
    slow_batches(monkeypatch, 0.5)
    withdrawn = record_withdrawals(monkeypatch)
    one = ModelSpec(name=SPEC.name, input_shape=SPEC.input_shape, max_batch_size=1)
    cfg = config(models=[one], max_inflight_batches=1, ingest_workers=workers, tokens={"fleet": TokenSpec("fleet-key")})
    async with Server(cfg) as srv:
        answered = await client.connect("127.0.0.1", srv.port, token="fleet-key")
        assert (await answered.submit(random_frames(1, seed=6)[0])).status == Status.OK
        busy = await client.connect("127.0.0.1", srv.port, token="fleet-key")
        queued = [busy.submit(f) for f in random_frames(3, seed=7)]  # one runs, two wait behind it
        while srv.metrics()["frames_in_flight"] < 3:
            await asyncio.sleep(0.01)
        await answered.close()
        await busy.close()  # (after the first close: on one worker, its record comes after the first's)
        started = time.perf_counter()
        while srv.metrics()["models"][SPEC.name]["abandoned"] < 2 and time.perf_counter() - started < 2.0:
            await asyncio.sleep(0.01)
        assert srv.metrics()["models"][SPEC.name]["abandoned"] == 2
        assert len(withdrawn) == 1, "the close of the connection with nothing in the server withdrew too"
        for fut in queued:
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await fut
    assert srv.pool.slots_in_use == 0


def _ring_mappings() -> int:
    """Mappings of streamgpu receive rings in this process (memfd files: ``/memfd:streamgpu-frames``)."""
    with open("/proc/self/maps") as maps:
        return sum("memfd:streamgpu-frames" in line for line in maps)


@pytest.mark.asyncio
@pytest.mark.parametrize("workers", [0, 2])
async def test_a_stopped_server_unmaps_its_ring_while_the_object_lives_on(workers: int) -> None:
    """An embedding application (aiohttp keeps up to 1024 applications cached) may hold a stopped Server for
    long: its ring was mapped as long as that object lived (the pool's views of it), one ring per server run."""
    before = _ring_mappings()
    server = Server(config(ingest_workers=workers, ring_bytes=1 << 22, max_payload_bytes=1 << 20))
    async with server:
        conn = await client.connect("127.0.0.1", server.port)
        assert (await conn.submit(np.zeros(SPEC.input_shape, np.uint8))).ok
        await conn.close()
        assert _ring_mappings() == before + 1

    def unmapped() -> bool:  # once what still held a view is gone: a copy thread finishing, garbage collected
        gc.collect()
        return _ring_mappings() == before

    await until(unmapped, 5.0, "the ring unmapped")  # (before the fix: never, while the Server object lived)
    assert server.metrics()["ring"]["capacity"] == 1 << 22  # what it reports stays readable
