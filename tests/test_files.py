"""Reading the files the server is told of or finds (``streamgpu.files``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from streamgpu.errors import ConfigError
from streamgpu.files import read_toml

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


# A config file named /dev/zero (or a pipe that never ends) as the CLI runs it, with its memory capped so that an
# unbounded read ends in MemoryError rather than taking the machine's memory
_CHECKS_DEV_ZERO = r"""
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
from streamgpu.cli import main
sys.exit(main(["check-config", "/dev/zero"]))
"""


def test_a_settings_file_that_never_ends_is_refused_naming_it(tmp_path: Path) -> None:
    """tomllib read the whole file before parsing it: --config /dev/zero took memory until MemoryError (a
    traceback; without a limit, the machine's memory)."""
    run = subprocess.run([sys.executable, "-c", _CHECKS_DEV_ZERO], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert "config file '/dev/zero' is larger than" in run.stderr and "not a settings file" in run.stderr
    huge = tmp_path / "huge.toml"
    huge.write_bytes(b"#" * (17 * 1024 * 1024))  # valid TOML (one comment), but no settings file is that large
    with pytest.raises(ConfigError, match=r"'huge.toml' is larger than 16777216 bytes"):
        read_toml(str(huge), "config file 'huge.toml'")
