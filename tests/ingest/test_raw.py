"""Raw producers (``--raw``): real ffmpeg and GStreamer streams, live and every-frame modes, bad input.

Every test checks the results sink: one JSON line per frame sent, with the
right result where the frame's bytes are known.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import torch

from streamgpu.config import Config, ListenerSpec
from streamgpu.models.builtin import build_builtin
from streamgpu.models.preprocess import preprocess_torch
from streamgpu.models.spec import ModelSpec
from streamgpu.protocol import wire
from streamgpu.protocol.wire import Status
from streamgpu.server import Server

SPEC = ModelSpec(input_shape=(224, 224, 3), max_batch_size=8, batch_buckets=(1, 8))
SMALL = ModelSpec(name="small", input_shape=(32, 32, 3), max_batch_size=8, batch_buckets=(1, 8))
FRAME = SPEC.frame_nbytes
N_FRAMES = 30
FFMPEG_SRC = ["-f", "lavfi", "-i", "testsrc=size=224x224:rate=30", "-frames:v", str(N_FRAMES)]
FFMPEG_RAW = ["-f", "rawvideo", "-pix_fmt", "rgb24"]
GST_SRC = ["videotestsrc", f"num-buffers={N_FRAMES}", "!", "videoconvert", "!",
           "video/x-raw,format=RGB,width=224,height=224"]  # fmt: skip


def need(program: str) -> str:
    path = shutil.which(program)
    if path is None:
        pytest.skip(f"{program} is not installed (sh tools/install_test_deps.sh installs it as root)")
    return path


def reference(frames: np.ndarray, spec: ModelSpec = SPEC) -> np.ndarray:
    module = build_builtin("small")
    with torch.inference_mode():
        return module(preprocess_torch(torch.from_numpy(frames.copy()), spec, torch.float32)).numpy()


def frames_from(argv: list[str], spec: ModelSpec = SPEC) -> np.ndarray:
    """What a producer command line writes to stdout, as frames."""
    out = subprocess.run(argv, check=True, capture_output=True, timeout=60).stdout
    return np.frombuffer(out, np.uint8).reshape(-1, *spec.input_shape)


def raw_config(live: bool = False, model: ModelSpec = SPEC, **kw: Any) -> Config:
    base: dict[str, Any] = dict(
        listeners=[ListenerSpec(port=0), ListenerSpec("raw", port=0, options={"model": model.name, "live": live})],
        device="cpu", models=[model], results_port=0, results_top_k=0,
    )  # fmt: skip
    base.update(kw)
    return Config(**base)


@contextlib.asynccontextmanager
async def raw_server(config: Config) -> AsyncIterator[tuple[Server, int, asyncio.StreamReader]]:
    """A started server, its raw port, and a results subscriber connected before any frame is sent."""
    async with Server(config) as server:
        address = server.results_address
        assert address is not None
        reader, writer = await asyncio.open_connection(*address)
        await asyncio.sleep(0.05)  # the subscriber is registered once the server accepted it
        try:
            yield server, server.addresses[1][1], reader
        finally:
            writer.close()
    assert server.pool.slots_in_use == 0


async def read_lines(reader: asyncio.StreamReader, n: int, timeout: float = 60) -> list[dict[str, Any]]:
    lines: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout):
        while len(lines) < n:
            lines.append(json.loads(await reader.readline()))
    return lines


async def no_more_lines(reader: asyncio.StreamReader, wait: float = 0.3) -> None:
    with contextlib.suppress(TimeoutError):
        line = await asyncio.wait_for(reader.readline(), wait)
        raise AssertionError(f"one line more than frames sent: {line!r}")


def check_results(lines: list[dict[str, Any]], frames: np.ndarray, spec: ModelSpec = SPEC) -> None:
    """One OK line per frame, numbered 0.. in the connection, each the model's result for that frame."""
    assert sorted(line["seq"] for line in lines) == list(range(len(frames)))
    assert {line["status"] for line in lines} == {"OK"}, lines
    assert len({line["stream"] for line in lines}) == 1
    got = np.array([line["result"] for line in sorted(lines, key=lambda line: line["seq"])], np.float32)
    np.testing.assert_allclose(got, reference(frames, spec), rtol=1e-4, atol=1e-4)


