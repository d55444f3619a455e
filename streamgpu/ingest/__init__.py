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
    from streamgpu.config import ListenerSpec
    from streamgpu.ingest.admission import Admission
    from streamgpu.ingest.base import Listener
    from streamgpu.memory import HostSegment

LISTENERS: dict[str, str] = {
    "tcp": "streamgpu.ingest.tcp:TcpListener",
    "http": "streamgpu.ingest.http:HttpListener",
    "raw": "streamgpu.ingest.raw:RawListener",
    "udp": "streamgpu.ingest.udp:UdpListener",
}
# Kinds that ingest worker processes can serve (``Config.ingest_workers > 0``): the parent side.
WORKER_LISTENERS: dict[str, str] = {
    "tcp": "streamgpu.ingest.workers:WorkerListener",
}


def listener_class(kind: str) -> type[Listener]:
    """The ``Listener`` subclass registered for ``kind`` (KeyError names the known kinds)."""
    try:
        target = LISTENERS[kind]
    except KeyError:
        raise KeyError(f"unknown listener kind {kind!r}; known: {sorted(LISTENERS)}") from None
    return _load(target)


def make_listener(spec: ListenerSpec, admission: Admission, segment: HostSegment) -> Listener:
    """The listener serving ``spec``: in this process, or through ingest worker processes when
    ``ingest_workers > 0`` (they receive into ``segment``, the host memory ``admission.pool`` carves)."""
    workers = admission.config.ingest_workers
    if workers and spec.kind in WORKER_LISTENERS:
        return _load(WORKER_LISTENERS[spec.kind])(spec, admission, segment, workers)  # type: ignore[call-arg]
    return listener_class(spec.kind)(spec, admission)


def _load(target: str) -> type[Listener]:
    module, _, name = target.partition(":")
    cls: type[Listener] = getattr(importlib.import_module(module), name)
    return cls
