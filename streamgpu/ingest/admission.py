"""Admission: the one place that decides whether a frame may enter, and who pays for it.

Every listener (TCP today; UDP, raw streams, HTTP, WebSocket next) calls the
same few functions, so every front end applies the same rules:

* ``open_connection`` / ``close_connection``: the ``max_connections`` cap.
* ``authenticate``: a HELLO's token -> a ``Grant`` (identity, priority ceiling).
* ``producer_for``: the unit of fairness and of admission. Without named
  tokens it is the connection; with them, every connection presenting the
  same token shares one ``Producer`` (its ring share, its scheduling turn).
* ``admit``: a frame header -> its deadline, or a ``Refused`` (status and
  message). It checks size, tensor, model, shape, priority ceiling and
  whether the server still accepts frames, and starts the frame's deadline
  at the header's arrival (so time spent waiting for ring space counts).
* ``Producer.reserve`` / ``Producer.reserve_wait``: host ring space for the
  payload, within the producer's share, in arrival order when the ring is
  full (see ``SlotPool``).
* ``submit``: an admitted, complete frame goes to the scheduler.

Each fact has one owner here: frames in the server (``Producer`` and
``Admission`` counters, changed only by ``submit`` and ``Frame.finish``) and
ring bytes held (``Producer.reserve``/``release``).
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from streamgpu.config import Config
from streamgpu.frame import Frame
from streamgpu.ingest.hub import ResultHub
from streamgpu.loops import BusyPoll
from streamgpu.memory import Slot, SlotPool, Waiter
from streamgpu.metrics import NO_MODEL, ReplyCounts
from streamgpu.models.spec import ModelSpec
from streamgpu.protocol import wire
from streamgpu.protocol.wire import FrameHeader, Status

SlotCallback = Callable[[Slot], None]
log = logging.getLogger("streamgpu.ingest")


class Refused(Exception):
    """A frame is not admitted: answer it with ``status`` and ``message``; it costs only that frame."""

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class Grant:
    """What a handshake established: who the producer is and how urgent its frames may be."""

    identity: str | None  # a named token's identity; None: anonymous (one producer per connection)
    max_priority: int


class Reservation:
    """A pending request for ring space (the producer is over its share, or the ring is full).

    The callback gets the slot (on the loop, never inside the code that freed
    the space). ``cancel`` withdraws it at any stage without leaking a slot.
    """

    __slots__ = ("_callback", "_cancelled", "_producer", "_waiter", "nbytes")

    def __init__(self, producer: Producer, nbytes: int, callback: SlotCallback) -> None:
        self._producer = producer
        self.nbytes = nbytes
        self._callback = callback
        self._waiter: Waiter | None = None  # set once past the producer's share, waiting for the pool
        self._cancelled = False

    def cancel(self) -> None:
        if self._cancelled:
            return
        self._cancelled = True
        self._producer._withdraw(self)

    def _deliver(self, slot: Slot) -> None:
        if self._cancelled:  # withdrawn after the grant was scheduled: give the space back
            self._producer.release(slot)
            return
        self._callback(slot)


class Producer:
    """One producer's share of the server: ring bytes held, frames in the server, scheduling turn."""

    def __init__(self, admission: Admission, name: str, max_priority: int, identity: str | None = None) -> None:
        self._admission = admission
        self._pool = admission.pool
        self.name = name
        self.identity = identity  # the named token's identity; None: anonymous (this producer is one connection)
        self.max_priority = max_priority
        self.max_bytes = admission.max_producer_bytes
        self.connections = 0
        self.frames_in_server = 0
        self.bytes_held = 0  # payload bytes of slots held, plus those promised to waiters in the pool
        self._over_share: collections.deque[Reservation] = collections.deque()
        self._in_pool: set[Reservation] = set()

    def __repr__(self) -> str:
        return f"Producer({self.name}, frames={self.frames_in_server}, bytes={self.bytes_held})"

    # -- ring space --------------------------------------------------------------------------

    def reserve(self, nbytes: int, callback: SlotCallback) -> Slot | Reservation:
        """A slot now, or a ``Reservation`` whose ``callback`` gets the slot later.

        A producer always gets at least one frame's space (a frame larger than
        its share is still served, alone); past its share it waits for its own
        frames to leave the ring, so a loud producer cannot take the space a
        quiet one needs. ValueError when ``nbytes`` can never fit the ring.
        """
        if not self._over_share and not self._exceeds_share(nbytes):
            slot = self._pool.reserve(nbytes)
            if slot is not None:
                self.bytes_held += nbytes
                return slot
        reservation = Reservation(self, nbytes, callback)
        if self._over_share or self._exceeds_share(nbytes):
            self._over_share.append(reservation)
        else:
            self._wait_in_pool(reservation)
        return reservation

    async def reserve_wait(self, nbytes: int) -> Slot:
        """Awaitable ``reserve`` for front ends that are not callback-driven (HTTP); cancellation-safe."""
        future: asyncio.Future[Slot] = asyncio.get_running_loop().create_future()

        def granted(slot: Slot) -> None:
            if future.cancelled():
                self.release(slot)
            else:
                future.set_result(slot)

        got = self.reserve(nbytes, granted)
        if isinstance(got, Slot):
            return got
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():  # granted, but the waiter was cancelled before it woke
                self.release(future.result())
            else:
                got.cancel()
            raise

    def release(self, slot: Slot) -> None:
        """Give a slot back to the ring, and let this producer's waiting frames in if now within share."""
        self.bytes_held -= slot.nbytes
        self._pool.release(slot)
        self._admit_over_share()
        self._admission.forget_if_idle(self)

    def _admit_over_share(self) -> None:
        """Move this producer's waiting frames that now fit its share on to wait for the pool."""
        while self._over_share and not self._exceeds_share(self._over_share[0].nbytes):
            self._wait_in_pool(self._over_share.popleft())

    def _exceeds_share(self, nbytes: int) -> bool:
        return self.bytes_held > 0 and self.bytes_held + nbytes > self.max_bytes

    def _wait_in_pool(self, reservation: Reservation) -> None:
        self.bytes_held += reservation.nbytes  # promised: counts against the share while it waits
        self._in_pool.add(reservation)

        def granted(slot: Slot) -> None:
            self._in_pool.discard(reservation)
            reservation._deliver(slot)

        reservation._waiter = self._pool.wait(reservation.nbytes, granted)

    def _withdraw(self, reservation: Reservation) -> None:
        if reservation._waiter is None:
            self._over_share.remove(reservation)
        elif reservation in self._in_pool:  # not granted yet: the pool frees a granted-but-undelivered slot
            self._in_pool.discard(reservation)
            self._pool.cancel(reservation._waiter)
            self.bytes_held -= reservation.nbytes
        else:  # granted, delivery pending: _deliver sees the cancel and releases the slot
            return
        self._admit_over_share()  # what waited behind it, or for the share it held, may go now

    # -- frames --------------------------------------------------------------------------------

    def frame_finished(self, model: str, status: int) -> None:
        self.frames_in_server -= 1
        admission = self._admission
        admission.frames_in_flight -= 1
        admission.replies.count(model, status)
        admission.forget_if_idle(self)

    def frames_finished(self, model: str, status: int, n: int) -> None:
        """``frame_finished`` for ``n`` frames of one batch."""
        self.frames_in_server -= n
        admission = self._admission
        admission.frames_in_flight -= n
        admission.replies.count(model, status, n)
        admission.forget_if_idle(self)

    @property
    def idle(self) -> bool:
        """No connection, no frame in the server, no ring space held or promised."""
        return not (self.connections or self.frames_in_server or self.bytes_held)


