"""An ingest worker process: accepts and reads producer connections, answers them, schedules nothing.

Started by ``streamgpu.ingest.workers.WorkerListener`` as
``python -m streamgpu.ingest.worker FD`` (a fresh interpreter: no fork of the
scheduling process, and no torch import here: ``tests/ingest/test_workers.py``
checks). ``FD`` is its end of the descriptor channel; the first thing on it
is a length-prefixed pickle of ``WorkerInit`` from the parent (trusted: the
parent wrote it).

The worker runs the ordinary TCP front end (``ingest.tcp``) on the connections
the parent accepts and hands over (one descriptor per message on its end of
a ``SOCK_SEQPACKET`` pair: ``WorkerInit.handoff_fd``) and, for each UDP
listener of the config, the ordinary UDP front end (``ingest.udp``) on its own
``SO_REUSEPORT`` socket of that address (the kernel keeps each source address
on one socket, so one producer's datagrams all reach one worker), with an
ordinary ``Admission``, over its own range of the shared host segment: framing, the
HELLO and its token, header validation and every admission check
(``Admission.admit``: size, tensor, model, shape, priority ceiling), ring
space per producer within its range (``Producer.reserve``), time limits and
reply order (UDP: reassembly, loss, every count of the listener) all happen
here, in the same code as in one-process mode. A
complete frame's payload is already in the segment (the kernel wrote it
there); the worker sends a FRAME descriptor up the channel instead of
queueing the frame, and the scheduling process (queues, batching, priority,
per-producer fairness, deadlines) answers with RELEASE and REPLY records.
See ``streamgpu.ingest.channel`` for the records.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import pickle
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np

from streamgpu.cmdline import STOP_SIGNALS
from streamgpu.config import Config, ListenerSpec
from streamgpu.frame import Frame, Outcome, finish_ok
from streamgpu.ingest import channel
from streamgpu.ingest.admission import Admission, Grant, Producer, Refused
from streamgpu.ingest.hub import UNNAMED, Encoded, Origin, ResultHub
from streamgpu.ingest.tcp import TcpConnection, TcpListener
from streamgpu.ingest.udp import STAT_NAMES, UdpListener
from streamgpu.loops import freeze_heap, new_event_loop, tune_malloc
from streamgpu.memory import HostSegment, SlotPool
from streamgpu.models.spec import ModelSpec
from streamgpu.protocol.wire import FrameHeader, Status, Timings

log = logging.getLogger("streamgpu.worker")
_LENGTH = struct.Struct("<I")
# The records' conn and fid fields are u32; connection ids (every TCP connection and UDP source address)
# and frame numbers are not bounded: they go up modulo 2**32, skipping those still in use
_U32 = 0xFFFFFFFF


@dataclass(frozen=True)
class WorkerInit:
    """What a worker needs from its parent: the config, its place, and the descriptors it inherited."""

    config: Config  # the worker's own: ring_bytes = its range, the producer share scaled to it
    index: int
    handoff_fd: int  # connections the parent accepted come on it, one descriptor per message
    udp_fds: tuple[int, ...]  # this worker's bound socket of each udp listener (in config order)
    segment_fd: int
    segment_bytes: int
    start: int  # this worker's range of the segment: [start, end)
    end: int
    connection_cap: int  # TCP connections it serves at once (its share of max_connections)
    models: tuple[tuple[int, ModelSpec], ...]  # the models served when it was spawned, by index (channel.MODELS)
    generation: int = 0  # the processes started at its index before it (its connections' names tell them apart)


def send_init(sock: socket.socket, init: WorkerInit) -> None:
    """Parent side: write ``init`` as the channel's first message (blocking; the socket is fresh)."""
    data = pickle.dumps(init)
    sock.sendall(_LENGTH.pack(len(data)) + data)


