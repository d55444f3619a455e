"""Starting a module of this package in a child interpreter (ingest workers, the weights reader)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import streamgpu

# The folder streamgpu is imported from here, first on a child's path: the child runs this streamgpu, not another
# one its environment may hold
_PACKAGE_ROOT = str(Path(streamgpu.__file__).resolve().parent.parent)


def module_command(module: str, *args: str) -> list[str]:
    """``python -m module args...`` with this process's interpreter."""
    return [sys.executable, "-m", module, *args]


def child_environment() -> dict[str, str]:
    """This process's environment, with the folder this streamgpu is imported from first on ``PYTHONPATH``, and
    the working directory off the child's path (``PYTHONSAFEPATH``: ``-m`` puts it first, before ``PYTHONPATH``,
    and a ``streamgpu`` or ``torch`` in the folder the server was started from was what the child imported)."""
    path = [_PACKAGE_ROOT, os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, path)), "PYTHONSAFEPATH": "1"}


def exit_status(status: int) -> str:
    """A child's exit status (``Popen.returncode``) in words: a signal that killed it, by name."""
    if status >= 0:
        return f"exit status {status}"
    try:
        return f"killed by {signal.Signals(-status).name}"
    except ValueError:
        return f"killed by signal {-status}"
