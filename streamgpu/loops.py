"""Choosing the event loop by name (``auto``: uvloop when installed, ``uvloop`` or ``asyncio``), and
keeping the garbage collector's full passes off its back (:func:`freeze_heap_once`)."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable

_heap_frozen = False

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


def freeze_heap_once() -> bool:
    """Once per process: collect, then freeze every object the process holds now (``gc.freeze``).

    A full (generation 2) collection walks every tracked object, and with torch imported that is
    hundreds of thousands of them: 87 ms on the H100 host, holding the GIL the whole time. A model
    load makes enough long-lived objects to set one off, in the loader thread or on the loop, and
    the loop then stands still (tools/bench_swap.py, docs/BENCHMARKS.md). Frozen objects are never
    walked again. Call it after the libraries are imported and before models load: objects made
    later (models, their versions) stay collectable. Returns False when it has already run.
    """
    global _heap_frozen
    if _heap_frozen:
        return False
    _heap_frozen = True
    gc.collect()  # what is garbage now is freed, not frozen for ever
    gc.freeze()
    return True
