"""``streamgpu serve`` as a user runs it: logs, serves, exits 0 on SIGINT; clear errors."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from streamgpu import client
from streamgpu.cli import main


def test_serve_logs_answers_and_exits_cleanly_on_sigint() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamgpu", "serve", "--port", "0", "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert proc.stdout is not None
    lines: list[str] = []
    port = None
    deadline = time.monotonic() + 60
    while port is None and time.monotonic() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        if m := re.search(r"listening on 127\.0\.0\.1:(\d+), device cpu", line):
            port = int(m.group(1))
    assert port is not None, "".join(lines)
    assert any("model default (builtin:small" in line for line in lines)
    with client.connect_sync("127.0.0.1", port) as conn:
        reply = conn.infer(np.zeros((224, 224, 3), np.uint8))
        assert reply.ok and reply.result is not None and reply.result.shape == (1000,)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "stopped" in out


def test_bad_flag_values_exit_2_with_a_message(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["serve", "--port", "99999"])
    assert info.value.code == 2
    assert "port must be 0..65535" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--model", "nonsense"])
    assert "must be builtin:NAME" in capsys.readouterr().err


def test_missing_model_file_is_an_error_not_a_traceback(caplog: pytest.LogCaptureFixture) -> None:
    code = main(["serve", "--port", "0", "--device", "cpu", "--model", "torchscript:/no/such/model.pt"])
    assert code == 1
    assert "file '/no/such/model.pt' does not exist" in caplog.text
