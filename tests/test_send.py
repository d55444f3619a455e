"""``streamgpu send`` as scripts use it: frames from a pipe, replies as JSON lines, clear errors."""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_asyncio
import torch

from streamgpu.cli import main
from streamgpu.config import Config, ListenerSpec
from streamgpu.models.builtin import build_builtin
from streamgpu.models.preprocess import preprocess_torch
from streamgpu.models.spec import ModelSpec
from streamgpu.send import SendOptions, raw_frames, send, video_frames
from streamgpu.send import run as send_run
from streamgpu.server import Server

SPEC = ModelSpec(input_shape=(32, 32, 3), max_batch_size=8, batch_buckets=(1, 8))
SEND = [sys.executable, "-m", "streamgpu", "send"]
ONE_LOOP = pytest.mark.asyncio(loop_factories=["uvloop"])  # the subprocess is what is tested


@pytest_asyncio.fixture
async def server() -> AsyncIterator[Server]:
    async with Server(Config(listeners=[ListenerSpec(port=0)], device="cpu", models=[SPEC])) as srv:
        yield srv


def reference(frames: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return build_builtin("small")(preprocess_torch(torch.from_numpy(frames), SPEC, torch.float32)).numpy()


async def run(argv: list[str], stdin: bytes | None = None, shell: str | None = None) -> tuple[int, str, str]:
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    if shell is not None:
        proc = await asyncio.create_subprocess_shell(
            shell, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env
        )
    else:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=env,
        )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(stdin), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def records(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines()]


@ONE_LOOP
async def test_frames_from_an_ffmpeg_pipe_are_answered_as_json_lines(server: Server) -> None:
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        pytest.skip("ffmpeg is not installed (sh tools/install_test_deps.sh installs it as root)")
    produce = (f"{ffmpeg} -loglevel error -f lavfi -i testsrc=size=32x32:rate=30 -frames:v 10"
               " -f rawvideo -pix_fmt rgb24 -")  # fmt: skip
    same = subprocess.run(produce.split(), capture_output=True, check=True, timeout=60).stdout  # for the reference
    frames = np.frombuffer(same, np.uint8).reshape(-1, *SPEC.input_shape)
    send = " ".join([*SEND, "--port", str(server.port), "--shape", "32x32x3", "--top-k", "0", "--in-flight", "3"])
    code, out, err = await run([], shell=f"{produce} | {send}")
    assert code == 0, err
    lines = records(out)
    assert [line["seq"] for line in lines] == list(range(10))  # in frame order
    assert {line["status"] for line in lines} == {"OK"} and {line["source"] for line in lines} == {"send"}
    np.testing.assert_allclose([line["result"] for line in lines], reference(frames), rtol=1e-4, atol=1e-4)
    assert lines[0]["shape"] == [1000] and lines[0]["dtype"] == "float32" and lines[0]["timings"]["batch_size"] >= 1


async def send_in_process(data: bytes, **kw: Any) -> tuple[int, str, str]:
    """``streamgpu.send.send`` (what the command runs) on this loop, with bytes for stdin."""
    out, err = io.StringIO(), io.StringIO()
    opts = SendOptions(**kw)
    code = await send(opts, raw_frames(io.BytesIO(data), opts), out, err)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.asyncio
