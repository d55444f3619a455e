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

``--subscribers`` (UDP only) sends every frame with the protocol's
SUBSCRIBERS flag through ``streamgpu.client.UdpConnection.send``: the server
sends no replies back and publishes each result to the subscribers of the
stream id instead (a WebSocket on ``/v1/stream``, the results port or file);
nothing is printed per frame, a summary goes to stderr.

Exit status: 0 when every frame was answered OK (``--subscribers``: sent
whole); 1 when a reply was not OK (a datagram could not be sent), the input
ended in the middle of a frame (or a video failed to decode), or the
connection failed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import queue
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import BinaryIO, Protocol, TextIO, cast

import numpy as np

from streamgpu.cmdline import discard_output
from streamgpu.loadgen.transports import ReplyLike, get_transport
from streamgpu.loops import loop_factory
from streamgpu.protocol.wire import Status
from streamgpu.results import encode_line, result_record

CONNECT_TIMEOUT_S = 10.0  # for the connection and its handshake


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
    subscribers: bool = False  # UDP only: no replies; results go to the stream id's subscribers


class InputError(Exception):
    """The input cannot give another whole frame (ended mid-frame, or a video that cannot be decoded)."""


class OutputClosed(Exception):
    """stdout's reader ended (``streamgpu send | head -3``): a BrokenPipeError, which is a ConnectionError, but
    not the server's connection."""


def raw_frames(source: BinaryIO, opts: SendOptions) -> Iterator[np.ndarray]:
    """Back-to-back frames of ``opts.shape``/``dtype``; each a fresh array (the client sends it without
    copying). InputError when the input ends in the middle of a frame, or a frame cannot be allocated."""
    dtype = np.dtype(opts.dtype).newbyteorder("<")
    while True:
        try:
            frame = np.empty(opts.shape, dtype)
        except MemoryError:  # (a transport that does not learn the server's limit, ws and http, lets any shape by)
            nbytes = math.prod(opts.shape) * dtype.itemsize
            raise InputError(f"a {opts.dtype} {list(opts.shape)} frame (--shape, --dtype) is {nbytes} bytes, more "
                             "than this process can allocate") from None  # fmt: skip
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


class _Reader:
    """Takes the input's frames one at a time on a daemon thread: reading a pipe may block, and a thread of
    the loop's default executor blocked in a read would hold the process at exit (Ctrl-C included)."""

    def __init__(self, frames: Iterator[np.ndarray]) -> None:
        self._loop = asyncio.get_running_loop()
        self._frames = frames
        self._asked: queue.SimpleQueue[asyncio.Future[np.ndarray | None]] = queue.SimpleQueue()
        threading.Thread(target=self._run, name="streamgpu-send-input", daemon=True).start()

    def next(self) -> asyncio.Future[np.ndarray | None]:
        """The next frame, None at the end (not read ahead: the input may reuse a frame's buffer)."""
        future: asyncio.Future[np.ndarray | None] = self._loop.create_future()
        self._asked.put(future)
        return future

    def _run(self) -> None:
        while True:
            future = self._asked.get()
            try:
                frame = next(self._frames, None)
            except BaseException as exc:  # InputError, a decode error: raised where the frame is awaited
                self._answer(future, None, exc)
            else:
                self._answer(future, frame, None)

    def _answer(self, future: asyncio.Future[np.ndarray | None], frame: np.ndarray | None,
                exc: BaseException | None) -> None:  # fmt: skip
        def answer() -> None:
            if future.done():
                return
            if exc is not None:
                future.set_exception(exc)
            else:
                future.set_result(frame)

        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile (interrupted): nobody waits
            self._loop.call_soon_threadsafe(answer)


async def paced(opts: SendOptions, frames: Iterator[np.ndarray]) -> AsyncIterator[np.ndarray]:
    """The frames to send: at most ``opts.count``, at ``opts.rate`` frames/s; InputError from the input."""
    reader = _Reader(frames)
    taken = 0
    next_at = time.monotonic()
    while not opts.count or taken < opts.count:
        frame = await reader.next()
        if frame is None:
            return
        if opts.rate:
            next_at += 1 / opts.rate
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        yield frame
        taken += 1


