"""Transports: how frames reach a server. Plug-ins are chosen by name.

A transport turns ``(host, port)`` into a :class:`Connection` whose
``submit()`` sends one frame and returns a future of its reply. The ``tcp``
transport (the wire protocol through :mod:`streamgpu.client`) and the
``udp`` one (chunked datagrams, with ``--loss``) are built in, and so are
``http`` and ``ws`` (:mod:`streamgpu.loadgen.web_transports`); raw frames
and others register here as they land, either by calling
:func:`register_transport` or through the ``streamgpu.loadgen.transports``
entry-point group (an entry point names a zero-argument factory of a Transport).
Entry points are what spawned ``--processes`` workers see, so out-of-tree
transports should use them.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol, cast

import numpy as np

from streamgpu.loadgen.errors import UsageError
from streamgpu.protocol.wire import Status, Timings

ENTRY_POINT_GROUP = "streamgpu.loadgen.transports"


class ReplyLike(Protocol):
    """What the generator reads from a reply (``streamgpu.client.Reply`` has it)."""

    @property
    def status(self) -> int: ...  # a wire.Status value

    @property
    def latency_s(self) -> float: ...  # send to reply, measured by the transport

    @property
    def timings(self) -> Timings: ...

    @property
    def message(self) -> str: ...  # the server's reason for a non-OK status


class Connection(Protocol):
    """One open connection to an endpoint."""

    @property
    def max_payload(self) -> int: ...

    def submit(
        self,
        frame: np.ndarray,
        *,
        stream_id: int = 0,
        model: str = "default",
        deadline: float | None = None,
        priority: int = 0,
        live: bool = False,
    ) -> asyncio.Future[ReplyLike]:
        """Send ``frame`` now (no await) and return the future of its reply."""
        ...

    async def close(self) -> None: ...


class Transport(ABC):
    """A way to reach a server; one instance may open many connections."""

    name: str = ""

    @abstractmethod
    async def connect(self, host: str, port: int, *, token: str = "", timeout: float = 10.0) -> Connection:
        """Open and handshake one connection; raise ConnectionError (or OSError) on failure."""

    def configure(self, *, loss: float = 0.0) -> None:
        """Options from the command line; UsageError for one this transport does not take."""
        if loss:
            raise UsageError(f"--loss needs a datagram transport (udp); {self.name!r} does not drop anything")


class TcpTransport(Transport):
    """Wire protocol v1 over TCP, through the project client library."""

    name = "tcp"

    async def connect(self, host: str, port: int, *, token: str = "", timeout: float = 10.0) -> Connection:
        # Imported here so the generator's CLI and tests of other parts load without the client.
        from streamgpu import client

        conn = await client.connect(host, port, token=token, timeout=timeout)
        return cast(Connection, conn)


class _Lost(NamedTuple):
    """A frame that got no reply at all over UDP (every datagram, or the reply, lost): counted INCOMPLETE."""

    latency_s: float
    message: str
    status: int = int(Status.INCOMPLETE)
    timings: Timings = Timings()


class _UdpConnection:
    """A ``streamgpu.client.UdpConnection`` whose frames without any reply count as INCOMPLETE, not as
    a transport failure (which would end the run): over UDP that is loss, and --loss asks for loss."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self.max_payload: int = conn.max_payload

    @property
    def unmatched_replies(self) -> int:
        return int(self._conn.unmatched_replies)

    def submit(self, frame: np.ndarray, **kwargs: Any) -> asyncio.Future[ReplyLike]:
        inner = self._conn.submit(frame, **kwargs)
        out: asyncio.Future[ReplyLike] = asyncio.get_running_loop().create_future()
        sent = time.perf_counter()

        def done(fut: asyncio.Future[Any]) -> None:
            if out.done():
                return
            if fut.cancelled():
                out.cancel()
            elif isinstance(exc := fut.exception(), TimeoutError):
                out.set_result(_Lost(time.perf_counter() - sent, f"no reply: {exc}"))
            elif exc is not None:
                out.set_exception(exc)
            else:
                out.set_result(fut.result())

        inner.add_done_callback(done)
        return out

    async def close(self) -> None:
        await self._conn.close()


class UdpTransport(Transport):
    """Frames over UDP in chunks (docs/PROTOCOL.md section 11), through ``streamgpu.client.connect_udp``.

    ``--loss FRACTION`` drops that fraction of datagrams on the sending side.
    There is no handshake, so no token: the server's allow list decides.
    """

    name = "udp"
    REPLY_TIMEOUT_S = 5.0

    def __init__(self) -> None:
        self.loss = 0.0

    def configure(self, *, loss: float = 0.0) -> None:
        if not 0 <= loss < 1:
            raise UsageError(f"--loss must be a fraction in [0, 1), got {loss}")
        self.loss = loss

    async def connect(self, host: str, port: int, *, token: str = "", timeout: float = 10.0) -> Connection:
        from streamgpu import client

        if token:
            raise UsageError("the udp transport has no handshake, so no --token (the server's allow list decides)")
        conn = await client.connect_udp(host, port, loss=self.loss, reply_timeout=self.REPLY_TIMEOUT_S)
        return cast(Connection, _UdpConnection(conn))


def _http_transport() -> Transport:
    from streamgpu.loadgen.web_transports import HttpTransport  # aiohttp only when asked for

    return HttpTransport()


def _ws_transport() -> Transport:
    from streamgpu.loadgen.web_transports import WsTransport

    return WsTransport()


_REGISTRY: dict[str, Callable[[], Transport]] = {
    "tcp": TcpTransport, "udp": UdpTransport, "http": _http_transport, "ws": _ws_transport,
}  # fmt: skip
_entry_points_loaded = False


def register_transport(name: str, factory: Callable[[], Transport]) -> None:
    """Make a transport available as ``--transport NAME`` (a later registration wins)."""
    _REGISTRY[name] = factory


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        _REGISTRY.setdefault(ep.name, ep.load())


def transport_names() -> list[str]:
    """Names of all registered transports, sorted."""
    _load_entry_points()
    return sorted(_REGISTRY)


def get_transport(name: str) -> Transport:
    """A new transport instance by name; UsageError for an unknown name."""
    _load_entry_points()
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise UsageError(f"unknown transport {name!r}; available: {', '.join(transport_names())}") from None
    return factory()
