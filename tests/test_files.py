"""Reading the files the server is told of or finds (``streamgpu.files``)."""

from __future__ import annotations

import os
import subprocess
import sys

# A process of a session of its own, with no controlling terminal (a daemon's, a systemd service's), opening a
# terminal that a model file or config.toml links to, then asking whether it has a controlling terminal now
_OPENS_A_TERMINAL = r"""
import os
from streamgpu.errors import NotRegularFileError
from streamgpu.files import open_regular
master, terminal = os.openpty()
os.setsid()
try:
    open_regular(os.ttyname(terminal))
except NotRegularFileError:
    pass
try:
    os.close(os.open("/dev/tty", os.O_RDONLY))
    print("a controlling terminal")
except OSError:
    print("none")
"""


def test_a_terminal_in_a_files_place_is_refused_without_becoming_the_servers() -> None:
    """Opened to be looked at, a terminal linked in a file's place became the controlling terminal of a server
    that leads its session and had none: its hangup (SIGHUP, which the server does not handle) then ended it."""
    found = subprocess.run(
        [sys.executable, "-c", _OPENS_A_TERMINAL], capture_output=True, text=True, timeout=60, env=dict(os.environ)
    )
    assert found.stdout.strip() == "none", found.stderr
