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
    from collections.abc import Sequence

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


def listener_class(kind: str) -> type[Listener]:
    """The ``Listener`` subclass registered for ``kind`` (KeyError names the known kinds)."""
    try:
        target = LISTENERS[kind]
    except KeyError:
        raise KeyError(f"unknown listener kind {kind!r}; known: {sorted(LISTENERS)}") from None
    return _load(target)


def make_listeners(specs: Sequence[ListenerSpec], admission: Admission, segment: HostSegment) -> list[Listener]:
    """The listeners serving ``specs``, in their order, in this process; but when ``ingest_workers > 0``
    the tcp and udp listeners are served by ingest worker processes, which receive into ``segment`` (the
    host memory ``admission.pool`` carves): the tcp listener is a ``WorkerListener``, which starts and
    stops them, and each udp listener its stand-in (``WorkerListener.udp``)."""
    workers = admission.config.ingest_workers
    if not workers:
        return [listener_class(spec.kind)(spec, admission) for spec in specs]
    from streamgpu.ingest.workers import WorkerListener

    (tcp,) = [spec for spec in specs if spec.kind == "tcp"]  # Config checked: exactly one
    front = WorkerListener(tcp, admission, segment, workers)
    udp = iter(front.udp)
    return [
        front if spec is tcp else next(udp) if spec.kind == "udp" else listener_class(spec.kind)(spec, admission)
        for spec in specs
    ]


def _load(target: str) -> type[Listener]:
    module, _, name = target.partition(":")
    cls: type[Listener] = getattr(importlib.import_module(module), name)
    return cls
