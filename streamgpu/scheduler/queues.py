"""A model's waiting frames: priority levels, and round-robin across streams within a level.

High-priority frames always leave before lower ones; inside a level, each
(producer, stream) gets a turn in rotation, so one hot producer cannot starve
the others. All operations are O(streams) at worst, and the structure holds
nothing per stream once that stream's frames are gone.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator

from streamgpu.frame import Frame

StreamKey = tuple[int, int]  # (producer, stream_id)


def stream_key(frame: Frame) -> StreamKey:
    return (frame.producer, frame.header.stream_id)


class FairQueue:
    """Frames of one model, by priority (higher first), then round-robin by stream, then FIFO."""

    def __init__(self) -> None:
        # priority -> stream -> frames; the OrderedDict's order is the rotation
        self._levels: dict[int, collections.OrderedDict[StreamKey, collections.deque[Frame]]] = {}
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
        level.setdefault(stream_key(frame), collections.deque()).append(frame)
        self._len += 1

    def remove(self, frame: Frame) -> None:
        level = self._levels[frame.header.priority]
        key = stream_key(frame)
        frames = level[key]
        frames.remove(frame)
        self._len -= 1
        if not frames:
            del level[key]
            if not level:
                del self._levels[frame.header.priority]

    def stream_frames(self, key: StreamKey) -> list[Frame]:
        """Every queued frame of one stream (any priority)."""
        return [f for level in self._levels.values() for f in level.get(key, ())]

    def pop_batch(self, n: int) -> list[Frame]:
        """Up to ``n`` frames: highest priority first, one per stream in rotation within a level."""
        batch: list[Frame] = []
        for priority in sorted(self._levels, reverse=True):
            level = self._levels[priority]
            while level and len(batch) < n:
                key, frames = next(iter(level.items()))
                batch.append(frames.popleft())
                self._len -= 1
                if frames:
                    level.move_to_end(key)  # this stream had its turn
                else:
                    del level[key]
            if not level:
                del self._levels[priority]
            if len(batch) == n:
                break
        return batch

    def oldest(self) -> Frame | None:
        """The frame that has waited longest (by completion time), any priority."""
        heads = (frames[0] for level in self._levels.values() for frames in level.values())
        return min(heads, key=lambda f: f.complete_ns, default=None)
