"""Isolation over a real server on loopback: hostile producers do not slow well-behaved ones.

``PRODUCERS`` well-behaved producers (``streamgpu.client`` connections on the
test's event loop, each closed-loop with ``WINDOW`` frames in flight) send to
``fast``, a model that costs next to nothing, so the event loop, not the
model, limits their frame rate. Each OK reply is timestamped; rates are
counted over windows of ``SPAN_S``. The producers go only around the windows
(from ``RAMP_S`` before each): while the hostiles arrive and leave they let
their frames in flight finish and wait, so those transitions are quick and
fall in no window.

Windows alternate: alone (nobody else on the server), then the hostiles
arrive (one of each kind, below) and settle, a window with every hostile
active from before it starts to after it ends, the hostiles leave (each
checked as it goes), alone again, and so on: A H A H A H A H A. Check
(``kept``): a hostile window's frames/s over the mean of the two alone windows
either side of it is, in the median over the hostile windows, at least
``KEEP`` (90 %).

Noise. On a shared 2-core CI machine other processes change the frame rate by
10 to 30 % from one second to the next, for seconds at a time. So:

* a window's rate is its frames over its time minus the time the event loop's
  thread sat runnable in the kernel's run queue, kept off the CPU by other
  processes (``run_queue_s``); stalls and idle time still count;
* the two kinds of window interleave and each hostile window is compared
  with its own neighbours, so what drifts slowly touches both alike, and
  the median ignores the windows another process disturbed, whichever
  way (a quiet second runs a third faster). A hostile that really slows the
  others does so in every hostile window, so the median shows it;
* ``MIN_CYCLES`` hostile windows are measured; while the result is near the
  bar (between ``KEEP / 2`` and ``KEEP``), more are added, up to
  ``MAX_CYCLES``; a real slowdown stays in all of them;
* a measure below the bar is taken again once, on a fresh server: a real
  slowdown fails both;
* 16 frames in flight per producer keep the model's batches full (32): with
  fewer, batch sizes wander and so does the rate.

The full measure runs on uvloop (``MIN_CYCLES`` hostile windows at least);
plain asyncio gets one hostile phase with every check but a looser rate bar
(no stall: more than half the rate kept), which keeps the file near 20 s.

The hostiles. The trickler, the half-sender and the flood run in a child
process (``HOSTILE_SCRIPT``, standard library only), as hostile producers run
elsewhere: their own client-side work (more than the server's) is then not
charged to the server's event loop. The never-reader and the parker are
passive once settled and run on the test's loop, where the test can look at
their every reply.

* trickler: HELLO, the header of a large ``slow`` frame, then one payload byte
  every ``TRICKLE_PERIOD``; the server must drop it with a CONNECTION-flag
  RECEIVE_TIMEOUT reply once the payload budget is spent (not before); it
  reconnects and repeats, so it holds ring space almost all the time;
* half-sender: connects, sends a header and half a payload, disconnects, again
  and again;
* flood: waves of ``FLOOD`` connections that never send HELLO, more than
  ``max_connections``: each is refused OVERLOADED at once (over the cap) or
  gets BAD_FRAME "no HELLO" after ``hello_timeout_s``;
* never-reader: sends ``sink`` frames and never reads its replies; the server
  must stop reading it (flow control), not drop it; when it leaves, it reads,
  and every frame it sent is answered exactly once;
* parker: ``N_PARKED`` frames for ``slow`` (fixed batching: a batch waits to be
  full, ``N_PARKED + 1`` frames, or for 10 minutes) sit in the queue holding
  their slots; when it leaves, one more frame fills the batch and all are
  answered.

The ring is small (1 MiB), so a ring that reclaims space only from its oldest
slot (what ``SlotPool`` replaced) stalls every producer behind the trickled or
parked slot within a fraction of a second. (Planted into ``SlotPool.release``,
it took the producers from about 4000 to about 300 frames/s in the first
hostile window, then the parked frames' batch could never fill: the test fails
with the rates and the ring's state.)

Exactly once: every frame a well-behaved producer submitted is answered OK
once, with its own result (futures resolve once; a duplicate or stray reply
would show up in the client's ``unmatched_replies``); so is every frame of the
never-reader and of the parker; the server's per-model counters agree; and in
the end no slot is held and no frame is in flight.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import socket
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from streamgpu import client
from streamgpu.config import Config, ListenerSpec
from streamgpu.models.spec import ModelSpec
from streamgpu.protocol import wire
from streamgpu.protocol.wire import ReplyFlags, Status
from streamgpu.server import Server

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.:DeprecationWarning")  # the cheap models are TorchScript

MIB = 1024 * 1024
SMALL = (16, 16, 3)  # 768-byte frames: the well-behaved producers' and the never-reader's
LARGE = (128, 128, 3)  # 48 KiB frames: trickled, half sent, parked
LARGE_BYTES = 128 * 128 * 3

PRODUCERS = 8
WINDOW = 16  # frames in flight per well-behaved producer: 128 in all, full batches of 32
WARMUP_S = 0.5
RAMP_S = 0.1  # the producers go again before a window starts
SPAN_S = 1.0  # one measuring window
MIN_CYCLES = 4  # hostile windows (each between two alone windows)
MAX_CYCLES = 11
KEEP = 0.9

TRICKLE_PERIOD = 0.1
HALF_PERIOD = 0.1
FLOOD = 80  # HELLO-less connections per wave (max_connections is 64; the listen backlog 100)
FLOOD_PAUSE = 0.5  # between waves: the trickler and the half-sender get their turn at the connection cap
N_PARKED = 4
NR_AHEAD = 64  # frames the never-reader keeps sent beyond those the server took
NR_QUIET_S = 0.3

# The child process's hostiles. It knows no protocol beyond the bytes the test gives it (HELLO,
# the trickled frame's header, the half-sent frame, the first bytes of a WELCOME that accepts).
# It starts the trickler, once that is connected the half-sender, once that has sent two half
# payloads the flood (which keeps new connections out while it holds the cap); says "ready";
# runs until its stdin closes; then reports, as JSON: each trickled connection the server
# accepted (all it received, hex, and the seconds from its header until the server closed or
# reset it; None when we left first), half payloads sent, handshakes refused, what the flood's
# connections got (hex -> how many), the longest a flood connection stayed open, and errors.
HOSTILE_SCRIPT = r"""
import asyncio, collections, json, selectors, socket, sys, threading, time

