"""Bad arguments give a clear message and exit status 2, without a traceback."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from fakeserver import FakeServer
from loadgen_support import FAST, Cli

from streamgpu.loadgen import sources
from streamgpu.loadgen.cli import build_parser, config_from_args, parse_endpoint, parse_range
from streamgpu.loadgen.config import CONCURRENCY, Endpoint, LoadLevel, RunConfig
from streamgpu.loadgen.errors import UsageError
from streamgpu.protocol.wire import Status


def test_parse_range() -> None:
    assert parse_range("4", integer=True) == [4]
    assert parse_range("1:4", integer=True) == [1, 2, 3, 4]
    assert parse_range("1:8:3", integer=True) == [1, 4, 7]
    assert parse_range("100:200:50", integer=False) == [100, 150, 200]
    assert parse_range("0.5:1.5:0.5", integer=False) == [0.5, 1.0, 1.5]
    assert parse_range("0.1:0.3:0.1", integer=False) == pytest.approx([0.1, 0.2, 0.3])  # float steps land past 0.3
    # One level, however large: stepping by 1 from 1e300 never left 1e300 ("more than 10000 levels")
    assert parse_range("1e300", integer=False) == [1e300]
    assert parse_range("1:10000", integer=True)[-1] == 10000


def test_parse_endpoint() -> None:
    assert parse_endpoint("example.org:9000") == Endpoint("example.org", 9000)
    assert parse_endpoint("example.org") == Endpoint("example.org", 7878)
    assert parse_endpoint("[::1]:9000") == Endpoint("::1", 9000)
    assert parse_endpoint("[::1]") == Endpoint("::1", 7878)  # was "port must be 1..65535, got '1]'"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--concurrency-range", "1:x"], "bad range '1:x'"),
        (["--concurrency-range", "1:2:3:4"], "expected start[:end[:step]]"),
        (["--concurrency-range", "0:4"], "must be > 0"),
        (["--concurrency-range", "-2"], "must be > 0"),
        (["--concurrency-range", "8:2"], "end 2 is below start 8"),
        (["--concurrency-range", "1.5"], "whole numbers"),
        (["--request-rate-range", "0"], "must be > 0"),
        (["--request-rate-range", "10:20:0"], "must be > 0"),
        (["--request-rate-range", "inf"], "bad range 'inf': start, end and step must be finite"),
        (["--request-rate-range", "1:1e9"], "bad range '1:1e9': 1e+09 levels, more than 10000"),
        (["--concurrency-range", "1:10001"], "10001 levels, more than 10000"),
        (["--concurrency-range", "2", "--request-rate-range", "10"], "not allowed with argument"),
        (["--shape", "3xax3"], "bad shape '3xax3'"),
        (["--shape", "0x3"], "every dimension must be positive"),
        (["--dtype", "complex64"], "not carried by the wire format"),
        (["--dtype", "bogus"], "unknown dtype 'bogus'"),
        (["-i", "carrier-pigeon"], "unknown transport 'carrier-pigeon'; available: "),
        (["--processes", "0"], "must be > 0, got 0"),
        (["--streams", "-1"], "must be > 0"),
        (["--count", "2.5"], "'2.5' is not a whole number"),
        (["--count", "5", "--duration", "1"], "not allowed with argument"),
        (["-p", "abc"], "'abc' is not a number"),
        (["--request-distribution", "zipf"], "invalid choice"),
        (["--priority", "300"], "argument --priority: must be an integer 0..255, got '300'"),
        (["--priority", "9" * 5000], "must be an integer 0..255, got '99999999999999999999'... (5000 characters)"),
        (["--processes", "2", "--concurrency-range", "1"], "concurrency must be a whole number >= --processes (2)"),
        (["-u", "host:notaport"], "port must be 1..65535, got 'notaport'"),
        (["-u", "host:70000"], "port must be 1..65535"),
        (["-u", "host:0"], "port must be 1..65535, got '0'"),
        # thousands of digits: Python's int() refuses past 4300 of them; quoted in full before, or its message
        (["-u", "host:" + "9" * 5000], "port must be 1..65535, got '99999999999999999999'... (5000 characters)"),
        (["--count", "9" * 5000], "'99999999999999999999'... (5000 characters) is not a whole number"),
        (["--concurrency-range", "9" * 5000], "bad range '99999999999999999999'... (5000 characters)"),
        (["--warmup", "inf"], "argument --warmup: must be a finite number >= 0, got inf"),
        (["--duration", "inf"], "argument --duration: must be a finite number > 0, got inf"),
        (["--deadline-ms", "1e300"], "--deadline-ms must be at most 4294967.295 ms"),  # a u32 of microseconds
        (["--streams", "99999999999"], "--streams must be at most 1000000"),  # hung, building ids 0..N-1
        (["--concurrency-range", "1000000000"], "concurrency must be at most 1000000, got 1e+09"),  # ran out of memory
        (["--seed", "-1"], "--seed must be >= 0, got -1"),  # numpy's ValueError, a traceback
        # numpy's ValueError (too big for an array) or MemoryError, a traceback
        (
            ["--shape", "4294967295x4294967295x8"],
            "--shape 4294967295x4294967295x8: a uint8 frame is 147573952520956936200 bytes, too large to build",
        ),
    ],
)
def test_bad_arguments(cli: Cli, argv: list[str], message: str) -> None:
    rc, out, err = cli(*argv)
    assert rc == 2
    assert message in err
    assert "Traceback" not in err + out
    assert "usage: loadgen" in err


def test_unreachable_server(cli: Cli) -> None:
    port = _closed_port()
    rc, _, err = cli("-u", f"127.0.0.1:{port}", "--count", "1", "--connect-timeout", "2")
    assert rc == 2
    assert f"cannot connect to 127.0.0.1:{port} over tcp" in err and "Traceback" not in err


@pytest.mark.parametrize("transport", ["tcp", "ws", "http"])
def test_a_server_that_never_answers_the_handshake_is_named(cli: Cli, transport: str) -> None:
    # The connect timeout's TimeoutError has no text: the error ended "over tcp: TimeoutError"
    with socket.create_server(("127.0.0.1", 0)) as silent:  # the kernel accepts; nobody reads or writes
        port = silent.getsockname()[1]
        rc, _, err = cli("-u", f"127.0.0.1:{port}", "-i", transport, "--count", "1", "--connect-timeout", "0.5")
    assert rc == 2 and "Traceback" not in err
    assert f"cannot connect to 127.0.0.1:{port} over {transport}: no answer within 0.5 s (--connect-timeout)" in err


def test_refused_handshake(cli: Cli) -> None:
    with FakeServer(welcome_status=Status.UNAUTHORIZED) as srv:
        rc, _, err = cli("-u", srv.url, "--count", "1", "--token", "wrong")
    assert rc == 2
    assert f"cannot connect to {srv.url}" in err and "UNAUTHORIZED" in err


def test_frame_larger_than_server_accepts(cli: Cli) -> None:
    with FakeServer(max_payload=1000) as srv:
        rc, _, err = cli("-u", srv.url, "--count", "1", "--shape", "32x32x3")
    assert rc == 2
    assert "a frame is 3072 bytes but" in err and "accepts at most 1000" in err
    assert srv.stats.frames == 0


def test_plot_without_matplotlib(cli: Cli, server: FakeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # import fails as if not installed
    rc, _, err = cli("-u", server.url, "--count", "1", "--plot", "x.png", *FAST)
    assert rc == 2 and "--plot needs matplotlib" in err
    assert server.stats.frames == 0  # refused before the run


def test_missing_image_file(cli: Cli, server: FakeServer) -> None:
    pytest.importorskip("PIL")
    rc, _, err = cli("-u", server.url, "--count", "1", "--images", "/nonexistent.png", *FAST)
    assert rc == 2 and "cannot read image /nonexistent.png" in err


def test_help_exits_zero(cli: Cli) -> None:
    rc, out, _ = cli("--help")
    assert rc == 0 and "--concurrency-range" in out


@pytest.mark.parametrize("flag", ["-f", "--json", "--plot"])
def test_an_output_file_in_a_missing_folder_is_refused_before_the_run(cli: Cli, server: FakeServer, flag: str) -> None:
    rc, _, err = cli("-u", server.url, "--count", "1", flag, "/no/such/folder/out", *FAST)
    assert rc == 2 and "folder '/no/such/folder' does not exist" in err and "Traceback" not in err
    assert server.stats.frames == 0  # not after a run whose results would be lost


@pytest.mark.parametrize("flag", ["-f", "--json", "--plot"])
def test_an_output_file_that_is_a_folder_or_cannot_be_written_is_refused_before_the_run(
    cli: Cli, server: FakeServer, flag: str, tmp_path: Path
) -> None:
    """A folder, or a file in a folder where none can be created (/proc: not even root can), named as an output
    failed only after the whole run, whose results were lost."""
    for path, why in (
        (str(tmp_path), "is a folder"),
        ("/proc/out", "cannot be written: no file can be made in folder '/proc'"),
    ):
        rc, _, err = cli("-u", server.url, "--count", "1", flag, path, *FAST)
        assert rc == 2 and f"'{path}' {why}" in err and "Traceback" not in err, err
        assert flag in err
    assert server.stats.frames == 0
    assert list(tmp_path.iterdir()) == []  # the check leaves nothing behind


def test_an_output_file_under_a_file_says_that_it_is_no_folder(cli: Cli, server: FakeServer, tmp_path: Path) -> None:
    # it said "folder '.../results' does not exist", which it does: as a file
    (tmp_path / "results").write_text("")
    rc, _, err = cli("-u", server.url, "--count", "1", "--json", str(tmp_path / "results" / "out.json"), *FAST)
    assert rc == 2 and f"--json: '{tmp_path / 'results'}' is not a folder" in err, err
    assert server.stats.frames == 0


def test_two_outputs_naming_one_file_are_refused_before_the_run(cli: Cli, server: FakeServer, tmp_path: Path) -> None:
    # the JSON overwrote the CSV after every level: one of the two was lost, silently
    rc, _, err = cli("-u", server.url, "--count", "1", "-f", str(tmp_path / "r"), "--json", f"{tmp_path}/./r", *FAST)
    assert rc == 2 and "-f/--latency-report-file and --json name the same file" in err, err
    assert server.stats.frames == 0 and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flag", ["-f", "--json", "--plot"])
def test_an_output_file_that_exists_read_only_is_refused_before_the_run(
    cli: Cli, server: FakeServer, flag: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--plot onto a read-only file failed only after the whole run (the folder check passed). As root no mode
    bit denies a write, so os.access is made to say what it says to another user; the real file is chmod 444."""
    out = tmp_path / "out"
    out.write_text("kept\n")
    out.chmod(0o444)
    if os.geteuid() == 0:
        access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: mode != os.W_OK if Path(p) == out else access(p, mode))
    rc, _, err = cli("-u", server.url, "--count", "1", flag, str(out), *FAST)
    assert rc == 2 and f"{flag}" in err and f"'{out}' exists and cannot be written (read-only)" in err, err
    assert server.stats.frames == 0 and out.read_text() == "kept\n"


