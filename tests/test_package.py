"""The package's surface: its exports, and which modules stay free of torch."""

from __future__ import annotations

import subprocess
import sys

import streamgpu


def test_exports() -> None:
    from streamgpu.client import connect, connect_sync
    from streamgpu.config import Config
    from streamgpu.serve import run
    from streamgpu.server import Server

    assert (streamgpu.Config, streamgpu.Server, streamgpu.run) == (Config, Server, run)
    assert (streamgpu.connect, streamgpu.connect_sync) == (connect, connect_sync)
    assert sorted(streamgpu.__all__) == ["Config", "Server", "__version__", "connect", "connect_sync", "run"]


def test_config_and_errors_import_no_torch() -> None:
    code = "import sys, streamgpu.config, streamgpu.errors, streamgpu.ingest; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_errors_mix_in_the_builtins_callers_catch() -> None:
    from streamgpu.errors import ConfigError, DeviceUnavailableError, ModelLoadError, StreamgpuError

    assert issubclass(ConfigError, ValueError) and issubclass(ModelLoadError, RuntimeError)
    assert all(issubclass(e, StreamgpuError) for e in (ConfigError, ModelLoadError, DeviceUnavailableError))
