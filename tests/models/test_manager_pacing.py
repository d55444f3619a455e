"""A load beside frames served is paced (``manager._yielding``): the loader thread pauses at Python calls to take its
share of the time, and on Python 3.12 and later that leaves other threads' code (the loop's) uninstrumented, but for
the functions the loader runs too."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from streamgpu.models import manager


def _step(x: int) -> int:
    return x + 1


def _loops_own(x: int) -> int:
    return x - 1


def _steps(x: int) -> int:
    """Seconds of ``_step`` calls at a time: a paced thread that runs it has its pauses there."""
    for _ in range(200_000):
        x = _step(x)
    return x


def _share_running(work: Callable[[int], int]) -> float:
    """The share of the time the calling thread runs while it calls ``work`` over and over for 0.6 s."""
    cpu, wall = time.thread_time(), time.perf_counter()
    until, x = time.monotonic() + 0.6, 0
    while time.monotonic() < until:
        x = work(x)
    return (time.thread_time() - cpu) / (time.perf_counter() - wall)


def test_a_paced_thread_takes_its_share_of_the_time() -> None:
    shares: list[float] = []

    def load() -> None:
        with manager._yielding(0.001, 0.002, lambda: True):  # a third of the time
            shares.append(_share_running(_step))

    loader = threading.Thread(target=load)
    loader.start()
    loader.join()
    assert shares[0] < 0.5, f"the paced thread ran {shares[0]:.0%} of the time"  # (~33 %; unpaced ~100 %)


def test_a_paced_thread_takes_its_share_where_another_thread_runs_its_functions() -> None:
    """A model served eagerly runs the functions a load's warm-up runs (its module's). On Python 3.12 the pacing's
    event, turned off where the serving thread started them, was off for the loader too: it ran ~80-90 % of the
    time, paced only where it started a function of its own."""
    shares: list[float] = []
    stop = threading.Event()

    def serve() -> None:  # not paced: a model's worker thread, or the loop
        x = 0
        while not stop.is_set():
            x = _step(x)
            time.sleep(0.001)

    def load() -> None:
        with manager._yielding(0.001, 0.002, lambda: True):  # a third of the time
            time.sleep(0.05)  # (reading the file: the serving thread starts the functions first)
            shares.append(_share_running(_steps))

    server = threading.Thread(target=serve)
    server.start()
    try:
        for _ in range(2):  # (the second load too: an event turned off in one stayed off in the next)
            loader = threading.Thread(target=load)
            loader.start()
            loader.join()
    finally:
        stop.set()
        server.join()
    assert max(shares) < 0.5, f"the paced thread ran {shares[0]:.0%}, {shares[1]:.0%} of the time"


@pytest.mark.skipif(sys.version_info < (3, 12), reason="sys.monitoring: Python 3.12 and later")
def test_another_threads_function_is_watched_once_while_a_load_is_paced(monkeypatch: pytest.MonkeyPatch) -> None:
    """From Python 3.12 a profile function set in one thread ran every thread's code instrumented: the loop's
    per-frame path 1.6-1.8x slower while a load was paced. The pacing's own event turns itself off where a
    thread not paced starts a function: the loop pays for its first call of each, then runs as before; but for a
    function the paced thread runs too, which stays watched (its pauses are there)."""
    calls = manager._CALLS
    assert calls is not None
    seen: dict[tuple[int, Any], int] = {}
    started = calls._started

    def counted(code: Any, offset: int) -> object:
        if code in (_step.__code__, _loops_own.__code__):
            key = (threading.get_ident(), code)
            seen[key] = seen.get(key, 0) + 1
        return started(code, offset)

    monkeypatch.setattr(calls, "_started", counted)
    paced, done = threading.Event(), threading.Event()

    def load() -> None:
        with manager._yielding(1.0, 0.001, lambda: True):
            for x in range(100):
                _step(x)
            paced.set()
            done.wait(10)

    loader = threading.Thread(target=load)
    loader.start()
    assert paced.wait(10)
    for x in range(1000):  # this thread, not paced: the loop
        _loops_own(x)
        _step(x)
    done.set()
    loader.join()
    this = threading.get_ident()
    assert seen[this, _loops_own.__code__] == 1  # its first call, then the event is off for it
    assert seen[this, _step.__code__] == 1000  # the loader's: still watched
    assert seen[loader.ident or 0, _step.__code__] == 100
    assert all(sys.monitoring.get_tool(i) is None for i in range(6))  # type: ignore[attr-defined]  # (given back)
    assert not calls._theirs  # (the code objects are not kept)


def _watching_nothing() -> bool:
    return sys.getprofile() is None and (
        manager._CALLS is None or (not manager._CALLS._watched and manager._CALLS._tool is None)
    )


def test_a_busy_test_that_raises_fails_the_block_once_and_leaves_the_thread_unwatched() -> None:
    asked = 0

    def busy() -> bool:
        nonlocal asked
        asked += 1
        raise RuntimeError("busy broke")

    with pytest.raises(RuntimeError, match="busy broke"), manager._yielding(0.0, 0.0, busy):  # every call is due
        _steps(0)
    assert asked == 1
    assert _watching_nothing()


@pytest.mark.skipif(sys.version_info < (3, 12), reason="sys.monitoring: Python 3.12 and later")
def test_a_tool_that_frees_the_pacings_id_under_it_does_not_fail_the_load() -> None:
    with manager._yielding(0.001, 0.0, lambda: False):
        assert manager._CALLS is not None and manager._CALLS._tool is not None
        tool = manager._CALLS._tool
        sys.monitoring.free_tool_id(tool)  # type: ignore[attr-defined]  # (a hostile tool)
        _step(0)
    assert _watching_nothing()
    assert sys.monitoring.get_events(tool) == 0  # type: ignore[attr-defined]  # (a freed id's events stay set)


@pytest.mark.skipif(sys.version_info < (3, 12), reason="sys.monitoring: Python 3.12 and later")
def test_loads_run_unpaced_where_both_tool_ids_are_taken_and_the_log_says_so(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert manager._CALLS is not None
    monkeypatch.setattr(manager._CALLS, "_said_unpaced", False)
    for tool in manager._CALLS._TOOLS:
        sys.monitoring.use_tool_id(tool, f"another tool {tool}")  # type: ignore[attr-defined]
    try:
        for _ in range(2):
            with caplog.at_level("WARNING", logger="streamgpu"), manager._yielding(0.001, 0.0, lambda: True):
                assert manager._CALLS._tool is None
                _step(0)
    finally:
        for tool in manager._CALLS._TOOLS:
            sys.monitoring.free_tool_id(tool)  # type: ignore[attr-defined]
    said = [r.getMessage() for r in caplog.records if "unpaced" in r.getMessage()]
    assert len(said) == 1 and "another tool 3, another tool 4" in said[0], said
