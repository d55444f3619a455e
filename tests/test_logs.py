"""Logs: JSON lines, one traceback per distinct failure, and what ``serve`` says over its life."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from streamgpu import client
from streamgpu.logs import JsonFormatter, RepeatFilter


def test_a_repeated_failure_logs_one_traceback_then_counts() -> None:
    records: list[logging.LogRecord] = []
    filt = RepeatFilter()
    logger = logging.getLogger("test.repeats")
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign,assignment]
    handler.addFilter(filt)
    logger.addHandler(handler)
    logger.propagate = False
    try:
        for i in range(25):
            try:
                raise ValueError(f"bad input {i}")  # one place, one type: one distinct failure
            except ValueError:
                logger.exception("batch failed")
        try:
            raise KeyError("other")
        except KeyError:
            logger.exception("batch failed")
    finally:
        logger.removeHandler(handler)
    with_traceback = [r for r in records if r.exc_info]
    assert len(with_traceback) == 2  # the ValueError's first time, the KeyError's
    counted = [r.getMessage() for r in records if not r.exc_info]
    assert counted == ["batch failed [ValueError: bad input 9; seen 10 times, traceback logged the first time]"]
    assert list(filt.repeats().values()) == [25]


def test_json_lines_carry_the_event_fields() -> None:
    record = logging.LogRecord("streamgpu", logging.INFO, __file__, 1, "hello %s", ("you",), None)
    record.event = "connection_opened"
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "hello you" and line["event"] == "connection_opened" and line["level"] == "INFO"


def test_serve_logs_connections_refusals_stats_and_a_drain_summary_as_json() -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "STREAMGPU_STATS_INTERVAL_S": "0.3", "STREAMGPU_AUTH_TOKEN": "t"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamgpu", "serve", "--port", "0", "--device", "cpu", "--log-format", "json",
         "--input-shape", "16,16,3"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    assert proc.stdout is not None
    lines: list[dict[str, object]] = []

    def read_until(pattern: str) -> dict[str, object]:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            text = proc.stdout.readline()  # type: ignore[union-attr]
            assert text, "server exited: " + "\n".join(map(str, lines))
            lines.append(json.loads(text))  # every line is one JSON object
            if re.search(pattern, str(lines[-1]["message"])):
                return lines[-1]
        raise AssertionError(f"no line matching {pattern!r}")

    try:
        listening = read_until(r"listening on")
        port = int(re.findall(r":(\d+),", str(listening["message"]))[0])
        assert any("data path: the CPU backend" in str(line["message"]) for line in lines)
        with client.connect_sync("127.0.0.1", port, token="t") as conn:
            assert conn.infer(np.zeros((16, 16, 3), np.uint8)).ok
            opened = read_until("opened")
            assert opened["event"] == "connection_opened"
        closed = read_until("closed after 1 frames")
        assert closed["event"] == "connection_closed" and closed["connection"] == opened["connection"]
        with pytest.raises(ConnectionError):
            client.connect_sync("127.0.0.1", port, token="wrong")
        refused = read_until("refused connection")
        assert (refused["event"], refused["status"], refused["reason"]) == ("handshake_refused", "UNAUTHORIZED",
                                                                           "bad auth token")  # fmt: skip
        stats = read_until("^stats: ")
        assert stats["event"] == "stats" and "errors" in stats
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    summary = [json.loads(line) for line in out.splitlines() if "drained in" in line]
    assert proc.returncode == 0 and len(summary) == 1, out
    assert summary[0]["totals"] == {"OK": 1, "UNAUTHORIZED": 1}
