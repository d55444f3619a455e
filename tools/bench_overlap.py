"""Copy/compute overlap: how busy the GPU is when the CUDA backend is fed as fast as it takes batches.

No network: frames sit in the pinned ring, and the backend is driven
directly, keeping ``--inflight`` batches launched (1 = no overlap of the next
batch's copy with this batch's compute; 2 = the server's default). GPU busy
is the sum of each batch's compute-stream time (timed CUDA events) over the
wall time, so it counts the time the model's stream had work.

    python tools/bench_overlap.py --model builtin:resnet50 --seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import numpy as np
import torch

from streamgpu.config import Config
from streamgpu.gpu.cuda import CudaBackend, CudaModel
from streamgpu.loops import new_event_loop
from streamgpu.memory import HostSegment, Slot, SlotPool
from streamgpu.models.loader import load_module
from streamgpu.models.spec import ModelSpec


async def drive(
    backend: CudaBackend, model: CudaModel, slot_sets: list[list[Slot]], inflight: int, seconds: float
) -> dict[str, float]:
    async def one(slots: list[Slot]) -> float:
        run = backend.launch(model, slots)
        await run.copied
        await run.done
        return run.service_s or 0.0

    running: set[asyncio.Task[float]] = set()
    busy = 0.0
    batches = 0
    i = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or running:
        while len(running) < inflight and time.perf_counter() - start < seconds:
            running.add(asyncio.ensure_future(one(slot_sets[i % len(slot_sets)])))
            i += 1
        done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            busy += task.result()
            batches += 1
    wall = time.perf_counter() - start
    return {"inflight": inflight, "frames_per_s": batches * len(slot_sets[0]) / wall, "gpu_busy": busy / wall}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:resnet50")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--inflight", default="1,2", help="batches kept launched; each runs twice, alternating")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_overlap needs a CUDA GPU", file=sys.stderr)
        return 2
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    spec = ModelSpec(source=args.model, max_batch_size=args.batch, precision="fp16")
    depths = [int(k) for k in args.inflight.split(",")]
    backend = CudaBackend(loop, Config(device="cuda", max_inflight_batches=max(depths)))
    segment = HostSegment.create(4 * args.batch * (spec.frame_nbytes + 256))
    backend.attach_host(segment.buffer)
    ring = SlotPool(segment.buffer)
    model = backend.load(spec, load_module(spec))
    slot_sets: list[list[Slot]] = []
    rng = np.random.default_rng(0)
    for _ in range(4):  # four batches of distinct slots, read in rotation (never released: read-only)
        slots = []
        for _ in range(args.batch):
            slot = ring.reserve(spec.frame_nbytes)
            assert slot is not None
            ring.array(slot)[:] = rng.integers(0, 256, spec.frame_nbytes)
            slots.append(slot)
        slot_sets.append(slots)
    results = [loop.run_until_complete(drive(backend, model, slot_sets, k, args.seconds)) for k in depths * 2]
    card = torch.cuda.get_device_name()
    print(f"{args.model} fp16, batch {args.batch}, {card}")
    print("inflight | frames/s | GPU busy")
    for r in results:
        print(f"{r['inflight']} | {r['frames_per_s']:.0f} | {r['gpu_busy']:.1%}")
    best = {k: max(r["gpu_busy"] for r in results if r["inflight"] == k) for k in depths}
    if 1 in best and 2 in best:
        met = "yes" if best[2] >= 0.95 else "NO"
        print(f"GPU busy with overlap (2 in flight) {best[2]:.1%} vs {best[1]:.1%} without; target >= 95%: {met}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"card": card, "model": args.model, "batch": args.batch, "runs": results}, f, indent=1)
    backend.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
