"""The strong baseline: the same job and wire protocol, written the way a capable engineer would without streamgpu.

What it does:

* asyncio streams (``asyncio.start_server``, ``readexactly``; uvloop when
  installed), TCP_NODELAY, one reader task per connection. A frame costs two
  reads (the fixed header, then model name + shape + payload in one piece).
* One shared queue and one worker thread with dynamic batching: the worker
  blocks until something is queued, then takes everything queued, up to
  ``--max-batch`` (no waiting for more once anything is there).
* The batch is stacked into a preallocated pinned staging buffer, copied to
  the GPU in one async H2D copy, then pre-processed (uint8 HWC -> normalized
  fp16 NCHW channels-last, the same math as streamgpu) and run by a CUDA graph
  captured per batch bucket (1, 2, 4, ... ``--max-batch``; padded up to the
  bucket; pre-processing is inside the graph). Results come back into a pinned
  buffer; the worker synchronizes its stream and hands them to the loop with
  ``call_soon_threadsafe``, which writes the replies, in arrival order per
  connection.
* Wrong frames get BAD_FRAME / UNKNOWN_MODEL replies and the connection goes
  on; lost framing gets a connection reply and the connection is closed.
  Reply timings: receive, queue (payload read to batch taken), compute (batch
  taken to results synchronized: stacking, H2D, model, D2H), total and
  batch_size; transfer is 0 (it is inside compute).

What it does not do, compared with streamgpu: no zero-copy receive (each
payload becomes a ``bytes`` object, then is copied again into the staging
buffer); no copy/compute overlap between batches (one batch on the GPU at a
time, the worker waits for it); no latency-aware batching, deadlines,
priorities, live mode, admission control or multiple models. ``--device cpu``
runs the same code path without pinning and graphs (fp32), for tests.

    python tools/strong_server.py --port 7880 --model builtin:resnet50 --device cuda
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import logging
import queue
import signal
import socket
import threading
import time
from typing import Any, NamedTuple

import numpy as np
import torch

from streamgpu.errors import StreamgpuError
from streamgpu.models.loader import load_module
from streamgpu.models.preprocess import TorchPreprocess
from streamgpu.models.spec import ModelSpec
from streamgpu.protocol import wire
from streamgpu.protocol.wire import ReplyFlags, ReplyHeader, Status, Timings

log = logging.getLogger("strong_server")
MAX_PAYLOAD = 1 << 26
MAX_IN_FLIGHT = 256  # frames per connection in the server; past it the reader waits (TCP flow control)
BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Conn:
    """A connection's writer and its replies in arrival order (an entry is a 1-list, filled when done)."""

    def __init__(self, writer: asyncio.StreamWriter, version: int) -> None:
        self.writer, self.version = writer, version
        self.pending: collections.deque[list[Any]] = collections.deque()
        self.room = asyncio.Event()

    def flush(self) -> None:
        while self.pending and self.pending[0][0] is not None:
            parts = self.pending.popleft()[0]
            if not self.writer.is_closing():
                self.writer.writelines(parts)
        if len(self.pending) < MAX_IN_FLIGHT:
            self.room.set()


class Item(NamedTuple):
    conn: Conn
    entry: list[Any]
    header: wire.FrameHeader
    payload: memoryview
    t_header: int  # perf_counter_ns when the header arrived
    t_complete: int  # ... and when the payload did


