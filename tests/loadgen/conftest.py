"""Fixtures of the load generator tests: a fake server on loopback and a CLI runner."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # fakeserver.py, loadgen_support.py, whatever pytest's import mode

from fakeserver import FakeServer
from loadgen_support import LATENCY, Cli


@pytest.fixture
def server() -> Iterator[FakeServer]:
    """A fake server answering every frame OK after LATENCY, on its own thread."""
    with FakeServer(LATENCY) as srv:
        yield srv


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(capsys)
