"""Ingest: the listeners that turn network input into frames, and the admission rules they share.

``LISTENERS`` maps a listener kind (``Config.listeners[i].kind``) to the
class that serves it, as ``module:Class`` strings imported on first use (as
uvicorn's ``config.py`` does), so that validating a config imports nothing
(this module imports nothing at load). A new front end is one module plus
one line here.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from streamgpu.ingest.base import Listener

LISTENERS: dict[str, str] = {
    "tcp": "streamgpu.ingest.tcp:TcpListener",
    "http": "streamgpu.ingest.http:HttpListener",
    "raw": "streamgpu.ingest.raw:RawListener",
    "udp": "streamgpu.ingest.udp:UdpListener",
}


def listener_class(kind: str) -> type[Listener]:
    """The ``Listener`` subclass registered for ``kind`` (KeyError names the known kinds)."""
    try:
        target = LISTENERS[kind]
    except KeyError:
        raise KeyError(f"unknown listener kind {kind!r}; known: {sorted(LISTENERS)}") from None
    module, _, name = target.partition(":")
    cls: type[Listener] = getattr(importlib.import_module(module), name)
    return cls