def test_the_token_comes_from_the_servers_variable_as_for_send_and_admin(monkeypatch: pytest.MonkeyPatch) -> None:
    # loadgen read no token variable: against a server with an auth_token every run needed --token, where send and
    # admin take STREAMGPU_AUTH_TOKEN
    monkeypatch.setenv("STREAMGPU_AUTH_TOKEN", "s3cret")
    parser = build_parser()
    assert config_from_args(parser.parse_args(["--count", "1"])).token == "s3cret"
    assert config_from_args(parser.parse_args(["--count", "1", "--token", "mine"])).token == "mine"
    assert config_from_args(parser.parse_args(["--count", "1", "-i", "udp"])).token == ""  # no handshake: not sent


def test_a_frame_too_large_for_memory_is_a_usage_error(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    # numpy's MemoryError ("Unable to allocate 931. GiB" for 100000x100000x100) ended in a traceback
    def no_memory(*_args: object, **_kw: object) -> None:
        raise MemoryError

    monkeypatch.setattr(sources, "synthetic", no_memory)
    rc, _, err = cli("--count", "1", "--shape", "100000x100000x100")
    assert rc == 2 and "--shape 100000x100000x100: a uint8 frame is 1000000000000 bytes, too large" in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("change", "message"),
    [
        # ran as an open loop at 4 frames/s, reported under "target/s"
        ({"levels": [LoadLevel("Concurrency", 4)]}, "a load level's mode must be 'concurrency' or 'rate', got 'Con"),
        ({"shape": (-1, 3)}, "bad shape '-1x3': every dimension must be positive"),  # numpy's ValueError at the run
        ({"shape": ()}, "empty shape"),
    ],
)
def test_a_bad_run_config_made_in_code_is_refused(change: dict[str, object], message: str) -> None:
    base: dict[str, object] = {"endpoints": [Endpoint("127.0.0.1", 1)], "levels": [LoadLevel(CONCURRENCY, 1)]}
    with pytest.raises(UsageError, match=re.escape(message)):
        RunConfig(**{**base, **change}).validate()  # type: ignore[arg-type]


def test_a_token_longer_than_a_hello_carries_is_a_usage_error(cli: Cli, server: FakeServer) -> None:
    # it was a ValueError traceback from the client's HELLO, after the run had started
    rc, _, err = cli("-u", server.url, "--count", "1", "--token", "t" * 1025, *FAST)
    assert rc == 2 and "--token (or $STREAMGPU_AUTH_TOKEN) must be at most 1024 UTF-8 bytes, got 1025" in err, err
    assert server.stats.frames == 0


def test_output_whose_reader_ended_stops_the_run_saying_so(server: FakeServer) -> None:
    # `streamgpu-loadgen ... | head -1`: the table's print raised BrokenPipeError, reported as
    # "error: [Errno 32] Broken pipe" as if the run had failed
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the table is written
    try:
        command = "import sys; from streamgpu.loadgen.cli import main; sys.exit(main())"  # (streamgpu-loadgen)
        done = subprocess.run([sys.executable, "-c", command, "-u", server.url, "--count", "20", *FAST],
                              stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60)  # fmt: skip
    finally:
        os.close(write_end)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().endswith("the output's reader ended (stdout: Broken pipe): stopped"), done.stderr
    assert "Traceback" not in done.stderr and "Errno" not in done.stderr, done.stderr