async def main(port, hello, trickled, half, ok, flood_n, flood_pause, trickle_period, half_period):
    stop = threading.Event()
    trickling, halfway = asyncio.Event(), asyncio.Event()
    trickles, flood, errors = [], collections.Counter(), collections.Counter()
    counts = {"half_sent": 0, "refused": 0, "longest": 0.0}

    def guarded(coro):
        async def run():
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except Exception as e:
                errors[repr(e)] += 1
        return asyncio.ensure_future(run())

    async def handshake():
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(hello)
        got = b""
        while len(got) < len(ok):
            chunk = await reader.read(4096)
            if not chunk:
                break
            got += chunk
        if got.startswith(ok):
            return reader, writer, got
        counts["refused"] += 1
        writer.close()
        return None

    async def trickler():
        while not stop.is_set():
            opened = await handshake()
            if opened is None:
                await asyncio.sleep(0.1)
                continue
            reader, writer, got = opened
            writer.write(trickled)
            started = time.monotonic()
            trickling.set()
            received = bytearray(got)

            async def until_closed():  # True: reset (the server aborts a connection it drops)
                try:
                    while chunk := await reader.read(65536):
                        received.extend(chunk)
                except ConnectionError:
                    return True
                return False

            closed = asyncio.ensure_future(until_closed())
            while not closed.done() and not stop.is_set():
                writer.write(b"\x01")
                await asyncio.wait([closed], timeout=trickle_period)
            held = time.monotonic() - started
            if not closed.done():  # we leave first
                closed.cancel()
                held = None
            trickles.append([received.hex(), held])
            writer.close()

    async def half_sender():
        while not stop.is_set():
            opened = await handshake()
            if opened is None:
                await asyncio.sleep(half_period)
                continue
            reader, writer, _ = opened
            writer.write(half)
            await writer.drain()
            writer.close()
            await writer.wait_closed()
            counts["half_sent"] += 1
            if counts["half_sent"] >= 2:
                halfway.set()
            await asyncio.sleep(half_period)

    def waves():  # a thread with plain sockets: the flood's own cost stays small
        sel = selectors.DefaultSelector()
        while not stop.is_set():
            for _ in range(flood_n):
                sock = socket.socket()
                sock.setblocking(False)
                sock.connect_ex(("127.0.0.1", port))  # on loopback: connected at once, or refused by the kernel
                sel.register(sock, selectors.EVENT_READ, [bytearray(), time.monotonic()])
            while sel.get_map() and not stop.is_set():
                for key, _ in sel.select(0.05):
                    got, started = key.data
                    try:
                        chunk = key.fileobj.recv(4096)
                    except OSError as e:
                        errors[repr(e)] += 1
                        chunk = None
                    if chunk:
                        got.extend(chunk)
                        continue
                    if chunk is not None:  # the server closed it
                        flood[got.hex()] += 1
                    counts["longest"] = max(counts["longest"], time.monotonic() - started)
                    sel.unregister(key.fileobj)
                    key.fileobj.close()
            for key in list(sel.get_map().values()):  # stopped mid-wave
                sel.unregister(key.fileobj)
                key.fileobj.close()
            stop.wait(flood_pause)

    tasks = [guarded(trickler())]
    await asyncio.wait_for(trickling.wait(), 10)
    tasks.append(guarded(half_sender()))
    await asyncio.wait_for(halfway.wait(), 10)  # the flood holds the cap for hello_timeout_s at a time
    flooding = threading.Thread(target=waves)
    flooding.start()
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 10)
    flooding.join()
    print(json.dumps(dict(counts, trickles=trickles, flood=flood, errors=errors)))

