"""Which devices may take new batches.

A device with a batch past its watchdog is *stalled* until that batch ends
(completes or fails); one whose context is lost (a sticky CUDA error) is
*dead* for the rest of the process. The scheduler places batches only on
devices that are neither; ``snapshot`` is what metrics show.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("streamgpu")


class DeviceHealth:
    """Per device (a position in ``Backend.devices``): batches overdue, and a sticky error."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self._overdue = [0] * len(names)
        self._dead: dict[int, str] = {}
        self.watchdog_fired = 0
        self.impaired = 0  # devices not usable now (a per-frame check reads this one number)

    def usable(self, device: int) -> bool:
        return not self._overdue[device] and device not in self._dead

    def why_unusable(self, devices: list[int]) -> str:
        """One line naming each of ``devices`` and why it takes no batch."""
        return "; ".join(
            f"{self.names[d]} " + (f"failed: {self._dead[d]}" if d in self._dead else "has a batch past its watchdog")
            for d in devices
        )

    def overdue(self, device: int) -> None:
        self.watchdog_fired += 1
        self._overdue[device] += 1
        self._count_impaired()

    def ended(self, device: int) -> None:
        """An overdue batch on ``device`` ended."""
        self._overdue[device] -= 1
        self._count_impaired()
        if self.usable(device):
            log.warning("device %s: its overdue batch ended; placing batches on it again", self.names[device])

    def failed(self, device: int, reason: str) -> bool:
        """Mark ``device`` dead (True the first time)."""
        if device in self._dead:
            return False
        self._dead[device] = reason
        self._count_impaired()
        log.error("device %s failed with a sticky error (%s): it takes no more work; restart the server to "
                  "use it again", self.names[device], reason)  # fmt: skip
        return True

    def _count_impaired(self) -> None:
        self.impaired = sum(1 for d in range(len(self.names)) if not self.usable(d))

    def snapshot(self) -> list[dict[str, Any]]:
        return [
            {"name": name, "healthy": self.usable(i), "overdue_batches": overdue, "error": self._dead.get(i, "")}
            for i, (name, overdue) in enumerate(zip(self.names, self._overdue, strict=True))
        ]