async def test_top_k_lines_and_input_ending_mid_frame(server: Server) -> None:
    frames = np.random.default_rng(1).integers(0, 256, (3, *SPEC.input_shape), dtype=np.uint8)
    data = frames.tobytes()[: -SPEC.frame_nbytes // 2]  # 2.5 frames
    code, out, err = await send_in_process(data, port=server.port, shape=SPEC.input_shape, top_k=3, in_flight=1)
    assert code == 1
    assert f"input ended mid-frame ({SPEC.frame_nbytes // 2} of {SPEC.frame_nbytes} bytes)" in err
    lines = records(out)
    assert [line["seq"] for line in lines] == [0, 1]
    expected = reference(frames[:2])
    for line, want in zip(lines, expected, strict=True):
        top = np.argsort(want)[::-1][:3]
        assert [i for i, _ in line["top_k"]] == top.tolist()
        np.testing.assert_allclose([v for _, v in line["top_k"]], want[top], rtol=1e-4, atol=1e-4)
        assert "result" not in line


@pytest.mark.asyncio
async def test_refused_frames_and_unreachable_servers_exit_1(server: Server) -> None:
    frame = bytes(SPEC.frame_nbytes)
    code, out, _ = await send_in_process(frame, port=server.port, shape=SPEC.input_shape, model="nosuch")
    assert code == 1
    (line,) = records(out)
    assert line["status"] == "UNKNOWN_MODEL" and "nosuch" in line["message"] and "result" not in line
    code, out, _ = await send_in_process(frame, port=server.port, shape=(16, 16, 3))  # 4 frames of the wrong shape
    assert code == 1 and [r["status"] for r in records(out)] == ["BAD_FRAME"] * 4
    code, out, _ = await send_in_process(frame, port=server.port, shape=SPEC.input_shape)
    assert code == 0 and records(out)[0]["status"] == "OK"
    port = server.port
    await server.stop()  # nobody listens on its port now
    code, out, err = await send_in_process(frame, port=port, shape=SPEC.input_shape)
    assert code == 1 and out == "" and "cannot connect" in err


@pytest.mark.asyncio
async def test_a_frame_larger_than_the_server_takes_is_refused_before_it_is_read(server: Server) -> None:
    shape = (100_000, 100_000, 100_000)  # 10**15 bytes: was allocated (MemoryError, a traceback) before any read
    code, out, err = await send_in_process(b"", port=server.port, shape=shape)
    assert code == 1 and out == ""
    assert f"a uint8 {list(shape)} frame (--shape, --dtype) is {10**15} bytes, more than the server takes" in err


@pytest.mark.asyncio
async def test_a_udp_frame_without_any_reply_is_a_line_not_a_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    from streamgpu.loadgen.transports import UdpTransport

    monkeypatch.setattr(UdpTransport, "REPLY_TIMEOUT_S", 0.2)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:  # takes datagrams, never answers
        sink.bind(("127.0.0.1", 0))
        port = sink.getsockname()[1]
        code, out, _ = await send_in_process(bytes(2 * SPEC.frame_nbytes), port=port, transport="udp",
                                             shape=SPEC.input_shape, stream_id=7)  # fmt: skip
    assert code == 1
    lines = records(out)
    assert [(r["stream_id"], r["seq"], r["status"]) for r in lines] == [(7, 0, "INCOMPLETE"), (7, 1, "INCOMPLETE")]
    assert "no reply" in lines[0]["message"]


@pytest.mark.asyncio
async def test_a_video_decoded_with_pyav(server: Server, tmp_path: Path) -> None:
    pytest.importorskip("av", reason="PyAV is not installed (pip install av)")
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        pytest.skip("ffmpeg is not installed (sh tools/install_test_deps.sh installs it as root)")
    clip = tmp_path / "clip.mkv"  # lossless RGB: decoded frames are the generated ones, bit for bit
    source = ["-f", "lavfi", "-i", "testsrc=size=32x32:rate=10", "-frames:v", "4"]
    subprocess.run([ffmpeg, "-loglevel", "error", *source, "-c:v", "ffv1", "-pix_fmt", "bgr0", str(clip)], check=True)
    raw = subprocess.run([ffmpeg, "-loglevel", "error", "-i", str(clip), "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
                         check=True, capture_output=True).stdout  # fmt: skip
    frames = np.frombuffer(raw, np.uint8).reshape(-1, *SPEC.input_shape)
    opts = SendOptions(port=server.port, shape=SPEC.input_shape, top_k=0, video=str(clip))
    out, err = io.StringIO(), io.StringIO()
    assert await send(opts, video_frames(str(clip), opts), out, err) == 0, err.getvalue()
    lines = records(out.getvalue())
    assert [line["seq"] for line in lines] == [0, 1, 2, 3]
    np.testing.assert_allclose([line["result"] for line in lines], reference(frames), rtol=1e-4, atol=1e-4)
    clip.write_bytes(b"not a video")
    out, err = io.StringIO(), io.StringIO()
    assert await send(opts, video_frames(str(clip), opts), out, err) == 1
    assert "cannot decode" in err.getvalue() and out.getvalue() == ""


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--shape", "0,3"], "--shape"),
        (["--shape", "a,b"], "--shape"),
        (["--in-flight", "0"], "--in-flight"),
        (["--rate", "-1"], "--rate"),
        (["--port", "70000"], "--port"),
        (["--priority", "300"], "--priority"),
        (["--transport", "carrier-pigeon"], "--transport"),
        (["--dtype", "complex64"], "--dtype"),
        (["--input", "/no/such/file"], "--input"),
        (["--video", "/no/such/file"], "--video"),
        (["--video", __file__, "--shape", "8,8"], "--video"),
        (["--video", __file__, "--input", __file__], "--video"),
        (["--subscribers"], "--subscribers"),  # tcp: replies always come back
        (["--subscribers", "--transport", "ws"], "--subscribers"),
        (["--transport", "udp", "--token", "s3cret"], "--token"),
        (["--transport", "udp", "--shape", "20000,20000,3"], "--shape"),  # 1.2 GB: refused before it is read
        (["--deadline", "1e300"], "--deadline"),  # past a header's u32 of microseconds: was a ValueError traceback
    ],
)
def test_bad_send_arguments_are_cli_errors_naming_the_flag(
    argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["send", *argv])
    assert info.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err