args = sys.argv[1:]
asyncio.run(main(int(args[0]), *map(bytes.fromhex, args[1:5]), int(args[5]), *map(float, args[6:])))
"""


# -- the server --------------------------------------------------------------------------------------


class Head(nn.Module):
    """The first ``width`` bytes of each frame as floats, ``repeat`` times over: next to no work."""

    def __init__(self, width: int, repeat: int) -> None:
        super().__init__()
        self.width = width
        self.repeat = repeat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1)[:, : self.width].float().repeat(1, self.repeat)


def cheap(name: str, path: Path, shape: tuple[int, ...], repeat: int = 1, **kw: Any) -> ModelSpec:
    file = path / f"{name}.pt"
    torch.jit.save(torch.jit.script(Head(4, repeat)), str(file))
    return ModelSpec(name=name, source=f"torchscript:{file}", input_shape=shape, preprocess="none", **kw)


@dataclass(frozen=True)
class Models:
    fast: ModelSpec  # the well-behaved producers'
    # The never-reader's: like ``fast`` but with 64 KiB results (so flow control stops it after a
    # few hundred frames), and its own name (the server's counters say how many frames it read).
    sink: ModelSpec
    slow: ModelSpec  # a batch waits to be full or for 10 minutes: frames stay parked


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    path = tmp_path_factory.mktemp("isolation-models")
    return Models(
        fast=cheap("fast", path, SMALL, max_batch_size=32),
        sink=cheap("sink", path, SMALL, repeat=4096, max_batch_size=32),
        slow=cheap("slow", path, LARGE, max_batch_size=N_PARKED + 1, batch_policy="fixed", max_queue_delay_ms=600_000),
    )


def make_config(models: Models) -> Config:
    return Config(
        listeners=[ListenerSpec(port=0)],
        device="cpu",
        models=[models.fast, models.sink, models.slow],
        ring_bytes=MIB,  # a producer's share: 256 KiB, enough for N_PARKED + 1 large frames
        max_payload_bytes=LARGE_BYTES,
        max_connections=64,
        max_frames_per_connection=64,  # bounds the replies a never-reader's frames still add once it is stopped
        hello_timeout_s=1.0,
        receive_timeout_s=0.5,
        min_receive_rate=1_000_000,
        shutdown_timeout_s=1.0,
    )


def header(model: ModelSpec, stream: int, sequence: int) -> bytes:
    h = wire.FrameHeader(stream, sequence, model.name, model.frame_dtype_code, model.input_shape, model.frame_nbytes)
    return wire.encode_frame_header(h)


async def until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    give_up = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < give_up, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


# -- raw connections on the test's loop ----------------------------------------------------------------


async def open_raw(port: int, rcvbuf: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A handshaken raw connection with a fixed receive buffer."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connecting: sets the window
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(wire.encode_hello(wire.Hello()))
    buf = b""
    while (parsed := wire.decode_welcome(buf)) is None:
        chunk = await reader.read(4096)
        assert chunk, "the server closed the connection during the handshake"
        buf += chunk
    assert parsed[0].status == Status.OK and parsed[1] == len(buf), parsed
    return reader, writer


async def close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


class ReplyReader:
    """Parses REPLY messages off a raw stream."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader
        self.buf = bytearray()
        self.pos = 0

    async def next(self) -> wire.ReplyHeader | None:
        """The next reply, or None when the connection ends first."""
        while True:
            parsed = wire.decode_reply(memoryview(self.buf)[self.pos :])
            if parsed is not None:
                reply, used = parsed[0], parsed[2]
                del parsed  # its payload view: the buffer may be resized below
                self.pos += used
                return reply
            del self.buf[: self.pos]
            self.pos = 0
            try:
                chunk = await self.reader.read(1 << 20)
            except ConnectionError:
                return None
            if not chunk:
                return None
            self.buf += chunk