async def send(opts: SendOptions, frames: Iterator[np.ndarray], out: TextIO, err: TextIO) -> int:
    """Send every frame of ``frames`` (``raw_frames``, ``video_frames``); write one JSON line per reply
    to ``out``, problems to ``err`` (``opts.subscribers``: :func:`send_to_subscribers`)."""
    if opts.subscribers:
        return await send_to_subscribers(opts, frames, err)
    try:
        conn = await get_transport(opts.transport).connect(opts.host, opts.port, token=opts.token,
                                                           timeout=CONNECT_TIMEOUT_S)  # fmt: skip
    except (OSError, TimeoutError) as exc:  # HandshakeError and ConnectionError are OSErrors
        err.write(f"streamgpu send: cannot connect to {opts.host}:{opts.port}: {exc or type(exc).__name__}\n")
        return 1
    nbytes = math.prod(opts.shape) * np.dtype(opts.dtype).itemsize
    # every frame would be refused, and a huge one cannot even be allocated (0: the transport does not learn the
    # limit, ws and http: the server refuses a frame past it)
    if conn.max_payload and nbytes > conn.max_payload:
        err.write(f"streamgpu send: a {opts.dtype} {list(opts.shape)} frame (--shape, --dtype) is {nbytes} bytes, "
                  f"more than the server takes ({conn.max_payload}, its max_payload_bytes)\n")  # fmt: skip
        await conn.close()
        return 1
    pending: collections.deque[tuple[asyncio.Future[ReplyLike], int]] = collections.deque()  # (reply, sequence)
    failed = False
    sent = 0

    def emit(got: ReplyLike, sequence: int) -> None:
        nonlocal failed
        failed |= got.status != Status.OK
        # a UDP frame that got no reply at all has only a status and a message (INCOMPLETE, "no reply ...")
        reply = cast(SendReply, got) if hasattr(got, "stream_id") else None
        stream_id = opts.stream_id if reply is None else reply.stream_id
        record = result_record("send", str(stream_id), sequence if reply is None else reply.sequence, opts.model,
                               Status(got.status), got.message, got.timings, reply.result if reply else None,
                               opts.top_k, stream_id)  # fmt: skip
        try:
            out.write(encode_line(record).decode())
            out.flush()  # a pipe's reader wants each line as it comes
        except BrokenPipeError:
            raise OutputClosed from None

    try:
        try:
            async for frame in paced(opts, frames):
                while len(pending) >= opts.in_flight:
                    emit(*await _next(pending))
                future = conn.submit(frame, stream_id=opts.stream_id, model=opts.model, deadline=opts.deadline,
                                     priority=opts.priority, live=opts.live)  # fmt: skip
                pending.append((future, sent))  # (the connection numbers a stream's frames from 0)
                sent += 1
        except InputError as exc:
            err.write(f"streamgpu send: {exc}\n")
            failed = True
        while pending:
            emit(*await _next(pending))
    except ConnectionError as exc:
        err.write(f"streamgpu send: connection lost after {sent} frames: {exc}\n")
        return 1
    except OutputClosed:
        err.write(f"streamgpu send: the output's reader ended (stdout: Broken pipe) after {sent} frames: stopped\n")
        discard_output(out)
        return 1
    finally:
        for fut, _ in pending:
            fut.cancel()
        await conn.close()
    return 1 if failed else 0


async def _next(pending: collections.deque[tuple[asyncio.Future[ReplyLike], int]]) -> tuple[ReplyLike, int]:
    future, sequence = pending.popleft()
    return await future, sequence


async def send_to_subscribers(opts: SendOptions, frames: Iterator[np.ndarray], err: TextIO) -> int:
    """Send every frame over UDP with the SUBSCRIBERS flag (``UdpConnection.send``): no replies come back;
    the results go to the subscribers of ``opts.stream_id``. Writes a summary (or problems) to ``err``."""
    from streamgpu import client

    try:
        conn = await client.connect_udp(opts.host, opts.port)
    except OSError as exc:
        err.write(f"streamgpu send: cannot reach {opts.host}:{opts.port} over UDP: {exc}\n")
        return 1
    failed = False
    sent = 0
    try:
        try:
            async for frame in paced(opts, frames):
                conn.send(frame, stream_id=opts.stream_id, model=opts.model, deadline=opts.deadline,
                          priority=opts.priority, live=opts.live)  # fmt: skip
                sent += 1
        except InputError as exc:
            err.write(f"streamgpu send: {exc}\n")
            failed = True
    except (ConnectionError, ValueError) as exc:  # ValueError: a frame too large for UDP
        err.write(f"streamgpu send: cannot send frame {sent}: {exc}\n")
        failed = True
    finally:
        await conn.close()
    summary = f"streamgpu send: {sent} frames for the subscribers of stream {opts.stream_id}: "
    summary += f"{conn.datagrams_sent} datagrams sent"
    if conn.datagrams_dropped:
        failed = True
        summary += (f"; {conn.datagrams_dropped} could not be sent (send buffer full, or nothing listens at"
                    f" {opts.host}:{opts.port}/udp): their frames are lost")  # fmt: skip
    if conn.unmatched_replies:
        summary += f"; {conn.unmatched_replies} refusals came back by datagram (frames refused before their first"
        summary += " datagram with the frame header came, e.g. OVERLOADED)"
    err.write(summary + "\n")
    return 1 if failed else 0


def run(opts: SendOptions) -> int:
    """``streamgpu send``: open the input, send it all, return the exit status."""
    if opts.input == "-":
        # Unbuffered: a read blocked in the input thread then holds no lock that the interpreter's exit
        # needs (sys.stdin.buffer's, which made an interrupted process abort).
        source: BinaryIO = open(sys.stdin.fileno(), "rb", buffering=0, closefd=False)  # noqa: SIM115 - closed below
    else:
        try:
            source = open(opts.input, "rb")  # noqa: SIM115 - closed below
        except OSError as exc:  # (no read permission; a socket's path)
            sys.stderr.write(f"streamgpu send: cannot read --input {opts.input!r}: {exc.strerror or exc}\n")
            return 1
    frames = video_frames(opts.video, opts) if opts.video else raw_frames(source, opts)
    try:
        with asyncio.Runner(loop_factory=loop_factory("auto")) as runner:
            return runner.run(send(opts, frames, sys.stdout, sys.stderr))
    except KeyboardInterrupt:  # Ctrl-C: the usual end of a live pipe
        sys.stderr.write("streamgpu send: interrupted\n")
        return 130
    finally:
        source.close()
