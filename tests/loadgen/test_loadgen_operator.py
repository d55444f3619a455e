"""The load generator as an operator relies on it: like-with-like comparisons, honest exit codes, files
written level by level with a fixed schema and no secrets, perf_analyzer's --percentile and --latency-threshold."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
from pathlib import Path

from fakeserver import FakeServer
from loadgen_support import FAST, Cli

from streamgpu.loadgen import CONCURRENCY, Endpoint, LoadLevel, RunConfig, run
from streamgpu.loadgen.report import CSV_STATUSES, RunReport
from streamgpu.protocol.wire import Status


def test_compare_warns_when_the_endpoints_serve_different_models(cli: Cli) -> None:
    unknown = FakeServer(0.001, status_for=lambda header, index: Status.UNKNOWN_MODEL)
    with FakeServer(0.001) as ok, unknown:
        rc, out, _ = cli("-u", ok.url, "--compare", unknown.url, "--count", "5", *FAST)
    assert rc == 0
    assert "answer the same uint8 [8, 8, 3] frame for model 'default' differently" in out
    assert f"{unknown.url}: UNKNOWN_MODEL" in out and "not like with like" in out


def test_exits_1_when_no_reply_was_ok(cli: Cli, tmp_path: Path) -> None:
    with FakeServer(0.001, status_for=lambda header, index: Status.BAD_FRAME) as server:
        rc, _, err = cli("-u", server.url, "--count", "5", "-f", str(tmp_path / "r.csv"), *FAST)
    assert rc == 1
    assert "no reply was OK" in err and "'BAD_FRAME': 5" in err
    assert (tmp_path / "r.csv").exists()  # the figures are still written


def test_reports_have_a_fixed_schema_and_no_token(cli: Cli, server: FakeServer, tmp_path: Path) -> None:
    csv_path, json_path = tmp_path / "r.csv", tmp_path / "r.json"
    rc, out, _ = cli("-u", server.url, "--token", "s3cret-token", "--count", "5", "-f", str(csv_path),
                     "--json", str(json_path), *FAST)  # fmt: skip
    assert rc == 0
    for text in (out, csv_path.read_text(), json_path.read_text()):
        assert "s3cret-token" not in text
    assert json.loads(json_path.read_text())["config"]["token"] == "***"
    header = next(csv.reader(io.StringIO(csv_path.read_text())))
    assert [h for h in header if h in CSV_STATUSES] == list(CSV_STATUSES)  # every status, seen or not
    assert CSV_STATUSES[-1] == "ERROR" and "UNAUTHORIZED" in CSV_STATUSES


def test_each_level_is_reported_as_it_finishes(server: FakeServer) -> None:
    cfg = RunConfig(endpoints=[Endpoint("127.0.0.1", server.port)], levels=[LoadLevel(CONCURRENCY, 1),
                    LoadLevel(CONCURRENCY, 2)], shape=(8, 8, 3), count=5, warmup_s=0)  # fmt: skip
    seen: list[list[float]] = []

    def on_level(report: RunReport) -> None:
        seen.append([r.level for r in report.results])
        report.to_csv()  # what the CLI writes at this point

    report = run(cfg, on_level=on_level)
    assert seen == [[1], [1, 2]] and len(report.results) == 2


def test_latency_threshold_stops_the_sweep_and_percentile_is_reported(cli: Cli, tmp_path: Path) -> None:
    with FakeServer(0.02) as slow:
        rc, out, _ = cli("-u", slow.url, "--concurrency-range", "1:3", "--count", "5", "--percentile", "95",
                         "--latency-threshold", "5", "--json", str(tmp_path / "r.json"), *FAST)  # fmt: skip
    assert rc == 0
    doc = json.loads((tmp_path / "r.json").read_text())
    assert [r["level"] for r in doc["results"]] == [1]  # 20 ms > 5 ms: levels 2 and 3 never run
    assert doc["results"][0]["latency"]["p95"] >= 0.02
    assert "p95 latency" in out and "exceeds --latency-threshold 5 ms; the sweep stops here" in out


def test_ctrl_c_prints_the_levels_finished_so_far(cli: Cli) -> None:
    # Ctrl-C printed only "interrupted": without -f or --json every level measured before it was lost
    def latency(_h: object, i: int) -> float:
        if i == 10:  # the first frame of the third level: the operator presses Ctrl-C
            os.kill(os.getpid(), signal.SIGINT)
        return 0.001

    with FakeServer(latency) as server:
        rc, out, err = cli("-u", server.url, "--concurrency-range", "1:3", "--count", "5", *FAST)
    assert rc == 130 and "interrupted" in err
    rows = [line.split()[0] for line in out.splitlines()[2:] if line.strip() and not line.startswith("warning")]
    assert rows == ["1", "2"], out
