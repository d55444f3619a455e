"""Host memory for frames: the shared segment they land in, and a pool of independently reused slots."""

from streamgpu.memory.pool import ALIGNMENT, HostSegment, Slot, SlotPool, Waiter

__all__ = ["ALIGNMENT", "HostSegment", "Slot", "SlotPool", "Waiter"]
