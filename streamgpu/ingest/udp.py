"""The UDP front end: chunked frames (docs/PROTOCOL.md section 11) reassembled in their ring slots.

One non-blocking socket, read from ``loop.add_reader`` (uvloop's datagram
transport would make a ``bytes`` per datagram). Each wake-up drains up to
``max_batches`` batches of up to ``batch`` datagrams, each with one
``recvmmsg`` call (``ingest.mmsg``), so the loop is never held long. A
batch's chunk headers are judged with numpy at once (``protocol.udp.check_batch``)
and its good datagrams sorted into frames (``protocol.udp.group``). Python
then runs once per frame in the batch (find or open it, parse chunk 0, look
up which chunks it already has), never per datagram: every new chunk of the
batch is copied from where it landed in the packet area (a row, or with
``gro`` its place in a coalesced receive buffer: the area says where) to its
offset in its frame's ring slot, once, by one strided copy per run of
chunks (with ``gro``, a GSO message's chunks are one run) or else one numpy
assignment per chunk size (the ring seen as rows of that size starting at
every byte), and the chunk and byte counts per frame come from ``bincount``.

Producers and trust: UDP has no handshake and a source address can be
forged, so an auth token would protect nothing. A producer is a source
address (ip, port); datagrams are taken only from the networks in the
listener's ``allow`` option (default: loopback only). A server with tokens
refuses to bind UDP beyond loopback without an explicit ``allow`` list.

A frame's slot is reserved at its first datagram (every chunk header
carries the payload length), within its producer's share; when there is
no room the frame is answered OVERLOADED at once (UDP cannot wait). A frame
completes when every chunk is in, in any order; duplicates are ignored (a
byte per chunk index). It is given up, answered INCOMPLETE exactly once and
its slot freed, when ``reassembly_timeout_s`` passes from its first
datagram or its deadline comes first. Each producer has at most
``max_partial_frames`` frames in reassembly: a new one past that gives up
its oldest (INCOMPLETE); a frame whole in the receive batch that opened it
ends with that batch and does not count. Late datagrams of a frame that has ended are
counted and dropped.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import ipaddress
import logging
import socket
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from streamgpu.config import LOOPBACK_HOSTS, Config, ListenerSpec
from streamgpu.errors import ConfigError
from streamgpu.frame import Frame, Outcome
from streamgpu.ingest.admission import Admission, Grant, Producer, Refused, Reservation
from streamgpu.ingest.base import Listener, connection_ids
from streamgpu.ingest.hub import Origin
from streamgpu.ingest.mmsg import MSG_TRUNC, ByteRows, PacketArea, decode_sockaddr, enable_gro
from streamgpu.memory import Slot
from streamgpu.metrics import NO_MODEL
from streamgpu.protocol import udp, wire
from streamgpu.protocol.udp import Assembly, Kind, Verdict
from streamgpu.protocol.wire import FrameFlags, FrameHeader, ProtocolError, ReplyHeader, Status, Timings

log = logging.getLogger(__name__)

LOOPBACK_NETS = ("127.0.0.0/8", "::1/128", "::ffff:127.0.0.0/104")
ENDED_KEPT = 1024  # per producer: recently ended frames, so their late datagrams are recognised
# Where a UDP producer finds all of a model's several outputs (a reply datagram holds the first)
_ALL_OUTPUTS = "its stream's WebSocket subscribers get all of them, as does a TCP connection of protocol version 2"
DENIED_KEPT = 4096  # sender keys found outside the allow list (cached: a flood costs a lookup each)
# A batch in fewer runs than this, or in runs of _RUN_LENGTH datagrams on average: a slice copy per run (the
# gathering assignment copies twice, through a temporary; a run costs a few numpy calls).
_RUNS_COPIED = 16
_RUN_LENGTH = 8
WAKEUP_BUDGET_NS = 1_000_000  # the work one readiness callback does before yielding to the loop
BAD_COUNTERS: dict[Verdict, str] = {v: v.name.lower() for v in Verdict if v is not Verdict.OK}
# In stats(): what is there now, and what each is.
GAUGES = {
    "producers": "Senders known (forgotten after peer_idle_s with nothing in the server)",
    "partial_frames": "Frames in reassembly",
}
# In stats(): counts since start (docs/PROTOCOL.md section 11 says when each is counted).
COUNTERS = (
    "receive_calls", "receive_errors", "datagrams", *BAD_COUNTERS.values(), "denied", "too_many_producers", "late",
    "duplicates", "inconsistent", "too_large", "evicted", "overloaded", "no_space", "bad_head", "superseded",
    "frames", "incomplete", "replies_to_subscribers", "replies_dropped", "reply_datagrams", "reply_datagrams_dropped",
)  # fmt: skip
# The numbers stats() reports (1 or 0 for gro), in the order an ingest worker reports them to the scheduling process.
STAT_NAMES = ("gro", *GAUGES, *COUNTERS)


@dataclass(frozen=True)
class UdpOptions:
    """The ``options`` of a ``kind = "udp"`` listener (configs/example.toml shows each)."""

    allow: tuple[str, ...] = ()  # networks datagrams are taken from; empty: loopback only
    reassembly_timeout_s: float = 1.0
    max_partial_frames: int = 16
    datagram_bytes: int = udp.DEFAULT_DATAGRAM_BYTES  # size of reply datagrams
    max_datagram_bytes: int = 9216  # receive buffer per datagram (jumbo frames fit); larger ones: oversized
    batch: int = 1024  # datagrams per recvmmsg call (the most Linux takes): the numpy work per call is amortised
    gro: bool = True  # let the kernel coalesce a sender's datagrams (UDP_GRO, Linux); bodies placed from there
    max_batches: int = 4  # batches per wake-up, then the loop runs other work
    recv_buffer_bytes: int = 16 * 1024 * 1024  # SO_RCVBUF asked for (the kernel may cap it)
    peer_idle_s: float = 60.0  # a producer with nothing in the server is forgotten after this long

    @classmethod
    def parse(cls, options: dict[str, Any]) -> UdpOptions:
        known = set(cls.__dataclass_fields__)
        unknown = set(options) - known
        if unknown:
            raise ConfigError(f"udp listener: unknown options {sorted(unknown)}; known: {sorted(known)}")
        values = dict(options)
        if "allow" in values:
            allow = values["allow"]
            if isinstance(allow, str) or not all(isinstance(a, str) for a in allow):
                raise ConfigError("udp listener: allow must be a list of networks, e.g. ['10.0.0.0/8']")
            values["allow"] = tuple(allow)
        try:
            opts = cls(**values)
        except TypeError as exc:
            raise ConfigError(f"udp listener: {exc}") from None
        problems = opts.problems()
        if problems:
            raise ConfigError("udp listener: " + "; ".join(problems))
        return opts

    def problems(self) -> list[str]:
        out = [] if isinstance(self.gro, bool) else [f"gro must be true or false, got {self.gro!r}"]
        for net in self.allow:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError as exc:
                out.append(f"allow: {exc}")
        for name in ("reassembly_timeout_s", "peer_idle_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0 < value < float("inf")):
                out.append(f"{name} must be a finite number of seconds > 0, got {value!r}")
        for name, lo, hi in (
            ("max_partial_frames", 1, 1 << 16),
            ("datagram_bytes", udp.MIN_DATAGRAM_BYTES, udp.MAX_DATAGRAM_BYTES),
            ("max_datagram_bytes", udp.MIN_DATAGRAM_BYTES, udp.MAX_DATAGRAM_BYTES + 1),
            ("batch", 1, 1024),
            ("max_batches", 1, 1 << 16),
            ("recv_buffer_bytes", 0, 1 << 31),
        ):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi):
                out.append(f"{name} must be an integer in {lo}..{hi}, got {value!r}")
        return out


def listener_options(spec: ListenerSpec, config: Config) -> UdpOptions:
    """The options of udp listener ``spec`` in a server of ``config``; ConfigError naming what is wrong (also
    read where ingest workers serve the listener, so that a bad one fails in this process, as without them)."""
    opts = UdpOptions.parse(spec.options)
    if spec.host not in LOOPBACK_HOSTS and not opts.allow and (config.auth_token or config.tokens):
        raise ConfigError(
            f"udp listener on {spec.host}: UDP has no handshake, so auth tokens cannot protect it;"
            " set the listener's options.allow to the producers' networks (or bind to loopback)"
        )
    return opts


class _Partial:
    """A frame in reassembly: its slot, its chunks so far, and when it is given up."""

    __slots__ = ("assembly", "deadline_ns", "give_up_ns", "header", "received_ns", "slot", "whole")

    def __init__(self, slot: Slot, assembly: Assembly, received_ns: int, give_up_ns: int, whole: bool) -> None:
        self.slot = slot
        self.assembly = assembly
        self.received_ns = received_ns
        self.give_up_ns = give_up_ns
        self.header: FrameHeader | None = None  # from chunk 0, once admitted
        self.deadline_ns = 0
        # Every chunk is in the receive batch that opened it, so it ends with that batch: it does not count
        # against max_partial_frames (or a producer with many frames in flight would give up its own frames).
        self.whole = whole


class _Peer:
    """One sender address: its producer, its frames in reassembly, the frames that ended recently."""

    __slots__ = ("address", "ended", "id", "key", "last_seen", "origin", "partials", "producer", "whole")

    def __init__(self, key: Any, address: Any, producer: Producer, origin: Origin) -> None:
        self.id = next(connection_ids)  # its frames' stream key: (id, stream_id)
        self.key = key
        self.address = address
        self.producer = producer
        self.origin = origin  # how its frames' outcomes are published
        self.partials: dict[tuple[int, int], _Partial] = {}  # (stream_id, sequence), oldest first
        self.whole = 0  # of the partials, those whole in the receive batch being placed
        self.ended: collections.OrderedDict[tuple[int, int], None] = collections.OrderedDict()
        self.last_seen = time.monotonic()


class UdpListener(Listener):
    """Receives chunked frames on one UDP address (``ListenerSpec(kind="udp", host, port, options)``)."""

    kind = "udp"
    socket_type = socket.SOCK_DGRAM

    def __init__(self, spec: ListenerSpec, admission: Admission, sock: socket.socket | None = None) -> None:
        super().__init__(spec, admission)
        self._given = sock  # a bound socket to receive on (an ingest worker's, SO_REUSEPORT), instead of binding
        self.options = opts = listener_options(spec, admission.config)
        public = spec.host not in LOOPBACK_HOSTS
        nets = opts.allow or (LOOPBACK_NETS if not public else ("0.0.0.0/0", "::/0"))
        self._allow = [ipaddress.ip_network(n, strict=False) for n in nets]
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reading = False
        # +1 byte per datagram: see oversized
        self._area = PacketArea(opts.batch, udp.HEADER_SIZE, opts.max_datagram_bytes + 1, gro=opts.gro)
        self._heads = udp.header_view(self._area.heads)
        self._words = udp.words(self._heads)
        self._every = np.arange(self._area.rows)
        self._ring: ByteRows | None = None  # the ring as rows of a chunk size (made at the first chunk)
        self._peers: dict[Any, _Peer] = {}
        self._denied: collections.OrderedDict[Any, None] = collections.OrderedDict()
        self._timer: asyncio.TimerHandle | None = None
        self._timeout_ns = int(opts.reassembly_timeout_s * 1e9)
        self._counts: collections.Counter[str] = collections.Counter()
        # Replies wait for the end of the loop iteration: the scheduler launches its next batch first.
        self._replies: list[tuple[_Peer, udp.Datagrams]] = []
        self._flushing: asyncio.Handle | None = None
        self._resume: asyncio.Handle | None = None  # the rest of a wake-up's work, in the next loop iteration

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        address: Any = None  # to bind to; None: the socket given is bound already
        if self._given is not None:
            sock = self._given
        else:
            infos = await loop.getaddrinfo(self.spec.host, self.spec.port, type=socket.SOCK_DGRAM)
            family, _, _, _, address = infos[0]
            sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            if self.options.recv_buffer_bytes:
                set_receive_buffer(sock, self.options.recv_buffer_bytes)
            if self._area.gro and not enable_gro(sock):
                log.info("udp listener %s:%d: the kernel does not coalesce datagrams (no UDP_GRO): one per row",
                         self.spec.host, self.spec.port)  # fmt: skip
                self._area.stop_coalescing()
            if address is not None:
                sock.bind(address)
        except BaseException:
            sock.close()
            raise
        self._sock, self._loop = sock, loop
        loop.add_reader(sock.fileno(), self._on_readable)
        self._reading = True

    @property
    def addresses(self) -> list[tuple[str, int]]:
        if self._sock is None:
            return []
        return [self._sock.getsockname()[:2]]

    def stop_accepting(self) -> None:
        """Read no more datagrams; frames still in reassembly are answered SHUTTING_DOWN."""
        self._stop_reading()
        for peer in list(self._peers.values()):
            for key in list(peer.partials):
                self._give_up(peer, key, Status.SHUTTING_DOWN, "server is shutting down")

    def _stop_reading(self) -> None:
        if self._reading and self._loop is not None and self._sock is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._reading = False
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None

    async def close(self, timeout: float) -> None:
        """Close the socket (replies of frames still in the server are then dropped: UDP cannot wait)."""
        self.stop_accepting()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for peer in list(self._peers.values()):
            self._forget(peer)
        self._flush()  # the replies already made go
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def sweep(self, now: float) -> None:
        """Forget producers that sent nothing for ``peer_idle_s`` and have nothing in the server."""
        idle = self.options.peer_idle_s
        for peer in list(self._peers.values()):
            if not peer.partials and not peer.producer.frames_in_server and now - peer.last_seen > idle:
                self._forget(peer)

    def _forget(self, peer: _Peer) -> None:
        for key in list(peer.partials):
            self._give_up(peer, key, Status.SHUTTING_DOWN, "server is shutting down")
        if self._peers.pop(peer.key, None) is not None:
            self.admission.leave(peer.producer)
            self.admission.close_connection()
            self.producer_gone(peer.id)

    def producer_added(self, peer_id: int, origin: Origin) -> None:
        """A new source address became a producer (its frames' stream key is ``(peer_id, stream_id)``; its
        frames' outcomes are published under ``origin``)."""

    def producer_gone(self, peer_id: int) -> None:
        """A producer was forgotten (idle, or the listener closed): nothing of it is left here."""

    def stats(self) -> dict[str, Any]:
        """``host``, ``port``, ``gro``, the gauges of :data:`GAUGES` and every counter of :data:`COUNTERS` seen
        non-zero."""
        partial = sum(len(p.partials) for p in self._peers.values())
        port = self.addresses[0][1] if self._sock is not None else self.spec.port
        return {"kind": self.kind, "host": self.spec.host, "port": port, "gro": self._area.gro,
                "producers": len(self._peers), "partial_frames": partial, **self._counts}  # fmt: skip

    # -- receiving -------------------------------------------------------------------------------

    def _on_readable(self) -> None:
        """Take waiting datagrams: up to ``max_batches`` receive calls, and no more than about
        WAKEUP_BUDGET_NS of work per call of this (a coalesced receive call may bring 64 MiB): past that
        the rest waits for the next loop iteration, so GPU completions and launches are not held up."""
        if self._resume is not None:  # the reader came first: it does the continuation's work (one at most)
            self._resume.cancel()
            self._resume = None
        area, sock = self._area, self._sock
        start = time.perf_counter_ns()
        calls = 0
        while sock is not None and self._reading:
            n = area.next_rows()  # what is left of the last receive (coalesced receives come a chunk at a time)
            if not n:
                if calls == self.options.max_batches or (calls and area.drained):
                    return
                calls += 1
                try:
                    n = area.receive(sock)
                except OSError as exc:  # e.g. ICMP errors reported on the socket: not fatal to the listener
                    self._counts["receive_errors"] += 1
                    log.debug("udp receive: %s", exc)
                    continue
                if n == 0:
                    return
                self._counts["receive_calls"] += 1
            self._counts["datagrams"] += n
            self._batch(n)
            if time.perf_counter_ns() - start > WAKEUP_BUDGET_NS and self._loop is not None:
                # Rows left of the receive are not on the socket: its readiness would not bring us back.
                self._resume = self._loop.call_soon(self._continue)
                return

    def _continue(self) -> None:
        self._resume = None  # (running: not to be cancelled)
        self._on_readable()

    def _batch(self, n: int) -> None:
        """Judge a batch's headers at once, group its good datagrams by frame, and place every new chunk
        with one numpy copy per chunk size in the batch: Python runs per frame, never per datagram."""
        area = self._area
        lengths = area.lengths[:n]
        # The area has one byte more per datagram than allowed: "too large" shows as a length, not only MSG_TRUNC.
        oversized = ((area.flags[:n] & MSG_TRUNC) != 0) | (lengths > self.options.max_datagram_bytes)
        verdict = udp.check_batch(self._heads[:n], lengths, Kind.FRAME, oversized)
        if verdict.any():
            bad = verdict != Verdict.OK
            for value, count in enumerate(np.bincount(verdict[bad], minlength=len(Verdict)).tolist()):
                if count:
                    self._counts[BAD_COUNTERS[Verdict(value)]] += count
            good = np.flatnonzero(~bad)
            if not len(good):
                return
        else:
            good = self._every[:n]
        w = self._words[good]
        senders = area.names64[good]
        g = udp.group(w, None if (senders == senders[0]).all() else senders)
        ws = w[g.order]
        src = good[g.order]  # packet-area row of each datagram, in grouped order
        index = ws[:, 5] & 0xFFFF
        # A frame's chunk count and length are those of its first datagram; datagrams that disagree are dropped.
        rep = w[g.first]
        incons = ((ws[:, 5] >> 16) != (rep[:, 5] >> 16)[g.group]) | (ws[:, 7] != rep[:, 7][g.group])
        some_incons = np.logical_or.reduceat(incons, g.starts).tolist()
        prev = np.zeros(len(src), bool)  # the chunk was in its frame before this batch
        sequence = rep[:, 3].astype(np.uint64) | (rep[:, 4].astype(np.uint64) << np.uint64(32))
        starts, ends, src_l = g.starts.tolist(), g.ends.tolist(), src.tolist()
        stream_l, sequence_l, count_l, length_l = rep[:, 2].tolist(), sequence.tolist(), (rep[:, 5] >> 16).tolist(), \
            rep[:, 7].tolist()  # fmt: skip
        head_l = (index[g.starts] == 0).tolist()  # sorted by chunk index: chunk 0 comes first in its frame
        distinct = (g.ends - g.starts) - np.add.reduceat(g.repeat, g.starts)
        whole_l = (distinct == (rep[:, 5] >> 16)).tolist()  # all of a frame's chunks are in this batch
        frames: list[tuple[_Peer, tuple[int, int], _Partial, bool] | None] = [None] * len(starts)
        now_ns = time.perf_counter_ns()
        peer: _Peer | None = None
        last_sender: Any = None
        for k in np.argsort(g.first).tolist():  # frames in the order their first datagram came
            a, b = starts[k], ends[k]
            sender = area.sender(src_l[a])
            if sender != last_sender or peer is None:
                peer = self._peer(sender, b - a)
                last_sender = sender
                if peer is None:
                    continue
            key = (stream_l[k], sequence_l[k])
            partial = peer.partials.get(key)
            if partial is None:
                if key in peer.ended:
                    self._counts["late"] += b - a
                    continue
                partial = self._open(peer, key, count_l[k], length_l[k], now_ns, whole_l[k] and not some_incons[k])
                if partial is None:
                    continue
            asm = partial.assembly
            if asm.count != count_l[k] or asm.length != length_l[k]:  # this batch's first datagram disagrees
                incons[a:b] = ((ws[a:b, 5] >> 16) != asm.count) | (ws[a:b, 7] != asm.length)
                some_incons[k] = True
            idx = index[a:b]
            if some_incons[k]:  # (an inconsistent chunk's index may be past this frame's count)
                ok = ~incons[a:b]
                idx = idx[ok]
                prev[a:b][ok] = asm.seen[idx]
            else:
                prev[a:b] = asm.seen[idx]
            head = head_l[k] and not incons[a] and not prev[a]
            if head:  # chunk 0: its frame header is parsed and admitted now
                chunk0 = area.body(src_l[a])
                used = self._on_head(peer, key, partial, chunk0, asm.count, asm.length)
                if used < 0:
                    frames[k] = (peer, key, partial, True)
                    continue
                asm.add(0, asm.count, 0, asm.length, chunk0[used:])  # _on_head checked that it fits
            asm.seen[idx] = True
            frames[k] = (peer, key, partial, head)
        self._place_batch(g, frames, ws, src, index, incons, prev, lengths)

    def _place_batch(self, g: udp.Groups, frames: list[tuple[_Peer, tuple[int, int], _Partial, bool] | None],
                     ws: np.ndarray, src: np.ndarray, index: np.ndarray, incons: np.ndarray, prev: np.ndarray,
                     lengths: np.ndarray) -> None:  # fmt: skip
        """Copy the batch's new chunks into their frames' slots, count them, and submit the frames now complete.

        A frame may have ended while the batch was sorted out (given up for a newer frame, superseded, its
        chunk 0 refused): its slot is free again, so nothing is written for it and its datagrams count as late.
        """
        alive = np.zeros(len(frames), bool)
        base = np.zeros(len(frames), np.int64)  # where each frame's slot starts in the ring buffer
        for k, entry in enumerate(frames):
            if entry is None:
                continue
            peer, key, partial, head = entry
            if peer.partials.get(key) is partial:
                alive[k] = True
                base[k] = partial.slot.offset
            else:
                frames[k] = None
                self._counts["late"] += int(g.ends[k] - g.starts[k]) - head
        live = alive[g.group] & ~incons
        new = live & ~prev & ~g.repeat
        self._counts["duplicates"] += int(np.count_nonzero(live)) - int(np.count_nonzero(new))
        self._counts["inconsistent"] += int(np.count_nonzero(alive[g.group] & incons))
        sel = np.flatnonzero(new & (index != 0))  # chunk 0 was placed with its header
        if len(sel):
            group = g.group[sel]
            width = lengths[src[sel]].astype(np.int64) - udp.HEADER_SIZE
            offset = ws[sel, 6].astype(np.int64)
            self._place(base[group] + offset, src[sel], width)
            chunks = np.bincount(group, minlength=len(frames)).tolist()
            nbytes = np.bincount(group, weights=width, minlength=len(frames)).tolist()
            spans = (offset << 32 | (offset + width)).astype(np.uint64)  # see Assembly.spans
            bounds = np.searchsorted(group, np.arange(len(frames) + 1)).tolist()  # frame k's: bounds[k]..[k + 1]
        else:
            chunks = nbytes = [0] * len(frames)
        complete: list[Frame] = []
        for k, entry in enumerate(frames):
            if entry is None:
                continue
            peer, key, partial, _ = entry
            asm = partial.assembly
            if chunks[k] and asm.spans is not None:
                asm.spans.append(spans[bounds[k] : bounds[k + 1]].copy())  # a copy: not the whole batch's kept alive
            asm.chunks += chunks[k]
            asm.bytes += int(nbytes[k])
            if asm.all_chunks:
                frame = self._finish(peer, key, partial)
                if frame is not None:
                    complete.append(frame)
            else:
                assert not partial.whole, "a frame whole in its receive batch ends with it"
        if complete:  # the batch's frames enter the scheduler together: their batches form once
            self.admission.submit_many(complete)

    def _place(self, dst: np.ndarray, rows: np.ndarray, width: np.ndarray) -> None:
        """Copy the body of packet-area row ``rows[j]`` (``width[j]`` bytes, where the area says it lies) to
        ring byte ``dst[j]``, per distinct width.

        In-order traffic, from one sender or several interleaved, comes in runs (bodies a constant step
        apart in the area, to consecutive places of one frame): each run is one strided copy (with
        coalescing, a GSO message's bodies in one). Otherwise (reordered) one numpy assignment places them
        all: the area's and the ring's bytes seen as rows of that width starting at every byte.
        """
        area = self._area
        body_rows, body_start, body_step = area.body_rows, area.body_start, area.body_step
        sizes = np.unique(width).tolist() if (width != width[0]).any() else [int(width[0])]
        for size in sizes:
            if size == 0:
                continue
            pick = (width == size) if len(sizes) > 1 else slice(None)
            d, r = dst[pick], rows[pick]
            s = body_start[r]
            if len(r) > 1:
                t = body_step[r]  # a run: each next body one step on, the same step throughout
                starts = np.flatnonzero((np.diff(d) != size) | (np.diff(s) != t[:-1]) | (np.diff(t) != 0)) + 1
                if len(starts) < max(_RUNS_COPIED, len(r) // _RUN_LENGTH):
                    ring, source = self.admission.pool.buffer, body_rows(size)
                    bounds = [0, *starts.tolist(), len(r)]
                    firsts = bounds[:-1]
                    for a, b, at, begin, step in zip(firsts, bounds[1:], d[firsts].tolist(), s[firsts].tolist(),
                                                     t[firsts].tolist(), strict=True):  # fmt: skip
                        m = b - a
                        ring[at : at + m * size].reshape(m, size)[:] = source[begin : begin + m * step : step]
                    continue
            self._ring_rows(size)[d] = body_rows(size)[s]

    def _ring_rows(self, size: int) -> np.ndarray:
        """The ring buffer as overlapping rows of ``size`` bytes, row i starting at byte i (no copy)."""
        if self._ring is None:
            self._ring = ByteRows(self.admission.pool.buffer)
        return self._ring(size)

    def _peer(self, sender: Any, datagrams: int) -> _Peer | None:
        """The producer ``sender`` is, or None when its ``datagrams`` are dropped (counted here, by why)."""
        peer = self._peers.get(sender)
        if peer is not None:
            peer.last_seen = time.monotonic()
            return peer
        if sender in self._denied:
            self._counts["denied"] += datagrams
            return None
        address = decode_sockaddr(sender)
        host = ipaddress.ip_address(address[0].split("%")[0])
        if not any(host in net for net in self._allow):
            self._counts["denied"] += datagrams
            self._denied[sender] = None
            if len(self._denied) > DENIED_KEPT:
                self._denied.popitem(last=False)
            return None
        if not self.admission.open_connection():
            self._counts["too_many_producers"] += datagrams
            return None
        grant = Grant(None, self.admission.config.max_priority)
        label = f"udp:{address[0]}:{address[1]}"
        producer = self.admission.producer_for(grant, label)
        peer = self._peers[sender] = _Peer(sender, address, producer, Origin("udp", label))
        self.producer_added(peer.id, peer.origin)
        return peer

    def _open(self, peer: _Peer, key: tuple[int, int], count: int, length: int, now_ns: int,
              whole: bool) -> _Partial | None:  # fmt: skip
        """Start reassembling a frame at its first datagram: reserve its slot, or answer it now. ``whole``: all
        its chunks are in this receive batch (it ends with the batch)."""
        cfg = self.admission.config
        if length > cfg.max_payload_bytes:
            self._counts["too_large"] += 1
            why = f"payload of {length} bytes exceeds {cfg.max_payload_bytes}"
            self._answer(peer, key, None, Status.TOO_LARGE, why)
            return None
        if not self.admission.accepting:
            self._answer(peer, key, None, Status.SHUTTING_DOWN, "server is shutting down")
            return None
        if not whole and len(peer.partials) - peer.whole >= self.options.max_partial_frames:
            oldest = next(k for k, p in peer.partials.items() if not p.whole)
            self._counts["evicted"] += 1
            self._give_up(peer, oldest, Status.INCOMPLETE,
                          f"given up for a newer frame: more than {self.options.max_partial_frames} frames of this"
                          " producer in reassembly")  # fmt: skip
        if peer.producer.frames_in_server + len(peer.partials) >= cfg.max_frames_per_connection:
            self._counts["overloaded"] += 1
            self._answer(peer, key, None, Status.OVERLOADED,
                         f"this producer has {cfg.max_frames_per_connection} frames in the server")  # fmt: skip
            return None
        got = peer.producer.reserve(length, _no_wait)
        if isinstance(got, Reservation):  # UDP cannot wait for space: the frame is refused now
            got.cancel()
            self._counts["no_space"] += 1
            self._answer(peer, key, None, Status.OVERLOADED, "no receive buffer space for this frame")
            return None
        assembly = Assembly(count, length, np.frombuffer(self.admission.pool.view(got), np.uint8))
        partial = peer.partials[key] = _Partial(got, assembly, now_ns, now_ns + self._timeout_ns, whole)
        peer.whole += whole
        self._arm_timer()
        return partial

    def _on_head(self, peer: _Peer, key: tuple[int, int], partial: _Partial, body: memoryview, count: int,
                 length: int) -> int:  # fmt: skip
        """Chunk 0: parse and admit the frame header; the bytes it used, or -1 when the frame ended here."""
        try:
            parsed = wire.decode_frame_header(body)
        except ProtocolError as exc:
            self._counts["bad_head"] += 1
            self._give_up(peer, key, Status.BAD_FRAME, f"chunk 0 does not hold a frame header: {exc}")
            return -1
        if parsed is None:
            self._counts["truncated"] += 1
            self._give_up(peer, key, Status.BAD_FRAME, "chunk 0 is shorter than the frame header it starts")
            return -1
        header, used = parsed
        if (header.stream_id, header.sequence, header.payload_len) != (key[0], key[1], length):
            self._counts["inconsistent"] += 1
            self._give_up(
                peer, key, Status.BAD_FRAME,
                f"chunk 0's frame header (stream {header.stream_id}, sequence {header.sequence}, payload_len"
                f" {header.payload_len}) disagrees with its chunk header (stream {key[0]}, sequence {key[1]},"
                f" length {length})",
            )  # fmt: skip
            return -1
        if len(body) - used > length:
            self._counts["past_end"] += 1
            self._give_up(peer, key, Status.BAD_FRAME, "chunk 0 carries more bytes than the payload length")
            return -1
        try:
            partial.deadline_ns = self.admission.admit(peer.producer, header, partial.received_ns)
        except Refused as refused:
            self._give_up(peer, key, refused.status, refused.message, header)
            return -1
        partial.header = header
        if partial.deadline_ns:
            partial.give_up_ns = min(partial.give_up_ns, partial.deadline_ns)
        if header.flags & FrameFlags.LIVE:
            for older in [k for k in peer.partials if k[0] == key[0] and k[1] < key[1]]:
                self._counts["superseded"] += 1
                self._give_up(peer, older, Status.SUPERSEDED,
                              "superseded by a newer frame of this live stream before it was complete")  # fmt: skip
        return used

    def _finish(self, peer: _Peer, key: tuple[int, int], partial: _Partial) -> Frame | None:
        """Every chunk is in: the frame to submit, or None when its chunks do not tile the payload (answered
        BAD_FRAME)."""
        asm = partial.assembly
        if not asm.complete:
            self._counts["inconsistent"] += 1
            why = (
                f"the frame's {asm.count} chunks hold {asm.bytes} bytes, its length is {asm.length}"
                if asm.bytes != asm.length
                else f"the frame's {asm.count} chunks overlap: they leave part of its {asm.length} bytes unwritten"
            )
            self._give_up(peer, key, Status.BAD_FRAME, why)
            return None
        header = partial.header
        assert header is not None  # chunk 0 is one of all the chunks, and admitted it
        del peer.partials[key]
        peer.whole -= partial.whole
        self._ended(peer, key)
        self._counts["frames"] += 1
        return Frame(
            header=header,
            slot=partial.slot,
            producer=peer.producer,
            stream=(peer.id, header.stream_id),
            received_ns=partial.received_ns,
            complete_ns=time.perf_counter_ns(),
            deadline_ns=partial.deadline_ns,
            sink=functools.partial(self._on_outcome, peer),
        )

    def _give_up(self, peer: _Peer, key: tuple[int, int], status: Status, message: str,
                 header: FrameHeader | None = None) -> None:  # fmt: skip
        """End a frame in reassembly: free its slot now and answer it once."""
        partial = peer.partials.pop(key, None)
        if partial is None:
            return
        peer.whole -= partial.whole
        peer.producer.release(partial.slot)
        if status == Status.INCOMPLETE:
            self._counts["incomplete"] += 1
        self._answer(peer, key, header or partial.header, status, message, partial.received_ns)

    def _ended(self, peer: _Peer, key: tuple[int, int]) -> None:
        peer.ended[key] = None
        if len(peer.ended) > ENDED_KEPT:
            peer.ended.popitem(last=False)

    # -- reassembly time limit -----------------------------------------------------------------

    def _arm_timer(self) -> None:
        if self._timer is None and self._loop is not None:
            period = min(max(self.options.reassembly_timeout_s / 4, 0.001), 0.25)
            self._timer = self._loop.call_later(period, self._expire)

    def _expire(self) -> None:
        self._timer = None
        now = time.perf_counter_ns()
        pending = False
        for peer in list(self._peers.values()):
            for key, partial in list(peer.partials.items()):
                if partial.give_up_ns <= now:
                    asm = partial.assembly
                    why = (
                        "its deadline passed"
                        if partial.give_up_ns == partial.deadline_ns
                        else (f"reassembly_timeout_s ({self.options.reassembly_timeout_s:g} s) passed")
                    )
                    self._give_up(peer, key, Status.INCOMPLETE,
                                  f"{asm.missing()} of {asm.count} datagrams missing when {why}")  # fmt: skip
            pending = pending or bool(peer.partials)
        if pending:
            self._arm_timer()

    # -- replies ---------------------------------------------------------------------------------

    def _answer(self, peer: _Peer, key: tuple[int, int], header: FrameHeader | None, status: Status, message: str,
                received_ns: int = 0) -> None:  # fmt: skip
        """Answer a frame that does not reach the scheduler (refused, given up), and remember it ended."""
        self.admission.replied(header.model if header is not None else NO_MODEL, status)  # /metrics, as TCP's
        self._ended(peer, key)
        total = (time.perf_counter_ns() - received_ns) // 1000 if received_ns else 0
        timings = Timings(total_us=total)
        if header is not None:  # chunk 0 came: the frame's subscribers hear of it, as of every outcome
            self.admission.stream_results.publish(header, Outcome(status, message, timings=timings), peer.origin)
            if header.flags & FrameFlags.SUBSCRIBERS:
                self._counts["replies_to_subscribers"] += 1
                return
        reply = ReplyHeader(key[0], key[1], status, timestamp_ns=header.timestamp_ns if header else 0,
                            timings=timings, message=message)  # fmt: skip
        self._send(peer, reply, b"")

    def _on_outcome(self, peer: _Peer, frame: Frame, outcome: Outcome) -> None:
        self.admission.stream_results.publish(frame.header, outcome, peer.origin)  # subscribers, results sink
        if frame.header.flags & FrameFlags.SUBSCRIBERS:  # the producer asked for no reply datagram
            self._counts["replies_to_subscribers"] += 1
            return
        # A model's several outputs would need the outputs block, which UDP clients do not read yet: they get
        # the first output and a message saying so, and where all of them are (not "connect with v2": UDP has
        # no HELLO to ask for a version).
        status, message, result, timings, outputs = outcome
        if outputs is not None:
            message = wire.first_output_note(outputs, "a UDP reply", _ALL_OUTPUTS)
        reply, payload = wire.reply_to(frame.header, status, message, result, timings)
        self._send(peer, reply, payload)

    def _send(self, peer: _Peer, reply: ReplyHeader, payload: bytes | memoryview) -> None:
        if self._sock is None:
            self._counts["replies_dropped"] += 1
            return
        self._replies.append((peer, udp.reply_datagrams(reply, payload, self.options.datagram_bytes)))
        if self._flushing is None and self._loop is not None:
            self._flushing = self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Send the replies made since the last flush (a datagram refused, for a full send buffer or an
        unreachable producer, is counted and lost: UDP does not wait)."""
        if self._flushing is not None:
            self._flushing.cancel()
            self._flushing = None
        replies, self._replies = self._replies, []
        sock = self._sock
        if sock is None:
            self._counts["replies_dropped"] += len(replies)
            return
        sent = failed = 0
        for peer, datagrams in replies:
            # One sendmsg per datagram: for a reply's one to three datagrams, cheaper than building sendmmsg
            # vectors (measured: 17 against 70 us for one datagram, 50 against 262 us for three).
            for parts in datagrams:
                try:
                    sock.sendmsg(parts, (), 0, peer.address)
                except OSError:  # send buffer full, or the producer's host unreachable: UDP does not wait
                    failed += 1
                else:
                    sent += 1
        self._counts["reply_datagrams"] += sent
        self._counts["reply_datagrams_dropped"] += failed


def set_receive_buffer(sock: socket.socket, nbytes: int) -> int:
    """Ask for an ``nbytes`` socket receive buffer: past ``net.core.rmem_max`` where allowed
    (SO_RCVBUFFORCE needs CAP_NET_ADMIN), else up to it. Returns what the kernel granted."""
    force = getattr(socket, "SO_RCVBUFFORCE", None)
    try:
        if force is None:
            raise PermissionError
        sock.setsockopt(socket.SOL_SOCKET, force, nbytes)
    except OSError:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, nbytes)
    granted: int = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    if granted < nbytes:
        log.info("udp: receive buffer is %d bytes (asked for %d; raise net.core.rmem_max for bursts)", granted, nbytes)
    return granted


def _no_wait(slot: Slot) -> None:  # pragma: no cover - a cancelled reservation never delivers
    raise AssertionError("a UDP frame never waits for ring space")
