"""Ingest worker processes (``ingest_workers = N``): N processes read and answer, one loop accepts and schedules.

``WorkerListener`` is the scheduling process's side: it binds the listening
socket, accepts and hands each connection to the live worker holding the
fewest (a descriptor sent over a ``SOCK_SEQPACKET`` pair per worker; the
counts come up as CONNECTIONS records), lends each worker one range of the
shared host segment (a slot of
``Admission.pool`` of ``Config.worker_ring_bytes``), spawns the workers
(``python -m streamgpu.ingest.worker``: a fresh interpreter, no torch), and
speaks the descriptor channel (``streamgpu.ingest.channel``) with each.

Who decides what (one owner per fact):

* A worker runs the TCP front end (``ingest.tcp``) and each UDP listener's
  front end (``ingest.udp``, on the worker's own ``SO_REUSEPORT`` socket of
  the address, which this process binds and keeps) with its own
  ``Admission`` over its range: framing, handshake and tokens, every check of
  ``Admission.admit`` (size, tensor, model, shape, priority ceiling), ring
  space per producer within its range (``Producer.reserve``: a producer's
  share is scaled to the range), time limits, reply order and encoding, and
  its share of the ``max_connections`` cap (1/N); for UDP, reassembly and every
  listener count (reported up in STATS records, summed here by
  ``WorkerUdpListener``, the stand-in of a UDP listener in this process's
  list of listeners). The kernel writes payloads
  straight into the segment, which the backend registered (pinned) once for
  the whole segment, so worker-received bytes need no copy here.
* This process owns the scheduling: a FRAME descriptor becomes a ``Frame``
  (its slot a view of the worker's range) that enters ``Admission.submit``
  like any other: queues, batching, priorities, deadlines, per-producer
  fairness (a named token's connections on every worker are one
  ``Producer``, via ``Admission.producer_for``), frames in flight, and a
  named token's ``max_connections`` (a worker ASKs before it answers such a
  token's HELLO: this process counts its connections on every worker, its
  HTTP requests and WebSockets).
* A frame's slot is released by a RELEASE record once the device copied it
  (or by the REPLY itself); the worker's pool frees it. Results go back
  inline in the REPLY record, and the worker that owns the connection writes
  the reply.

A worker that dies (killed, crashed): the kernel closes its connections;
here its connections are closed (their queued frames are dropped as
abandoned, running ones finish and their replies are discarded). Once no
frame here still reads its range, the range is reclaimed and a new worker is
started on it, on the same UDP sockets (restart, not N-1: new connections go
to the other workers meanwhile, and wait in the backlog while none is live;
datagrams for its UDP sockets wait in them, as far as their buffers go). Shutdown: STOP (workers take no new
frames, answer partial ones SHUTTING_DOWN, and confirm), the frames they sent
are answered, then CLOSE (workers flush replies and exit).
"""

from __future__ import annotations

import asyncio
import collections
import copy
import dataclasses
import errno
import functools
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from streamgpu.children import child_environment, exit_status, module_command
from streamgpu.cmdline import STOP_SIGNALS
from streamgpu.config import ListenerSpec
from streamgpu.errors import WorkerStartError
from streamgpu.frame import Frame, Outcome, unsendable
from streamgpu.ingest import channel
from streamgpu.ingest.admission import Admission, Grant, Producer, Refused
from streamgpu.ingest.base import Listener
from streamgpu.ingest.hub import Origin
from streamgpu.ingest.udp import COUNTERS, STAT_NAMES, UdpListener, listener_options
from streamgpu.ingest.worker import WorkerInit, send_init
from streamgpu.loops import spare_cpus
from streamgpu.memory import HostSegment, Slot
from streamgpu.metrics import NO_MODEL
from streamgpu.models.spec import ModelSpec
from streamgpu.protocol.wire import FRAME_VERSION, FrameFlags, FrameHeader, Status, Timings

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 60.0
RESTART_DELAY_S = 0.2  # between a worker's death (once its range is free) and its replacement
# Connections accepted per readiness of the listening socket before the loop moves on. Bounds what a connect
# flood adds to one loop iteration: under ~6,000 connect-and-resets/s (dev VM) the loop's lag p99 was
# 14-15 ms at 64, 8.6-8.9 ms at 16 and at 4, for the same connections served (1.9 ms without the flood).
ACCEPTS_PER_WAKEUP = 16
ACCEPT_RETRY_S = 1.0  # after accept() failed (out of descriptors): when to try again
HANDOFF_RETRY_S = 0.01  # a connection no worker had room for (every handoff queue full) is offered again after this
# A load or unload waits this long at most for every worker to admit by the new list of models
MODELS_TIMEOUT_S = 2.0
# A worker sends ALIVE at least once a second (each of its sweeps); one silent this long while this process's
# loop ran is hung (stopped, deadlocked, spinning): it is killed, and restarted as a dead one is
WORKER_HANG_S = 10.0
HANDOFF_STALL_S = 0.5  # a worker that has left a handed connection untaken this long gets new ones only if no other can
RESTART_MAX_DELAY_S = 10.0  # a replacement that fails to start is tried again, doubling the delay up to this
# A worker that dies sooner than this after it started, twice or more in a row (a crash loop: a bug a frame or the
# environment sets off), is replaced after a delay doubling each time up to RESTART_MAX_DELAY_S, not every 0.2 s
CRASH_LOOP_S = 10.0
# A worker whose channel closed is exiting (the kernel closes its descriptors first, then it can be reaped): one
# still running this long after is killed (a worker without its channel serves nobody)
REAP_GRACE_S = 1.0
# Flags byte -> FrameFlags: LIVE is the one flag that means something here (SUBSCRIBERS, UDP's, the worker acts on)
_FLAGS = [FrameFlags.LIVE if f & FrameFlags.LIVE else FrameFlags.NONE for f in range(256)]
_WORKER_HINT = (  # what to check when a worker cannot start
    f"Check that '{sys.executable} -m streamgpu.ingest.worker' can import streamgpu in this environment (the "
    "interpreter, PYTHONPATH, the virtual environment) and that memory is not short, or serve without worker "
    "processes (ingest_workers = 0, --ingest-workers 0)"
)


