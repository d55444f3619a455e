"""The README's embedding example, exactly as printed, in a process of its own: its own route and
the streamgpu routes answer side by side, and SIGINT drains and stops the server with the application.
Then the embedding API used carelessly: cleaned up mid-stream, given a started Server, or a path for a Config."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiohttp import WSCloseCode, web

from streamgpu import client
from streamgpu.config import Config, ListenerSpec
from streamgpu.errors import ServerStartedError
from streamgpu.models.spec import ModelSpec
from streamgpu.protocol import wire
from streamgpu.protocol.wire import FrameHeader, Status
from streamgpu.server import Server
from streamgpu.web.app import setup
from tests.test_server import slow_batches

ROOT = Path(__file__).parent.parent.parent
README = (ROOT / "README.md").read_text()


def example() -> str:
    """The python block of the README's "HTTP, and embedding in an aiohttp application" section."""
    text = README[README.index("### HTTP, and embedding in an aiohttp application") :]
    code = text[text.index("```python\n") + len("```python\n") :]
    return code[: code.index("```")]


def test_the_example_has_at_most_ten_lines() -> None:
    assert len(example().splitlines()) <= 10


# The example binds :8080; here the one change is the port, to a free one, through run_app itself.
HARNESS = """
import sys
from aiohttp import web
_run_app = web.run_app
web.run_app = lambda app, **kw: _run_app(app, **{**kw, "port": int(sys.argv[1]), "print": None})
exec(compile(sys.argv[2], "README.md", "exec"), {"__name__": "__main__"})
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.asyncio(loop_factories=["asyncio"])
async def test_the_readme_embedding_example_runs_as_written() -> None:
    tritonaio = pytest.importorskip("tritonclient.http.aio", reason="tritonclient[http] is a test dependency")
    port = free_port()
    env = {**os.environ, "STREAMGPU_PORT": "0", "STREAMGPU_DEVICE": "cpu", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", HARNESS, str(port), example()], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as session:
            give_up = time.monotonic() + 120
            while True:  # torch loads, the model loads, then the application serves
                assert proc.poll() is None, proc.communicate()
                try:
                    async with session.get(f"{base}/hello") as resp:
                        assert resp.status == 200 and await resp.text() == "my own route"
                        break
                except aiohttp.ClientConnectionError:
                    assert time.monotonic() < give_up, "the example did not start serving"
                    await asyncio.sleep(0.2)
            async with session.get(f"{base}/ml/v2/health/ready") as resp:
                assert resp.status == 200
        client = tritonaio.InferenceServerClient(f"127.0.0.1:{port}/ml")
        try:
            frame = np.zeros((1, 224, 224, 3), np.uint8)
            inp = tritonaio.InferInput("input", list(frame.shape), "UINT8")
            inp.set_data_from_numpy(frame)
            result = await client.infer("default", [inp])
            assert result.as_numpy("output").shape == (1, 1000)
        finally:
            await client.close()
        proc.send_signal(signal.SIGINT)  # run_app's graceful exit: the cleanup context stops the server
        _out, err = await asyncio.to_thread(proc.communicate, timeout=60)
        assert proc.returncode == 0, err.decode()[-2000:]
        assert b"Traceback" not in err, err.decode()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- the embedding API attacked: shutdown mid-stream, a Server started twice, a wrong config -------------------

SPEC = ModelSpec(input_shape=(16, 16, 3), max_batch_size=8, batch_buckets=(1, 4, 8))


def embedded_config(**kw: Any) -> Config:
    base: dict[str, Any] = dict(listeners=[ListenerSpec(port=0)], device="cpu", models=[SPEC])
    base.update(kw)
    return Config(**base)


def frame_message(stream_id: int, sequence: int) -> bytes:
    frame = np.zeros(SPEC.input_shape, np.uint8)
    header = FrameHeader(stream_id, sequence, "default", wire.dtype_code(frame.dtype), frame.shape, frame.nbytes, 1)
    return wire.encode_frame_header(header) + frame.tobytes()


async def started(app: web.Application) -> tuple[web.AppRunner, int]:
    """``app`` served on a free loopback port, as a user's own ``AppRunner`` serves it."""
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, int(runner.addresses[0][1])


@pytest.mark.asyncio
async def test_embedded_shutdown_answers_the_websocket_frames_it_took(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cleaning the application up mid-stream answers every frame a WebSocket sent (as the stand-alone listener
    does: drain, then close), not a close frame in place of the replies."""
    slow_batches(monkeypatch, 0.2)  # 20 frames: three batches still to run when the cleanup begins
    app = web.Application()
    server = setup(app, embedded_config(), prefix="/ml")
    runner, port = await started(app)
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(f"http://127.0.0.1:{port}/ml/v1/stream")
        for sequence in range(20):
            await ws.send_bytes(frame_message(7, sequence))
        while server.frames_in_flight + server.replies.total(Status.OK) < 20:  # every frame taken
            await asyncio.sleep(0.01)
        cleanup = asyncio.ensure_future(runner.cleanup())
        statuses = []
        while (msg := await asyncio.wait_for(ws.receive(), 30)).type is aiohttp.WSMsgType.BINARY:
            parsed = wire.decode_reply(msg.data)
            assert parsed is not None
            statuses.append(parsed[0].status)
        await asyncio.wait_for(cleanup, 30)
    assert statuses == [Status.OK] * 20, statuses
    assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == WSCloseCode.GOING_AWAY


@pytest.mark.asyncio
async def test_setup_with_a_started_server_fails_and_leaves_it_serving() -> None:
    """A Server already started, given to ``setup`` (or started twice): the second start fails saying so, and the
    running server is not torn down by that failure (its listeners, ring and models stay)."""
    async with Server(embedded_config()) as server:
        app = web.Application()
        setup(app, server)
        runner = web.AppRunner(app)
        with pytest.raises(ServerStartedError, match="started already"):
            await runner.setup()
        await runner.cleanup()
        assert server.started
        conn = await client.connect("127.0.0.1", server.port)
        try:
            assert (await conn.submit(np.zeros(SPEC.input_shape, np.uint8))).ok
        finally:
            await conn.close()


@pytest.mark.asyncio
async def test_a_stopped_server_does_not_start_again() -> None:
    server = Server(embedded_config())
    await server.start()
    await server.stop()
    with pytest.raises(ServerStartedError, match="make a new Server"):
        await server.start()


@pytest.mark.parametrize("config", ["configs/example.toml", {"port": 0}])
def test_setup_with_a_path_or_dict_names_config_load(config: object) -> None:
    with pytest.raises(TypeError, match=r"Config\.load"):
        setup(web.Application(), config)  # type: ignore[arg-type]