class Admission:
    """The admission rules and counters shared by every listener of one server."""

    def __init__(
        self,
        config: Config,
        pool: SlotPool,
        specs: Mapping[str, ModelSpec],
        submit: Callable[[Frame], None],
        submit_many: Callable[[list[Frame]], None] | None = None,
        withdraw: Callable[[Producer], None] | None = None,
    ) -> None:
        self.config = config
        self.pool = pool
        self.specs = specs
        self._submit = submit
        self._submit_many = submit_many
        self._withdraw = withdraw  # the scheduler's: a closed connection's queued frames answered at once
        self.accepting = True  # False once shutdown began: new frames get SHUTTING_DOWN
        self.connections = 0
        self.frames_in_flight = 0  # submitted and not yet finished, over all producers
        self.max_producer_bytes = config.producer_ring_bytes
        # Every reply, by model and status: frames' outcomes (counted as they finish), and replies a
        # listener gives itself (refused frames, refused handshakes, connection replies) via ``replied``.
        self.replies = ReplyCounts(specs)
        self._named: dict[str, Producer] = {}
        self._tokens = {grant.token: name for name, grant in config.tokens.items()}
        self.stream_results = ResultHub()  # every front end publishes its frames' outcomes here (see ingest.hub)
        # Connections served at once: max_connections, or an ingest worker's share of it
        self.connection_cap = config.max_connections
        # Poked by this process's front ends when they write what will be answered soon (busy_poll_us)
        self.busy_poll = BusyPoll(config.busy_poll_us / 1e6)

    # -- connections and identity -------------------------------------------------------------

    def open_connection(self) -> bool:
        """Count a new connection; False (do not serve it) past ``connection_cap``."""
        if self.connections >= self.connection_cap:
            return False
        self.connections += 1
        return True

    def close_connection(self) -> None:
        self.connections -= 1

    def replied(self, model: str, status: int) -> None:
        """A listener answered without a submitted frame: a refused frame (its header's ``model``), or a
        handshake or connection reply (``NO_MODEL``). Counted in ``replies``."""
        self.replies.count(model, status)

    def refused_handshake(self, peer: str, status: Status, reason: str) -> None:
        """A connection was refused at its handshake (or before it): counted, and one log line saying why."""
        self.replied(NO_MODEL, status)
        fields = {"event": "handshake_refused", "peer": peer, "status": status.name, "reason": reason}
        log.info("refused connection from %s: %s: %s", peer, status.name, reason, extra=fields)

    def authenticate(self, token: str) -> Grant | None:
        """The grant for ``token``, or None when it is refused."""
        presented = token.encode("utf-8", "surrogatepass")  # (an HTTP header's bytes that are not UTF-8: surrogates)
        for known, name in self._tokens.items():
            if hmac.compare_digest(presented, known.encode()):
                return Grant(name, self.config.tokens[name].max_priority)
        if self._tokens and not self.config.auth_token:
            return None
        if self.config.auth_token and not hmac.compare_digest(presented, self.config.auth_token.encode()):
            return None
        return Grant(None, self.config.max_priority)

    def producer_for(self, grant: Grant, label: str) -> Producer:
        """The producer a new connection belongs to (shared by every connection of a named token).

        Raises ``Refused`` (OVERLOADED) when a named token has its ``max_connections`` open already. (An ingest
        worker counts only its own connections, which the scheduling process counted too before it admitted
        them (``ASK`` in ``ingest.channel``): a worker never refuses one admitted.)"""
        if grant.identity is None:
            producer = Producer(self, label, grant.max_priority)
        elif (named := self._named.get(grant.identity)) is not None:
            if why := self._token_full(grant.identity, named):
                raise Refused(Status.OVERLOADED, why)
            producer = named
        else:
            producer = self._named[grant.identity] = Producer(self, grant.identity, grant.max_priority, grant.identity)
        producer.connections += 1
        return producer

    def _token_full(self, name: str, producer: Producer) -> str | None:
        cap = self.config.tokens[name].max_connections
        if not cap or producer.connections < cap:
            return None
        return f"too many connections of token {name!r} (its max_connections is {cap})"

    def leave(self, producer: Producer, queued: bool = True) -> None:
        """A connection of ``producer`` closed: its frames still queued are answered now (they hold ring space).

        ``queued=False``: the front end knows none of this connection's frames is in the server (every one
        answered), so nothing is withdrawn. A named token's other connections may hold thousands of queued
        frames, and looking for this one's among them costs the loop ~0.15 us a frame.
        """
        producer.connections -= 1
        if queued and self._withdraw is not None:
            self._withdraw(producer)
        self.forget_if_idle(producer)

    def forget_if_idle(self, producer: Producer) -> None:
        """Drop a named producer once nothing of it is left: while its frames still hold ring space or
        wait for the GPU, a reconnecting token gets the same producer (the same share), not a fresh one."""
        if producer.idle and self._named.get(producer.name) is producer:
            del self._named[producer.name]

    def limits(self, producer: Producer) -> wire.Limits:
        """What a v2 WELCOME announces to a connection of ``producer``."""
        cfg = self.config
        return wire.Limits(
            max_frames_in_flight=cfg.max_frames_per_connection,
            max_producer_bytes=producer.max_bytes,
            receive_timeout_ms=int(cfg.receive_timeout_s * 1000),
            min_receive_rate=cfg.min_receive_rate,
            max_priority=producer.max_priority,
        )

    # -- frames ---------------------------------------------------------------------------------

    def admit(self, producer: Producer, header: FrameHeader, received_ns: int) -> int:
        """The frame's deadline (perf_counter ns, 0 = none) if it may enter; raises ``Refused`` if not."""
        cfg = self.config
        if header.payload_len > cfg.max_payload_bytes:
            raise Refused(Status.TOO_LARGE, f"payload of {header.payload_len} bytes exceeds {cfg.max_payload_bytes}")
        if (why := header.check_tensor()) is not None:
            raise Refused(Status.BAD_FRAME, why)
        spec = self.specs.get(header.model)
        if spec is None:
            raise Refused(Status.UNKNOWN_MODEL, f"no model named {header.model!r}")
        if (why := spec.check_frame(header)) is not None:
            raise Refused(Status.BAD_FRAME, why)
        if header.priority > producer.max_priority:
            raise Refused(
                Status.UNAUTHORIZED,
                f"priority {header.priority} exceeds this connection's ceiling {producer.max_priority}"
                " (a token that allows it is needed)",
            )
        if not self.accepting:
            raise Refused(Status.SHUTTING_DOWN, "server is shutting down")
        if header.deadline_us:
            return received_ns + header.deadline_us * 1000
        if spec.default_deadline_ms:
            return received_ns + int(spec.default_deadline_ms * 1e6)
        return 0

    def payload_budget_s(self, nbytes: int) -> float:
        """How long a payload of ``nbytes`` may take to arrive once its space is reserved."""
        return self.config.receive_timeout_s + nbytes / self.config.min_receive_rate

    def submit(self, frame: Frame) -> None:
        """A complete, admitted frame enters the scheduler (which answers it, one way or another)."""
        frame.producer.frames_in_server += 1
        self.frames_in_flight += 1
        self._submit(frame)

    def submit_many(self, frames: list[Frame]) -> None:
        """``submit`` for frames that arrived together (an ingest channel's read): one scheduling pass."""
        for frame in frames:
            frame.producer.frames_in_server += 1
        self.frames_in_flight += len(frames)
        if self._submit_many is not None:
            self._submit_many(frames)
        else:
            for frame in frames:
                self._submit(frame)
