"""A load beside frames served is paced (``manager._yielding``): the loader thread pauses at Python calls to take its
share of the time, and on Python 3.12 and later that leaves other threads' code (the loop's) uninstrumented."""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

import pytest

from streamgpu.models import manager


def _step(x: int) -> int:
    return x + 1


def test_a_paced_thread_takes_its_share_of_the_time() -> None:
    shares: list[float] = []

    def load() -> None:
        cpu, wall = time.thread_time(), time.perf_counter()
        with manager._yielding(0.001, 0.002, lambda: True):  # a third of the time
            until, x = time.monotonic() + 0.6, 0
            while time.monotonic() < until:
                x = _step(x)
        shares.append((time.thread_time() - cpu) / (time.perf_counter() - wall))

    loader = threading.Thread(target=load)
    loader.start()
    loader.join()
    assert shares[0] < 0.5, f"the paced thread ran {shares[0]:.0%} of the time"  # (~33 %; unpaced ~100 %)


@pytest.mark.skipif(sys.version_info < (3, 12), reason="sys.monitoring: Python 3.12 and later")
def test_another_threads_function_is_watched_once_while_a_load_is_paced(monkeypatch: pytest.MonkeyPatch) -> None:
    """From Python 3.12 a profile function set in one thread ran every thread's code instrumented: the loop's
    per-frame path 1.6-1.8x slower while a load was paced. The pacing's own event turns itself off where a
    thread not paced starts a function: the loop pays for its first call of each, then runs as before."""
    calls = manager._CALLS
    assert calls is not None
    seen: dict[int, int] = {}
    started = calls._started

    def counted(code: Any, offset: int) -> object:
        if code is _step.__code__:
            seen[threading.get_ident()] = seen.get(threading.get_ident(), 0) + 1
        return started(code, offset)

    monkeypatch.setattr(calls, "_started", counted)
    paced, done = threading.Event(), threading.Event()

    def load() -> None:
        with manager._yielding(1.0, 0.001, lambda: True):
            paced.set()
            for x in range(100):
                _step(x)
            done.wait(10)

    loader = threading.Thread(target=load)
    loader.start()
    assert paced.wait(10)
    for x in range(1000):  # this thread, not paced: the loop
        _step(x)
    done.set()
    loader.join()
    assert seen[threading.get_ident()] == 1  # its first call, then the event is off for it
    assert seen.get(loader.ident or 0, 0) >= 1  # the loader's calls are watched (those before the other's first)
    assert all(sys.monitoring.get_tool(i) is None for i in range(6))  # type: ignore[attr-defined]  # (given back)
