"""streamgpu: stream frames over the network into DNNs on a GPU, from one asyncio loop.

The names below are imported on first use, so that ``import streamgpu.config``
(or the client) does not pull in torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Config": "streamgpu.config",
    "Server": "streamgpu.server",
    "run": "streamgpu.serve",
    "connect": "streamgpu.client",
    "connect_sync": "streamgpu.client",
}
__all__ = ["Config", "Server", "__version__", "connect", "connect_sync", "run"]

if TYPE_CHECKING:
    from streamgpu.client import connect, connect_sync
    from streamgpu.config import Config
    from streamgpu.serve import run
    from streamgpu.server import Server


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'streamgpu' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
