"""tools/plain_server.py, the plain baseline server: its command line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_tool(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    """A baseline server given bad arguments: it must stop at once (no model is served)."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, f"tools/{tool}", "--device", "cpu", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--port", "99999"], "argument --port: must be 0..65535, got 99999"),
        (["--port", "0", "--model", "nope"], "source 'nope' must be builtin:NAME"),
        (["--port", "0", "--model", "torchscript:/no/such/model.pt"], "file '/no/such/model.pt' does not exist"),
    ],
)
def test_bad_arguments_are_errors_not_tracebacks(args: list[str], message: str) -> None:
    done = run_tool("plain_server.py", *args)
    assert done.returncode != 0 and message in done.stderr and "Traceback" not in done.stderr