class Model:
    """The model on one device, run on whole batches by the worker thread."""

    def __init__(self, spec: ModelSpec, device: str, max_batch: int, graphs: bool, compile: bool = False) -> None:
        self.spec, self.device = spec, torch.device(device)
        cuda = self.device.type == "cuda"
        self.dtype = torch.float16 if cuda else torch.float32
        torch.backends.cudnn.benchmark = True
        module = load_module(spec).to(self.device, self.dtype)
        self.module = module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        if compile and cuda:  # inductor, one compile per bucket shape (at capture)
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            self.module = torch.compile(self.module, dynamic=False)
        self.pre = TorchPreprocess(spec, self.dtype, self.device)
        shape = (max_batch, *spec.input_shape)
        self.staging = torch.empty(shape, dtype=torch.uint8, pin_memory=cuda)  # preallocated host buffer
        self.staging_np = self.staging.numpy().reshape(max_batch, -1)
        self.dev_in = torch.empty(shape, dtype=torch.uint8, device=self.device) if cuda else self.staging
        self.stream = torch.cuda.Stream(self.device) if cuda else None
        self.buckets = [b for b in BUCKETS if b < max_batch] + [max_batch]
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        with torch.inference_mode():
            out_shape = self.forward(self.dev_in[:1]).shape[1:]
            self.host_out = torch.empty((max_batch, *out_shape), dtype=torch.float32, pin_memory=cuda)
            if cuda and graphs:
                self.capture()

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        x = self.pre(frames).contiguous(memory_format=torch.channels_last)
        return self.module(x).float()

    def capture(self) -> None:
        """One graph per bucket, largest first, sharing one memory pool; warm-up runs on the side stream first."""
        assert self.stream is not None
        pool = torch.cuda.graph_pool_handle()
        self.dev_in.random_(0, 256)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # weights and inputs are ready
        with torch.cuda.stream(self.stream):
            for b in sorted(self.buckets, reverse=True):
                for _ in range(3):  # cuDNN autotuning, lazy initialisation
                    self.forward(self.dev_in[:b])
                self.stream.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=self.stream):
                    out = self.forward(self.dev_in[:b])
                self.graphs[b] = (graph, out)
        self.stream.synchronize()

    def run(self, payloads: list[memoryview]) -> np.ndarray:
        """Results [n, ...] float32 (an owned copy) for n frames' payloads. Blocks until they are there."""
        n = len(payloads)
        for i, payload in enumerate(payloads):
            self.staging_np[i] = np.frombuffer(payload, np.uint8)
        with torch.inference_mode():
            if self.stream is None:  # CPU: the staging buffer is the model's input
                self.host_out[:n] = self.forward(self.staging[:n])
            else:
                with torch.cuda.stream(self.stream):
                    self.dev_in[:n].copy_(self.staging[:n], non_blocking=True)  # one H2D copy per batch
                    if self.graphs:  # the smallest bucket that holds n; rows n.. hold stale frames (padding)
                        graph, out = self.graphs[next(b for b in self.buckets if b >= n)]
                        graph.replay()
                    else:
                        out = self.forward(self.dev_in[:n])
                    self.host_out[:n].copy_(out[:n], non_blocking=True)
                self.stream.synchronize()  # in the worker thread: that is what it is for
        return self.host_out[:n].numpy().copy()  # the next batch reuses host_out


