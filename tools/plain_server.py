"""The plain baseline: the same job and wire protocol, done the usual way.

What a competent engineer writes in an afternoon: an asyncio TCP server
(streams API) that reads each frame into a ``bytes`` object, turns it into a
pageable tensor, copies it to the GPU, runs the model one frame at a time
(fp16, channels-last, cuDNN autotuning, inference mode), and copies the
result back (which synchronizes). Inference runs in one worker thread so the
loop keeps reading other connections. No ring, no batching, no CUDA graphs,
no overlap.

    python tools/plain_server.py --port 7879 --model builtin:resnet50 --device cuda
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import logging
import signal
import time

import numpy as np
import torch

from streamgpu.errors import StreamgpuError
from streamgpu.models.loader import load_module
from streamgpu.models.preprocess import preprocess_torch
from streamgpu.models.spec import ModelSpec
from streamgpu.protocol import wire
from streamgpu.protocol.wire import ReplyHeader, Status, Timings

log = logging.getLogger("plain_server")


class PlainServer:
    def __init__(self, spec: ModelSpec, device: str) -> None:
        self.spec = spec
        self.device = torch.device(device)
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        torch.backends.cudnn.benchmark = True
        module = load_module(spec).to(self.device, self.dtype)
        self.module = module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.worker = concurrent.futures.ThreadPoolExecutor(max_workers=1)  # one frame at a time
        self.infer(np.zeros(spec.input_shape, spec.frame_dtype))  # warm up

    def infer(self, frame: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            x = torch.from_numpy(frame).unsqueeze(0).to(self.device)  # pageable host -> device
            x = preprocess_torch(x, self.spec, self.dtype).contiguous(memory_format=torch.channels_last)
            return self.module(x).float().cpu().numpy()[0]  # .cpu() synchronizes

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        try:
            head = await reader.readexactly(8)
            token_len = int.from_bytes(head[6:8], "little")
            await reader.readexactly(token_len)
            version = int.from_bytes(head[4:6], "little")  # answer in the layout the client asked for
            writer.write(wire.encode_welcome(wire.Welcome(Status.OK, 1 << 26, 0, version=version)))
            while True:
                fixed = await reader.readexactly(wire.FRAME_HEADER_SIZE)
                t0 = time.perf_counter_ns()
                need = wire.frame_header_length(fixed)
                assert need is not None
                rest = await reader.readexactly(need - wire.FRAME_HEADER_SIZE)
                parsed = wire.decode_frame_header(fixed + rest)
                assert parsed is not None
                h = parsed[0]
                payload = await reader.readexactly(h.payload_len)
                why = self.spec.check_frame(h) if h.model == self.spec.name else f"no model named {h.model!r}"
                if why:
                    writer.writelines(
                        wire.encode_reply(ReplyHeader(h.stream_id, h.sequence, Status.BAD_FRAME, message=why))
                    )
                    continue
                frame = np.frombuffer(payload, self.spec.frame_dtype).reshape(self.spec.input_shape)
                t1 = time.perf_counter_ns()
                out = await loop.run_in_executor(self.worker, self.infer, frame)
                t2 = time.perf_counter_ns()
                timings = Timings(receive_us=(t1 - t0) // 1000, compute_us=(t2 - t1) // 1000,
                                  total_us=(t2 - t0) // 1000, batch_size=1)  # fmt: skip
                reply = ReplyHeader(h.stream_id, h.sequence, Status.OK, wire.dtype_code(out.dtype), out.shape,
                                    out.nbytes, h.timestamp_ns, timings)  # fmt: skip
                writer.writelines(wire.encode_reply(reply, out.tobytes()))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, wire.ProtocolError):
            pass
        finally:
            writer.close()


async def main(args: argparse.Namespace) -> None:
    spec = ModelSpec(source=args.model, input_shape=tuple(args.shape))
    server = PlainServer(spec, args.device)
    listener = await asyncio.start_server(server.handle, args.host, args.port)
    port = listener.sockets[0].getsockname()[1]
    log.info("plain server listening on %s:%d, %s on %s", args.host, port, args.model, args.device)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    listener.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7879)
    parser.add_argument("--model", default="builtin:resnet50")
    parser.add_argument("--shape", type=int, nargs=3, default=[224, 224, 3])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parser.parse_args()
    if not 0 <= args.port <= 65535:
        parser.error(f"argument --port: must be 0..65535, got {args.port}")
    try:
        asyncio.run(main(args))
    except (ValueError, OSError, StreamgpuError) as exc:  # a bad model or a taken port: said, not a traceback
        parser.exit(1, f"{parser.prog}: error: {exc}\n")
