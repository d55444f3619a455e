"""Several GPUs and sick GPUs, for real: batches spread over two devices with the results of one; a
batch that hangs on the device is answered by the watchdog; an illegal memory access (a sticky
error, the context is lost) takes the device out of service while the process keeps answering."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from streamgpu import client
from streamgpu.config import Config, ListenerSpec
from streamgpu.models.spec import ModelSpec
from streamgpu.protocol.wire import Status
from streamgpu.server import Server

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.asyncio(loop_factories=["uvloop"])
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
async def test_two_devices_share_the_batches_and_give_the_results_of_one() -> None:
    spec = ModelSpec(source="builtin:resnet18", precision="fp32", max_batch_size=8, batch_buckets=(1, 2, 4, 8))
    frames = np.random.default_rng(0).integers(0, 256, (64, *spec.input_shape), dtype=np.uint8)
    results = {}
    for devices in ((0,), (0, 1)):
        config = Config(listeners=[ListenerSpec(port=0)], device="cuda", devices=devices, models=[spec])
        async with Server(config) as server:
            conn = await client.connect("127.0.0.1", server.port)
            replies = await asyncio.gather(*[conn.infer(f, stream_id=i) for i, f in enumerate(frames)])
            await conn.close()
            assert all(r.ok for r in replies)
            results[devices] = np.stack([np.asarray(r.result) for r in replies])
            latency = server.metrics()["models"]["default"]["batch_latency_ms"]
            assert all(latency[name] for name in server.backend.devices), latency  # type: ignore[union-attr]
    err = np.linalg.norm(results[(0, 1)] - results[(0,)]) / np.linalg.norm(results[(0,)])
    assert err < 1e-4, err


# A model whose forward is normal unless the frame's first value is a trigger: 1000 spins the
# device for ~2 s (a batch that does not complete), 2000 writes through a null pointer.
SICK_SERVER = textwrap.dedent('''
    import asyncio, os, sys
    import cupy, torch
    import streamgpu.models.manager
    from streamgpu import client
    from streamgpu.config import Config, ListenerSpec
    from streamgpu.models.spec import ModelSpec

    KERNEL = cupy.RawKernel(r"""
    extern "C" __global__ void sick(const float* x, long long cycles) {
        if (x[0] == 1000.0f) { long long t = clock64(); while (clock64() - t < cycles) {} }
        if (x[0] == 2000.0f) { *((volatile int*)0) = 1; }
    }""", "sick")

    class Sick(torch.nn.Module):
        def forward(self, x):
            stream = torch.cuda.current_stream()
            with cupy.cuda.ExternalStream(stream.cuda_stream):
                KERNEL((1,), (1,), (cupy.asarray(x), cupy.int64(4_000_000_000)))
            return x * 2

    streamgpu.models.manager.load_module = lambda spec: Sick()

    async def main():
        spec = ModelSpec(source="builtin:small", input_shape=(4,), input_dtype="float32", preprocess="none",
                         precision="fp32", cuda_graphs=False, max_batch_size=1, batch_buckets=(1,))
        config = Config(listeners=[ListenerSpec(port=0)], device="cuda", models=[spec], watchdog_factor=1.0,
                        watchdog_min_s=0.3)
        async with Server(config) as server:
            conn = await client.connect("127.0.0.1", server.port)
            async def send(value):
                reply = await conn.infer(torch.full((4,), value).numpy())
                print("REPLY", value, reply.status.name, (reply.message or "-").replace(" ", "_")[:200], flush=True)
            await send(1.0)
            hung = asyncio.ensure_future(send(1000.0))
            await asyncio.sleep(0.8)        # the watchdog has answered it by now
            await send(3.0)                 # the only device is busy with the hung batch: refused at once
            await hung
            await asyncio.sleep(2.5)        # the spin ends: the device takes batches again
            await send(4.0)
            await send(2000.0)              # illegal address: the context is lost for good
            await send(5.0)
            print("DEVICES", server.metrics()["devices"], flush=True)
            await conn.close()
        os._exit(0)  # torch's CUDA teardown aborts on a lost context (streamgpu serve exits 3 here)

    from streamgpu.server import Server
    asyncio.run(main())
''')


def test_a_hung_batch_is_answered_and_a_lost_device_retired_while_the_process_answers(tmp_path: Path) -> None:
    pytest.importorskip("cupy")
    script = tmp_path / "sick_server.py"
    script.write_text(SICK_SERVER)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    replies = {float(v): (s, m) for _, v, s, m in (line.split(" ", 3) for line in done.stdout.splitlines()
                                                   if line.startswith("REPLY"))}  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert replies[1.0][0] == "OK"
    assert replies[1000.0][0] == Status.INTERNAL_ERROR.name and "did_not_complete" in replies[1000.0][1]
    assert replies[3.0][0] == Status.INTERNAL_ERROR.name and "past_its_watchdog" in replies[3.0][1]
    assert replies[4.0][0] == "OK", replies  # back in service once the slow batch ended
    assert replies[2000.0][0] == Status.INTERNAL_ERROR.name
    assert replies[5.0][0] == Status.INTERNAL_ERROR.name and "failed" in replies[5.0][1], replies
    assert "sticky error" in done.stderr