# -- hostiles --------------------------------------------------------------------------------------


@dataclass
class Hostiles:
    """One of each hostile kind; ``arrive`` and ``leave`` once per hostile phase. Counters add up."""

    server: Server
    models: Models
    phases: int = 0
    # the child process: trickler, half-sender, flood
    child: asyncio.subprocess.Process | None = None
    trickle_drops: list[tuple[Status, ReplyFlags, float]] = field(default_factory=list)  # (status, flags, held s)
    trickle_cut: int = 0  # connections we closed first (the phase ended)
    half_sent: int = 0
    refused: int = 0  # trickler / half-sender handshakes refused while the flood held the cap
    flood_overloaded: int = 0
    flood_no_hello: int = 0
    flood_longest_s: float = 0.0
    other: list[str] = field(default_factory=list)  # anything unexpected
    # the never-reader
    nr_task: asyncio.Future[int] | None = None
    nr_writer: asyncio.StreamWriter | None = None
    nr_reader: asyncio.StreamReader | None = None
    nr_sent: int = 0  # by the never-reader of this phase
    nr_taken: int = 0  # ``sink`` frames the server took, as of the never-reader's stall
    nr_total: int = 0  # frames of all never-readers, answered
    # the parker
    parker: client.Connection | None = None
    parked: list[asyncio.Future[client.Reply]] = field(default_factory=list)
    parked_total: int = 0  # answered

    @property
    def port(self) -> int:
        return self.server.port

    def model_counts(self, name: str) -> dict[str, Any]:
        counts: dict[str, Any] = self.server.metrics()["models"][name]
        return counts

    async def arrive(self) -> None:
        """Start every hostile; return once each is in its steady state."""
        self.phases += 1
        # the connections that must get in before the flood holds the cap
        self.parker = await client.connect("127.0.0.1", self.port)
        large = np.zeros(LARGE, np.uint8)
        self.parked = [self.parker.submit(large, model="slow", stream_id=i) for i in range(N_PARKED)]
        # A fixed receive buffer (no autotuning): the server stops reading it after about 4 MiB of
        # replies in its write buffer plus what the kernel holds.
        self.nr_reader, self.nr_writer = await open_raw(self.port, rcvbuf=256 * 1024)
        self.nr_sent = 0
        self.nr_task = asyncio.ensure_future(self.never_reader(self.nr_writer))
        ok = wire.encode_welcome(wire.Welcome(Status.OK, 0, 0))[:8]  # magic, version, status
        slow = self.models.slow
        args = [
            self.port,
            wire.encode_hello(wire.Hello()).hex(),
            header(slow, 1, 0).hex(),
            (header(slow, 2, 0) + b"\x02" * (LARGE_BYTES // 2)).hex(),
            ok.hex(),
            FLOOD,
            FLOOD_PAUSE,
            TRICKLE_PERIOD,
            HALF_PERIOD,
        ]
        self.child = await asyncio.create_subprocess_exec(
            sys.executable, "-c", HOSTILE_SCRIPT, *map(str, args), stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert self.child.stdout is not None
        assert await asyncio.wait_for(self.child.stdout.readline(), 15) == b"ready\n"
        await until(lambda: self.model_counts("slow")["queue_length"] == N_PARKED, 5, "the parked frames")
        try:
            self.nr_taken = await asyncio.wait_for(self.nr_task, 15)  # flow control stopped reading it
        except TimeoutError:
            pytest.fail(f"the server did not stop reading the never-reader: it took {self.nr_sent} frames")

    async def never_reader(self, writer: asyncio.StreamWriter) -> int:
        """Sends ``sink`` frames and never reads a reply; returns once the server has stopped reading
        it, with the number of ``sink`` frames the server took.

        It keeps at most ``NR_AHEAD`` frames sent beyond those the server took, so that it has
        sent little more than the server read when it stops (they are all answered at the end).
        The server has stopped reading it for lack of room for replies (not because frames are in
        progress) when it took nothing for ``NR_QUIET_S`` and has answered all it took.
        """
        payload = bytes(self.models.sink.frame_nbytes)
        loop = asyncio.get_running_loop()
        before = self.model_counts("sink")["accepted"]
        last, since = -1, loop.time()
        while True:
            sink = self.model_counts("sink")
            taken = sink["accepted"]
            if taken != last:
                last, since = taken, loop.time()
            elif loop.time() - since >= NR_QUIET_S and sink["completed"] == taken < before + self.nr_sent:
                return int(taken)
            while before + self.nr_sent - taken < NR_AHEAD:
                writer.write(header(self.models.sink, 0, self.nr_sent) + payload)
                self.nr_sent += 1
            await asyncio.sleep(0.01)

    async def leave(self) -> None:
        """Check that the passive hostiles held on through the window, stop them all, check the answers."""
        assert self.nr_writer is not None and self.nr_reader is not None and self.parker is not None
        assert self.model_counts("sink")["accepted"] == self.nr_taken, "the never-reader was read from"
        dropped = self.nr_writer.is_closing() or self.nr_reader.at_eof() or self.nr_reader.exception() is not None
        assert not dropped, "the never-reader was dropped"
        assert self.model_counts("slow")["queue_length"] == N_PARKED and not any(f.done() for f in self.parked)
        await self.stop_child()
        # one more frame fills the parked frames' batch: all of them are answered, once
        self.parked.append(self.parker.submit(np.zeros(LARGE, np.uint8), model="slow", stream_id=N_PARKED))
        for fut in self.parked:
            answer = await asyncio.wait_for(fut, 10)
            assert answer.ok, answer
        self.parked_total += len(self.parked)
        assert self.parker._protocol.unmatched_replies == 0
        await self.parker.close()
        # the never-reader reads at last: every frame it sent is answered, once
        replies = ReplyReader(self.nr_reader)
        seen: set[int] = set()
        while len(seen) < self.nr_sent:
            reply = await asyncio.wait_for(replies.next(), 10)
            assert reply is not None, f"the never-reader was closed after {len(seen)} of {self.nr_sent} replies"
            assert (reply.stream_id, reply.status, reply.flags) == (0, Status.OK, ReplyFlags.NONE), reply
            assert reply.sequence == len(seen), reply  # one stream: in order, each once
            seen.add(reply.sequence)
        with contextlib.suppress(TimeoutError):
            extra = await asyncio.wait_for(replies.next(), 0.1)
            pytest.fail(f"an extra reply for the never-reader: {extra}")
        self.nr_total += self.nr_sent
        await close_writer(self.nr_writer)
        await until(lambda: self.server.metrics()["connections"] == PRODUCERS, 5, "the hostiles to be gone")

    async def stop_child(self) -> None:
        """Close the child's stdin (it stops), and file its report."""
        child, self.child = self.child, None
        assert child is not None
        out, _ = await asyncio.wait_for(child.communicate(b""), 15)
        assert child.returncode == 0, out
        report = json.loads(out)
        self.half_sent += report["half_sent"]
        self.refused += report["refused"]
        self.flood_longest_s = max(self.flood_longest_s, report["longest"])
        self.other += [f"{n} x {error}" for error, n in report["errors"].items()]
        for data, held in report["trickles"]:
            got = bytes.fromhex(data)
            welcome = wire.decode_welcome(got)
            assert welcome is not None and welcome[0].status == Status.OK, got
            reply = wire.decode_reply(got[welcome[1] :])
            if held is None and reply is None:
                self.trickle_cut += 1
            elif reply is not None and welcome[1] + reply[2] == len(got):  # one reply, then the server closed
                self.trickle_drops.append((reply[0].status, reply[0].flags, held))
            else:
                self.other.append(f"trickled connection got {got!r}")
        for data, n in report["flood"].items():
            got = bytes.fromhex(data)
            welcome = wire.decode_welcome(got)
            if welcome is None or welcome[1] != len(got):  # a WELCOME, then the server closes
                self.other.append(f"{n} x flood connection got {got!r}")
            elif welcome[0].status == Status.OVERLOADED:
                self.flood_overloaded += n
            elif welcome[0].status == Status.BAD_FRAME and "no HELLO" in welcome[0].message:
                self.flood_no_hello += n
            else:
                self.other.append(f"{n} x flood connection got {welcome[0]}")

    async def abort(self) -> None:
        """After a failure: leave nothing running."""
        if self.child is not None:
            self.child.kill()
            await self.child.wait()
        if self.nr_task is not None:
            self.nr_task.cancel()
            await asyncio.gather(self.nr_task, return_exceptions=True)
        if self.nr_writer is not None:
            await close_writer(self.nr_writer)
        if self.parker is not None:
            await self.parker.close()
            await asyncio.gather(*self.parked, return_exceptions=True)


# -- well-behaved producers ----------------------------------------------------------------------------


@dataclass
class Good:
    done_at: list[float] = field(default_factory=list)  # perf_counter of every OK reply, all producers
    submitted: int = 0
    answered: int = 0
    bad: list[str] = field(default_factory=list)
    stop: bool = False
    going: asyncio.Event = field(default_factory=asyncio.Event)  # clear: let the frames in flight finish, wait

    async def run(self, conn: client.Connection, stream: int) -> None:
        frame = np.full(SMALL, stream, np.uint8)
        pending: list[asyncio.Future[client.Reply]] = []
        for _ in range(WINDOW):
            pending.append(conn.submit(frame, model="fast", stream_id=stream))
            self.submitted += 1
        try:
            while pending:
                reply = await pending[0]  # one stream: replies come in order
                pending.pop(0)
                self.answered += 1
                if reply.ok and reply.result is not None and reply.result[0] == stream:
                    self.done_at.append(time.perf_counter())
                else:
                    self.bad.append(f"{reply.status.name}: {reply.message} {reply.result!r}")
                await self.going.wait()
                if not self.stop:
                    pending.append(conn.submit(frame, model="fast", stream_id=stream))
                    self.submitted += 1
        finally:  # after a failure: no future is left for the loop to report as never retrieved
            for fut in pending:
                fut.cancel()

    async def window(self) -> float:
        """Let the producers go for ``RAMP_S + SPAN_S``; their frames/s over the ``SPAN_S``, not counting
        the time the loop's thread was kept off the CPU by other processes (``run_queue_s``)."""
        self.going.set()
        await asyncio.sleep(RAMP_S)
        start, waited = time.perf_counter(), run_queue_s()
        await asyncio.sleep(SPAN_S)
        end, waited = time.perf_counter(), run_queue_s() - waited
        self.going.clear()
        times = self.done_at
        return (bisect.bisect_left(times, end) - bisect.bisect_left(times, start)) / (end - start - waited)


def kept(alone: list[float], hostile: list[float]) -> float:
    """The share of their frame rate the well-behaved producers kept with the hostiles: the median,
    over the hostile windows, of each one's rate over the mean of the two alone windows either side
    of it (the alone window after the last hostile one may not be measured yet: then the one before).

    Pairing each hostile window with its neighbours takes out what drifts over the run: on a busy CI
    machine the alone rate once fell from 5,900 to 4,000 frames/s and rose to 5,700 within one test,
    so the median alone window (early, fast) over the median hostile one (late, slow) said 85 %."""
    return statistics.median(h / statistics.mean(alone[i : i + 2]) for i, h in enumerate(hostile))


def run_queue_s() -> float:
    """Seconds the calling thread has spent runnable but waiting for a CPU (Linux schedstat; 0 elsewhere).

    On a shared 2-core machine other processes keep the event loop's thread off the CPU for up to
    half of the time, varying from second to second; the frame rate over the rest of the time is
    what the server's own work decides. Idle time (the loop waiting for input) is not excluded.
    """
    try:
        with open("/proc/thread-self/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


# -- the test --------------------------------------------------------------------------------------------


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_hostile_producers_do_not_slow_well_behaved_ones(models: Models) -> None:
    """The full measure, on uvloop (the loop the server picks where it is installed). A busy machine can fake
    one slow measure (other processes' bursts, seconds long, that fall on hostile windows more than on alone
    ones); a real slowdown shows in a second measure too, on a fresh server."""
    share, summary = await isolation(models, MIN_CYCLES, MAX_CYCLES, KEEP)
    if share < KEEP:
        print(f"measuring again: {summary}")
        share, summary = await isolation(models, MIN_CYCLES, MAX_CYCLES, KEEP)
    assert share >= KEEP, summary


@pytest.mark.asyncio(loop_factories=["asyncio"])
async def test_hostile_producers_on_the_asyncio_loop(models: Models) -> None:
    """One hostile phase on plain asyncio: every protocol and exactly-once check, and no stall (the
    well-behaved producers keep more than half their rate; 90 % needs the windows the full measure
    spends, which would double the time)."""
    share, summary = await isolation(models, 1, 1, KEEP / 2)
    assert share >= KEEP / 2, summary


async def isolation(models: Models, min_cycles: int, max_cycles: int, keep: float) -> tuple[float, str]:
    """One measure on a fresh server: (``kept``, a summary); every check but the rate's is asserted here. More
    hostile windows than ``min_cycles`` are measured while the rate kept is near ``keep``."""
    began = time.perf_counter()
    cfg = make_config(models)
    server = Server(cfg)
    await server.start()
    good = Good()
    hostiles = Hostiles(server, models)
    conns: list[client.Connection] = []
    producers: list[asyncio.Future[None]] = []
    try:
        conns += [await client.connect("127.0.0.1", server.port) for _ in range(PRODUCERS)]
        producers += [asyncio.ensure_future(good.run(c, k)) for k, c in enumerate(conns)]
        good.going.set()
        await asyncio.sleep(WARMUP_S)
        alone = [await good.window()]
        hostile: list[float] = []
        while len(hostile) < min_cycles or (len(hostile) < max_cycles and keep / 2 < kept(alone, hostile) < keep):
            await hostiles.arrive()
            hostile.append(await good.window())
            rates = f"frames/s alone {alone[-1]:.0f}, then with the hostiles {hostile[-1]:.0f}"
            print(rates)
            try:
                await hostiles.leave()
            except TimeoutError:
                pytest.fail(f"stuck while the hostiles left ({rates}); ring: {server.metrics()['ring']}")
            alone.append(await good.window())
        good.stop = True
        good.going.set()
        await asyncio.wait_for(asyncio.gather(*producers), 10)

        h = hostiles
        summary = (
            f"alone {[round(r) for r in alone]} frames/s, with hostiles {[round(r) for r in hostile]} frames/s "
            f"(kept {kept(alone, hostile):.1%}, best of each {max(hostile) / max(alone):.1%}); "
            f"over {h.phases} hostile phases: trickler dropped "
            f"{len(h.trickle_drops)}x, {h.half_sent} half payloads, flood {h.flood_overloaded} refused + "
            f"{h.flood_no_hello} timed out, never-readers stopped after {h.nr_total} frames, "
            f"{h.refused} trickler/half-sender handshakes refused at the cap"
        )
        print(summary)

        # -- each hostile did what it came for, and was treated as the protocol says ------------------
        assert not h.other, h.other[:5]
        budget = cfg.receive_timeout_s + LARGE_BYTES / cfg.min_receive_rate
        assert h.trickle_drops, f"the trickler was never dropped ({h.trickle_cut} times it left first)"
        for status, flags, held in h.trickle_drops:
            assert status == Status.RECEIVE_TIMEOUT and flags & ReplyFlags.CONNECTION, (status, flags)
            assert budget * 0.95 <= held <= budget + 1.0, f"dropped after {held:.2f} s; the budget is {budget:.2f} s"
        assert h.half_sent >= 2 * h.phases, f"{h.half_sent} half payloads got in ({h.refused} handshakes refused)"
        assert h.flood_overloaded, "no HELLO-less connection was refused over max_connections"
        assert h.flood_no_hello, "no HELLO-less connection was closed for its missing HELLO"
        assert h.flood_longest_s <= cfg.hello_timeout_s + 1.0, h.flood_longest_s

        # -- exactly once -------------------------------------------------------------------------------
        assert not good.bad, good.bad[:5]
        assert good.answered == good.submitted == len(good.done_at)
        for conn in conns:
            assert conn.in_flight == 0 and not conn.closed
            assert conn._protocol.unmatched_replies == 0
        counts = server.metrics()["models"]
        for name, want in (("fast", good.submitted), ("sink", h.nr_total), ("slow", h.parked_total)):
            m = counts[name]
            assert m["accepted"] == m["completed"] == want, (name, m)
            assert m["failed"] == m["rejected_overloaded"] == m["abandoned"] == m["deadline_missed"] == 0, (name, m)
        assert server.pool.slots_in_use == 0 and server.metrics()["frames_in_flight"] == 0
        print(f"test took {time.perf_counter() - began:.1f} s")
        return kept(alone, hostile), summary
    finally:  # also after a failure: leave nothing running for the loop's exception handler to report
        await hostiles.abort()
        for task in producers:
            task.cancel()
        await asyncio.gather(*producers, return_exceptions=True)
        for conn in conns:
            await conn.close()
        await server.stop(timeout=0.2)
