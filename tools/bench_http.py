"""HTTP (Open Inference Protocol, binary tensor data extension) against TCP, on the same server, in one run.

One ``streamgpu serve --http-port 0`` process serves both front ends with the same model. Client
processes drive it closed-loop with N frames in flight in total, alternating TCP and HTTP
windows (``--rounds``) so that both see the same machine state:

* tcp: ``streamgpu.client`` connections (one per client process), the native wire format;
* http: an aiohttp client per process posting what ``tritonclient.http`` posts with
  ``binary_data=True`` (a JSON inference header + the raw frame, ``Inference-Header-Content-Length``)
  and asking for the output in binary.

Frames are 224x224x3 uint8 (150,528 bytes). Prints frames/s, MB/s, p50/p90/p99 latency per
transport and the HTTP/TCP ratios; writes JSON.

    python tools/bench_http.py --device cuda --concurrency 1,16,64 --json out/bench_http.json
    python tools/bench_http.py --device cpu --concurrency 4 --seconds 2 --rounds 1   # a dry run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e import server  # the server process harness, shared with the end-to-end bench)

SHAPE = (224, 224, 3)
HOST = "127.0.0.1"


def http_body(frame: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """What tritonclient.http sends for one binary input and one binary output."""
    header = {
        "inputs": [{"name": "input", "shape": [1, *frame.shape], "datatype": "UINT8",
                    "parameters": {"binary_data_size": frame.nbytes}}],
        "outputs": [{"name": "output", "parameters": {"binary_data": True}}],
    }  # fmt: skip
    head = json.dumps(header).encode()
    return head + frame.tobytes(), {"Inference-Header-Content-Length": str(len(head))}


async def drive(transport: str, port: int, inflight: int, seconds: float, warmup: float) -> dict[str, Any]:
    """Closed loop: ``inflight`` workers, each sending its next frame when its last is answered."""
    frame = np.random.default_rng(0).integers(0, 256, SHAPE, dtype=np.uint8)
    latencies: list[float] = []
    errors = 0
    loop = asyncio.get_running_loop()
    start = loop.time()
    measure_from, stop_at = start + warmup, start + warmup + seconds

    async def run(send: Any) -> None:
        nonlocal errors
        while (now := loop.time()) < stop_at:
            ok = await send()
            if now >= measure_from:
                if ok:
                    latencies.append(loop.time() - now)
                else:
                    errors += 1

    if transport == "tcp":
        from streamgpu import client

        conn = await client.connect(HOST, port)

        async def send_tcp() -> bool:
            return (await conn.infer(frame)).ok

        await asyncio.gather(*(run(send_tcp) for _ in range(inflight)))
        await conn.close()
    else:
        import aiohttp

        body, headers = http_body(frame)
        url = f"http://{HOST}:{port}/v2/models/default/infer"
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=inflight)) as session:

            async def send_http() -> bool:
                async with session.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    return resp.status == 200

            await asyncio.gather(*(run(send_http) for _ in range(inflight)))
    return {"latencies": latencies, "errors": errors}


def worker(transport: str, port: int, inflight: int, seconds: float, warmup: float, out: Any) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    out.put(asyncio.run(drive(transport, port, inflight, seconds, warmup)))


def measure(transport: str, port: int, concurrency: int, procs: int, seconds: float) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    shares = [concurrency // procs + (i < concurrency % procs) for i in range(procs)]
    jobs = [ctx.Process(target=worker, args=(transport, port, n, seconds, 1.0, out)) for n in shares if n]
    for job in jobs:
        job.start()
    results = [out.get(timeout=seconds + 120) for _ in jobs]
    for job in jobs:
        job.join()
    lat = np.array([x for r in results for x in r["latencies"]]) * 1e3
    frames = len(lat)
    rate = frames / seconds
    return {
        "transport": transport, "concurrency": concurrency, "frames": frames,
        "errors": sum(r["errors"] for r in results),
        "frames_per_s": rate, "MB_per_s": rate * np.prod(SHAPE) / 1e6,
        **{f"p{q}_ms": float(np.percentile(lat, q)) if frames else float("nan") for q in (50, 90, 99)},
    }  # fmt: skip


def free_ports(n: int) -> list[int]:
    socks = [socket.create_server((HOST, 0)) for _ in range(n)]
    ports = [int(s.getsockname()[1]) for s in socks]
    for s in socks:
        s.close()
    return ports


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--model", default="builtin:small", help="model source (default builtin:small: the "
                        "front end's cost shows; builtin:resnet50 for a real model)")  # fmt: skip
    parser.add_argument("--concurrency", default="1,16,64", help="frames in flight in total, comma-separated")
    parser.add_argument("--procs", type=int, default=4, help="client processes (default 4)")
    parser.add_argument("--seconds", type=float, default=5.0, help="measurement window per transport and round")
    parser.add_argument("--rounds", type=int, default=2, help="alternating tcp/http rounds; the best round is kept")
    parser.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "bench_http.json"))
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    log = Path(tempfile.mkdtemp(prefix="bench_http_")) / "server.log"
    tcp_port, http_port = free_ports(2)
    cmd = [sys.executable, "-m", "streamgpu", "serve", "--port", str(tcp_port), "--http-port", str(http_port),
           "--device", args.device, "--model", args.model]  # fmt: skip
    rows: list[dict[str, Any]] = []
    with server(cmd, log, r"listening on [^:]+:(\d+)"):
        for concurrency in levels:
            best: dict[str, dict[str, Any]] = {}
            for _ in range(args.rounds):
                for transport, port in (("tcp", tcp_port), ("http", http_port)):
                    row = measure(transport, port, concurrency, min(args.procs, concurrency), args.seconds)
                    if transport not in best or row["frames_per_s"] > best[transport]["frames_per_s"]:
                        best[transport] = row
            tcp, http = best["tcp"], best["http"]
            http["vs_tcp_throughput"] = http["frames_per_s"] / tcp["frames_per_s"] if tcp["frames_per_s"] else None
            http["vs_tcp_p50_ms"] = http["p50_ms"] - tcp["p50_ms"]
            rows += [tcp, http]
    device = "cpu"
    if args.device == "cuda":
        import torch

        device = torch.cuda.get_device_name(0)
    print(f"\n{args.model} on {device}, {np.prod(SHAPE)} B uint8 frames, closed loop, {args.procs} client processes")
    print(f"{'transport':<10}{'in flight':>10}{'frames/s':>11}{'MB/s':>9}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}"
          f"{'errors':>8}{'http/tcp':>10}")  # fmt: skip
    for r in rows:
        ratio = f"{r['vs_tcp_throughput']:.2f}x" if r.get("vs_tcp_throughput") else ""
        print(f"{r['transport']:<10}{r['concurrency']:>10}{r['frames_per_s']:>11.0f}{r['MB_per_s']:>9.0f}"
              f"{r['p50_ms']:>9.2f}{r['p90_ms']:>9.2f}{r['p99_ms']:>9.2f}{r['errors']:>8}{ratio:>10}")  # fmt: skip
    report = {"card": device, "model": args.model, "date": time.strftime("%Y-%m-%d"), "procs": args.procs,
              "seconds": args.seconds, "rounds": args.rounds, "rows": rows}  # fmt: skip
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1))
    print(f"JSON: {args.json}")
    return 0 if all(r["frames"] and not r["errors"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