@ONE_LOOP
async def test_ctrl_c_ends_a_send_whose_input_is_stalled() -> None:
    """A live pipe that has gone quiet (a camera paused): Ctrl-C ends ``streamgpu send`` at once with 130.
    It read its input on a thread of the loop's default executor, which the loop's shutdown waited for, so
    the process hung until the pipe gave a byte (review)."""
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # where the frame goes (no server: nothing answers)
    udp.bind(("127.0.0.1", 0))
    udp.setblocking(False)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "streamgpu", "send", "--transport", "udp", "--subscribers", "--port",
        str(udp.getsockname()[1]), "--shape", "8,8,3", stdin=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )  # fmt: skip
    assert proc.stdin is not None and proc.stderr is not None
    proc.stdin.write(bytes(8 * 8 * 3))  # one frame, then nothing: the next read blocks
    await proc.stdin.drain()
    with udp:
        await asyncio.wait_for(asyncio.get_running_loop().sock_recv(udp, 65536), 30)  # started, sent the frame
    await asyncio.sleep(0.2)  # waiting on the pipe
    proc.send_signal(signal.SIGINT)
    code = await asyncio.wait_for(proc.wait(), 10)
    assert code == 130, (await proc.stderr.read()).decode()
    assert "interrupted" in (await proc.stderr.read()).decode()
    proc.stdin.close()


