"""Instructions per frame of the scheduling loop's worker-mode path (or of the one-process TCP front end, or of
an ingest worker): a figure that does not move with the machine.

Wall-time figures of the loop path (``bench_ingest.py --part loop``) vary by 2x between runs on a shared
machine; the instructions it executes do not (to within 0.1 %). This runs ``bench_ingest.loop_path`` (FRAME
descriptors in, scheduler, null backend, RELEASE and REPLY records out) under valgrind's callgrind, counting
only the measured run (after a warm-up run), and prints instructions per frame (``--path tcp`` and ``--path
worker``: ``bench_ingest.micro_tcp`` and ``micro_worker_process`` instead). For comparing two trees on
one machine (docs/BENCHMARKS.md); needs ``valgrind`` (``apt-get install valgrind``).

    python tools/loop_instructions.py                    # 16,384 frames, 1,024 in flight, 16 producers
    python tools/loop_instructions.py --frames 4096 --shape 224,224,3
    python tools/loop_instructions.py --path tcp      # the one-process TCP front end; --path worker: a worker
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def measure(args: argparse.Namespace) -> None:
    """Inside valgrind: a warm-up run, then the measured one between instrumentation on and off."""
    sys.path.insert(0, str(ROOT / "tools"))
    from bench_ingest import loop_path, micro_tcp, micro_worker_process

    from streamgpu.loops import tune_malloc

    tune_malloc()  # as a serving process sets its allocator
    shape = tuple(int(d) for d in args.shape.split(","))
    loop = asyncio.new_event_loop()

    def run(frames: int) -> None:
        if args.path == "loop":
            loop.run_until_complete(loop_path(shape, frames, args.in_flight, args.producers, max_batch=args.max_batch))
        elif args.path == "tcp":
            micro_tcp(shape, frames, args.max_batch)
        else:
            loop.run_until_complete(micro_worker_process(shape, frames, args.max_batch))

    run(4096)
    control = ["callgrind_control", "--instr=on", str(os.getpid())]
    subprocess.run(control, check=True, capture_output=True)
    run(args.frames)
    subprocess.run([*control[:1], "--instr=off", str(os.getpid())], check=True, capture_output=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path", default="loop", choices=["loop", "tcp", "worker"],
                        help="loop: the scheduling loop with workers (FRAME records in, REPLY records out); tcp: the "
                        "TCP front end in one process (bytes in, replies out, a batch at a time; no scheduler); "
                        "worker: an ingest worker process (bytes in, FRAME records out, REPLY records in, replies "
                        "out)")  # fmt: skip
    parser.add_argument("--frames", type=int, default=16384, help="frames in the measured run")
    parser.add_argument("--in-flight", type=int, default=1024)
    parser.add_argument("--producers", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=256, help="loop: the model's; tcp, worker: frames per batch")
    parser.add_argument("--shape", default="32,32,3", help="frame shape H,W,C (uint8)")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)  # (the run under valgrind)
    args = parser.parse_args()
    if args.inside:
        measure(args)
        return 0
    if not shutil.which("valgrind") or not shutil.which("callgrind_control"):
        print("loop_instructions needs valgrind (apt-get install valgrind)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={tmp}/callgrind.out",
               sys.executable, __file__, "--inside", *sys.argv[1:]]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    counted = re.search(r"Collected : (\d+)", done.stderr)
    if done.returncode or counted is None:
        print(done.stderr[-3000:], file=sys.stderr)
        return 1
    setting = (f"{args.in_flight} in flight, {args.producers} producers" if args.path == "loop"
               else f"batches of {args.max_batch}")  # fmt: skip
    print(f"{int(counted.group(1)) / args.frames:,.0f} instructions per frame, {args.path} path ({args.frames} "
          f"frames, {setting}, shape {args.shape})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
