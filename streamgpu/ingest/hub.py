"""Publish/subscribe of frame outcomes by stream id: the seam between producers and watchers.

One ``ResultHub`` per server, owned by its ``Admission`` (``admission.stream_results``), so every
listener reaches it the way it reaches the admission rules. A front end that answers frames
(TCP, WebSocket; raw streams and others next) calls ``publish(header, outcome)`` once per
finished frame, beside its own reply; a watcher (a WebSocket subscriber, a test, an embedding
application) calls ``subscribe(stream_id, callback)`` and gets every outcome published for that
stream id, from any front end, as it is made.

Stream ids are one namespace here: two producers that both send stream 7 feed the same
subscribers. ``publish`` costs one dictionary lookup while nobody watches the stream id.
Callbacks run on the loop, inside the publishing front end's reply path: they must be quick
and must not raise (an exception is logged and that subscription ended), and they must copy
what they keep (``outcome.result`` may be a view of a buffer reused after the call).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from streamgpu.frame import Outcome
from streamgpu.protocol.wire import FrameHeader

log = logging.getLogger(__name__)

Watcher = Callable[[FrameHeader, Outcome], None]


class Subscription:
    """One watcher of one stream id; ``cancel()`` ends it (idempotent)."""

    __slots__ = ("_hub", "callback", "stream_id")

    def __init__(self, hub: ResultHub, stream_id: int, callback: Watcher) -> None:
        self._hub = hub
        self.stream_id = stream_id
        self.callback = callback

    def cancel(self) -> None:
        self._hub._remove(self)


class ResultHub:
    """Outcomes by stream id, to whoever subscribed to that id."""

    def __init__(self) -> None:
        self._watchers: dict[int, list[Subscription]] = {}

    def subscribe(self, stream_id: int, callback: Watcher) -> Subscription:
        """Call ``callback(header, outcome)`` for every outcome published for ``stream_id`` from now on."""
        subscription = Subscription(self, stream_id, callback)
        self._watchers.setdefault(stream_id, []).append(subscription)
        return subscription

    def publish(self, header: FrameHeader, outcome: Outcome) -> None:
        """A frame of stream ``header.stream_id`` finished with ``outcome``: tell its subscribers."""
        watchers = self._watchers.get(header.stream_id)
        if not watchers:
            return
        for subscription in list(watchers):
            try:
                subscription.callback(header, outcome)
            except Exception:  # one broken watcher must not cost the producer its reply
                log.exception("result subscriber of stream %d failed; unsubscribed", header.stream_id)
                subscription.cancel()

    def subscribers(self, stream_id: int) -> int:
        """How many subscriptions ``stream_id`` has."""
        return len(self._watchers.get(stream_id, ()))

    def _remove(self, subscription: Subscription) -> None:
        watchers = self._watchers.get(subscription.stream_id)
        if watchers and subscription in watchers:
            watchers.remove(subscription)
            if not watchers:
                del self._watchers[subscription.stream_id]
