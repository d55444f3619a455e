"""The ``Listener`` interface: one front end that turns network input into frames.

Shaped after aiohttp's ``web_runner`` sites: the server owns a list of
listeners built from ``Config.listeners`` through the registry in
``streamgpu.ingest``; each listener owns its sockets and connections, calls
``Admission`` for every decision about a frame, and encodes ``Outcome``s in
its own wire format. A new front end is one module plus one registry line.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any, ClassVar

from streamgpu.config import ListenerSpec
from streamgpu.ingest.admission import Admission

if TYPE_CHECKING:
    from streamgpu.server import Server


class Listener(abc.ABC):
    """One front end of a server: start, stop accepting, close, and a periodic sweep."""

    kind: ClassVar[str]
    # The server this listener belongs to, set by ``Server`` before ``start()``: a front end that
    # serves more than frames (HTTP: health, model metadata) reads it; frame paths use ``admission``.
    server: Server | None = None

    def __init__(self, spec: ListenerSpec, admission: Admission) -> None:
        self.spec = spec
        self.admission = admission

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

    @abc.abstractmethod
    async def close(self, timeout: float) -> None:
        """Shutdown, step 2: flush replies for up to ``timeout`` seconds, then drop what is left."""

    @abc.abstractmethod
    def sweep(self, now: float) -> None:
        """Periodic housekeeping (``now`` is ``time.monotonic()``): handshake and payload time limits."""

    @abc.abstractmethod
    def stats(self) -> dict[str, Any]:
        """Connection counts and the like, for ``Server.metrics()``."""
