"""The ``Listener`` interface: one front end that turns network input into frames.

Shaped after aiohttp's ``web_runner`` sites: the server owns a list of
listeners built from ``Config.listeners`` through the registry in
``streamgpu.ingest``; each listener owns its sockets and connections, calls
``Admission`` for every decision about a frame, and encodes ``Outcome``s in
its own wire format. A new front end is one module plus one registry line.
"""

from __future__ import annotations

import abc
import asyncio
import itertools
import socket
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar

from streamgpu.config import ListenerSpec
from streamgpu.errors import BindError
from streamgpu.ingest.admission import Admission
from streamgpu.protocol.wire import Status

if TYPE_CHECKING:
    from streamgpu.server import Server

# Numbers of connections (TCP, raw) and UDP producers: unique in the process, so that logs, stream keys
# and an ingest worker's descriptor channel (which names them by it) never confuse two of them.
connection_ids = itertools.count(1)


class Listener(abc.ABC):
    """One front end of a server: start, stop accepting, close, and a periodic sweep."""

    kind: ClassVar[str]
    socket_type: ClassVar[int] = socket.SOCK_STREAM  # what ``check_bind`` probes
    # The server this listener belongs to, set by ``Server`` before ``start()``: a front end that
    # serves more than frames (HTTP: health, model metadata) reads it; frame paths use ``admission``.
    server: Server | None = None

    def __init__(self, spec: ListenerSpec, admission: Admission) -> None:
        self.spec = spec
        self.admission = admission

    @classmethod
    def check_bind(cls, spec: ListenerSpec) -> None:
        """Fail early, naming the address, when ``spec``'s address cannot be bound (probes a bind of
        ``socket_type``). ``start`` may still fail on a race."""
        try:
            infos = socket.getaddrinfo(spec.host, spec.port, type=cls.socket_type, flags=socket.AI_PASSIVE)
        except OSError as exc:
            raise BindError(f"cannot bind {cls.kind} listener to {spec.host}:{spec.port}: {exc}") from None
        for family, kind, proto, _, address in infos:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio's create_server does
                try:
                    probe.bind(address)
                except OSError as exc:
                    raise BindError(
                        f"cannot bind {cls.kind} listener to {spec.host}:{spec.port}: {exc.strerror or exc}"
                    ) from None

    @abc.abstractmethod
    async def start(self) -> None:
        """Bind and start accepting input."""

    @property
    @abc.abstractmethod
    def addresses(self) -> list[tuple[str, int]]:
        """(host, port) of every bound socket (port 0 in the config picks a free one)."""

    @abc.abstractmethod
    def stop_accepting(self) -> None:
        """Shutdown, step 1: accept no new connections and read no new frames.

        Frames already partly received are answered SHUTTING_DOWN; frames already
        submitted are left to the scheduler, whose outcomes still reach their producers.
        """

    async def submitted(self) -> None:
        """After ``stop_accepting``: until every frame taken before it is submitted to the scheduler. At
        once here (frames are submitted as they are taken); not so where they come from other processes."""
        return

    async def models_changed(self) -> None:
        """The models served changed (``admission.specs``): once this returns, frames are admitted by the new
        list. At once here (admission reads it as frames come); not so where other processes admit them."""
        return

    @property
    def connections_elsewhere(self) -> int:
        """Its connections open now that ``admission`` does not count (``Server.connections`` adds them): none
        here; those of other processes' admissions (ingest workers'), as last reported."""
        return 0

    @property
    def ring_lent_free(self) -> int:
        """Bytes of ``admission.pool`` it reserved for other processes that no frame holds there
        (``Server.ring_used_bytes`` leaves them out): none here; ingest workers' free bytes."""
        return 0

    @abc.abstractmethod
    async def close(self, timeout: float) -> None:
        """Shutdown, step 2: flush replies for up to ``timeout`` seconds, then drop what is left."""

    @abc.abstractmethod
    def sweep(self, now: float) -> None:
        """Periodic housekeeping (``now`` is ``time.monotonic()``): handshake and payload time limits."""

    @abc.abstractmethod
    def stats(self) -> dict[str, Any]:
        """Connection counts and the like, for ``Server.metrics()``."""


