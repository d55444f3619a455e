"""What the load generator tests share beyond fixtures: settings, a CLI runner, a real server in a thread.

A module of its own, not conftest.py: ``from conftest import ...`` finds whichever conftest module
pytest imported first when several test folders are collected in one run.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import pytest

from streamgpu.config import Config
from streamgpu.loadgen.cli import main

if TYPE_CHECKING:
    from streamgpu.server import Server

#: Injected server latency of the default fake server.
LATENCY = 0.005

#: Fast measurement settings for a noisy 2-core machine: short windows, no warm-up.
FAST = ["--warmup", "0", "-p", "300", "--shape", "8x8x3"]


class Cli:
    """Runs ``main(argv)`` and captures its output."""

    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self.capsys = capsys

    def __call__(self, *argv: str) -> tuple[int, str, str]:
        rc = main(list(argv))
        out, err = self.capsys.readouterr()
        return rc, out, err


@contextmanager
def serving(cfg: Config) -> Iterator[Server]:
    """A real server (``streamgpu.server.Server``) on its own loop in a thread, while the block runs."""
    from streamgpu.server import Server  # torch: only the tests that start one pay for it

    server = Server(cfg)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(30)
    try:
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()