def sent_options(monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> SendOptions:
    """The options ``streamgpu send argv`` would send with (nothing is sent)."""
    got: list[SendOptions] = []

    def run(opts: SendOptions) -> int:
        got.append(opts)
        return 0

    monkeypatch.setattr("streamgpu.send.run", run)
    assert main(["send", "--shape", "8,8,3", *argv]) == 0
    return got[0]


def test_send_reads_the_token_from_the_servers_variable_and_the_old_one_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """One token, one name: send read $STREAMGPU_TOKEN while the server and admin read $STREAMGPU_AUTH_TOKEN."""
    monkeypatch.delenv("STREAMGPU_TOKEN", raising=False)
    monkeypatch.setenv("STREAMGPU_AUTH_TOKEN", "s3cret")
    assert sent_options(monkeypatch, []).token == "s3cret"
    assert sent_options(monkeypatch, ["--token", "flag"]).token == "flag"  # --token wins
    assert sent_options(monkeypatch, ["--transport", "udp"]).token == ""  # no handshake: the server's token stays
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("STREAMGPU_TOKEN", "old")  # the new name wins, the old one still warns
    assert sent_options(monkeypatch, []).token == "s3cret"
    monkeypatch.delenv("STREAMGPU_AUTH_TOKEN")
    assert sent_options(monkeypatch, []).token == "old"
    assert capsys.readouterr().err == (
        "streamgpu send: warning: STREAMGPU_TOKEN is deprecated, set STREAMGPU_AUTH_TOKEN instead\n"
    )


@pytest.mark.parametrize("command", [["send"], ["admin", "list", "http://127.0.0.1:9"]])
def test_send_and_admin_refuse_a_mistyped_streamgpu_variable(
    command: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # STREAMGPU_AUTH_TOKN was ignored: send went without a token and the server refused it as unauthorized
    monkeypatch.setattr("streamgpu.send.run", lambda opts: pytest.fail("sent despite the typo"))
    monkeypatch.setenv("STREAMGPU_AUTH_TOKN", "s3cret")
    with pytest.raises(SystemExit) as info:
        main(command)
    assert info.value.code == 2
    assert "unknown environment variable STREAMGPU_AUTH_TOKN (did you mean 'STREAMGPU_AUTH_TOKEN'?)" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize(("flag", "hi"), [("--stream-id", 0xFFFFFFFF), ("--priority", 255), ("--port", 65535)])
def test_a_number_flag_out_of_range_or_of_thousands_of_digits_names_its_range(
    flag: str, hi: int, capsys: pytest.CaptureFixture[str]
) -> None:
    # 5000 digits: argparse's "invalid int value" quoting them all (int() refuses past 4300 digits), no range
    for value, shown in ((str(hi + 1), repr(str(hi + 1))), ("-1", "'-1'"), ("1" * 5000, "... (5000 characters)")):
        with pytest.raises(SystemExit) as info:
            main(["send", flag, value])
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert f"argument {flag}: must be an integer 0..{hi}, got " in err and shown in err and len(err) < 2000, err


def test_a_number_flag_may_have_thousands_of_leading_zeros(monkeypatch: pytest.MonkeyPatch) -> None:
    assert sent_options(monkeypatch, ["--stream-id", "0" * 5000 + "7"]).stream_id == 7  # int() counts the zeros


def test_a_token_longer_than_a_hello_carries_is_a_cli_error_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("streamgpu.send.run", lambda opts: pytest.fail("sent a token no HELLO carries"))
    monkeypatch.setenv("STREAMGPU_AUTH_TOKEN", "t" * 1025)
    with pytest.raises(SystemExit) as info:
        main(["send", "--shape", "8,8,3"])
    assert info.value.code == 2
    assert (
        "argument --token: the token (--token or $STREAMGPU_AUTH_TOKEN) must be at most 1024 UTF-8 bytes, got 1025"
        in (capsys.readouterr().err)
    )


@pytest.mark.asyncio
@pytest.mark.parametrize("transport", ["ws", "http"])
async def test_frames_are_sent_over_the_web_transports(transport: str) -> None:
    # A web transport learns no max_payload_bytes (no WELCOME: 0, unknown): send compared every frame with 0 and
    # refused them all, "more than the server takes (0, its max_payload_bytes)"
    listeners = [ListenerSpec(port=0), ListenerSpec(kind="http", port=0)]
    async with Server(Config(listeners=listeners, device="cpu", models=[SPEC])) as srv:
        port = srv.addresses[1][1]
        data = np.random.default_rng(3).integers(0, 256, (2, *SPEC.input_shape), dtype=np.uint8).tobytes()
        code, out, err = await send_in_process(data, port=port, shape=SPEC.input_shape, transport=transport, top_k=3)
        assert code == 0 and err == "", err
        got = records(out)
        assert [r["status"] for r in got] == ["OK", "OK"]
        # ...with each frame's result, as over TCP (the web transports gave none: no shape, dtype or top_k)
        _, tcp_out, _ = await send_in_process(data, port=srv.port, shape=SPEC.input_shape, top_k=3)
        for line, want in zip(got, records(tcp_out), strict=True):
            assert (line["shape"], line["dtype"]) == (want["shape"], want["dtype"]) == ([1000], "float32"), line
            assert [i for i, _ in line["top_k"]] == [i for i, _ in want["top_k"]], (line, want)
        # ...and with no limit to compare with, a frame too large to allocate is a message, not a MemoryError
        shape = (100_000, 100_000, 100_000)
        code, out, err = await send_in_process(b"", port=port, shape=shape, transport=transport)
    assert code == 1 and out == ""
    assert f"a uint8 {list(shape)} frame (--shape, --dtype) is {10**15} bytes, more than this process can" in err


@pytest.mark.asyncio
@pytest.mark.parametrize("transport", ["tcp", "ws", "http"])
async def test_a_server_that_never_answers_the_handshake_is_named(
    transport: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A port that accepts and never answers (a hung server, another program): the timeout's TimeoutError has no
    # text, so send printed "cannot connect to 127.0.0.1:PORT: " and nothing after
    monkeypatch.setattr("streamgpu.send.CONNECT_TIMEOUT_S", 0.5, raising=False)
    with socket.create_server(("127.0.0.1", 0)) as silent:  # the kernel accepts; nobody reads or writes
        port = silent.getsockname()[1]
        code, out, err = await send_in_process(b"", port=port, shape=SPEC.input_shape, transport=transport)
    assert code == 1 and out == ""
    assert f"cannot connect to 127.0.0.1:{port}: no answer within 0.5 s" in err, err


def test_input_from_a_named_pipe_or_device_is_taken_and_a_folder_or_unopenable_one_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # --input <(ffmpeg ...), a FIFO or /dev/zero exist but are no regular files: "no such file '/dev/fd/63'"
    fifo = tmp_path / "frames.fifo"
    os.mkfifo(fifo)
    for path in (str(fifo), "/dev/zero"):
        assert sent_options(monkeypatch, ["--input", path]).input == path
    with pytest.raises(SystemExit) as info:
        main(["send", "--input", str(tmp_path)])
    assert info.value.code == 2
    assert f"argument --input: {str(tmp_path)!r} is a folder, not a file of frames" in capsys.readouterr().err
    # a path that exists but cannot be opened (a socket's; a file without read permission): a message, exit 1
    with socket.socket(socket.AF_UNIX) as unix:
        unix.bind(str(tmp_path / "s"))
        assert send_run(SendOptions(input=str(tmp_path / "s"))) == 1
    err = capsys.readouterr().err
    assert f"streamgpu send: cannot read --input {str(tmp_path / 's')!r}: " in err and "Traceback" not in err


class _ReaderGone(io.StringIO):
    """stdout whose reader ended (``streamgpu send | head -3``): every write raises BrokenPipeError."""

    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")


@pytest.mark.asyncio
async def test_output_whose_reader_ended_stops_send_saying_so_not_blaming_the_connection(server: Server) -> None:
    # BrokenPipeError is a ConnectionError: send said "connection lost after N frames: [Errno 32] Broken pipe"
    opts = SendOptions(port=server.port, shape=SPEC.input_shape)
    err = io.StringIO()
    code = await send(opts, raw_frames(io.BytesIO(bytes(3 * SPEC.frame_nbytes)), opts), _ReaderGone(), err)
    assert code == 1
    assert "connection lost" not in err.getvalue()
    assert err.getvalue().startswith("streamgpu send: the output's reader ended (stdout: Broken pipe) after "), err