@dataclass(eq=False, slots=True)
class WorkerFrame(Frame):
    """A frame received by a worker: its slot lives in the worker's range, released by a record."""

    worker: _Worker | None = None
    fid: int = 0

    def release_slot(self) -> None:
        if self.slot is not None:
            self.slot = None
            assert self.worker is not None
            self.worker.slot_released(self.fid, self.finished)


class _RemoteConn:
    """A worker's connection, as the scheduler sees it: its producer, whether it is gone, how its
    frames' outcomes are published (``origin``)."""

    __slots__ = ("abandoned", "closed", "origin", "producer")

    def __init__(self, producer: Producer, origin: Origin) -> None:
        self.producer = producer
        self.origin = origin
        self.closed = False
        self.abandoned = self.is_closed  # bound once: each of its frames holds it (``Frame.is_abandoned``)

    def is_closed(self) -> bool:
        return self.closed


class _Worker(asyncio.Protocol):
    """One worker process and its channel (the parent side)."""

    def __init__(self, listener: WorkerListener, index: int, lent: Slot) -> None:
        self._listener = listener
        self._admission = listener.admission
        self._loop = asyncio.get_running_loop()
        self.index = index
        self.generation = 0  # the processes started at this index before it
        self.lent = lent  # the range of the segment this worker receives into
        self.proc: subprocess.Popen[bytes] | None = None
        self._transport: asyncio.Transport | None = None
        self._out: list[bytes | memoryview] = []
        self._replies_down = False  # the records to flush hold replies (the next frames follow: busy_poll_us)
        self._releases: list[int] = []  # frames whose slots were copied, for this loop iteration's RELEASE
        self._rest = b""
        self.conns: dict[int, _RemoteConn] = {}
        self.held = 0  # frames here whose payload (in this worker's range) may still be read
        self.in_server = 0  # frames here not finished yet
        self.frames = 0
        self.alive = True
        self.ready: asyncio.Future[None] = self._loop.create_future()
        self.stopped: asyncio.Future[None] = self._loop.create_future()
        self.gone: asyncio.Future[None] = self._loop.create_future()
        self.replaced = False
        self.started = False  # said READY
        self.udp: list[dict[str, int]] = [{} for _ in listener.udp]  # each UDP listener's numbers (STATS records)
        self._answer: channel.Answer | None = None  # an ANSWERED record whose TEXT records are still coming
        # An OPEN or ASK record's (conn, index, priority, flags, whether it asks), until its TEXT
        self._opening: tuple[int, int, int, int, bool] | None = None
        self.handoff: socket.socket | None = None  # our end of the pair TCP connections are handed over on
        self._handed = 0  # connections handed over (modulo 2**32, as the worker counts those it took up)
        self._taken = 0  # ... of which it took up, as last reported (CONNECTIONS)
        self._open = 0  # its open connections, as last reported
        self._behind_since: float | None = None  # since when a connection handed over waits untaken (loop time)
        self._models_sent: dict[int, asyncio.Future[None]] = {}  # MODELS records not confirmed yet, by generation
        self.heard = time.monotonic()  # when its last records were read
        self.ready_at = 0.0  # loop time of its READY
        self.ring_used = 0  # bytes of its range that frames hold, as last reported (ALIVE)
        self._reaped: asyncio.Future[int] | None = None  # its process's exit status (reap)

    @property
    def load(self) -> int:
        """Its open TCP connections, counting those handed over and not taken up yet."""
        return self._open + ((self._handed - self._taken) & 0xFFFFFFFF)

    def stalled(self, now: float) -> bool:
        """It has left a connection handed over untaken for HANDOFF_STALL_S (hung, or stopped reading)."""
        return self._behind_since is not None and now - self._behind_since > HANDOFF_STALL_S

    def hand_over(self, conn: socket.socket) -> bool:
        """Send the accepted ``conn`` to the worker (our copy is the caller's to close); False when it is gone.
        BlockingIOError: no room now (its handoff queue is full: a worker busy a moment, or one that stopped
        reading; or too many descriptors in flight)."""
        if self.handoff is None:
            return False
        try:
            socket.send_fds(self.handoff, [b"c"], [conn.fileno()])
        except BlockingIOError:
            raise
        except OSError as exc:
            if exc.errno == errno.ETOOMANYREFS:
                raise BlockingIOError(exc.errno, exc.strerror) from exc
            return False
        if self._handed == self._taken:
            self._behind_since = self._loop.time()
        self._handed = (self._handed + 1) & 0xFFFFFFFF
        return True

    # -- process ----------------------------------------------------------------------

    async def spawn(self, init: WorkerInit, segment_fd: int) -> None:
        """Start its process and connect its channel. WorkerStartError: no process could be started, or it
        exited before it took its init (a bad environment, killed)."""
        try:
            await self._spawn(init, segment_fd)
        except BaseException as exc:  # no process or no channel: never alive (nothing waits for its STOPPED)
            self.kill()
            self.alive = False
            self._out = []
            self._settle()
            if not isinstance(exc, OSError):
                if self.proc is not None:
                    self.reap()
                raise
            if self.proc is None:  # Popen failed: no executable, out of descriptors or memory
                raise WorkerStartError(
                    f"ingest worker {self.index} could not be started ({sys.executable} -m streamgpu.ingest.worker): "
                    f"{exc}. {_WORKER_HINT}"
                ) from exc
            # (sending it its init failed, Broken pipe: it was gone already)
            raise self.start_failed("exited while starting", await self.reap()) from exc

    def start_failed(self, what: str, status: int) -> WorkerStartError:
        """The error of a worker that did ``what`` (exited, did not start in time) while starting."""
        pid = self.proc.pid if self.proc is not None else -1
        return WorkerStartError(
            f"ingest worker {self.index} (pid {pid}) {what} ({exit_status(status)}); its own error, if it printed "
            f"one, is above on this process's stderr. {_WORKER_HINT}"
        )

    def reap(self) -> asyncio.Future[int]:
        """Its process's exit status, once reaped off the loop (one still running REAP_GRACE_S after the first
        call is killed). Needs its process."""
        if self._reaped is None:
            self._reaped = self._loop.create_task(self._reap())
        return self._reaped

    async def _reap(self) -> int:
        proc = self.proc
        assert proc is not None
        try:
            return await self._loop.run_in_executor(None, proc.wait, REAP_GRACE_S)
        except subprocess.TimeoutExpired:  # (said, or its "killed by SIGKILL" would read as another's doing)
            log.warning("ingest worker %d (pid %d) still ran %g s after its channel closed: killing it", self.index,
                        proc.pid, REAP_GRACE_S)  # fmt: skip
            proc.kill()
            return await self._loop.run_in_executor(None, proc.wait)

    async def _spawn(self, init: WorkerInit, segment_fd: int) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        handoff, their_handoff = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            try:
                for s in (ours, theirs):  # room for many records per write
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
                init = dataclasses.replace(init, handoff_fd=their_handoff.fileno())
                # Born with the signals it ignores blocked (the mask survives fork and exec; it unblocks them once
                # ignored): one reaching the process group while its interpreter started (Ctrl-C or systemd's
                # stop as the server starts or replaces a worker) killed it, and the server's start failed
                blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
                try:
                    self.proc = subprocess.Popen(
                        module_command("streamgpu.ingest.worker", str(theirs.fileno())),
                        pass_fds=(theirs.fileno(), their_handoff.fileno(), segment_fd, *init.udp_fds),
                        env=child_environment(),
                    )
                finally:
                    signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
                # Beside a pinned loop from the start: it inherited the loop's CPU, and its start (an interpreter,
                # imports: a third of a second of CPU) would stall a serving loop when it replaces a worker.
                if (cpus := spare_cpus()) is not None:
                    os.sched_setaffinity(self.proc.pid, cpus)
            finally:
                theirs.close()
                their_handoff.close()
            send_init(ours, init)
            ours.setblocking(False)
            handoff.setblocking(False)
            await self._loop.create_unix_connection(lambda: self, sock=ours)  # its transport owns ours now
            self.handoff = handoff
        except BaseException:
            ours.close()
            handoff.close()
            raise

    def _settle(self) -> None:
        """It is gone (or never came): nothing waits for its READY, STOPPED, end or MODELS_TAKEN any more."""
        for future in (self.ready, self.stopped, self.gone, *self._models_sent.values()):
            if not future.done():
                future.set_result(None)
        self._models_sent.clear()

    def send_models(self, record: bytes, generation: int) -> asyncio.Future[None]:
        """Send a MODELS record; the future is done once the worker admits by it (or is gone)."""
        taken = self._models_sent[generation] = self._loop.create_future()
        self.send(record)
        return taken

    def _models_taken(self, generation: int) -> None:
        for sent in [g for g in self._models_sent if g <= generation]:
            future = self._models_sent.pop(sent)
            if not future.done():
                future.set_result(None)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()

    # -- channel ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        if self._out:  # sent while the worker was starting (a STOP during a restart): they go now
            self._loop.call_soon(self._flush)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self.alive = False
        if self.handoff is not None:  # (connections handed over and not taken up close with it)
            self.handoff.close()
            self.handoff = None
        for conn in self.conns.values():  # the kernel closed them with the process
            conn.closed = True
            self._admission.leave(conn.producer)
        self.conns.clear()
        self._settle()
        self._listener.worker_gone(self)

    def send(self, *records: bytes | memoryview) -> None:
        """Queue records (or the parts of one) for this loop iteration's write."""
        if not self._out and not self._releases:
            self._loop.call_soon(self._flush)
        self._out.extend(records)

    def _flush(self) -> None:
        if self._transport is None and self.alive:  # not connected yet: connection_made flushes them
            return
        out, self._out = self._out, []
        if self._releases:  # first: a slot copied before its reply is free before the reply is written
            out.insert(0, channel.release(self._releases))
            self._releases = []
        if self._transport is not None and not self._transport.is_closing():
            # One system call for the loop iteration's records, and no copy of them into one buffer first (a
            # batch's replies can be a megabyte)
            self._transport.writelines(out)
            if self._replies_down:
                self._admission.busy_poll.poke()  # replies down: the producers' next frames follow
        self._replies_down = False

    def data_received(self, data: bytes) -> None:
        self.heard = time.monotonic()
        buf = self._rest + data if self._rest else data
        whole = len(buf) - len(buf) % channel.UP.size
        self._rest = buf[whole:]
        models, conns = self._listener.models, self.conns
        pool, sink = self._admission.pool, self._sink
        frames: list[Frame] = []
        new_header = tuple.__new__
        for (kind, priority, flags, _p, index, _q, conn, fid, offset, payload_len, stream_id, deadline_us,
             sequence, timestamp_ns, received_ns, complete_ns, deadline_ns) in channel.UP.iter_unpack(
                memoryview(buf)[:whole]):  # fmt: skip
            if kind == channel.FRAME:
                remote = conns[conn]
                name, dtype, shape = models[index]
                # tuple.__new__: the NamedTuple's own __new__ is a Python call, per frame
                header = new_header(FrameHeader, (stream_id, sequence, name, dtype, shape, payload_len, timestamp_ns,
                                                  deadline_us, priority, _FLAGS[flags], FRAME_VERSION))  # fmt: skip
                # The slot is a description of where the payload lies; this process never frees it.
                slot = Slot(pool, offset, payload_len, 0)
                frame = WorkerFrame(header, slot, remote.producer, (remote, stream_id), received_ns, complete_ns,
                                    deadline_ns, sink, remote.abandoned, False, self, self, fid)  # fmt: skip
                frames.append(frame)
            elif kind == channel.OPEN or kind == channel.ASK:  # made at the TEXT record of its name, which follows
                self._opening = (conn, index, priority, flags, kind == channel.ASK)
            elif kind == channel.TEXT and self._opening is not None:
                label = channel.text_of((kind, priority, flags, _p, index, _q, conn, fid, offset, payload_len,
                                         stream_id, deadline_us, sequence, timestamp_ns, received_ns, complete_ns,
                                         deadline_ns)).rstrip(b"\0").decode(errors="replace")  # fmt: skip
                self._connection_made(label, *self._opening)
                self._opening = None
            elif kind == channel.CLOSED:
                self._submit(frames)  # its frames before it: queued while it was open, then dropped as abandoned
                gone = conns.pop(conn, None)
                if gone is not None:
                    gone.closed = True
                    self._admission.leave(gone.producer, queued=offset != 0)  # (its unanswered frames)
            elif kind == channel.REPLIED:  # the worker answered a frame or handshake itself: count it here too
                self._admission.replied(models[index][0] if index < len(models) else NO_MODEL, priority)
            elif kind == channel.CONNECTIONS:
                if conn != self._taken:  # it takes them: those left are newer
                    self._behind_since = None if conn == self._handed else self._loop.time()
                self._taken, self._open = conn, offset
            elif kind == channel.READY:
                self.started = True
                self.ready_at = self._loop.time()
                if not self.ready.done():
                    self.ready.set_result(None)
                self._listener.worker_ready()
            elif kind == channel.ANSWERED or (kind == channel.TEXT and self._answer is not None):
                # (rare: refusals and the like; the TEXT of an ANSWERED record nobody watches is skipped)
                self._answered((kind, priority, flags, _p, index, _q, conn, fid, offset, payload_len,
                                stream_id, deadline_us, sequence, timestamp_ns, received_ns, complete_ns,
                                deadline_ns))  # fmt: skip
            elif kind == channel.STATS:
                if conn < len(self.udp) and index < len(STAT_NAMES):
                    self.udp[conn][STAT_NAMES[index]] = offset
            elif kind == channel.STOPPED and not self.stopped.done():
                self.stopped.set_result(None)
            elif kind == channel.MODELS_TAKEN:
                self._models_taken(offset)
            elif kind == channel.ALIVE:
                self.ring_used = offset
        self._submit(frames)

    def _connection_made(self, label: str, number: int, identity: int, ceiling: int, source: int, asked: bool) -> None:
        """An OPEN: the connection is made. An ASK: the same, if its named token has room under its
        max_connections (counted here over every worker, HTTP requests and WebSockets), then the answer. (A
        token with a cap always asks: an OPEN's producer is never refused.)"""
        grant = Grant(self._listener.identities[identity], ceiling)
        try:
            producer = self._admission.producer_for(grant, label)
        except Refused as refused:
            self.send(channel.admit(number, refused.status, refused.message))
            return
        self.conns[number] = _RemoteConn(producer, Origin("udp" if source == channel.OPEN_UDP else "tcp", label))
        if asked:
            self.send(channel.admit(number, Status.OK))

    def _answered(self, fields: tuple[int, ...]) -> None:
        """An ANSWERED record or one of its TEXT records: once its text is whole, its outcome is published
        here (subscribers, results sink), as the worker's own reply went to the producer."""
        if fields[0] == channel.ANSWERED:
            # Decoded only while someone watches its stream id, as a batch's outcomes are (finished_ok)
            self._answer = channel.Answer(fields) if self._admission.stream_results.watched(fields[10]) else None
        elif self._answer is not None:
            self._answer.add(fields)
        answer = self._answer
        if answer is not None and answer.complete:
            self._answer = None
            header, outcome, source, stream = answer.outcome()
            self._admission.stream_results.publish(header, outcome, Origin(source, stream))

    def _submit(self, frames: list[Frame]) -> None:
        """The frames of one read, to the scheduler at once (one scheduling pass for the lot)."""
        if frames:
            n = len(frames)
            self.held += n
            self.in_server += n
            self.frames += n
            self._admission.submit_many(frames)
            frames.clear()

    # -- frames -----------------------------------------------------------------------

    def _sink(self, frame: Frame, outcome: Outcome) -> None:
        self.in_server -= 1
        self._admission.stream_results.publish(frame.header, outcome, _remote(frame).origin)  # subscribers, results
        if self.alive:
            self._replies_down = True
            self.send(channel.encode_reply(cast(WorkerFrame, frame).fid, outcome))

    def finished_ok(self, frames: list[Frame], rows: np.ndarray, timings: np.ndarray) -> None:
        """A batch's OK frames of this worker: one REPLIES record (it releases the slots too)."""
        self.in_server -= len(frames)
        fids = [frame.fid for frame in frames]  # type: ignore[attr-defined]  # this sink's frames are WorkerFrames
        failed: Outcome | None = None
        try:
            records = channel.encode_ok(fids, rows, timings)
        except Exception as exc:  # results the channel cannot carry (load refuses most): answered, not left hanging
            failed = unsendable(frames, rows, exc)
            records = [channel.encode_reply(fid, failed) for fid in fids]
        hub = self._admission.stream_results
        watching = hub.watching  # (nobody, mostly: then no look-up per frame)
        listed: list[list[int]] | None = None
        for i, frame in enumerate(frames):
            if frame.slot is not None:
                frame.slot = None
                self.held -= 1
            if watching and hub.watched(frame.header.stream_id):  # an Outcome only for frames someone watches
                outcome = failed
                if outcome is None:
                    listed = listed if listed is not None else timings.tolist()
                    outcome = Outcome(Status.OK, result=rows[i], timings=Timings(*listed[i]))
                hub.publish(frame.header, outcome, _remote(frame).origin)
        if not self.alive:
            if not self.held:
                self._listener.worker_gone(self)
            return
        self._replies_down = True
        self.send(*records)

    def slots_released(self, frames: list[Frame]) -> None:
        """The payloads of ``frames`` were copied: one RELEASE record (this loop iteration's) names them."""
        self.held -= len(frames)
        for frame in frames:
            frame.slot = None
        if not self.alive:
            if not self.held:
                self._listener.worker_gone(self)
            return
        if not self._out and not self._releases:
            self._loop.call_soon(self._flush)
        self._releases.extend([frame.fid for frame in frames if not frame.finished])  # type: ignore[attr-defined]

    def slot_released(self, fid: int, finishing: bool) -> None:
        self.held -= 1
        if not self.alive:
            if not self.held:
                self._listener.worker_gone(self)
        elif not finishing:  # the REPLY that follows a finish releases the slot too
            if not self._out and not self._releases:
                self._loop.call_soon(self._flush)
            self._releases.append(fid)


