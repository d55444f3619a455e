"""Controlled spatial sharing: two models co-located on one GPU, each at a fixed offered load.

Model A (ResNet-50 fp16, batches of 8) and model B (ResNet-50 fp16, batches of 32) are launched
through the CUDA backend at fixed batch rates (open loop) for ``--seconds``; each batch's latency is
measured from launch to its results on the loop. Scenarios, same process, one after another:

* ``solo``: each model alone, inside its share (``--share-a`` / ``--share-b`` of the SMs);
* ``controlled``: both at once, each inside its share (green contexts);
* ``uncontrolled``: both at once, no shares (the hardware schedules both over all SMs);
* ``solo ... again``: as the first, once more, so that the first windows' place in the run does not favour the
  co-located ones: the ratios are against the better of the two.

The figure: each model's p99 co-located against alone at the same share (target: within 10 %),
and how much the uncontrolled run lets one model hurt the other. Beside each latency, the batch's
device time (its started and done events on the model's stream, ``BatchRun.service_s``): where the
p99 grows and the device time does not, the host side (launch, completion) is what waited; and the
launch call's own time (a submission that blocks shows there, and in the device time too, since the
started event is recorded before the replay is submitted). Prints a
table, writes JSON.

    python tools/bench_shares.py --share-a 0.5 --share-b 0.5 --rate-a 300 --rate-b 60
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from typing import Any

import numpy as np
import torch

from streamgpu.config import Config
from streamgpu.gpu.cuda import CudaBackend, CudaModel
from streamgpu.memory import HostSegment, SlotPool
from streamgpu.models.builtin import build_builtin
from streamgpu.models.spec import ModelSpec

FRAME = (224, 224, 3)


async def drive(backend: CudaBackend, model: CudaModel, pool: SlotPool, batch: int, rate: float,
                seconds: float) -> list[tuple[float, float, float]]:  # fmt: skip
    """Launch a batch every 1/rate s for ``seconds``; the (latency, device time, launch call) of each batch, in s."""
    loop = asyncio.get_running_loop()
    slots = [pool.reserve(model.spec.frame_nbytes) for _ in range(batch)]
    assert all(slots)
    latencies: list[tuple[float, float, float]] = []
    pending: set[asyncio.Future[Any]] = set()
    start = loop.time()
    n = 0
    while (now := loop.time()) < start + seconds:
        due = start + n / rate
        if due > now:
            await asyncio.sleep(due - now)
        launched = time.perf_counter()
        run = backend.launch(model, slots)  # type: ignore[arg-type]
        call = time.perf_counter() - launched  # the launch call itself (host side: a blocked submission shows)

        def finished(_f: asyncio.Future[Any], launched: float = launched, run: Any = run, call: float = call) -> None:
            latencies.append((time.perf_counter() - launched, run.service_s or 0.0, call))

        run.done.add_done_callback(finished)
        pending.add(run.done)
        run.done.add_done_callback(pending.discard)
        n += 1
    if pending:
        await asyncio.wait(pending)
    for slot in slots:
        pool.release(slot)  # type: ignore[arg-type]
    return latencies[len(latencies) // 10 :]  # the first tenth warms clocks and queues


def stats(latencies: list[tuple[float, float, float]]) -> dict[str, float]:
    a = np.array(latencies) * 1e3
    out: dict[str, float] = {"batches": len(a)}
    for name, values in (("", a[:, 0]), ("device_", a[:, 1]), ("launch_", a[:, 2])):
        out[f"{name}p50_ms"], out[f"{name}p99_ms"] = float(np.percentile(values, 50)), float(np.percentile(values, 99))
    return out


async def main(args: argparse.Namespace) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    backend = CudaBackend(loop, Config(device="cuda", max_inflight_batches=16))
    segment = HostSegment.create(64 << 20)
    await loop.run_in_executor(None, backend.attach_host, segment.buffer)
    pool = SlotPool(segment.buffer)

    def load(name: str, batch: int, share: float) -> CudaModel:
        spec = ModelSpec(name=name, source="builtin:resnet50", precision="fp16", max_batch_size=batch,
                         batch_buckets=(batch,), compile=args.compile, sm_share=share)  # fmt: skip
        return backend.load(spec, build_builtin("resnet50"))

    shared = {"a": load("a", 8, args.share_a), "b": load("b", 32, args.share_b)}
    unshared = {"a": load("a", 8, 0.0), "b": load("b", 32, 0.0)}
    for model in (*shared.values(), *unshared.values()):
        print(model.description)
    plan = {"a": (8, args.rate_a), "b": (32, args.rate_b)}
    out: dict[str, Any] = {}
    for name in ("a", "b"):
        out[f"solo {name}"] = stats(await drive(backend, shared[name], pool, *plan[name], args.seconds))
    for label, models in (("controlled", shared), ("uncontrolled", unshared)):
        a, b = await asyncio.gather(*(drive(backend, models[m], pool, *plan[m], args.seconds) for m in ("a", "b")))
        out[f"{label} a"], out[f"{label} b"] = stats(a), stats(b)
    for name in ("a", "b"):  # again, last: a window's place in the run must not favour either side
        out[f"solo {name} again"] = stats(await drive(backend, shared[name], pool, *plan[name], args.seconds))
    backend.close()
    segment.close()
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--share-a", type=float, default=0.5)
    parser.add_argument("--share-b", type=float, default=0.5)
    parser.add_argument("--rate-a", type=float, default=300.0, help="batches of 8 per second")
    parser.add_argument("--rate-b", type=float, default=60.0, help="batches of 32 per second")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--compile", default="auto", choices=("off", "auto", "on"),
                        help="the models' compile setting (auto: the server's default)")  # fmt: skip
    parser.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "bench_shares.json"))
    args = parser.parse_args()
    result = asyncio.run(main(args))
    print(f"\nResNet-50 fp16 (compile {args.compile}) on {torch.cuda.get_device_name()}: A = batch 8 at "
          f"{args.rate_a:g}/s, share {args.share_a:g}; B = batch 32 at {args.rate_b:g}/s, "
          f"share {args.share_b:g}")  # fmt: skip
    print("run | batches | p50 ms | p99 ms | device p50 ms | device p99 ms | launch call p50 ms | p99 ms")
    for label, r in result.items():
        print(f"{label} | {r['batches']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['device_p50_ms']:.2f}"
              f" | {r['device_p99_ms']:.2f} | {r['launch_p50_ms']:.3f} | {r['launch_p99_ms']:.3f}")  # fmt: skip
    for m in ("a", "b"):  # against the better of the two solo windows
        solo = min(result[f"solo {m}"]["p99_ms"], result[f"solo {m} again"]["p99_ms"])
        device = min(result[f"solo {m}"]["device_p99_ms"], result[f"solo {m} again"]["device_p99_ms"])
        print(
            f"model {m}: p99 co-located/solo: controlled {result[f'controlled {m}']['p99_ms'] / solo:.2f}x, "
            f"uncontrolled {result[f'uncontrolled {m}']['p99_ms'] / solo:.2f}x (target controlled <= 1.10x); "
            f"device time p99: controlled {result[f'controlled {m}']['device_p99_ms'] / device:.2f}x, "
            f"uncontrolled {result[f'uncontrolled {m}']['device_p99_ms'] / device:.2f}x"
        )
    with open(args.json, "w") as f:
        json.dump({"card": torch.cuda.get_device_name(), "args": vars(args), "runs": result}, f, indent=1)
