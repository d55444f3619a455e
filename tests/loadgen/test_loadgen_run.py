"""End-to-end runs against the fake server on loopback: counts, latency, pacing, outputs."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import fakeserver
import numpy as np
import pytest
from fakeserver import TIMINGS, FakeServer
from loadgen_support import FAST, LATENCY, Cli

from streamgpu.loadgen import CONCURRENCY, RATE, Endpoint, LoadLevel, RunConfig, run
from streamgpu.loadgen.engine import LoadRunner, open_connections
from streamgpu.loadgen.measure import Window
from streamgpu.loadgen.transports import get_transport
from streamgpu.protocol.wire import FrameFlags, FrameHeader, Status

# Generous enough for a busy 2-core machine, tight enough to catch ms/s or off-by-one-window mistakes.
SLACK = 0.010


def config(*urls: str, **kw: object) -> RunConfig:
    endpoints = [Endpoint("127.0.0.1", int(u.rsplit(":", 1)[1])) for u in urls]
    defaults: dict[str, object] = {"shape": (8, 8, 3), "warmup_s": 0.0, "window_s": 0.3}
    return RunConfig(endpoints=endpoints, **{**defaults, **kw})  # type: ignore[arg-type]


def test_count_latency_and_server_stages(server: FakeServer) -> None:
    report = run(config(server.url, levels=[LoadLevel(CONCURRENCY, 4)], count=200))
    (r,) = report.results
    assert server.stats.frames == 200
    assert r.sent == r.completed == 200 and r.statuses == {"OK": 200}
    assert LATENCY * 0.95 <= r.latency["min"] <= r.latency["p50"] <= LATENCY + SLACK
    assert r.latency["p50"] <= r.latency["p99"] <= LATENCY + 4 * SLACK
    assert r.server_us == {
        "receive_us": 11, "queue_us": 22, "transfer_us": 33, "compute_us": 44, "total_us": 150, "batch_size": 2
    }  # fmt: skip
    # 4 in flight, 5 ms each: at most 800 frames/s; a unit slip would be off by 1000x.
    assert 300 < r.throughput <= 4 / LATENCY * 1.02
    assert server.stats.max_in_flight == 4


def test_percentiles_of_a_known_latency_mix() -> None:
    # Every 10th frame (by arrival) is answered after 40 ms, the rest after 3 ms.
    def latency(_h: object, i: int) -> float:
        return 0.040 if i % 10 == 9 else 0.003

    with FakeServer(latency) as srv:
        (r,) = run(config(srv.url, levels=[LoadLevel(CONCURRENCY, 2)], count=200)).results
    assert r.completed == 200
    assert 0.003 <= r.latency["p50"] <= 0.003 + SLACK
    assert 0.040 <= r.latency["p95"] <= 0.040 + 2 * SLACK  # 10 % are slow, so p91 and above are slow
    assert 0.040 <= r.latency["p99"] <= 0.040 + 2 * SLACK
    assert r.latency["mean"] == pytest.approx(0.9 * 0.003 + 0.1 * 0.040, abs=SLACK)


@pytest.mark.parametrize("concurrency", [1, 3])
def test_closed_loop_concurrency_is_honoured(server: FakeServer, concurrency: int) -> None:
    (r,) = run(config(server.url, levels=[LoadLevel(CONCURRENCY, concurrency)], duration_s=0.4)).results
    assert server.stats.max_in_flight == concurrency
    assert r.throughput == pytest.approx(concurrency / LATENCY, rel=0.5)


def test_status_counts() -> None:
    def status(_h: object, i: int) -> Status:
        return Status.OVERLOADED if i % 4 == 3 else (Status.DEADLINE_MISSED if i % 10 == 0 else Status.OK)

    with FakeServer(0.001, status_for=status) as srv:
        (r,) = run(config(srv.url, levels=[LoadLevel(CONCURRENCY, 1)], count=100)).results
    expected_deadline = len([i for i in range(100) if i % 10 == 0 and i % 4 != 3])
    assert r.statuses == {"OK": 75 - expected_deadline, "OVERLOADED": 25, "DEADLINE_MISSED": expected_deadline}
    assert r.completed == 100
    assert r.messages == {"OVERLOADED": "fake overloaded", "DEADLINE_MISSED": "fake deadline_missed"}


def _pacing(server: FakeServer, rate: float, distribution: str) -> tuple[float, np.ndarray]:
    report = run(config(server.url, levels=[LoadLevel(RATE, rate)], distribution=distribution, duration_s=1.5))
    (r,) = report.results
    arrivals = np.array(server.stats.arrivals)
    return r.send_rate, np.diff(arrivals)


def test_open_loop_constant_pacing(server: FakeServer) -> None:
    send_rate, gaps = _pacing(server, 200, "constant")
    assert send_rate == pytest.approx(200, rel=0.05)
    assert np.median(gaps) == pytest.approx(1 / 200, rel=0.2)
    assert gaps.std() / gaps.mean() < 0.5  # constant intervals (timer jitter only)


def test_open_loop_poisson_pacing(server: FakeServer) -> None:
    send_rate, gaps = _pacing(server, 300, "poisson")
    assert send_rate == pytest.approx(300, rel=0.15)
    assert 0.7 < gaps.std() / gaps.mean() < 1.3  # exponential intervals: coefficient of variation 1


def test_a_low_open_loop_rate_ends_its_level_on_time(server: FakeServer) -> None:
    # the level waited for the sender to wake for its next send, 1/rate away: a 0.3 s window at 0.2/s took 5 s
    started = time.monotonic()
    (r,) = run(config(server.url, levels=[LoadLevel(RATE, 0.2)], duration_s=0.3)).results
    assert time.monotonic() - started < 2.5
    assert r.sent == r.completed == 1 and r.statuses == {"OK": 1}


def test_a_frame_answered_past_the_drain_timeout_does_not_count_in_the_next_level() -> None:
    # Frame 0 is answered after 1 s: past level 1 (0.6 s) and its 0.2 s drain, inside level 2. Its reply counted
    # in level 2 (max latency 1 s) and freed a slot level 2 never took: 3 frames in flight at concurrency 2.
    in_flight: list[int] = []  # frames the server held as each frame arrived, that one included

    def latency(_h: object, i: int) -> float:
        in_flight.append(srv.stats.in_flight)
        return 1.0 if i == 0 else LATENCY

    with FakeServer(latency) as srv:
        report = run(config(srv.url, levels=[LoadLevel(CONCURRENCY, 2)] * 2, duration_s=0.6, drain_timeout_s=0.2))
    late = [n for n, t in zip(in_flight, srv.stats.arrivals, strict=True) if t > srv.stats.arrivals[0] + 1.05]
    assert late and max(late) == 2
    assert report.results[1].latency["max"] < 0.5 and report.results[1].sent == report.results[1].completed
    assert "1 frames were unanswered 0.2 s after the load stopped" in report.warnings


def test_a_warmup_frame_unanswered_past_the_drain_timeout_is_not_taken_for_a_counted_one() -> None:
    # Frame 0 of the warm-up is answered after 1 s. The --count window waited for it too: "1 counted frames were
    # never answered" when all 10 were (and, answered sooner, it was counted as an 11th, with its latency).
    with FakeServer(lambda _h, i: 1.0 if i == 0 else LATENCY) as srv:
        report = run(config(srv.url, levels=[LoadLevel(CONCURRENCY, 1)], warmup_s=0.3, count=10, drain_timeout_s=0.2))
    (r,) = report.results
    assert r.sent == r.completed == 10 and r.statuses == {"OK": 10} and r.latency["max"] < 0.5
    assert report.warnings == ["1 frames were unanswered 0.2 s after the load stopped"]  # the warm-up's frame


def test_replies_for_no_frame_waiting_are_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    # A server answering frame 3 with a wrong sequence number and frame 5 twice: the client dropped both replies
    # without a word (the only sign: "1 counted frames were never answered", for a frame the server did answer)
    reply = fakeserver._Conn.reply

    def misbehave(conn: fakeserver._Conn, header: FrameHeader, status: Status) -> None:
        reply(conn, header._replace(sequence=1000) if header.sequence == 3 else header, status)
        if header.sequence == 5:
            reply(conn, header, status)

    monkeypatch.setattr(fakeserver._Conn, "reply", misbehave)
    with FakeServer(LATENCY) as srv:
        report = run(config(srv.url, levels=[LoadLevel(CONCURRENCY, 2)], count=10, drain_timeout_s=0.2))
    (r,) = report.results
    assert r.sent == 10 and r.completed == 9 and r.statuses == {"OK": 9}  # the duplicate counted once
    assert any(w.startswith("2 replies came for no frame waiting (duplicates, or a stream id or sequence")
               for w in report.warnings), report.warnings  # fmt: skip


def test_windows_shorter_than_the_loop_can_cut_do_not_hang(server: FakeServer) -> None:
    # -p 0.001 (1 us windows): cutting one took longer than a window, so the loop cut windows without ever
    # yielding; the stop (set by a task) never came and the run spun forever. In a process of its own, killable.
    argv = ["-u", server.url, *FAST, "-p", "0.001"]
    code = f"import sys; from streamgpu.loadgen.cli import main; sys.exit(main({argv!r}))"
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the run did not end")
    assert done.returncode in (0, 1) and "Traceback" not in done.stderr, done.stderr  # 1: no reply fell in a window


def test_an_open_loop_count_keeping_its_schedule_is_not_behind() -> None:
    # 20 frames at 1000/s are sent in 20 ms, then the window waits 50 ms for the last replies: the send rate was
    # taken over those 70 ms (286 frames/s) and the generator said it fell behind
    with FakeServer(0.050) as srv:
        (r,) = run(config(srv.url, levels=[LoadLevel(RATE, 1000)], count=20)).results
    assert r.send_rate == pytest.approx(1000, rel=0.3) and not r.behind, (r.send_rate, r.send_lag_p99_s)
    assert r.throughput < 500  # completions still over the whole window, to the last reply


def test_open_loop_warns_when_behind(cli: Cli) -> None:
    # 50 ms per frame and at most 5 in flight allow 100 frames/s; 1000 are asked for.
    with FakeServer(0.050) as srv:
        rc, out, _ = cli("-u", srv.url, "--request-rate-range", "1000", "--max-outstanding", "5",
                         "--duration", "0.5", *FAST)  # fmt: skip
    assert rc == 0
    assert "fell behind its schedule" in out
    assert srv.stats.max_in_flight <= 5


def test_windows_until_stable(server: FakeServer) -> None:
    report = run(config(server.url, levels=[LoadLevel(CONCURRENCY, 2)], window_s=0.25, stability_pct=50,
                        max_windows=6))  # fmt: skip
    (r,) = report.results
    assert r.stable and 3 <= r.windows <= 6
    assert r.duration_s == pytest.approx(0.75, rel=0.1)  # the figures come from the last three windows


def test_csv_and_json_outputs(cli: Cli, server: FakeServer, tmp_path: Path) -> None:
    csv_path, json_path = tmp_path / "out.csv", tmp_path / "out.json"
    rc, out, _ = cli("-u", server.url, "--concurrency-range", "1:3:2", "--count", "40", "-f", str(csv_path),
                     "--json", str(json_path), *FAST)  # fmt: skip
    assert rc == 0
    assert "in flight" in out and "p99 ms" in out
    rows = list(csv.DictReader(io.StringIO(csv_path.read_text())))
    assert [row["Concurrency"] for row in rows] == ["1", "3"]
    for row in rows:
        assert row["Completed"] == row["OK"] == "40"
        assert row["Server Queue"] == str(TIMINGS.queue_us) and row["Server Total"] == str(TIMINGS.total_us)
        assert LATENCY * 1e6 * 0.95 <= float(row["p50 latency"]) <= (LATENCY + SLACK) * 1e6  # usec
        assert float(row["Inferences/Second"]) > 0 and row["Stable"] == "1"
    doc = json.loads(json_path.read_text())
    assert doc["format"] == "streamgpu-loadgen/1" and doc["frame_bytes"] == 8 * 8 * 3
    assert [r["level"] for r in doc["results"]] == [1, 3]
    assert doc["results"][1]["statuses"] == {"OK": 40}
    assert doc["results"][0]["send_lag_p99_s"] is None  # NaN becomes null
    assert server.stats.frames == 80


def test_compare_gives_ratios(cli: Cli, tmp_path: Path) -> None:
    with FakeServer(0.004) as fast, FakeServer(0.012) as slow:
        rc, out, _ = cli("-u", fast.url, "--compare", slow.url, "--count", "60", "--json", str(tmp_path / "c.json"),
                         "-f", str(tmp_path / "c.csv"), *FAST)  # fmt: skip
    assert rc == 0
    assert fast.stats.frames == slow.stats.frames == 61  # 60 measured + the one frame that probes each endpoint
    assert "answer the same" not in out  # both answer alike: no warning
    assert "ratio" in out and f"ratio = {slow.url} / {fast.url}" in out
    (cmp,) = json.loads((tmp_path / "c.json").read_text())["comparison"]
    assert 1.8 < cmp["ratios"]["latency_p50"] < 3.2  # 12 ms against 4 ms plus overheads
    assert 0.3 < cmp["ratios"]["throughput"] < 0.6
    assert cmp["ratios"]["server_total_us"] == 1.0
    rows = list(csv.DictReader(io.StringIO((tmp_path / "c.csv").read_text())))
    assert [row["Endpoint"] for row in rows] == [fast.url, slow.url, "ratio"]


def test_processes_merge(cli: Cli, server: FakeServer, tmp_path: Path) -> None:
    rc, _, err = cli("-u", server.url, "--processes", "2", "--concurrency-range", "4", "--streams", "4",
                     "--count", "101", "--json", str(tmp_path / "p.json"), *FAST)  # fmt: skip
    assert rc == 0, err
    (r,) = json.loads((tmp_path / "p.json").read_text())["results"]
    assert server.stats.frames == 101 and r["completed"] == 101 and r["statuses"] == {"OK": 101}
    assert r["processes"] == 2
    assert LATENCY * 0.95 <= r["latency"]["p50"] <= LATENCY + SLACK
    assert server.stats.max_in_flight <= 4
    assert {h.stream_id for h in server.stats.headers} == {0, 1, 2, 3}
    assert server.stats.connections == 2


def test_frame_fields_reach_the_server(cli: Cli, server: FakeServer) -> None:
    rc, _, _ = cli("-u", server.url, "--count", "6", "--streams", "3", "--deadline-ms", "20", "--priority", "7",
                   "--live", "-m", "resnet", "--shape", "2x3", "--dtype", "float16", "--warmup", "0")  # fmt: skip
    assert rc == 0
    headers = server.stats.headers
    assert [h.stream_id for h in headers] == [0, 1, 2, 0, 1, 2]
    assert {(h.deadline_us, h.priority, h.flags, h.model, h.shape, h.payload_len) for h in headers} == {
        (20_000, 7, FrameFlags.LIVE, "resnet", (2, 3), 12)
    }


def test_progress_bar_on_request(cli: Cli, server: FakeServer) -> None:
    rc, _, err = cli("-u", server.url, "--count", "10", "--progress", *FAST)
    assert rc == 0 and "[" in err and "1/1" in err and "window 1" in err


def test_plot(cli: Cli, server: FakeServer, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "curve.png"
    rc, _, _ = cli("-u", server.url, "--concurrency-range", "1:2", "--count", "20", "--plot", str(png), *FAST)
    assert rc == 0 and png.read_bytes().startswith(b"\x89PNG")


def test_server_going_away_mid_run(cli: Cli) -> None:
    srv = FakeServer(0.002).start()

    def close_at_50(_h: object, i: int) -> Status:
        if i == 50:
            srv.stop()
        return Status.OK

    srv.status_for = close_at_50
    rc, _, err = cli("-u", srv.url, "--duration", "2", *FAST)
    assert rc == 1 and "the run failed" in err and "Traceback" not in err


@pytest.mark.asyncio
async def test_engine_on_this_loop() -> None:
    """LoadRunner on the test's loop (asyncio and uvloop), server on the same loop."""
    srv = FakeServer(0.002)
    await srv.start_on_loop()
    cfg = config(srv.url, levels=[LoadLevel(CONCURRENCY, 3)], count=30)
    conns = await open_connections(get_transport("tcp"), cfg.endpoints[0], cfg)
    runner = LoadRunner(conns, cfg.frames(), [0], cfg)
    windows: list[Window] = []
    stop = asyncio.Event()

    async def on_window(w: Window) -> None:
        windows.append(w)
        stop.set()

    await runner.run_level(cfg.levels[0], time.monotonic(), on_window, stop)
    await runner.close()
    await srv.stop_on_loop()
    (w,) = windows
    assert w.ok == w.sent == 30 and srv.stats.max_in_flight == 3
    assert 0.002 <= float(np.median(w.latencies)) < 0.002 + SLACK
