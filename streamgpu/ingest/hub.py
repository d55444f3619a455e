"""Publish/subscribe of frame outcomes by stream id: the one path every result takes to its watchers.

One ``ResultHub`` per server, owned by its ``Admission`` (``admission.stream_results``), so every
listener reaches it the way it reaches the admission rules. Every front end that takes streams
(TCP, ingest workers, raw ports, WebSocket producers) calls ``publish(header, outcome, origin)``
once per frame it answers (a result or a refusal), beside its own reply if it has one. Watchers:

* ``subscribe(stream_id, callback)``: ``callback(header, outcome)`` for every outcome published
  for that stream id, from any front end, as it is made (a WebSocket subscriber, a test, an
  embedding application);
* ``tap(callback)``: ``callback(header, outcome, origin)`` for every outcome of every stream id
  (the JSON-lines results sink, ``streamgpu.results.Results.attach``). A tap watches every id
  while it is attached, so a watcher attaches one only while it wants outcomes and cancels it
  when it stops (the results sink taps only while a file or a results-port subscriber takes
  lines): ``watched`` then tells front ends the truth, and they skip building outcomes.

Stream ids are one namespace here: two producers that both send stream 7 feed the same
subscribers. A raw port publishes under its listener's ``stream_id`` (by default its port
number). ``publish`` costs one dictionary lookup and one truthiness test while nobody watches.
Callbacks run on the loop, inside the publishing front end's reply path: they must be quick
and must not raise (an exception is logged and that subscription ended), and they must copy
what they keep (``outcome.result`` may be a view of a buffer reused after the call). A watcher
that sends the outcome in some wire format gets it from ``encoded(encode, header, outcome)``:
made once per publication and format, and the same object handed to every watcher that asks
(sixteen WebSocket subscribers of one stream cost one encoding of each result, not sixteen); a
publisher that encoded its own reply in that format hands it over (``publish(..., encoded=...)``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar, cast

from streamgpu.frame import Outcome
from streamgpu.protocol.wire import FrameHeader

log = logging.getLogger(__name__)


class Origin(NamedTuple):
    """Who published an outcome: the front end (``source``: "tcp", "ws", "raw", ...) and the producer's
    own stream name (``stream``: "raw:9000/3", "tcp:12", ...). One per connection, made once."""

    source: str = ""
    stream: str = ""


UNNAMED = Origin()
Watcher = Callable[[FrameHeader, Outcome], None]
Tap = Callable[[FrameHeader, Outcome, Origin], None]
# An encoding a publisher made of its own reply: (encode, encode(header, outcome)), for ``publish``.
Encoded = tuple[Callable[[FrameHeader, Outcome], Any], Any]
T = TypeVar("T")


class Subscription:
    """One watcher of one stream id (``stream_id`` None: a tap of every id); ``cancel()`` ends it (idempotent)."""

    __slots__ = ("_hub", "callback", "stream_id")

    def __init__(self, hub: ResultHub, stream_id: int | None, callback: Watcher | Tap) -> None:
        self._hub = hub
        self.stream_id = stream_id
        self.callback = callback

    def cancel(self) -> None:
        self._hub._remove(self)


class ResultHub:
    """Outcomes by stream id, to whoever subscribed to that id, and to every tap."""

    def __init__(self) -> None:
        self._watchers: dict[int, list[Subscription]] = {}
        self._taps: list[Subscription] = []
        self.published = 0  # outcomes published (watched or not)
        # The publication under way, and its encodings by encoder (``encoded``); None between publications, so
        # nothing of an outcome (a result may be a view of a reused buffer) is kept past its publication.
        self._current: tuple[FrameHeader, Outcome, dict[Callable[..., Any], Any]] | None = None

    def subscribe(self, stream_id: int, callback: Watcher) -> Subscription:
        """Call ``callback(header, outcome)`` for every outcome published for ``stream_id`` from now on."""
        subscription = Subscription(self, stream_id, callback)
        self._watchers.setdefault(stream_id, []).append(subscription)
        return subscription

    def tap(self, callback: Tap) -> Subscription:
        """Call ``callback(header, outcome, origin)`` for every outcome published from now on, any stream id."""
        subscription = Subscription(self, None, callback)
        self._taps.append(subscription)
        return subscription

    def publish(
        self, header: FrameHeader, outcome: Outcome, origin: Origin = UNNAMED, encoded: Encoded | None = None
    ) -> None:
        """A frame of stream ``header.stream_id`` ended with ``outcome``: tell its subscribers and the taps.

        ``encoded``: ``(encode, encode(header, outcome))``, an encoding the publisher made for its own reply;
        watchers that ask ``encoded`` with the same ``encode`` get that object instead of encoding it again."""
        self.published += 1
        watchers = self._watchers.get(header.stream_id)
        if not watchers and not self._taps:
            return
        made = {encoded[0]: encoded[1]} if encoded is not None else {}
        outer, self._current = self._current, (header, outcome, made)  # (a watcher may publish in turn)
        try:
            for subscription in list(watchers or ()):
                self._call(subscription, header, outcome, origin)
            for subscription in list(self._taps):
                self._call(subscription, header, outcome, origin)
        finally:
            self._current = outer

    def encoded(self, encode: Callable[[FrameHeader, Outcome], T], header: FrameHeader, outcome: Outcome) -> T:
        """``encode(header, outcome)``, made once per publication of this outcome: every watcher that asks with the
        same ``encode`` (one per wire format) gets the same object. Outside its publication, encoded afresh."""
        current = self._current
        if current is None or current[0] is not header or current[1] is not outcome:
            return encode(header, outcome)
        made = current[2]
        if encode not in made:
            made[encode] = encode(header, outcome)
        return cast(T, made[encode])

    def _call(self, subscription: Subscription, header: FrameHeader, outcome: Outcome, origin: Origin) -> None:
        try:
            if subscription.stream_id is None:
                subscription.callback(header, outcome, origin)  # type: ignore[call-arg]
            else:
                subscription.callback(header, outcome)  # type: ignore[call-arg]
        except Exception:  # one broken watcher must not cost the producer its reply
            log.exception("result subscriber of stream %d failed; unsubscribed", header.stream_id)
            subscription.cancel()

    @property
    def watching(self) -> bool:
        """Whether any publication would reach anyone now (``watched`` is false for every stream id if not)."""
        return bool(self._taps or self._watchers)

    def watched(self, stream_id: int) -> bool:
        """Whether a publication for ``stream_id`` would reach anyone (a subscriber of it, or a tap): a
        front end that finishes many frames at once skips building their ``Outcome``s when not. Taps
        are attached only while they want outcomes (module docstring), so this is false for a results
        port nobody reads."""
        return bool(self._taps) or stream_id in self._watchers

    def subscribers(self, stream_id: int) -> int:
        """How many subscriptions ``stream_id`` has."""
        return len(self._watchers.get(stream_id, ()))

    def _remove(self, subscription: Subscription) -> None:
        if subscription.stream_id is None:
            if subscription in self._taps:
                self._taps.remove(subscription)
            return
        watchers = self._watchers.get(subscription.stream_id)
        if watchers and subscription in watchers:
            watchers.remove(subscription)
            if not watchers:
                del self._watchers[subscription.stream_id]
