"""Per-stream reply ordering: replies leave in the order their frames arrived on that stream."""

from __future__ import annotations

import collections
from collections.abc import Sequence

Parts = Sequence["bytes | memoryview"]


class Ticket:
    """A frame's place in its stream's reply queue."""

    __slots__ = ("parts", "stream_id")

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id
        self.parts: Parts | None = None


class ReplyOrder:
    """Holds finished replies until every earlier frame of the same stream is answered.

    Streams are independent: a slow frame on one stream never holds back another.
    """

    def __init__(self) -> None:
        self._streams: dict[int, collections.deque[Ticket]] = {}
        self._held = 0  # tickets not yet written: frames in the server plus replies held back

    def __len__(self) -> int:
        return self._held

    def expect(self, stream_id: int) -> Ticket:
        """Reserve the next place in ``stream_id``'s reply order."""
        ticket = Ticket(stream_id)
        self._streams.setdefault(stream_id, collections.deque()).append(ticket)
        self._held += 1
        return ticket

    def complete(self, ticket: Ticket, parts: Parts) -> list[bytes | memoryview]:
        """Record a finished reply; return every reply now ready to write, in order."""
        if ticket.parts is not None:
            raise RuntimeError(f"reply for stream {ticket.stream_id} completed twice")
        ticket.parts = parts
        queue = self._streams[ticket.stream_id]
        ready: list[bytes | memoryview] = []
        while queue and queue[0].parts is not None:
            ready.extend(queue.popleft().parts or ())
            self._held -= 1
        if not queue:
            del self._streams[ticket.stream_id]  # bounded by streams with frames outstanding
        return ready
