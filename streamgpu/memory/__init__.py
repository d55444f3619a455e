"""Pinned host memory: the ring buffer that frames land in, and slot lifetimes."""

from streamgpu.memory.ring import ALIGNMENT, PinnedRing, Slot

__all__ = ["ALIGNMENT", "PinnedRing", "Slot"]