def _remote(frame: Frame) -> _RemoteConn:
    """The worker connection a frame came on (its ``stream`` is ``(connection, stream id)``)."""
    return cast(_RemoteConn, cast(tuple, frame.stream)[0])


class WorkerListener(Listener):
    """The TCP front end and the config's UDP listeners, served by ``ingest_workers`` worker processes (see
    the module docstring). ``udp`` holds the stand-ins of the UDP listeners."""

    kind = "tcp"

    def __init__(self, spec: ListenerSpec, admission: Admission, segment: HostSegment, workers: int) -> None:
        super().__init__(spec, admission)
        if segment.fd < 0:
            raise RuntimeError("ingest workers need a memfd host segment (os.memfd_create), which is missing here")
        cfg = admission.config
        self._segment = segment
        self._n = workers
        self._sock: socket.socket | None = None
        self._workers: list[_Worker] = []
        self._stopping = False
        self._started = False  # every first worker said READY: connections are accepted and handed over
        self._reading = False  # the listening socket is watched (off while no worker can take a connection)
        self._unhanded = 0  # connections accepted that no worker could take (closed)
        self._parked: socket.socket | None = None  # accepted while every worker's handoff queue was full
        self._retry: asyncio.TimerHandle | None = None  # when the parked connection is offered again
        self.restarts = 0
        self._quick_deaths: dict[int, int] = {}  # index -> its workers' deaths in a row within CRASH_LOOP_S of starting
        self._frames_before = 0  # FRAME descriptors of workers no longer in the list
        self.udp = [WorkerUdpListener(udp, admission, self, i)
                    for i, udp in enumerate(s for s in cfg.listeners if s.kind == "udp")]  # fmt: skip
        self._udp_socks: list[list[socket.socket]] = []  # per UDP listener, each worker's socket
        self._udp_before = [collections.Counter[str]() for _ in self.udp]  # counts of workers no longer in the list
        # A FRAME record's model index -> the model's (name, dtype code, shape). Never reused: a record sent
        # before a load or unload keeps its meaning. The config's models first, at their positions.
        self.models: list[tuple[str, int, tuple[int, ...]]] = []
        self._model_indexes: dict[tuple[str, int, tuple[int, ...]], int] = {}
        self._models_generation = 0  # MODELS records sent (each worker confirms the last it took)
        self._swept = time.monotonic()  # the last sweep (a loop that stood still hears no worker)
        self._served()
        self.identities: list[str | None] = [None, *cfg.tokens]
        share = cfg.worker_ring_bytes
        # The server's config with the worker's range for a ring: copied, not checked again as a server's of its
        # own (dataclasses.replace would), whose ring would be one range: a model whose batch fills the ranges of
        # several workers (as Config.model_problems allows) was refused there, at start
        self._worker_config = worker_config = copy.copy(cfg)
        worker_config.ring_bytes = share
        worker_config.max_producer_ring_bytes = min(cfg.max_producer_ring_bytes, share)  # 0 stays 0: a quarter
        worker_config.ingest_workers = 0
        worker_config.loop_cpu = -1  # a worker runs beside the loop's CPU: _Worker._spawn
        # Each new connection goes to the worker holding the fewest, so a 1/N share of max_connections on
        # each makes the cap hold for the server (up to N - 1 more, rounding up)
        self._connection_cap = -(-cfg.max_connections // workers)

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            self._stopping = True  # (no restarts) and nothing bound or started is left behind
            await self.close(0)
            raise

    async def _start(self) -> None:
        host, port = self.spec.host, self.spec.port
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        self._sock = socket.create_server((host, port), family=family, backlog=4096)
        self._sock.setblocking(False)
        self._udp_socks = [_reuseport_sockets(udp.spec, self._n) for udp in self.udp]
        self._workers = [None] * self._n  # type: ignore[list-item]
        spawned = []
        for i in range(self._n):  # all start at once; then each must say READY
            lent = self.admission.pool.reserve(self._worker_config.ring_bytes)
            if lent is None:
                raise RuntimeError("the host ring has no room for the ingest workers' ranges")
            spawned.append(await self._spawn(i, lent))
        for worker in spawned:
            await self._await_ready(worker)
        self._started = True
        self.worker_ready()

    async def _spawn(self, index: int, lent: Slot) -> _Worker:
        worker = _Worker(self, index, lent)
        previous = self._workers[index]  # (its replacement's connections must not take its connections' names)
        worker.generation = previous.generation + 1 if previous is not None else 0
        self._workers[index] = worker
        udp_fds = tuple(socks[index].fileno() for socks in self._udp_socks)
        init = WorkerInit(self._worker_config, index, -1, udp_fds, self._segment.fd,  # (handoff_fd: at spawn)
                          self._segment.nbytes, lent.offset, lent.offset + lent.nbytes,
                          self._connection_cap, tuple(self._served()), worker.generation)  # fmt: skip
        await worker.spawn(init, self._segment.fd)
        return worker

    def _served(self) -> list[tuple[int, ModelSpec]]:
        """The models served now (``admission.specs``), each with its index (given one if new)."""
        table = []
        for spec in self.admission.specs.values():
            key = channel.model_key(spec)
            index = self._model_indexes.get(key)
            if index is None:
                if len(self.models) >= channel.NO_MODEL_INDEX:
                    log.error("model %s is not taken by the ingest workers: %d kinds of frames were served "
                              "before (restart the server)", spec.name, len(self.models))  # fmt: skip
                    continue
                index = self._model_indexes[key] = len(self.models)
                self.models.append(key)
            table.append((index, spec))
        return table

    async def models_changed(self) -> None:
        """Every live worker admits the models served now once this returns (or after MODELS_TIMEOUT_S, for
        one that is hung: it is named in the log)."""
        self._models_generation += 1
        record = channel.models(self._served(), self._models_generation)
        live = [worker for worker in self._workers if worker is not None and worker.alive]
        sent = [worker.send_models(record, self._models_generation) for worker in live]
        await _wait(sent, MODELS_TIMEOUT_S)
        for worker, taken in zip(live, sent, strict=True):
            if not taken.done():
                log.warning("ingest worker %d (pid %s) did not take the new list of models within %.0f s: it "
                            "admits by the old one until it does", worker.index, worker.proc and worker.proc.pid,
                            MODELS_TIMEOUT_S)  # fmt: skip

    # -- connections ------------------------------------------------------------------
    # This process accepts and hands each connection to the live worker holding the fewest. Workers
    # accepting on one shared socket leave connections wherever one wakes first: it takes every pending
    # one (measured: 16 connections opened at once all went to one of 4 workers), as Node's cluster
    # module found too (its default is to accept in the primary and hand over, for that reason).
    # A worker's handoff queue holds a few hundred descriptors: when every live worker's is full (busy a
    # moment, or stopped reading), the connection in hand is parked here and the rest wait in the backlog.
    # One that left a connection untaken for HANDOFF_STALL_S (hung) is passed over while another can take it.

    def worker_ready(self) -> None:
        """A worker said READY: once started, (again) watch the listening socket."""
        if self._started and not self._stopping and not self._reading and self._sock is not None:
            asyncio.get_running_loop().add_reader(self._sock.fileno(), self._accept)
            self._reading = True

    def _stop_reading(self) -> None:
        if self._reading and self._sock is not None:
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
        self._reading = False

    def _accept(self) -> None:
        """Accept what is pending (a bounded number per wakeup; a parked connection first) and hand each
        connection over."""
        assert self._sock is not None
        for _ in range(ACCEPTS_PER_WAKEUP):
            takers = [w for w in self._workers if w is not None and w.alive and w.started and w.handoff is not None]
            if not takers:  # they wait in the backlog until a (restarted) worker says READY
                self._stop_reading()
                if self._parked is not None:
                    self._park(self._parked)
                return
            conn, self._parked = self._parked, None
            if conn is None:
                try:
                    conn, _ = self._sock.accept()
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as exc:  # out of descriptors and the like: try again later, as asyncio's servers do
                    log.error("accepting a connection failed: %s; trying again in %g s", exc, ACCEPT_RETRY_S)
                    self._stop_reading()
                    asyncio.get_running_loop().call_later(ACCEPT_RETRY_S, self.worker_ready)
                    return
            if not self._hand_over(conn, takers):
                return  # parked: the next ones wait in the backlog

    def _hand_over(self, conn: socket.socket, takers: list[_Worker]) -> bool:
        """Hand ``conn`` to the emptiest of ``takers`` that can take it and close our copy; False when every
        one's handoff queue is full (``conn`` is parked, to be offered again)."""
        now = asyncio.get_running_loop().time()
        takers.sort(key=lambda w: (w.stalled(now), w.load))  # a stalled one only when no other can take it
        full = False
        for worker in takers:
            try:
                if worker.hand_over(conn):
                    conn.close()  # our copy: the worker has its own
                    return True
            except BlockingIOError:
                full = True
        if full:  # every live worker is busy a moment
            self._park(conn)
            return False
        conn.close()
        self._unhanded += 1
        log.warning("no ingest worker could take a connection (%d so far); it is closed", self._unhanded)
        return True

    def _park(self, conn: socket.socket) -> None:
        self._parked = conn
        self._stop_reading()
        if self._retry is None:
            self._retry = asyncio.get_running_loop().call_later(HANDOFF_RETRY_S, self._retry_parked)

    def _retry_parked(self) -> None:
        """Offer the parked connection again; once it is handed over, watch the listening socket again."""
        self._retry = None
        if self._parked is not None and self._sock is not None and not self._stopping:
            self._accept()
            if self._parked is None:
                self.worker_ready()

    def _drop_parked(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._parked is not None:  # (refused, as those still in the backlog are)
            self._parked.close()
            self._parked = None

    async def _await_ready(self, worker: _Worker) -> None:
        """Until ``worker`` said READY. WorkerStartError: it exited first, or did not say it in time (killed)."""
        try:
            await asyncio.wait_for(asyncio.shield(worker.ready), READY_TIMEOUT_S)
        except TimeoutError:
            worker.kill()
            raise worker.start_failed(f"did not start within {READY_TIMEOUT_S:g} s", await worker.reap()) from None
        if not worker.started:
            raise worker.start_failed("exited while starting", await worker.reap())
        log.info("ingest worker %d: pid %d, ring range [%d, %d)", worker.index, worker.proc.pid if worker.proc else -1,
                 worker.lent.offset, worker.lent.offset + worker.lent.nbytes)  # fmt: skip

    async def _start_worker(self, index: int, lent: Slot) -> None:
        await self._await_ready(await self._spawn(index, lent))

    def worker_gone(self, worker: _Worker) -> None:
        """A worker's channel closed: reap it; once nothing reads its range, start its replacement."""
        if worker.proc is None:  # (its process could not be started: it never had a channel)
            return
        reaped = worker.reap()
        if worker.replaced or worker.held or self._stopping or self._workers[worker.index] is not worker:
            return
        if not worker.started:  # it died while starting: start() reports it; no restart loop
            return
        worker.replaced = True
        self._retire(worker)
        # Logged once reaped: its channel closes before its exit status can be read
        reaped.add_done_callback(functools.partial(self._exited, worker))

    def _exited(self, dead: _Worker, reaped: asyncio.Future[int]) -> None:
        """A started worker's process was reaped: say how it ended, and start its replacement (none once the
        server is stopping: it died just before, and is reaped as the server stops), later each time in a crash
        loop (CRASH_LOOP_S)."""
        if reaped.cancelled():  # (the loop is closing)
            return
        loop = asyncio.get_running_loop()
        pid, status = dead.proc.pid if dead.proc else -1, exit_status(reaped.result())
        said = f"ingest worker {dead.index} (pid {pid}) exited ({status}); its connections closed"
        if self._stopping:
            log.warning("%s", said)
            return
        quick = loop.time() - dead.ready_at < CRASH_LOOP_S
        deaths = self._quick_deaths[dead.index] = self._quick_deaths.get(dead.index, 0) + 1 if quick else 0
        if deaths < 2:
            log.warning("%s; starting a new one", said)
            loop.call_later(RESTART_DELAY_S, self._restart, dead)
            return
        delay = min(RESTART_DELAY_S * 2 ** (deaths - 1), RESTART_MAX_DELAY_S)
        log.warning("%s; its workers died %d times in a row within %g s of starting: starting a new one in %g s",
                    said, deaths, CRASH_LOOP_S, delay)  # fmt: skip
        loop.call_later(delay, self._restart, dead)

    def _restart(self, dead: _Worker, attempt: int = 0) -> None:
        if self._stopping:
            return
        self.restarts += 1
        task = asyncio.get_running_loop().create_task(self._start_worker(dead.index, dead.lent))
        task.add_done_callback(functools.partial(self._restarted, dead.index, attempt))

    def _restarted(self, index: int, attempt: int, task: asyncio.Task[None]) -> None:
        """A replacement that failed to start is tried again, later each time: until one runs, nobody reads
        its UDP sockets (the kernel still sends them their source addresses' datagrams)."""
        if task.cancelled() or task.exception() is None or self._stopping or index >= len(self._workers):
            return
        delay = min(RESTART_DELAY_S * 2 ** (attempt + 1), RESTART_MAX_DELAY_S)
        log.error("restarting ingest worker %d failed: %s; trying again in %g s", index, task.exception(), delay)
        asyncio.get_running_loop().call_later(delay, self._restart, self._workers[index], attempt + 1)

    @property
    def addresses(self) -> list[tuple[str, int]]:
        if self._sock is None:
            return []
        return [self._sock.getsockname()[:2]]

    @property
    def workers(self) -> int:
        """How many worker processes serve the listeners (``ingest_workers``)."""
        return self._n

    def udp_sockets(self, position: int) -> list[socket.socket]:
        """UDP listener ``position``'s sockets, one per worker (empty before start and after close)."""
        return self._udp_socks[position] if position < len(self._udp_socks) else []

    @property
    def pids(self) -> list[int]:
        """Process ids of the live workers (tests, status)."""
        return [w.proc.pid for w in self._workers if w is not None and w.alive and w.proc is not None]

    @property
    def connections_elsewhere(self) -> int:
        """The workers' TCP connections (handed over and not taken up yet included)."""
        return sum(w.load for w in self._workers if w is not None and w.alive)

    @property
    def ring_lent_free(self) -> int:
        """Bytes of the ranges lent to the workers that no frame holds there, as last reported: a dead
        worker's frames still here hold at most what it last reported, and none once they are gone (nor
        those of a replacement that never started)."""
        return sum(w.lent.nbytes - (w.ring_used if w.alive or w.held else 0) for w in self._workers if w is not None)

    def stop_accepting(self) -> None:
        self._stopping = True
        self._stop_reading()
        self._drop_parked()
        for worker in self._workers:
            if worker is not None and worker.alive:
                worker.send(channel.down(channel.STOP))

    async def submitted(self) -> None:
        """Until each live worker said STOPPED (or died): every FRAME it sent comes before that."""
        stopped = [w.stopped for w in self._workers if w is not None and w.alive]
        if stopped:
            await asyncio.wait(stopped)  # (cancelled at the shutdown timeout, it leaves them be)

    async def close(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        give_up = loop.time() + timeout
        workers = [w for w in self._workers if w is not None]
        live = [w for w in workers if w.alive]
        # Every FRAME a worker sent comes before its STOPPED; then those frames are answered.
        await _wait([w.stopped for w in live], timeout)
        while any(w.in_server for w in live) and loop.time() < give_up:
            await asyncio.sleep(0.005)
        flush_ms = int(max(0.0, give_up - loop.time()) * 1000)
        for worker in live:
            worker.send(channel.down(channel.CLOSE, flush_ms))
        await _wait([w.gone for w in live], flush_ms / 1000 + 2.0)
        for worker in workers:
            worker.kill()
            if worker.proc is not None:
                await worker.reap()
        for worker in workers:
            if not worker.lent.released:
                self.admission.pool.release(worker.lent)
        for worker in workers:
            if not worker.replaced:
                self._retire(worker)
        self._workers = []
        self._stop_reading()
        self._drop_parked()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        for socks in self._udp_socks:
            for sock in socks:
                sock.close()
        self._udp_socks = []

    def _retire(self, worker: _Worker) -> None:
        """Keep the counts of a worker that is leaving the list."""
        self._frames_before += worker.frames
        for before, numbers in zip(self._udp_before, worker.udp, strict=True):
            before.update({name: numbers[name] for name in COUNTERS if name in numbers})

    def udp_stats(self, position: int) -> dict[str, Any]:
        """UDP listener ``position``'s numbers: its counts over every worker it had, its gauges over the
        live ones, as last reported (once per sweep period). A dead worker's counts stay in until it is
        retired (``_retire`` moves them to ``_udp_before``): counts never go back."""
        kept = [w for w in self._workers if w is not None and not w.replaced]
        total = collections.Counter(self._udp_before[position])
        for worker in kept:
            numbers = worker.udp[position]
            # a dead worker's gauges (what it had then) are gone; its counts stay
            total.update({name: value for name, value in numbers.items()
                          if name != "gro" and (worker.alive or name in COUNTERS)})  # fmt: skip
        gro = all(w.udp[position].get("gro", 1) for w in kept if w.alive)
        return {"gro": bool(gro), **{name: total[name] for name in STAT_NAMES[1:] if name in total}}

    def sweep(self, now: float) -> None:
        """Workers enforce their connections' time limits themselves; here, a worker that has gone silent is
        killed (and restarted as a dead one is), unless this loop itself stood still meanwhile (then the
        worker's records may just be unread)."""
        swept, self._swept = self._swept, now
        if now - swept > 2.0 or self._stopping:
            return
        for worker in self._workers:
            if worker is not None and worker.alive and worker.started and now - worker.heard > WORKER_HANG_S:
                log.error("ingest worker %d (pid %s) sent nothing for %.0f s: it is hung; killing it (its "
                          "connections close) and starting a new one", worker.index,
                          worker.proc and worker.proc.pid, now - worker.heard)  # fmt: skip
                worker.heard = now  # (once: its channel closes when it is gone)
                worker.kill()

    def stats(self) -> dict[str, Any]:
        live = [w for w in self._workers if w is not None and w.alive]
        return {
            "kind": self.kind,
            "ingest_workers": self._n,
            "workers_alive": len(live),
            "worker_restarts": self.restarts,
            "connections": sum(len(w.conns) for w in live),  # those that sent a frame; a capped token's: admitted
            "worker_connections": [len(w.conns) if w is not None and w.alive else 0 for w in self._workers],
            "worker_open_connections": [w.load if w is not None and w.alive else 0 for w in self._workers],
            "unhanded_connections": self._unhanded,
            "frames": self._frames_before + sum(w.frames for w in self._workers if w is not None and not w.replaced),
        }


class WorkerUdpListener(Listener):
    """A UDP listener served by the ingest workers, in this process's list of listeners: its address and
    its numbers (``stats()``, as ``UdpListener``'s). The ``WorkerListener`` binds, starts and stops it."""

    kind = "udp"
    socket_type = socket.SOCK_DGRAM

    def __init__(self, spec: ListenerSpec, admission: Admission, workers: WorkerListener, position: int) -> None:
        super().__init__(spec, admission)
        listener_options(spec, admission.config)  # a bad option fails here, naming it, not in every worker
        self._workers = workers
        self._position = position  # among the config's udp listeners

    async def start(self) -> None:
        """Nothing: the workers' listener binds its sockets and starts the workers."""

    @property
    def addresses(self) -> list[tuple[str, int]]:
        socks = self._workers.udp_sockets(self._position)
        return [socks[0].getsockname()[:2]] if socks else []

    @property
    def connections_elsewhere(self) -> int:
        """Its producers on the live workers (a gauge they report once per sweep period)."""
        return int(self._workers.udp_stats(self._position).get("producers", 0))

    def stop_accepting(self) -> None:
        """Nothing: the workers stop reading when the workers' listener stops accepting."""

    async def close(self, timeout: float) -> None:
        """Nothing: the workers' listener closes the sockets."""

    def sweep(self, now: float) -> None:
        """The workers enforce the reassembly time limits themselves."""

    def stats(self) -> dict[str, Any]:
        addresses = self.addresses
        port = addresses[0][1] if addresses else self.spec.port
        return {"kind": self.kind, "host": self.spec.host, "port": port, "ingest_workers": self._workers.workers,
                **self._workers.udp_stats(self._position)}  # fmt: skip


def _reuseport_sockets(spec: ListenerSpec, count: int) -> list[socket.socket]:
    """``count`` UDP sockets bound to ``spec``'s address with SO_REUSEPORT (port 0: the first one picks it),
    one per worker: the kernel spreads source addresses over them, each always to the same one. A fixed
    port is first probed with a plain bind: SO_REUSEPORT would otherwise let these sockets join what is
    bound there already (another udp listener of this config, or a process of this user that set it too)."""
    if spec.port:
        UdpListener.check_bind(spec)  # BindError naming the address
    family, _, _, _, address = socket.getaddrinfo(spec.host, spec.port, type=socket.SOCK_DGRAM,
                                                  flags=socket.AI_PASSIVE)[0]  # fmt: skip
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_DGRAM)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(address)
            address = sock.getsockname()  # the port the first one got, for the others
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


async def _wait(futures: list[asyncio.Future[None]], timeout: float) -> None:
    if futures:
        await asyncio.wait(futures, timeout=max(timeout, 0.0))
