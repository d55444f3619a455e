"""Choosing the event loop by name: ``auto`` (uvloop when installed), ``uvloop`` or ``asyncio``."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

LOOPS = ("auto", "uvloop", "asyncio")


def loop_factory(kind: str = "auto") -> Callable[[], asyncio.AbstractEventLoop]:
    """A factory of event loops of ``kind`` (for ``asyncio.Runner(loop_factory=...)``).

    Raises ValueError for an unknown kind, or for ``uvloop`` when it is not installed.
    """
    if kind not in LOOPS:
        raise ValueError(f"loop must be one of {LOOPS}, got {kind!r}")
    if kind == "asyncio":
        return asyncio.new_event_loop
    try:
        import uvloop
    except ImportError:
        if kind == "uvloop":
            raise ValueError("loop 'uvloop' requested but uvloop is not installed") from None
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def new_event_loop(kind: str = "auto") -> asyncio.AbstractEventLoop:
    """A new event loop of ``kind``."""
    return loop_factory(kind)()
