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
from collections.abc import Callable, Hashable, Iterator

from streamgpu.frame import Frame
from streamgpu.ingest.admission import Producer


class FairQueue:
    """Frames of one model, by priority (higher first), then round-robin by producer, then FIFO."""

    def __init__(self) -> None:
        # priority -> producer -> frames; the OrderedDict's order is the rotation
        self._levels: dict[int, collections.OrderedDict[Producer, collections.deque[Frame]]] = {}
        # frames queued per producer (a plain dict: its insertion order breaks ties in ``loudest``)
        self._per_producer: dict[Producer, int] = {}
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
        producer = frame.producer
        level = self._levels.get(frame.header.priority)
        if level is None:
            level = self._levels[frame.header.priority] = collections.OrderedDict()
        frames = level.get(producer)
        if frames is None:
            frames = level[producer] = collections.deque()
        frames.append(frame)
        per = self._per_producer
        per[producer] = per.get(producer, 0) + 1
        self._len += 1

    def push_many(self, frames: list[Frame]) -> None:
        """``push`` each of ``frames``, in order (one call for a read's worth)."""
        levels, per = self._levels, self._per_producer
        for frame in frames:
            producer = frame.producer
            level = levels.get(frame.header.priority)
            if level is None:
                level = levels[frame.header.priority] = collections.OrderedDict()
            queued = level.get(producer)
            if queued is None:
                queued = level[producer] = collections.deque()
            queued.append(frame)
            per[producer] = per.get(producer, 0) + 1
        self._len += len(frames)

    def remove(self, frame: Frame) -> None:
        level = self._levels[frame.header.priority]
        frames = level[frame.producer]
        frames.remove(frame)
        self._forget(frame.producer, 1)
        if not frames:
            self._drop(level, frame.header.priority, frame.producer)

    def withdraw(self, producer: Producer, gone: Callable[[Frame], bool]) -> list[Frame]:
        """Take out ``producer``'s queued frames for which ``gone(frame)`` holds (any priority); the others
        keep their order and ``producer`` its place in the rotation."""
        taken: list[Frame] = []
        if producer not in self._per_producer:  # every closed connection asks: not a look-up per priority level
            return taken
        for priority, level in list(self._levels.items()):
            frames = level.get(producer)
            if frames is None:
                continue
            here: list[Frame] = []
            kept: collections.deque[Frame] = collections.deque()
            for frame in frames:
                (here if gone(frame) else kept).append(frame)
            if not here:
                continue
            taken += here
            self._forget(producer, len(here))
            if kept:
                level[producer] = kept  # (an existing key: its place in the rotation stays)
            else:
                self._drop(level, priority, producer)
        return taken

    def stream_frames(self, producer: Producer, stream: Hashable) -> list[Frame]:
        """Every queued frame of one stream (any priority)."""
        return [f for level in self._levels.values() for f in level.get(producer, ()) if f.stream == stream]

    def queued_by(self, producer: Producer) -> int:
        return self._per_producer.get(producer, 0)

    @property
    def producers(self) -> int:
        """Producers with frames in this queue."""
        return len(self._per_producer)

    def loudest(self) -> Producer | None:
        """The producer with the most queued frames (the first queued of those tied)."""
        per = self._per_producer
        return max(per, key=per.__getitem__) if per else None

    def newest_of(self, producer: Producer) -> Frame:
        """``producer``'s most recently queued frame at its lowest priority (the cheapest to refuse)."""
        priority = min(p for p, level in self._levels.items() if producer in level)
        return self._levels[priority][producer][-1]

    def pop_batch(self, n: int) -> list[Frame]:
        """Up to ``n`` frames: highest priority first, one per producer in rotation within a level."""
        batch: list[Frame] = []
        take = batch.append
        levels = self._levels
        for priority in sorted(levels, reverse=True) if len(levels) > 1 else list(levels):
            level = levels[priority]
            while level and len(batch) < n:
                need = n - len(batch)
                turns = list(level.items())
                if len(turns) == 1:  # one producer: its oldest frames, in order
                    producer, frames = turns[0]
                    k = min(need, len(frames))
                    for _ in range(k):
                        take(frames.popleft())
                    self._forget(producer, k)
                    if not frames:
                        self._drop(level, priority, producer)
                elif len(turns) <= need:
                    # Whole rounds: every producer takes a turn, so the rotation order is unchanged;
                    # as many rounds as the shortest queue and the batch allow, without reordering.
                    rounds = max(1, min(need // len(turns), min(len(f) for _, f in turns)))
                    for _ in range(rounds):
                        for _p, frames in turns:
                            take(frames.popleft())
                    for producer, frames in turns:
                        self._forget(producer, rounds)
                        if not frames:
                            self._drop(level, priority, producer)
                else:  # a partial round: those that took a turn go to the end of the rotation
                    for producer, frames in turns[:need]:
                        take(frames.popleft())
                        self._forget(producer, 1)
                        if frames:
                            level.move_to_end(producer)
                        else:
                            self._drop(level, priority, producer)
            if len(batch) == n:
                break
        return batch

    def oldest(self) -> Frame | None:
        """The frame that has waited longest (by completion time), any priority."""
        heads = (frames[0] for level in self._levels.values() for frames in level.values())
        return min(heads, key=lambda f: f.complete_ns, default=None)

    def _forget(self, producer: Producer, n: int) -> None:
        """``n`` of ``producer``'s frames left the queue."""
        self._len -= n
        per = self._per_producer
        left = per[producer] - n
        if left:
            per[producer] = left
        else:
            del per[producer]

    def _drop(
        self, level: collections.OrderedDict[Producer, collections.deque[Frame]], priority: int, producer: Producer
    ) -> None:
        """``producer`` has no frame left at ``priority``."""
        del level[producer]
        if not level:
            del self._levels[priority]
