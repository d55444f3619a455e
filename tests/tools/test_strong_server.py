"""The strong baseline server (tools/strong_server.py) on the CPU, driven by the streamgpu client."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from streamgpu.client import connect
from streamgpu.models.builtin import build_builtin
from streamgpu.models.preprocess import preprocess_torch
from streamgpu.models.spec import ModelSpec
from streamgpu.protocol.wire import Status

ROOT = Path(__file__).resolve().parents[2]
SHAPE = (64, 64, 3)


@contextlib.contextmanager
def strong_server(log: Path, *args: str) -> Iterator[int]:
    """tools/strong_server.py in a subprocess until the block ends; yields its port."""
    cmd = [sys.executable, "tools/strong_server.py", "--port", "0", "--model", "builtin:small", *args]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}", "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    try:
        deadline = time.monotonic() + 120
        while not (m := re.search(r"listening on [\d.]+:(\d+)", log.read_text())):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        yield int(m.group(1))
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    log = tmp_path_factory.mktemp("strong") / "server.log"
    with strong_server(log, "--device", "cpu", "--shape", *map(str, SHAPE)) as port:
        yield port


def frames(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *SHAPE), dtype=np.uint8)


def reference(batch: np.ndarray) -> np.ndarray:
    """The same model (seeded random weights) run directly, one batch, fp32 on the CPU."""
    spec = ModelSpec(source="builtin:small", input_shape=SHAPE)
    with torch.inference_mode():
        x = preprocess_torch(torch.from_numpy(batch), spec, torch.float32)
        return build_builtin("small")(x.contiguous(memory_format=torch.channels_last)).numpy()


@pytest.mark.asyncio
@pytest.mark.parametrize("version", [2, 1])
async def test_results_order_and_batching(port: int, version: int) -> None:
    conn = await connect("127.0.0.1", port, protocol_version=version)
    try:
        assert conn.protocol_version == version
        assert (conn.limits is not None) == (version == 2)  # v1 WELCOME has no limits block
        batch = frames(48)
        order: list[tuple[int, int]] = []
        futs = []
        for i, frame in enumerate(batch):  # all submitted at once, over 3 streams
            fut = conn.submit(frame, stream_id=i % 3)
            fut.add_done_callback(lambda f: order.append((f.result().stream_id, f.result().sequence)))
            futs.append(fut)
        replies = await asyncio.gather(*futs)
    finally:
        await conn.close()
    assert all(r.status == Status.OK for r in replies)
    results = np.stack([r.unwrap() for r in replies])
    assert results.shape == (48, 1000) and results.dtype == np.float32
    np.testing.assert_allclose(results, reference(batch), rtol=1e-4, atol=1e-4)
    for sid in range(3):  # each stream's replies came back in order
        seqs = [seq for s, seq in order if s == sid]
        assert seqs == sorted(seqs) and len(seqs) == 16
    sizes = [r.timings.batch_size for r in replies]
    assert all(1 <= s <= 32 for s in sizes) and max(sizes) > 1, sizes  # dynamic batching took what was queued
    assert all(r.timings.compute_us > 0 and r.timings.total_us >= r.timings.compute_us for r in replies)


@pytest.mark.asyncio
async def test_bad_frames_get_error_replies_and_the_connection_goes_on(port: int) -> None:
    conn = await connect("127.0.0.1", port)
    try:
        good = frames(2, seed=1)
        first = conn.submit(good[0], stream_id=5)
        wrong_shape = conn.submit(good[0][:32], stream_id=5)
        wrong_dtype = conn.submit(good[0].astype(np.float32), stream_id=5)
        unknown = conn.submit(good[0], stream_id=5, model="nope")
        last = conn.submit(good[1], stream_id=5)
        replies = await asyncio.gather(first, wrong_shape, wrong_dtype, unknown, last)
        assert [r.status for r in replies] == [Status.OK, Status.BAD_FRAME, Status.BAD_FRAME, Status.UNKNOWN_MODEL,
                                               Status.OK]  # fmt: skip
        assert "takes uint8 [64, 64, 3]" in replies[1].message and "nope" in replies[3].message
        assert replies[1].result is None
        received = [r.received_ns for r in replies]
        assert received == sorted(received)  # error replies waited behind the earlier frame of their stream
        np.testing.assert_allclose(replies[4].unwrap(), reference(good[1:])[0], rtol=1e-4, atol=1e-4)
        assert (await conn.infer(good[0], stream_id=6)).ok  # still open
    finally:
        await conn.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_cuda_graphs_match_the_direct_call(tmp_path: Path) -> None:
    """On the GPU (fp16, graphs per bucket, 224x224x3): results match the model called directly."""
    spec = ModelSpec(source="builtin:small")
    batch = np.random.default_rng(3).integers(0, 256, (512, *spec.input_shape), dtype=np.uint8)
    with torch.inference_mode():
        x = preprocess_torch(torch.from_numpy(batch).cuda(), spec, torch.float16)
        expected = build_builtin("small").cuda().half()(x).float().cpu().numpy()
    with strong_server(tmp_path / "server.log", "--device", "cuda") as port:
        assert "graphs [1, 2, 4, 8, 16, 32]" in (tmp_path / "server.log").read_text()
        conns = [await connect("127.0.0.1", port) for _ in range(4)]
        replies = await asyncio.gather(*(conns[i % 4].submit(f, stream_id=i % 8) for i, f in enumerate(batch)))
        for conn in conns:
            await conn.close()
    got = np.stack([r.unwrap() for r in replies])
    err = np.linalg.norm(got - expected) / np.linalg.norm(expected)
    sizes = [r.timings.batch_size for r in replies]
    assert err < 3e-2, f"relative error {err:.2e}"
    assert max(sizes) > 1, sizes


def test_bad_arguments_are_errors_not_tracebacks() -> None:
    from test_plain_server import run_tool

    done = run_tool("strong_server.py", "--port", "0", "--model", "torchscript:/no/such/model.pt")
    assert done.returncode != 0 and "file '/no/such/model.pt' does not exist" in done.stderr
    assert "Traceback" not in done.stderr
    done = run_tool("strong_server.py", "--port", "99999")
    assert done.returncode == 2 and "argument --port: must be 0..65535, got 99999" in done.stderr