class StrongServer:
    def __init__(self, model: Model, max_batch: int) -> None:
        self.model, self.spec, self.max_batch = model, model.spec, max_batch
        self.queue: queue.SimpleQueue[Item | None] = queue.SimpleQueue()
        self.loop = asyncio.get_running_loop()
        self.worker = threading.Thread(target=self.work, name="strong-worker", daemon=True)
        self.worker.start()

    def work(self) -> None:
        """The worker thread: take what is queued (up to max_batch), run it, hand the results to the loop."""
        while (first := self.queue.get()) is not None:
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    item = self.queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self.queue.put(None)  # stop after this batch
                    break
                batch.append(item)
            t_start = time.perf_counter_ns()
            try:
                out, error = self.model.run([item.payload for item in batch]), ""
            except Exception as exc:  # answer the batch, keep serving
                log.exception("batch of %d failed", len(batch))
                out, error = None, f"{type(exc).__name__}: {exc}"
            self.loop.call_soon_threadsafe(self.deliver, batch, out, error, t_start, time.perf_counter_ns())

    def deliver(self, batch: list[Item], out: np.ndarray | None, error: str, t_start: int, t_done: int) -> None:
        conns = {}
        for i, it in enumerate(batch):
            h = it.header
            t = Timings(receive_us=(it.t_complete - it.t_header) // 1000, queue_us=(t_start - it.t_complete) // 1000,
                        compute_us=(t_done - t_start) // 1000, total_us=(time.perf_counter_ns() - it.t_header) // 1000,
                        batch_size=len(batch))  # fmt: skip
            if out is None:
                it.entry[0] = self.encode(it.conn, h, Status.INTERNAL_ERROR, error, t)
            else:
                row = out[i]
                reply = ReplyHeader(h.stream_id, h.sequence, Status.OK, wire.dtype_code(row.dtype), row.shape,
                                    row.nbytes, h.timestamp_ns, t)  # fmt: skip
                it.entry[0] = wire.encode_reply(reply, row.data, it.conn.version)
            conns[id(it.conn)] = it.conn
        for conn in conns.values():
            conn.flush()

    @staticmethod
    def encode(conn: Conn, h: wire.FrameHeader, status: Status, message: str, t: Timings | None = None) -> list:
        t = t or Timings()
        reply = ReplyHeader(h.stream_id, h.sequence, status, timestamp_ns=h.timestamp_ns, timings=t, message=message)
        return wire.encode_reply(reply, b"", conn.version)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        version = 1
        try:
            head = await reader.readexactly(8)
            token = await reader.readexactly(int.from_bytes(head[6:8], "little"))
            version = int.from_bytes(head[4:6], "little")
            if head[:4] != wire.HELLO_MAGIC or version not in wire.SUPPORTED_VERSIONS:
                status = Status.BAD_FRAME if head[:4] != wire.HELLO_MAGIC else Status.UNSUPPORTED_VERSION
                writer.write(wire.encode_welcome(wire.Welcome(status, 0, 0, "not a v1/v2 HELLO", version=1)))
                return
            del token  # no authentication
            limits = wire.Limits(MAX_IN_FLIGHT, MAX_IN_FLIGHT * MAX_PAYLOAD, 0, 0, 255)
            writer.write(wire.encode_welcome(wire.Welcome(Status.OK, MAX_PAYLOAD, 0, "", version, limits)))
            await self.read_frames(reader, Conn(writer, version))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except wire.ProtocolError as exc:  # framing is lost: say why in a connection reply, then close
            reply = ReplyHeader(0, 0, exc.status, message=str(exc), flags=ReplyFlags.CONNECTION)
            writer.writelines(wire.encode_reply(reply, b"", version))
        finally:
            writer.close()

    async def read_frames(self, reader: asyncio.StreamReader, conn: Conn) -> None:
        spec = self.spec
        while True:
            fixed = await reader.readexactly(wire.FRAME_HEADER_SIZE)
            t_header = time.perf_counter_ns()
            wire.decode_frame_header(fixed)  # raises ProtocolError on bad magic / version / lengths
            payload_len = int.from_bytes(fixed[24:32], "little")
            if payload_len > MAX_PAYLOAD:
                raise wire.ProtocolError(Status.TOO_LARGE, f"payload of {payload_len} bytes; at most {MAX_PAYLOAD}")
            rest = (wire.frame_header_length(fixed) or 0) - wire.FRAME_HEADER_SIZE
            body = await reader.readexactly(rest + payload_len)  # model name + shape + payload
            parsed = wire.decode_frame_header(fixed + body[:rest])
            assert parsed is not None
            h = parsed[0]
            entry: list[Any] = [None]
            conn.pending.append(entry)
            if h.model != spec.name:
                entry[0] = self.encode(conn, h, Status.UNKNOWN_MODEL, f"no model named {h.model!r}")
            elif why := h.check_tensor() or spec.check_frame(h):
                entry[0] = self.encode(conn, h, Status.BAD_FRAME, why)
            else:
                self.queue.put(Item(conn, entry, h, memoryview(body)[rest:], t_header, time.perf_counter_ns()))
            if entry[0] is not None:
                conn.flush()  # replies in arrival order: an error waits behind earlier frames
            if conn.writer.transport.get_write_buffer_size() > 1 << 20:
                await conn.writer.drain()  # the producer is not reading its replies
            while len(conn.pending) >= MAX_IN_FLIGHT:
                conn.room.clear()
                await conn.room.wait()

    def close(self) -> None:
        """Stop the worker after its current batch; frames still queued are dropped."""
        with contextlib.suppress(queue.Empty):
            while True:
                self.queue.get_nowait()
        self.queue.put(None)
        self.worker.join(30)


async def main(args: argparse.Namespace) -> None:
    spec = ModelSpec(source=args.model, input_shape=tuple(args.shape), max_batch_size=args.max_batch)
    model = Model(spec, args.device, args.max_batch, graphs=not args.no_graphs, compile=args.compile)
    server = StrongServer(model, args.max_batch)
    listener = await asyncio.start_server(server.handle, args.host, args.port, limit=1 << 22)
    port = listener.sockets[0].getsockname()[1]
    mode = (f"graphs {sorted(model.graphs)}" if model.graphs else "eager") + (", compiled" if args.compile else "")
    log.info("strong server listening on %s:%d, %s on %s, %s", args.host, port, args.model, args.device, mode)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    listener.close()
    await asyncio.to_thread(server.close)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7880)
    parser.add_argument("--model", default="builtin:resnet50")
    parser.add_argument("--shape", type=int, nargs=3, default=[224, 224, 3])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--no-graphs", action="store_true", help="CUDA: run the model eagerly")
    parser.add_argument("--compile", action="store_true", help="CUDA: torch.compile the model (inductor) first")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        import uvloop

        loop_factory: Any = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    args = parser.parse_args()
    if not 0 <= args.port <= 65535:
        parser.error(f"argument --port: must be 0..65535, got {args.port}")
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(main(args))
    except (ValueError, OSError, StreamgpuError) as exc:  # a bad model or a taken port: said, not a traceback
        parser.exit(1, f"{parser.prog}: error: {exc}\n")
