"""A model's waiting frames: priority levels, and round-robin across producers within a level.

High-priority frames always leave before lower ones; inside a level, each
producer (a connection, or a token's identity: see ``ingest.admission``) gets
a turn in rotation, whatever number of stream ids it spreads its frames over,
so one hot producer cannot starve the others. Within a producer, frames
leave in arrival order. The structure holds nothing per producer once that
producer's frames are gone.
"""

from __future__ import annotations

import collections
from collections.abc import Hashable, Iterator

from streamgpu.frame import Frame
from streamgpu.ingest.admission import Producer


class FairQueue:
    """Frames of one model, by priority (higher first), then round-robin by producer, then FIFO."""

    def __init__(self) -> None:
        # priority -> producer -> frames; the OrderedDict's order is the rotation
        self._levels: dict[int, collections.OrderedDict[Producer, collections.deque[Frame]]] = {}
        self._per_producer: collections.Counter[Producer] = collections.Counter()
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def __bool__(self) -> bool:
        return self._len > 0

    def __iter__(self) -> Iterator[Frame]:
        for level in self._levels.values():
            for frames in level.values():
                yield from frames

    def push(self, frame: Frame) -> None:
        level = self._levels.setdefault(frame.header.priority, collections.OrderedDict())
        level.setdefault(frame.producer, collections.deque()).append(frame)
        self._per_producer[frame.producer] += 1
        self._len += 1

    def remove(self, frame: Frame) -> None:
        level = self._levels[frame.header.priority]
        frames = level[frame.producer]
        frames.remove(frame)
        self._forget(frame.producer, level, frame.header.priority, frames)

    def stream_frames(self, producer: Producer, stream: Hashable) -> list[Frame]:
        """Every queued frame of one stream (any priority)."""
        return [f for level in self._levels.values() for f in level.get(producer, ()) if f.stream == stream]

    def queued_by(self, producer: Producer) -> int:
        return self._per_producer[producer]

    @property
    def producers(self) -> int:
        """Producers with frames in this queue."""
        return len(self._per_producer)

    def loudest(self) -> Producer | None:
        """The producer with the most queued frames."""
        most = self._per_producer.most_common(1)
        return most[0][0] if most else None

    def newest_of(self, producer: Producer) -> Frame:
        """``producer``'s most recently queued frame at its lowest priority (the cheapest to refuse)."""
        priority = min(p for p, level in self._levels.items() if producer in level)
        return self._levels[priority][producer][-1]

    def pop_batch(self, n: int) -> list[Frame]:
        """Up to ``n`` frames: highest priority first, one per producer in rotation within a level."""
        batch: list[Frame] = []
        for priority in sorted(self._levels, reverse=True):
            level = self._levels[priority]
            while level and len(batch) < n:
                producer, frames = next(iter(level.items()))
                batch.append(frames.popleft())
                if frames:
                    level.move_to_end(producer)  # this producer had its turn
                self._forget(producer, level, priority, frames)
            if len(batch) == n:
                break
        return batch

    def oldest(self) -> Frame | None:
        """The frame that has waited longest (by completion time), any priority."""
        heads = (frames[0] for level in self._levels.values() for frames in level.values())
        return min(heads, key=lambda f: f.complete_ns, default=None)

    def _forget(
        self,
        producer: Producer,
        level: collections.OrderedDict[Producer, collections.deque[Frame]],
        priority: int,
        frames: collections.deque[Frame],
    ) -> None:
        """Bookkeeping after one of ``producer``'s frames left ``frames`` (its deque at ``priority``)."""
        self._len -= 1
        self._per_producer[producer] -= 1
        if not self._per_producer[producer]:
            del self._per_producer[producer]
        if not frames:
            del level[producer]
            if not level:
                del self._levels[priority]