def _read_init(sock: socket.socket) -> WorkerInit:
    def exactly(n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("parent closed the channel before the worker's setup")
            buf += chunk
        return bytes(buf)

    (n,) = _LENGTH.unpack(exactly(_LENGTH.size))
    init = pickle.loads(exactly(n))
    if not isinstance(init, WorkerInit):
        raise TypeError(f"expected WorkerInit, got {type(init).__name__}")
    return init


class _Channel(asyncio.Protocol):
    """The worker's end of the descriptor channel: frames up (batched per loop iteration), replies down."""

    def __init__(self, config: Config) -> None:
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._out: list[bytes] = []
        self._frames_up = False  # the records to flush hold frames (their replies follow: busy_poll_us)
        self._rest = b""  # the start of a record not whole yet
        # The reads of a record longer than one, joined once it is whole (a batch's results can be tens of MB:
        # joined at every read, its start was copied again at each), and how many bytes they still lack
        self._parts: list[bytes] = []
        self._missing = 0
        self._frames: dict[int, Frame] = {}
        self._fids = itertools.count(1)
        # Connections announced (OPEN sent) -> their number on the channel (their id modulo 2**32, unless a
        # connection still open has that one: new UDP source addresses can burn ids at the datagram rate)
        self._announced: dict[int, int] = {}
        self._numbers: set[int] = set()  # the channel numbers of the connections announced
        # ASKs not answered yet, by channel number: the connection and what to tell it
        self._asking: dict[int, tuple[int, Callable[[Refused | None], None]]] = {}
        # The numbers of connections gone while they asked: taken until their ADMIT comes (a connection given
        # one meanwhile would take that answer for its own ASK's)
        self._gone_asking: set[int] = set()
        # Connections (TCP, and UDP producers) by id -> how their frames' outcomes are published (their OPEN
        # says so: the scheduling process publishes the rest under the same name)
        self._origins: dict[int, Origin] = {}
        self.specs: dict[str, ModelSpec] = {}  # the models admitted, by name (what ``Admission`` reads)
        # Every model's index by what its frames are (name, dtype, shape), kept after an unload: a frame
        # admitted before one goes up under the index of the model that admitted it (never reused)
        self._indexes: dict[tuple[str, int, tuple[int, ...]], int] = {}
        # Every name served since the start -> its latest index: a refusal naming a model unloaded since is
        # counted under that name up there, as one-process mode counts it (its label exists already)
        self._named: dict[str, int] = {}
        self.set_models(list(enumerate(config.models)))
        self._identities = {name: i + 1 for i, name in enumerate(config.tokens)}
        self.listeners: list[TcpListener | UdpListener] = []
        self.admission: Admission | None = None
        self._reported: list[dict[str, int]] = []  # per UDP listener: the numbers last sent up
        self.done: asyncio.Future[float] = self._loop.create_future()  # result: the CLOSE's flush timeout
        # The header of the frame being finished with the scheduling process's outcome (it published that one;
        # a refusal the delivery lets happen meanwhile, e.g. of a header waiting behind the frame, goes up).
        self.delivering: FrameHeader | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if not self.done.done():
            self.done.set_result(0.0)  # the parent is gone: close everything now

    # -- up ---------------------------------------------------------------------------

    def send(self, record: bytes) -> None:
        if not self._out:
            self._loop.call_soon(self._flush)
        self._out.append(record)

    def _flush(self) -> None:
        out, self._out = self._out, []
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(b"".join(out))  # one system call for the loop iteration's records
            if self._frames_up and self.admission is not None:
                # Frames up: their replies follow within a batch's time. (Not for other records: the ALIVE
                # every sweep, or a connection's comings and goings, would keep an idle worker polling.)
                self.admission.busy_poll.poke()
        self._frames_up = False

    def submit(self, frame: Frame) -> None:
        """``Admission``'s submit: the frame goes up as a descriptor; it stays here until its REPLY."""
        conn = frame.stream[0]  # type: ignore[index]
        number = self._announced.get(conn)
        if number is None:
            number = self._open(conn, frame.producer)
        frames = self._frames
        fid = next(self._fids) & _U32  # the records' fid is u32: it wraps (every 17 hours at 70,000 frames/s)
        while not fid or fid in frames:  # (0 is never a fid; one still in flight is skipped)
            fid = next(self._fids) & _U32
        frames[fid] = frame
        h, slot = frame.header, frame.slot
        assert slot is not None
        if not self._out:
            self._loop.call_soon(self._flush)
        self._frames_up = True
        self._out.append(channel.UP.pack(
            channel.FRAME, h.priority, int(h.flags), 0, self._indexes[h.model, h.dtype_code, h.shape], 0,
            number, fid, slot.offset, h.payload_len, h.stream_id, h.deadline_us, h.sequence, h.timestamp_ns,
            frame.received_ns, frame.complete_ns, frame.deadline_ns,
        ))  # fmt: skip

    def _open(self, conn: int, producer: Producer) -> int:
        """Announce ``conn`` (an OPEN record); returns its number on the channel."""
        return self._announce(conn, producer.identity, producer.max_priority, channel.OPEN)

    def _announce(self, conn: int, identity: str | None, max_priority: int, record: int) -> int:
        number = conn & _U32
        while number in self._numbers:
            number = (number + 1) & _U32
        self._announced[conn] = number
        self._numbers.add(number)
        origin = self._origins[conn]
        kind = channel.OPEN_UDP if origin.source == "udp" else channel.OPEN_TCP
        self.send(channel.opened(number, self._identities.get(identity or "", 0), max_priority, kind, origin.stream,
                                 record))  # fmt: skip
        return number

    def ask(self, conn: int, grant: Grant, answer: Callable[[Refused | None], None]) -> None:
        """Ask the scheduling process whether TCP connection ``conn`` of ``grant``'s named token may open (an ASK:
        it counts the token's connections everywhere); ``answer`` is called with None or the refusal when its
        ADMIT comes, unless the connection is gone by then."""
        number = self._announce(conn, grant.identity, grant.max_priority, channel.ASK)
        self._asking[number] = (conn, answer)

    def _admit(self, number: int, status: Status, message: str) -> None:
        if number in self._gone_asking:  # the connection is gone (its CLOSED went up): its number is free now
            self._gone_asking.discard(number)
            self._numbers.discard(number)
            return
        asked = self._asking.pop(number, None)
        if asked is None:
            return
        conn, answer = asked
        if status == Status.OK:
            answer(None)
            return
        del self._announced[conn]  # refused: never open up there, so no CLOSED for it
        self._numbers.discard(number)
        answer(Refused(status, message))

    def model_index(self, model: str) -> int:
        """``model``'s index (a REPLIED record's ``index``; ``NO_MODEL_INDEX`` for a name never served)."""
        return self._named.get(model, channel.NO_MODEL_INDEX)

    def set_models(self, table: Sequence[tuple[int, ModelSpec]]) -> None:
        """Admit these models from now on (a MODELS record; frames admitted before keep their indexes)."""
        self.specs.clear()
        self.specs.update((spec.name, spec) for _, spec in table)
        self._indexes.update((channel.model_key(spec), index) for index, spec in table)
        self._named.update((spec.name, index) for index, spec in table)

    def named(self, conn: int, origin: Origin) -> None:
        """Connection ``conn`` (TCP, or a UDP producer) publishes under ``origin`` (its OPEN, at its first frame,
        will say so)."""
        self._origins[conn] = origin

    def connection_closed(self, conn: int, outstanding: int) -> None:
        """``conn`` is gone, ``outstanding`` of its frames unanswered (0: none can be queued up there)."""
        self._origins.pop(conn, None)
        number = self._announced.pop(conn, None)
        if number is not None:
            if self._asking.pop(number, None) is not None:  # its ADMIT is on its way (up there CLOSED ends it)
                self._gone_asking.add(number)
            else:
                self._numbers.discard(number)
            self.send(channel.up(channel.CLOSED, number, value=outstanding))

    def report(self, udp_listeners: Sequence[UdpListener]) -> None:
        """STATS records for the UDP listeners' numbers that changed since the last report."""
        if not self._reported:
            self._reported = [{} for _ in udp_listeners]
        for position, (listener, last) in enumerate(zip(udp_listeners, self._reported, strict=True)):
            stats = listener.stats()
            for index, name in enumerate(STAT_NAMES):
                value = int(stats.get(name, 0))
                if last.get(name) != value:
                    last[name] = value
                    self.send(channel.up(channel.STATS, position, index, value=value))

    # -- down -------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        # Whole records are decoded from immutable bytes: a result row is a view of them until written.
        if self._missing:
            self._parts.append(data)
            self._missing -= len(data)
            if self._missing > 0:
                return
            data, self._parts, self._missing = b"".join(self._parts), [], 0
        buf = self._rest + data if self._rest else data
        pos, end = 0, len(buf)
        frames = self._frames
        while True:
            n = channel.record_length(buf, pos)
            if n is None or pos + n > end:
                break
            kind = buf[pos]
            if kind == channel.REPLIES:
                self._finish_batch(*channel.decode_ok(buf, pos))
            elif kind == channel.REPLY:
                fid, outcome = channel.decode_reply(buf, pos)
                frame = frames.pop(fid, None)
                if frame is not None:
                    self._deliver(frame, outcome)
            elif kind == channel.RELEASE:
                for fid in channel.released(buf, pos):
                    frame = frames.get(fid)
                    if frame is not None:
                        frame.release_slot()
            elif kind == channel.MODELS:
                generation, table = channel.models_of(buf, pos)
                self.set_models(table)
                self.send(channel.up(channel.MODELS_TAKEN, value=generation))
            elif kind == channel.ADMIT:
                self._admit(*channel.admitted(buf, pos))
            elif kind == channel.STOP:
                self._stop()
            elif kind == channel.CLOSE and not self.done.done():
                self.done.set_result(channel.DOWN.unpack_from(buf, pos)[4] / 1000)
            pos += n
        if n is not None:  # a record whose length is known, whole at a later read
            self._parts, self._missing, self._rest = [buf[pos:]], pos + n - end, b""
        else:
            self._rest = buf[pos:]

    def _finish_batch(self, fids: list[int], rows: np.ndarray, timings: np.ndarray) -> None:
        """A batch's OK results (a REPLIES record): its frames here finished at once (each front end's
        ``BatchSink`` encodes their replies together). These outcomes were published up there already."""
        frames = [self._frames.pop(fid, None) for fid in fids]
        batched = [i for i, frame in enumerate(frames) if frame is not None and frame.batch_sink is not None]
        if len(batched) < len(frames):  # UDP frames (one by one), or frames gone meanwhile (dropped at a close)
            listed = timings.tolist()
            for i, frame in enumerate(frames):
                if frame is not None and frame.batch_sink is None:
                    self._deliver(frame, Outcome(Status.OK, result=rows[i], timings=Timings(*listed[i])))
            frames, rows, timings = [frames[i] for i in batched], rows[batched], timings[batched]
        if frames:
            finish_ok(cast(list[Frame], frames), rows, None, timings)

    def _deliver(self, frame: Frame, outcome: Outcome) -> None:
        """Finish ``frame`` with the scheduling process's ``outcome`` (published there already)."""
        self.delivering = frame.header
        try:
            frame.finish(outcome)
        finally:
            self.delivering = None

    def _stop(self) -> None:
        if self.admission is not None:
            self.admission.accepting = False
        for listener in self.listeners:
            listener.stop_accepting()  # frames partly received are answered SHUTTING_DOWN here
        self.send(channel.up(channel.STOPPED))

    def drop_frames(self) -> None:
        """Closing: frames the parent will not answer any more hold no memory."""
        for frame in self._frames.values():
            frame.release_slot()
        self._frames.clear()


class _ForwardingHub(ResultHub):
    """The worker's result hub: nobody watches here, so the outcomes the worker gives frames itself
    (refusals, INCOMPLETE, ...) go up as ANSWERED records, to be published where the subscribers and
    the results sink are. Those of frames the scheduler answered were published there already."""

    def __init__(self, chan: _Channel) -> None:
        super().__init__()
        self._chan = chan

    @property
    def watching(self) -> bool:
        # Nobody subscribes here: a front end finishing a batch's frames at once (``TcpConnection.finished_ok``)
        # publishes nothing, as those outcomes were published up there already
        return False

    def publish(
        self, header: FrameHeader, outcome: Outcome, origin: Origin = UNNAMED, encoded: Encoded | None = None
    ) -> None:
        # (``encoded`` stays here: the scheduling process publishes the outcome, and encodes for its watchers)
        if header is not self._chan.delivering:
            self._chan.send(channel.answered(header, outcome, origin.source, origin.stream))


class _WorkerAdmission(Admission):
    """The worker's admission rules; the replies it gives itself are also counted by the scheduling
    process (its ``/metrics``), one REPLIED record each."""

    channel: _Channel | None = None

    def replied(self, model: str, status: int) -> None:
        super().replied(model, status)
        if self.channel is not None:
            self.channel.send(channel.replied(self.channel.model_index(model), status))


class _WorkerTcpListener(TcpListener):
    """The TCP front end on the connections the parent hands over, telling the channel when one is gone
    and how many it holds (CONNECTIONS records: the parent hands each new one to the emptiest worker)."""

    def __init__(self, spec: ListenerSpec, admission: Admission, chan: _Channel, index: int, generation: int) -> None:
        super().__init__(spec, admission, handed_over=True)
        self._chan = chan
        # Its connections are named "tcp:wW/N", "tcp:wW.G/N" in the G-th replacement of worker W: connection ids
        # are per process, and a name is one connection's for the server's life (the results sink's lines)
        self._name = f"tcp:w{index}" + (f".{generation}" if generation else "")
        self._taken = 0  # connections handed over and taken up (served, refused, found closed or lost)
        self._adopting: set[asyncio.Task[None]] = set()

    def take_handed(self, handoff: socket.socket) -> None:
        """The handoff socket is readable: adopt every connection waiting in it."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                message, fds, _, _ = socket.recv_fds(handoff, 1, 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                message, fds = b"", []
            if not message:  # the parent closed its end (it is going): nothing more comes
                loop.remove_reader(handoff.fileno())
                return
            if not fds:  # out of descriptors: the kernel dropped (closed) this one; the next may fit
                log.warning("a connection handed over was lost: no descriptor left to receive it")
                self._taken += 1
                self._report()
                continue
            task = loop.create_task(self._adopt(socket.socket(fileno=fds[0])))
            self._adopting.add(task)
            task.add_done_callback(self._adopting.discard)

    async def _adopt(self, sock: socket.socket) -> None:
        try:
            await self.adopt(sock)
        finally:
            self._taken += 1
            self._report()

    def _report(self) -> None:
        self._chan.send(channel.up(channel.CONNECTIONS, self._taken & 0xFFFFFFFF, value=len(self._connections)))

    def origin(self, conn_id: int) -> Origin:
        return Origin("tcp", f"{self._name}/{conn_id}")

    def connection_opened(self, conn: TcpConnection) -> bool:
        self._chan.named(conn.id, conn.origin)
        return super().connection_opened(conn)

    def admission_pending(self, conn: TcpConnection, grant: Grant, answer: Callable[[Refused | None], None]) -> bool:
        # A named token's max_connections counts its connections on every worker, its HTTP requests and
        # WebSockets: the scheduling process holds that count, so it is asked
        if grant.identity is None or not self.admission.config.tokens[grant.identity].max_connections:
            return False
        self._chan.ask(conn.id, grant, answer)
        return True

    def connection_closing(self, conn: TcpConnection) -> None:
        # Up there its frames still queued are abandoned now (CLOSED), not once it is gone
        self._chan.connection_closed(conn.id, conn.frames_outstanding)

    def connection_closed(self, conn: TcpConnection) -> None:
        super().connection_closed(conn)
        self._chan.connection_closed(conn.id, conn.frames_outstanding)  # (nothing, when it was closing)
        self._report()


class _WorkerUdpListener(UdpListener):
    """The UDP front end on this worker's socket of the address, telling the channel of its producers."""

    def __init__(self, spec: ListenerSpec, admission: Admission, sock: socket.socket, chan: _Channel) -> None:
        super().__init__(spec, admission, sock)
        self._chan = chan

    def producer_added(self, peer_id: int, origin: Origin) -> None:
        self._chan.named(peer_id, origin)

    def producer_gone(self, peer_id: int) -> None:
        self._chan.connection_closed(peer_id, 1)  # (a UDP producer does not count its frames: some may be queued)


async def serve(chan_sock: socket.socket, init: WorkerInit) -> None:
    """Serve until the parent says CLOSE (or goes away)."""
    loop = asyncio.get_running_loop()
    config = init.config
    segment = HostSegment.attach(init.segment_fd, init.segment_bytes)
    os.close(init.segment_fd)  # the segment keeps its own descriptor
    handoff = socket.socket(fileno=init.handoff_fd)
    handoff.setblocking(False)
    chan_sock.setblocking(False)
    _, chan = await loop.create_unix_connection(lambda: _Channel(config), sock=chan_sock)
    pool = SlotPool(segment.buffer, init.start, init.end, defer=loop.call_soon)
    chan.set_models(init.models)
    admission = _WorkerAdmission(config, pool, chan.specs, chan.submit)
    admission.channel = chan
    admission.stream_results = _ForwardingHub(chan)
    admission.connection_cap = init.connection_cap
    tcp = next(spec for spec in config.listeners if spec.kind == "tcp")
    udp_specs = [spec for spec in config.listeners if spec.kind == "udp"]
    udp = [_WorkerUdpListener(spec, admission, socket.socket(fileno=fd), chan)
           for spec, fd in zip(udp_specs, init.udp_fds, strict=True)]  # fmt: skip
    tcp_listener = _WorkerTcpListener(tcp, admission, chan, init.index, init.generation)
    listeners: list[TcpListener | UdpListener] = [tcp_listener, *udp]
    chan.listeners, chan.admission = listeners, admission
    for listener in listeners:
        await listener.start()
    loop.add_reader(handoff.fileno(), tcp_listener.take_handed, handoff)
    chan.send(channel.up(channel.READY))

    sweeper: list[asyncio.TimerHandle] = []

    def sweep() -> None:
        now = time.monotonic()
        for listener in listeners:
            try:
                listener.sweep(now)
            except Exception:  # one listener's bug must not end every time limit, nor the ALIVE records
                log.exception("sweeping %s listener failed", listener.kind)
        if udp:
            chan.report(udp)
        chan.send(channel.up(channel.ALIVE, value=pool.used_bytes))
        sweeper[:] = [loop.call_later(config.sweep_period_s, sweep)]

    sweep()
    try:
        timeout = await chan.done
        admission.accepting = False
        for listener in listeners:
            listener.stop_accepting()
        for listener in listeners:
            await listener.close(timeout)
        if udp:
            chan.report(udp)  # the last counts, sent before the channel closes
            await asyncio.sleep(0)  # (the channel writes a loop iteration's records at its end)
    finally:
        sweeper[0].cancel()
        loop.remove_reader(handoff.fileno())
        handoff.close()
        chan.drop_frames()
        segment.close()
        admission.busy_poll.close()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    # Ctrl-C reaches the whole group, and so does a SIGTERM to it (systemd's stop): the parent drives shutdown,
    # answering the frames in flight through this worker first (a parent gone closes the channel: it ends then)
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # (blocked from its spawn until now: _Worker._spawn)
    chan_sock = socket.socket(fileno=int(args[0]))
    init = _read_init(chan_sock)
    logging.basicConfig(level=init.config.log_level, format=f"%(asctime)s worker {init.index}: %(message)s")
    loop = new_event_loop(init.config.loop)
    freeze_heap()  # its frames die young too (no thaw: the process ends with the server)
    tune_malloc()  # a batch's replies come in a megabyte at a time
    try:
        loop.run_until_complete(serve(chan_sock, init))
    finally:
        loop.close()
    return 0


if __name__ == "__main__":
    from streamgpu.ingest import worker  # the pickled WorkerInit names the package module, not __main__

    sys.exit(worker.main())
