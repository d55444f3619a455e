"""The README's embedding example, exactly as printed, in a process of its own: its own route and
the streamgpu routes answer side by side, and SIGINT drains and stops the server with the application."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import numpy as np
import pytest

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