# -- real producers ------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_ffmpeg_stream_gets_one_result_per_frame(tmp_path: Path) -> None:
    ffmpeg = need("ffmpeg")
    frames = frames_from([ffmpeg, "-loglevel", "error", *FFMPEG_SRC, *FFMPEG_RAW, "-"])
    assert len(frames) == N_FRAMES
    out = tmp_path / "results.jsonl"
    async with raw_server(raw_config(results_file=str(out))) as (server, port, reader):
        proc = await asyncio.create_subprocess_exec(
            ffmpeg, "-loglevel", "error", *FFMPEG_SRC, *FFMPEG_RAW, f"tcp://127.0.0.1:{port}"
        )
        assert await asyncio.wait_for(proc.wait(), 60) == 0
        lines = await read_lines(reader, N_FRAMES)
        await no_more_lines(reader)
        stats = server.metrics()["listeners"][1]
    check_results(lines, frames)
    assert stats["frames"] == N_FRAMES and stats["dropped_frames"] == stats["partial_frames"] == 0
    # the file outlet got the same lines (flushed, closed at stop)
    assert sorted(json.loads(x)["seq"] for x in out.read_text().splitlines()) == list(range(N_FRAMES))


@pytest.mark.asyncio(loop_factories=["uvloop"])  # the receive path runs on both loops in the ffmpeg test
async def test_gstreamer_tcpclientsink_gets_one_result_per_frame(tmp_path: Path) -> None:
    gst = need("gst-launch-1.0")
    reference_file = tmp_path / "frames.rgb"
    frames_from([gst, "-q", *GST_SRC, "!", "filesink", f"location={reference_file}"])
    frames = np.frombuffer(reference_file.read_bytes(), np.uint8).reshape(-1, *SPEC.input_shape)
    assert len(frames) == N_FRAMES
    async with raw_server(raw_config()) as (_server, port, reader):
        proc = await asyncio.create_subprocess_exec(
            gst, "-q", *GST_SRC, "!", "tcpclientsink", "host=127.0.0.1", f"port={port}",
            stdout=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        assert await asyncio.wait_for(proc.wait(), 60) == 0
        lines = await read_lines(reader, N_FRAMES)
        await no_more_lines(reader)
    check_results(lines, frames)


# -- modes ---------------------------------------------------------------------------------------------


def send_all(port: int, data: bytes) -> float:
    """A blocking producer: connect, send, close; seconds the sending took."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        start = time.monotonic()
        sock.sendall(data)
        return time.monotonic() - start


@pytest.mark.asyncio
async def test_live_mode_newest_frame_wins_and_every_frame_has_a_line() -> None:
    frames = np.random.default_rng(1).integers(0, 256, (20, *SPEC.input_shape), dtype=np.uint8)
    async with raw_server(raw_config(live=True)) as (_server, port, reader):
        await asyncio.to_thread(send_all, port, frames.tobytes())
        lines = await read_lines(reader, len(frames))
        await no_more_lines(reader)
    assert sorted(line["seq"] for line in lines) == list(range(len(frames)))
    by_seq = {line["seq"]: line for line in lines}
    assert by_seq[19]["status"] == "OK"  # nothing newer came: the newest frame is run
    np.testing.assert_allclose(by_seq[19]["result"], reference(frames[19:])[0], rtol=1e-4, atol=1e-4)
    statuses = [line["status"] for line in lines]
    assert "SUPERSEDED" in statuses, statuses  # a burst faster than the model: stale frames were skipped
    assert set(statuses) <= {"OK", "SUPERSEDED", "OVERLOADED"}


@pytest.mark.asyncio
async def test_live_mode_never_blocks_the_producer_when_out_of_ring_space() -> None:
    # A ring share of one frame: while one frame holds its slot, the next ones find no space.
    cfg = raw_config(live=True, max_producer_ring_bytes=FRAME)
    frames = np.random.default_rng(2).integers(0, 256, (40, *SPEC.input_shape), dtype=np.uint8)
    async with raw_server(cfg) as (server, port, reader):
        took = await asyncio.to_thread(send_all, port, frames.tobytes())
        lines = await read_lines(reader, len(frames))
        stats = server.metrics()["listeners"][1]
    assert sorted(line["seq"] for line in lines) == list(range(len(frames)))
    dropped = [line for line in lines if line["status"] == "OVERLOADED"]
    assert dropped and stats["dropped_frames"] == len(dropped)
    assert "no receive buffer space" in dropped[0]["message"]
    assert took < 2.0  # read on into scratch: 6 MB never waited for the model


@pytest.mark.asyncio
async def test_every_frame_mode_pauses_the_producer_and_loses_nothing() -> None:
    # The same one-frame share, every-frame mode: the producer waits (TCP flow control), frames
    # wait at their boundary with read-ahead in scratch; every frame is run, with the right result.
    cfg = raw_config(live=False, max_producer_ring_bytes=FRAME)
    frames = np.random.default_rng(3).integers(0, 256, (12, *SPEC.input_shape), dtype=np.uint8)
    async with raw_server(cfg) as (server, port, reader):
        await asyncio.to_thread(send_all, port, frames.tobytes())
        lines = await read_lines(reader, len(frames))
        await no_more_lines(reader)
        assert server.metrics()["listeners"][1]["dropped_frames"] == 0
    check_results(lines, frames)


@pytest.mark.asyncio
async def test_a_frame_begins_when_its_bytes_come_and_holds_nothing_before() -> None:
    # A camera sends a frame, then nothing for a while: the next frame's clock must not start (nor
    # its ring slot be taken) when the loop merely asks for a buffer (uvloop asks right after a read).
    frames = np.random.default_rng(6).integers(0, 256, (2, *SMALL.input_shape), dtype=np.uint8)
    async with raw_server(raw_config(live=True, model=SMALL)) as (server, port, reader):
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(frames[0].tobytes())
            first = await read_lines(reader, 1)
            await asyncio.sleep(0.3)
            assert server.pool.slots_in_use == 0  # nothing held between frames
            sock.sendall(frames[1].tobytes())
            second = await read_lines(reader, 1)
    assert [line["status"] for line in first + second] == ["OK", "OK"]
    assert second[0]["timings"]["receive_us"] < 100_000, second  # not the 300 ms pause before it


# -- bad input -----------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_connection_closing_mid_frame_drops_and_counts_the_partial_frame() -> None:
    frames = np.random.default_rng(4).integers(0, 256, (2, *SPEC.input_shape), dtype=np.uint8)
    async with raw_server(raw_config()) as (server, port, reader):
        await asyncio.to_thread(send_all, port, frames.tobytes()[: FRAME + FRAME // 2])
        lines = sorted(await read_lines(reader, 2), key=lambda line: line["seq"])
        await no_more_lines(reader)
        stats = server.metrics()["listeners"][1]
        assert server.pool.slots_in_use == 0  # the partial frame's slot is back
    assert lines[0]["status"] == "OK"
    np.testing.assert_allclose(lines[0]["result"], reference(frames[:1])[0], rtol=1e-4, atol=1e-4)
    assert lines[1]["status"] == "BAD_FRAME" and lines[1]["seq"] == 1
    assert f"connection closed mid-frame ({FRAME // 2} of {FRAME} bytes came)" in lines[1]["message"]
    assert stats["partial_frames"] == 1 and stats["frames"] == 1


@pytest.mark.asyncio
async def test_a_stalled_raw_producer_is_cut_off_and_others_go_on() -> None:
    small = np.random.default_rng(5).integers(0, 256, (3, *SMALL.input_shape), dtype=np.uint8)
    cfg = raw_config(model=SMALL, receive_idle_timeout_s=0.2, receive_timeout_s=1.0, hello_timeout_s=1.0)
    async with raw_server(cfg) as (server, port, reader):
        stalled = socket.create_connection(("127.0.0.1", port))
        stalled.sendall(small.tobytes()[:100])  # and nothing more
        await asyncio.to_thread(send_all, port, small.tobytes())  # another camera, meanwhile
        lines = await read_lines(reader, 4, timeout=10)
        assert server.pool.slots_in_use == 0
        stalled.close()
    stalled_lines = [line for line in lines if line["status"] == "RECEIVE_TIMEOUT"]
    assert len(stalled_lines) == 1 and "made no progress" in stalled_lines[0]["message"]
    ok = sorted((line for line in lines if line["status"] == "OK"), key=lambda line: line["seq"])
    assert [line["seq"] for line in ok] == [0, 1, 2]
    np.testing.assert_allclose([line["result"] for line in ok], reference(small, SMALL), rtol=1e-4, atol=1e-4)


@pytest.mark.asyncio
async def test_raw_port_in_use_fails_start_and_frees_what_it_bound() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        cfg = Config(
            listeners=[ListenerSpec(port=0), ListenerSpec("raw", port=busy, options={"model": "default"})],
            device="cpu", models=[SPEC], results_port=0,
        )  # fmt: skip
        server = Server(cfg)
        with pytest.raises(OSError, match="in use"):
            await server.start()
        assert server.addresses == [] and server.results_address is None  # framed port and results port closed


# -- one result path: the hub feeds WebSocket subscribers and the JSON lines alike ----------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("producer", ["ffmpeg", "socket"])
async def test_raw_results_reach_a_websocket_subscriber_and_the_json_lines(producer: str) -> None:
    # A subscriber finds the raw port's stream id in /v1/status (default: the port number; or the
    # listener's stream_id option), subscribes on /v1/stream and gets every frame's REPLY, while the
    # JSON-lines subscriber gets the same results, each line naming that stream id.
    n = 10
    options: dict[str, Any] = {"model": SMALL.name, "live": False}
    if producer == "socket":
        options["stream_id"] = 77
        frames = np.random.default_rng(7).integers(0, 256, (n, *SMALL.input_shape), dtype=np.uint8)
    else:
        ffmpeg = need("ffmpeg")
        src = ["-f", "lavfi", "-i", "testsrc=size=32x32:rate=30", "-frames:v", str(n)]
        frames = frames_from([ffmpeg, "-loglevel", "error", *src, *FFMPEG_RAW, "-"], SMALL)
    cfg = raw_config(model=SMALL, listeners=[ListenerSpec(port=0), ListenerSpec("raw", port=0, options=options),
                                             ListenerSpec("http", port=0)])  # fmt: skip
    async with raw_server(cfg) as (server, port, reader), aiohttp.ClientSession() as session:
        base = f"127.0.0.1:{server.addresses[2][1]}"
        async with session.get(f"http://{base}/v1/status") as response:
            (raw,) = (await response.json())["raw_streams"]
        stream_id = 77 if producer == "socket" else port
        assert raw["port"] == port and raw["stream_id"] == stream_id and raw["model"] == SMALL.name
        async with session.ws_connect(f"ws://{base}/v1/stream") as ws:
            await ws.send_json({"subscribe": raw["stream_id"]})
            assert await asyncio.wait_for(ws.receive_json(), 5) == {"subscribed": [stream_id]}
            if producer == "socket":
                await asyncio.to_thread(send_all, port, frames.tobytes())
            else:
                proc = await asyncio.create_subprocess_exec(
                    ffmpeg, "-loglevel", "error", *src, *FFMPEG_RAW, f"tcp://127.0.0.1:{port}"
                )
                assert await asyncio.wait_for(proc.wait(), 60) == 0
            replies = {}
            for _ in range(n):
                msg = await asyncio.wait_for(ws.receive(), 10)
                assert msg.type is aiohttp.WSMsgType.BINARY, msg
                parsed = wire.decode_reply(msg.data)
                assert parsed is not None
                header, payload, _ = parsed
                assert header.stream_id == stream_id and header.status == Status.OK, header
                replies[header.sequence] = np.frombuffer(payload, np.float32)
        lines = await read_lines(reader, n)
        await no_more_lines(reader)
    assert sorted(replies) == list(range(n))
    expected = reference(frames, SMALL)
    np.testing.assert_allclose([replies[i] for i in range(n)], expected, rtol=1e-4, atol=1e-4)
    assert {(line["source"], line["stream_id"], line["status"]) for line in lines} == {("raw", stream_id, "OK")}
    check_results(lines, frames, SMALL)