class StreamConnection(Protocol):
    """What ``SocketListener`` needs of its connections (one per accepted stream socket)."""

    def stop_reading(self) -> None: ...

    def close(self) -> None: ...

    def abort(self, status: Status, message: str) -> None: ...

    def sweep(self, now: float) -> None: ...


C = TypeVar("C", bound=StreamConnection)


def write_eof_or_abort(transport: asyncio.WriteTransport) -> bool:
    """Shut our side for writing after what is queued (the peer reads it, then end of stream). False, and the
    transport aborted, if the peer reset it already: asyncio then shuts the socket at once, which raises
    ENOTCONN."""
    try:
        transport.write_eof()
    except OSError:
        transport.abort()
        return False
    return True


def peer_name(transport: asyncio.BaseTransport) -> str:
    """``host:port`` of a stream transport's other end, for logs and refusal lines."""
    peer = transport.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)


class SocketListener(Listener, Generic[C]):
    """A listener on one stream-socket address whose connections are ``C`` protocols.

    Owns the accept socket, the set of open connections and their place under
    ``max_connections`` (``connection_opened``/``connection_closed``), and the
    shutdown steps; a subclass makes the protocol (``make_connection``).
    """

    def __init__(self, spec: ListenerSpec, admission: Admission, handed_over: bool = False) -> None:
        super().__init__(spec, admission)
        # True: binds nothing; its connections are accepted elsewhere and handed to ``adopt`` (an ingest
        # worker's, by its scheduling process)
        self._handed_over = handed_over
        self._accepting = True
        self._server: asyncio.Server | None = None
        self._connections: set[C] = set()
        self._refused = 0

    @abc.abstractmethod
    def make_connection(self) -> C:
        """A protocol instance for one accepted socket."""

    async def start(self) -> None:
        if not self._handed_over:
            loop = asyncio.get_running_loop()
            self._server = await loop.create_server(self.make_connection, self.spec.host, self.spec.port)  # type: ignore[arg-type]

    async def adopt(self, sock: socket.socket) -> None:
        """Serve ``sock``, a connection accepted by another process and handed over; closed at once after
        ``stop_accepting``, as the listening socket would have refused it."""
        if not self._accepting:
            sock.close()
            return
        try:
            await asyncio.get_running_loop().connect_accepted_socket(self.make_connection, sock=sock)  # type: ignore[type-var]
        except OSError:  # (the producer is gone already: nothing to serve)
            sock.close()

    @property
    def addresses(self) -> list[tuple[str, int]]:
        if self._server is None:
            return []
        return [s.getsockname()[:2] for s in self._server.sockets]

    def connection_opened(self, conn: C) -> bool:
        """Count ``conn`` under ``max_connections``; False (refuse it) when no place is left."""
        if not self.admission.open_connection():
            self._refused += 1
            return False
        self._connections.add(conn)
        return True

    def connection_closed(self, conn: C) -> None:
        if conn in self._connections:
            self._connections.discard(conn)
            self.admission.close_connection()

    def stop_accepting(self) -> None:
        self._accepting = False
        if self._server is not None:
            self._server.close()
        for conn in list(self._connections):
            conn.stop_reading()

    async def close(self, timeout: float) -> None:
        for conn in list(self._connections):
            conn.close()  # flushes what is owed first
        loop = asyncio.get_running_loop()
        give_up = loop.time() + timeout
        while self._connections and loop.time() < give_up:  # a producer that reads nothing cannot hold us
            await asyncio.sleep(0.01)
        for conn in list(self._connections):
            conn.abort(Status.SHUTTING_DOWN, "server is shutting down")
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def sweep(self, now: float) -> None:
        for conn in list(self._connections):
            conn.sweep(now)

    def stats(self) -> dict[str, Any]:
        return {"kind": self.kind, "connections": len(self._connections), "refused_connections": self._refused}
