"""``streamgpu send``: raw frames from stdin or a file, sent with the streamgpu protocol, replies as JSON lines.

For scripts and pipes: ``ffmpeg ... -f rawvideo -pix_fmt rgb24 - | streamgpu
send --shape 224,224,3`` prints one JSON line per frame, in the schema of the
server's results sink (``streamgpu.results.result_record``, source ``"send"``),
in frame order. The input is back-to-back frames of ``shape`` and ``dtype``,
exactly what a raw listener (``--raw``) takes, or a video file decoded with
PyAV (``--video``, where PyAV is installed: ``pip install 'streamgpu[video]'``).

``--transport`` names a transport of the load generator's registry
(``streamgpu.loadgen.transports``: ``tcp`` now; one registered there, such as
UDP, is usable here too): anything whose connections have the ``submit`` /
``close`` shape of ``streamgpu.client.Connection``.

Exit status: 0 when every frame was answered OK; 1 when a reply was not OK,
the input ended in the middle of a frame (or a video failed to decode), or
the connection failed.
"""

from __future__ import annotations

import asyncio
import collections
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO, Protocol, TextIO, cast

import numpy as np

from streamgpu.loadgen.transports import ReplyLike, get_transport
from streamgpu.loops import loop_factory
from streamgpu.protocol.wire import Status
from streamgpu.results import encode_line, result_record


class SendReply(ReplyLike, Protocol):
    """What ``send`` reads from a reply, beyond the load generator's needs (``client.Reply`` has it)."""

    @property
    def stream_id(self) -> int: ...

    @property
    def sequence(self) -> int: ...

    @property
    def message(self) -> str: ...

    @property
    def result(self) -> np.ndarray | None: ...


@dataclass
class SendOptions:
    """What ``streamgpu send`` was asked to do (the CLI flags, checked)."""

    host: str = "127.0.0.1"
    port: int = 7878
    transport: str = "tcp"
    token: str = ""
    model: str = "default"
    shape: tuple[int, ...] = (224, 224, 3)
    dtype: str = "uint8"
    input: str = "-"  # a file path, or "-" for stdin
    video: str = ""  # a video file decoded with PyAV instead of raw input
    stream_id: int = 0
    live: bool = False
    deadline: float | None = None
    priority: int = 0
    in_flight: int = 8
    rate: float = 0.0  # frames per second; 0: as fast as replies allow
    count: int = 0  # stop after this many frames; 0: the whole input
    top_k: int = 5


class InputError(Exception):
    """The input cannot give another whole frame (ended mid-frame, or a video that cannot be decoded)."""


def raw_frames(source: BinaryIO, opts: SendOptions) -> Iterator[np.ndarray]:
    """Back-to-back frames of ``opts.shape``/``dtype``; each a fresh array (the client sends it without
    copying). InputError when the input ends in the middle of a frame."""
    while True:
        frame = np.empty(opts.shape, np.dtype(opts.dtype).newbyteorder("<"))
        view = frame.reshape(-1).view(np.uint8).data
        got = 0
        while got < len(view):
            n = source.readinto(view[got:])  # type: ignore[attr-defined]
            if not n:
                break
            got += n
        if got < len(view):
            if got:
                raise InputError(f"input ended mid-frame ({got} of {len(view)} bytes): not sent")
            return
        yield frame


def video_frames(path: str, opts: SendOptions) -> Iterator[np.ndarray]:
    """A video's frames decoded with PyAV (optional dependency), as RGB24 scaled to ``opts.shape`` (H, W, 3)."""
    import av  # only here: PyAV is optional

    height, width = opts.shape[:2]
    try:
        with av.open(path) as container:
            for decoded in container.decode(video=0):
                yield decoded.to_ndarray(format="rgb24", width=width, height=height)
    except av.FFmpegError as exc:
        raise InputError(f"cannot decode {path!r}: {exc}") from None


async def send(opts: SendOptions, frames: Iterator[np.ndarray], out: TextIO, err: TextIO) -> int:
    """Send every frame of ``frames`` (``raw_frames``, ``video_frames``); write one JSON line per reply
    to ``out``, problems to ``err``."""
    loop = asyncio.get_running_loop()
    try:
        conn = await get_transport(opts.transport).connect(opts.host, opts.port, token=opts.token)
    except (OSError, TimeoutError) as exc:  # HandshakeError and ConnectionError are OSErrors
        err.write(f"streamgpu send: cannot connect to {opts.host}:{opts.port}: {exc}\n")
        return 1
    pending: collections.deque[asyncio.Future[ReplyLike]] = collections.deque()
    failed = False
    sent = 0
    next_at = time.monotonic()

    def emit(got: ReplyLike) -> None:
        nonlocal failed
        reply = cast(SendReply, got)
        failed |= reply.status != Status.OK
        record = result_record("send", str(reply.stream_id), reply.sequence, opts.model, Status(reply.status),
                               reply.message, reply.timings, reply.result, opts.top_k, reply.stream_id)  # fmt: skip
        out.write(encode_line(record).decode())
        out.flush()  # a pipe's reader wants each line as it comes

    try:
        while not opts.count or sent < opts.count:
            try:
                frame = await loop.run_in_executor(None, next, frames, None)  # reading a pipe may block
            except InputError as exc:
                err.write(f"streamgpu send: {exc}\n")
                failed = True
                break
            if frame is None:
                break
            if opts.rate:
                next_at += 1 / opts.rate
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            while len(pending) >= opts.in_flight:
                emit(await pending.popleft())
            pending.append(conn.submit(frame, stream_id=opts.stream_id, model=opts.model, deadline=opts.deadline,
                                       priority=opts.priority, live=opts.live))  # fmt: skip
            sent += 1
        while pending:
            emit(await pending.popleft())
    except ConnectionError as exc:
        err.write(f"streamgpu send: connection lost after {sent} frames: {exc}\n")
        return 1
    finally:
        for fut in pending:
            fut.cancel()
        await conn.close()
    return 1 if failed else 0


def run(opts: SendOptions) -> int:
    """``streamgpu send``: open the input, send it all, return the exit status."""
    if opts.input == "-":
        source: BinaryIO = sys.stdin.buffer
    else:
        source = open(opts.input, "rb")  # noqa: SIM115 - closed below
    frames = video_frames(opts.video, opts) if opts.video else raw_frames(source, opts)
    try:
        with asyncio.Runner(loop_factory=loop_factory("auto")) as runner:
            return runner.run(send(opts, frames, sys.stdout, sys.stderr))
    finally:
        if source is not sys.stdin.buffer:
            source.close()
