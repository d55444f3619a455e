"""``streamgpu serve`` as a user runs it: logs, serves, exits 0 on SIGINT; clear errors."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from streamgpu import client
from streamgpu.cli import build_parser, main, serve_config
from streamgpu.config import ListenerSpec


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


def test_raw_and_results_flags_make_the_config(tmp_path: Path) -> None:
    # What serving them does is tested in-process (tests/ingest/test_raw.py): here, the flags' wiring.
    parser = build_parser()
    argv = ["serve", "--host", "0.0.0.0", "--port", "0", "--raw", "tcp:9000:default", "--raw", "tcp:9001:default:every",
            "--results-port", "9100", "--results-file", str(tmp_path / "r.jsonl")]  # fmt: skip
    cfg = serve_config(parser, parser.parse_args(argv))
    assert cfg.listeners == [
        ListenerSpec("tcp", "0.0.0.0", 0),
        ListenerSpec("raw", "0.0.0.0", 9000, {"model": "default", "live": True}),
        ListenerSpec("raw", "0.0.0.0", 9001, {"model": "default", "live": False}),
    ]
    assert (cfg.results_port, cfg.results_file) == (9100, str(tmp_path / "r.jsonl"))


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("tcp:0:nosuch", "argument --raw: listeners[1]: raw listener model 'nosuch' is not a configured model"),
        ("udp:9000:default", "argument --raw: expected tcp:PORT:MODEL"),
        ("tcp:99999:default", "argument --raw: PORT must be 0..65535"),
        ("tcp:9000:default:sometimes", "argument --raw: mode must be one of"),
    ],
)
def test_bad_raw_flags_are_cli_errors_naming_the_flag(
    raw: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["serve", "--device", "cpu", "--raw", raw])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_raw_port_in_use_is_an_error_not_a_traceback(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        code = main(["serve", "--port", "0", "--device", "cpu", "--raw", f"tcp:{busy}:default"])
    assert code == 1
    assert "cannot serve" in caplog.text and "address already in use" in caplog.text.lower()
