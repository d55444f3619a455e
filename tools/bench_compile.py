"""Does compiling a model (torch.compile, inductor) lower its batch time under a CUDA graph?

For each batch size: the model as streamgpu runs it today (fp16, channels-last, eager module
captured in a CUDA graph) against the same module after ``torch.compile`` (inductor; the compiled
code is captured in the same kind of graph), replayed side by side. Prints a table and writes JSON.

    python tools/bench_compile.py --model resnet50 --sizes 1,8,32 --mode default
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from streamgpu.models.builtin import build_builtin


def graph_of(fn: object, x: torch.Tensor) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream), torch.inference_mode():
        for _ in range(3):
            fn(x)  # type: ignore[operator]
        stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            out = fn(x)  # type: ignore[operator]
    return graph, out


def time_replays(graph: torch.cuda.CUDAGraph, reps: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--sizes", default="1,8,32")
    parser.add_argument("--mode", default="default", help="torch.compile mode (default, max-autotune-no-cudagraphs)")
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "bench_compile.json"))
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    module = build_builtin(args.model).cuda().half().to(memory_format=torch.channels_last).eval()  # type: ignore[call-overload]
    compiled = torch.compile(module, mode=args.mode, dynamic=False)
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        x = torch.randn(n, 3, 224, 224, device="cuda", dtype=torch.half).contiguous(memory_format=torch.channels_last)
        eager_graph, eager_out = graph_of(module, x)
        t0 = time.perf_counter()
        with torch.inference_mode():
            compiled(x)
        compile_s = time.perf_counter() - t0
        compiled_graph, compiled_out = graph_of(compiled, x)
        ms: dict[str, list[float]] = {}
        for _ in range(3):  # interleaved rounds: the GPU's clocks drift
            for name, graph in (("eager", eager_graph), ("compiled", compiled_graph)):
                ms.setdefault(name, []).append(time_replays(graph, args.reps))
        eager_ms, compiled_ms = min(ms["eager"]), min(ms["compiled"])
        err = ((compiled_out.float() - eager_out.float()).norm() / eager_out.float().norm()).item()
        rows.append({"batch": n, "eager_graph_ms": eager_ms, "compiled_graph_ms": compiled_ms,
                     "speedup": eager_ms / compiled_ms, "compile_s": compile_s, "rel_err": err})  # fmt: skip
    print(f"\n{args.model} fp16 channels-last, CUDA graph replay, torch.compile mode={args.mode}")
    print("batch | eager graph ms | compiled graph ms | speedup | compile s | rel err")
    for r in rows:
        print(
            f"{r['batch']} | {r['eager_graph_ms']:.3f} | {r['compiled_graph_ms']:.3f} | {r['speedup']:.2f}x | "
            f"{r['compile_s']:.1f} | {r['rel_err']:.1e}"
        )
    with open(args.json, "w") as f:
        json.dump({"card": torch.cuda.get_device_name(), "mode": args.mode, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
