"""Fixtures of the models tests."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture
def call_beside_fifo() -> Callable[[Path, Callable[[], Any]], Any]:
    """``call_beside_fifo(fifo, call)``: ``call()`` in a thread, its result or the exception it raised; fails the
    test if it waits on ``fifo`` (an open of a FIFO waits for a writer), after letting it through."""

    def run(fifo: Path, call: Callable[[], Any]) -> Any | BaseException:
        done: list[Any] = []

        def target() -> None:
            try:
                done.append(call())
            except BaseException as exc:
                done.append(exc)

        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        thread.join(10)
        if thread.is_alive():
            with open(fifo, "wb"):  # a writer lets the stuck open through
                pass
            thread.join(10)
            pytest.fail(f"the call waited on the FIFO {fifo}")
        return done[0]

    return run
