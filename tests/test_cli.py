"""``streamgpu serve`` as a user runs it: logs, serves, exits 0 on SIGINT; clear errors."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from streamgpu import client, serve
from streamgpu.cli import build_parser, main, serve_config
from streamgpu.config import Config, ListenerSpec
from streamgpu.models.spec import ModelSpec
from streamgpu.server import Server
from streamgpu.web import admin_client


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


def test_a_second_sigint_while_models_load_exits_at_once() -> None:
    # serve's first handler only set the stop event: a signal while a model loaded (a compile can take a minute)
    # stopped nothing until the load ended, and a second one did the same, where the log promises it exits at once.
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamgpu", "serve", "--port", "0", "--device", "cpu", "--model", "builtin:resnet50"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        for wanted in ("data path:", "signal received while starting"):  # (the model loads for seconds after it)
            while not lines or wanted not in lines[-1]:
                line = proc.stdout.readline()
                assert line, "".join(lines)  # the process ended
                lines.append(line)
                assert "listening on" not in line, "".join(lines)  # the load ended before the signals were taken
            proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 1, "".join(lines) + out
    assert "second signal: exiting" in out


def test_sigterm_to_the_whole_process_group_still_answers_the_ingest_workers_frames(tmp_path: Path) -> None:
    """systemd's stop (KillMode=control-group) or `kill -TERM -PGID` signals every process of the server: the
    ingest workers, which ignored SIGINT only, died at once, and the producer lost the replies of its frames in
    flight (the connection closed) while the server logged them answered OK."""
    # (resnet50 takes a while on a CPU: a batch on a loaded 2-core machine outlasted the batch watchdog's 2 s at
    # 224x224, and at 112x112 while other work ran, answered INTERNAL_ERROR: not what this test is about)
    settings = tmp_path / "patient.toml"
    settings.write_text("[server]\nwatchdog_min_s = 120\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamgpu", "serve", "--config", str(settings), "--port", "0", "--device", "cpu",
         "--model", "builtin:resnet50", "--input-shape", "112,112,3", "--ingest-workers", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        start_new_session=True,
    )  # fmt: skip
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        while not (m := re.search(r"listening on 127\.0\.0\.1:(\d+)", lines[-1] if lines else "")):
            lines.append(proc.stdout.readline())
            assert lines[-1], "".join(lines)

        async def produce(port: int) -> list[str]:
            conn = await client.connect("127.0.0.1", port)
            replies = [conn.submit(np.zeros((112, 112, 3), np.uint8)) for _ in range(16)]
            await replies[0]  # (the rest queued or running)
            os.killpg(proc.pid, signal.SIGTERM)
            got = await asyncio.gather(*replies, return_exceptions=True)
            await conn.close()
            return [r.status.name if isinstance(r, client.Reply) else repr(r) for r in got]

        statuses = asyncio.run(produce(int(m.group(1))))
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert statuses == ["OK"] * 16, "".join(lines) + out
    assert proc.returncode == 0, "".join(lines) + out


def test_serve_started_with_sigint_ignored_is_still_interrupted_before_its_loop_runs(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A script's background job (`streamgpu serve &`) starts with SIGINT ignored; serve's own handler comes once
    # its loop runs, so a `kill -INT` sent while it imported torch and loaded models was lost and it served on.
    seen = []

    def loading(*args: object, **kwargs: object) -> Config:
        seen.append(signal.getsignal(signal.SIGINT))
        raise KeyboardInterrupt  # (what Ctrl-C raises now, while serve imports and loads)

    monkeypatch.setattr(Config, "load", loading)
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        assert main(["serve", "--device", "cpu"]) == 130
    finally:
        signal.signal(signal.SIGINT, before)
    assert seen == [signal.default_int_handler]
    assert capsys.readouterr().err == "streamgpu: interrupted\n"


def test_serve_called_from_another_thread_refuses_at_once_naming_the_embedding_api(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Only the main thread gets signals: serve failed there with a traceback (add_signal_handler's error)
    got: list[object] = []

    def call() -> None:
        try:
            got.append(main(["serve", "--port", "0", "--device", "cpu"]))
        except BaseException as exc:
            got.append(exc)

    thread = threading.Thread(target=call, name="host")
    thread.start()
    thread.join(60)
    assert got == [1], got
    assert ("cannot serve: streamgpu serve stops on SIGINT/SIGTERM, which Python delivers to the main thread only, "
            "and this is thread 'host': call it from the main thread, or, in this thread, run a "
            "streamgpu.server.Server") in caplog.text  # fmt: skip
    assert "await server.stop()" in caplog.text and "data path" not in caplog.text  # (refused before it started)


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
async def test_serve_called_where_an_event_loop_runs_refuses_at_once_naming_the_embedding_api(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # (a coroutine, a notebook) it failed with a traceback, RuntimeError 'Cannot run the event loop while another
    # loop is running', having set its own loop as this thread's and raised the open files limit
    loop = asyncio.get_running_loop()
    assert main(["serve", "--port", "0", "--device", "cpu"]) == 1
    assert ("cannot serve: streamgpu serve runs an event loop of its own, and one runs in this thread already (a "
            "coroutine, a notebook): on that loop, run a streamgpu.server.Server instead") in caplog.text  # fmt: skip
    assert asyncio.get_event_loop_policy().get_event_loop() is loop and "data path" not in caplog.text


def test_a_program_that_runs_serve_gets_its_signal_handlers_back() -> None:
    # serve's loop, closing, left SIGINT at Python's default and SIGTERM at the system's (which kills)
    def handler(signum: int, frame: object) -> None:
        pass

    before = signal.signal(signal.SIGINT, handler), signal.signal(signal.SIGTERM, handler)
    try:
        assert main(["serve", "--port", "0", "--device", "cpu", "--model", "torchscript:/no/such/model.pt"]) == 1
        assert signal.getsignal(signal.SIGINT) is handler and signal.getsignal(signal.SIGTERM) is handler
    finally:
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGTERM, before[1])


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("had", ["none", "its own"])
def test_run_leaves_the_threads_event_loop_as_it_found_it(loop: str, had: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # run set its loop as the thread's current one and closed it on return without unsetting it: the caller's
    # asyncio.get_event_loop() then gave that closed loop ("Event loop is closed" at its first use)
    start = Server.start

    async def started_then_interrupted(server: Server) -> None:
        await start(server)
        signal.raise_signal(signal.SIGINT)  # (run's handler is installed: it stops the server, run returns 0)

    monkeypatch.setattr(Server, "start", started_then_interrupted)
    own = asyncio.new_event_loop() if had == "its own" else None
    asyncio.set_event_loop(own)
    try:
        spec = ModelSpec(input_shape=(4, 4, 3), max_batch_size=1, batch_buckets=(1,))
        assert serve.run(Config(listeners=[ListenerSpec(port=0)], device="cpu", models=[spec], loop=loop)) == 0
        if own is None:
            with pytest.raises(RuntimeError, match="no current event loop"):
                asyncio.get_event_loop_policy().get_event_loop()
        else:
            assert asyncio.get_event_loop_policy().get_event_loop() is own and not own.is_closed()
            assert own.run_until_complete(asyncio.sleep(0, "used the old way")) == "used the old way"
    finally:
        asyncio.set_event_loop(None)
        if own is not None:
            own.close()


def test_a_signal_while_the_command_exits_ends_it_at_once_with_its_status() -> None:
    """After a drain the process still runs exit hooks (torch's teardown, ~0.6 s); a second Ctrl-C then raised
    KeyboardInterrupt inside one and printed its traceback. The command (``console``) now exits at once with the
    status ``main`` returned. A slow exit hook stands in for torch's teardown."""
    child = textwrap.dedent("""
        import atexit, sys, time
        from streamgpu import cli
        cli.main = lambda argv=None: 3
        atexit.register(lambda: (print("exiting", flush=True), time.sleep(5)))
        cli.console()
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "exiting\n"
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=10)
    assert (proc.returncode, err) == (3, "") and time.monotonic() - started < 2


def test_serve_raises_a_low_open_files_limit_so_its_connections_are_served() -> None:
    """Started with a soft limit of 160 open files (below max_connections, 1024), ``streamgpu serve`` raises
    it: 200 producers are welcomed and served. (Left at 160, accept() failed once the descriptors ran out
    and the producers past it hung in the backlog.)"""

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (160, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    proc = subprocess.Popen(
        [sys.executable, "-m", "streamgpu", "serve", "--port", "0", "--device", "cpu", "--input-shape", "8,8,3"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        preexec_fn=low_limit,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        port = None
        lines: list[str] = []
        deadline = time.monotonic() + 60
        while port is None and time.monotonic() < deadline:
            lines.append(proc.stdout.readline())
            if m := re.search(r"listening on 127\.0\.0\.1:(\d+)", lines[-1]):
                port = int(m.group(1))
        assert port is not None, "".join(lines)

        async def producers() -> list[bool]:
            conns = []
            try:
                async with asyncio.timeout(30):
                    for _ in range(200):
                        conns.append(await client.connect("127.0.0.1", port))
                    frame = np.zeros((8, 8, 3), np.uint8)
                    return [(await conn.submit(frame)).ok for conn in conns[::20]]
            finally:
                for conn in conns:
                    await conn.close()

        assert all(asyncio.run(producers()))
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out


def test_a_hard_open_files_limit_below_max_connections_is_named(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    set_to: list[tuple[int, int]] = []
    monkeypatch.setattr(serve.resource, "getrlimit", lambda _: (256, 600))
    monkeypatch.setattr(serve.resource, "setrlimit", lambda _, limits: set_to.append(limits))
    serve.raise_descriptor_limit(Config(max_connections=1024))
    assert set_to == [(600, 600)]
    assert "open files are limited to 600 (hard limit), below max_connections (1024)" in caplog.text
    set_to.clear()
    serve.raise_descriptor_limit(Config(max_connections=64))  # 64 + the margin fits: raised, no warning
    assert set_to == [(64 + serve.DESCRIPTOR_MARGIN, 600)]


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


def test_version_log_level_any_case_and_model_flags(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from streamgpu import __version__

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"streamgpu {__version__}"
    (tmp_path / "m.pt").write_bytes(b"")  # (check-config asks only that the file can be read)
    model = f"torchscript:{tmp_path / 'm.pt'}"
    args = ["check-config", "--log-level", "debug", "--model", model, "--model-name", "lidar",
            "--input-shape", "1024,4", "--input-dtype", "float32"]  # fmt: skip
    assert main(args) == 0
    resolved = json.loads(capsys.readouterr().out)
    assert resolved["log_level"] == "DEBUG"
    model = resolved["models"][0]
    assert (model["name"], model["input_shape"], model["input_dtype"], model["preprocess"]) == (
        "lidar", [1024, 4], "float32", "none")  # fmt: skip


def test_check_config_prints_resolved_settings_with_tokens_masked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[server]\nport = 9000\nauth_token = "s3cret"\n[server.tokens.cam]\ntoken = "t0ken"\n')
    monkeypatch.setenv("STREAMGPU_MAX_PRIORITY", "7")
    assert main(["check-config", str(path), "--host", "0.0.0.0"]) == 0
    out = capsys.readouterr().out
    assert "s3cret" not in out and "t0ken" not in out
    resolved = json.loads(out)
    assert resolved["listeners"][0]["port"] == 9000 and resolved["listeners"][0]["host"] == "0.0.0.0"
    assert resolved["max_priority"] == 7 and resolved["auth_token"] == "***"
    path.write_text('[server]\nport = "7883"\n')
    with pytest.raises(SystemExit) as info:
        main(["check-config", str(path)])
    assert info.value.code == 2
    assert "server.port must be an integer, got '7883' (str)" in capsys.readouterr().err


def test_a_config_file_nested_too_deeply_is_a_cli_error_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "c.toml"
    path.write_text("a = " + "[" * 100_000 + "]" * 100_000)
    for command in ("check-config", "serve"):
        with pytest.raises(SystemExit) as info:  # (was a RecursionError's traceback)
            main([command, "--config", str(path)])
        assert info.value.code == 2
        assert f"config file {str(path)!r}: tables or arrays nested more than 32" in capsys.readouterr().err


def test_admin_load_settings_nested_too_deeply_are_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:  # (json's RecursionError was a traceback)
        main(["admin", "load", "http://127.0.0.1:9", "cam", "input_shape=" + "[" * 100_000])
    assert info.value.code == 2
    assert "setting 'input_shape': tables or arrays nested more than 32" in capsys.readouterr().err


@pytest.mark.parametrize("scheme", ["state_dict", "torchscript", "export"])
def test_check_config_refuses_a_model_file_source_that_cannot_be_read(
    scheme: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A missing file, or a folder, named as a model's source: check-config said the config was fine and serve
    then failed at load. Only the file system is asked (nothing is loaded: the file here holds no model)."""
    arch = 'arch = "small"\n' if scheme == "state_dict" else ""
    path = tmp_path / "c.toml"
    for source in ("/nope.pt", str(tmp_path)):
        path.write_text(f'[[models]]\nname = "cam"\nsource = "{scheme}:{source}"\n{arch}')
        with pytest.raises(SystemExit) as info:
            main(["check-config", str(path)])
        assert info.value.code == 2
        assert f"model 'cam': source file {source!r} " in capsys.readouterr().err
    (tmp_path / "m.pt").write_bytes(b"not loaded")
    path.write_text(f'[[models]]\nname = "cam"\nsource = "{scheme}:{tmp_path / "m.pt"}"\n{arch}')
    assert main(["check-config", str(path)]) == 0


def test_check_config_refuses_a_model_repository_that_is_no_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "c.toml"
    for where in (tmp_path / "none", path):
        path.write_text(f'[server]\nmodel_repository = "{where}"\n')
        with pytest.raises(SystemExit) as info:
            main(["check-config", str(path)])
        assert info.value.code == 2
        assert f"model_repository {str(where)!r} " in capsys.readouterr().err
    path.write_text(f'[server]\nmodel_repository = "{tmp_path}"\n')
    assert main(["check-config", str(path)]) == 0


def test_serve_refuses_a_mistyped_environment_variable(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STREAMGPU_LOG_LEVL", "debug")
    with pytest.raises(SystemExit) as info:
        main(["check-config"])
    assert info.value.code == 2
    assert "STREAMGPU_LOG_LEVL (did you mean 'STREAMGPU_LOG_LEVEL'?)" in capsys.readouterr().err


def test_a_taken_address_fails_before_models_load_and_names_it(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        # resnet50 would take seconds to build: the bind error must come first
        code = main(["serve", "--port", str(port), "--device", "cpu", "--model", "builtin:resnet50"])
    assert code == 1
    assert f"cannot bind tcp listener to 127.0.0.1:{port}: Address already in use" in caplog.text
    assert "model default" not in caplog.text and time.monotonic() - started < 5


def test_serve_logs_its_data_path(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    code = main(["serve", "--port", "0", "--device", "cpu", "--model", "torchscript:/no/such/model.pt"])
    assert code == 1
    assert "data path: the CPU backend" in caplog.text


def test_client_and_loadgen_import_no_torch() -> None:
    code = ("import sys, streamgpu.client, streamgpu.loadgen.cli, streamgpu.cli;"
            "from streamgpu.loadgen.cli import main;"
            "sys.argv = ['streamgpu-loadgen', '--help'];"
            "import contextlib, io\n"
            "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()): main()\n"
            "print(sorted(m for m in ('torch', 'cupy', 'aiohttp', 'prometheus_client') if m in sys.modules))"
            )  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stderr


def test_setup_gpu_names_the_cupy_build_for_torchs_cuda(capsys: pytest.CaptureFixture[str]) -> None:
    from streamgpu.gpu import setup

    assert setup.cupy_package("13.0") == "cupy-cuda13x" and setup.cupy_package("12.8") == "cupy-cuda12x"
    assert setup.cupy_package("") is None
    if setup.torch_cuda_version() is None:  # a CPU build of torch (CI): nothing to install, and it says so
        assert main(["setup-gpu"]) == 0
        assert "nothing to install" in capsys.readouterr().out


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
        # int() refused them (too many digits; a superscript two) and argparse said "invalid raw_listener_flag value"
        (f"tcp:{'1' * 5000}:default", "argument --raw: PORT must be 0..65535, got '11111111111111111111'... (5000 "),
        ("tcp:\u00b2:default", "argument --raw: PORT must be 0..65535, got '\u00b2'"),
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


def test_a_taken_results_port_fails_before_models_load_and_names_the_setting(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        code = main(["serve", "--port", "0", "--device", "cpu", "--model", "builtin:resnet50", "--results-port",
                     str(port)])  # fmt: skip
    assert code == 1
    assert f"cannot bind results_port to 127.0.0.1:{port}: Address already in use" in caplog.text
    assert "model default" not in caplog.text and time.monotonic() - started < 5


def test_an_unwritable_results_file_names_the_setting(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "no" / "such" / "results.jsonl"
    code = main(["serve", "--port", "0", "--device", "cpu", "--results-file", str(path)])
    assert code == 1
    assert f"cannot open results_file {str(path)!r}: No such file or directory" in caplog.text


@pytest.mark.parametrize(
    ("flag", "setting"), [("--udp-port", "udp_port"), ("--http-port", "http_port"), ("--port", "port")]
)
def test_an_out_of_range_port_flag_names_its_setting(
    flag: str, setting: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["check-config", flag, "99999"])
    assert info.value.code == 2
    assert f"{setting} must be 0..65535, got 99999" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--port", "--http-port", "--udp-port", "--results-port", "--ingest-workers"])
def test_a_number_flag_of_thousands_of_digits_is_refused_with_the_value_cut(
    flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # argparse's int printed all 5000 digits ("invalid int value")
    with pytest.raises(SystemExit) as info:
        main(["check-config", flag, "9" * 5000])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: must be an integer of at most 20 digits" in err and len(err) < 1000


def test_gpu_devices_with_no_gpu_are_an_error_naming_them(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("streamgpu.gpu.backend.cuda_usable", lambda: False)  # auto: no GPU, so the cpu backend
    assert main(["serve", "--port", "0", "--device", "auto", "--devices", "0,1"]) == 1
    assert "devices [0, 1] name GPUs, but no usable CUDA device was found" in caplog.text


def test_check_config_takes_the_serve_command_lines_flags(capsys: pytest.CaptureFixture[str]) -> None:
    # an operator checks a serve command line by swapping the word: --config FILE included
    example = str(Path(__file__).parent.parent / "configs" / "example.toml")
    assert main(["check-config", "--config", example, "--port", "9000"]) == 0
    assert json.loads(capsys.readouterr().out)["listeners"][0]["port"] == 9000
    with pytest.raises(SystemExit) as info:
        main(["check-config", example, "--config", "other.toml"])
    assert info.value.code == 2
    assert "give the config file once" in capsys.readouterr().err


@pytest.mark.parametrize("url", ["127.0.0.1:8000", "notaurl", "ftp://127.0.0.1:8000"])
def test_admin_with_a_url_that_is_not_http_says_so(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    # a usage error: exit 2 as every other command's (it was 1, a server's refusal's status)
    with pytest.raises(SystemExit) as info:
        main(["admin", "list", url])
    assert info.value.code == 2
    assert f"admin list: URL must start with http:// or https://, got {url!r}" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://[::1", "not a URL (Invalid IPv6 URL)"),  # was a traceback
        ("http://127.0.0.1:abc", "port 'abc' is not 0..65535"),  # was 'is it the server's http_port?', exit 1
        ("http://127.0.0.1:99999", "port '99999' is not 0..65535"),
        ("http://", "no host"),  # was 'no host given', exit 1
        ("http://:8000", "no host"),
        ("http://127.0.0.1:8000/a b", "a space or control character"),  # was 'is it the server's http_port?'
    ],
)
def test_admin_with_a_url_that_names_no_server_says_so_before_any_request(
    url: str, why: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["admin", "list", url])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"admin list: URL {url!r}: {why}" in err and "Traceback" not in err, err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["load", "http://127.0.0.1:1", "cam", "max_batch_size"], "setting 'max_batch_size' must be KEY=VALUE"),
        (["load", "http://127.0.0.1:1", "cam", "=1"], "setting '=1' must be KEY=VALUE"),
        (["load", "http://127.0.0.1:1"], "admin load needs NAME"),
        (["list", "http://127.0.0.1:1", "cam"], "admin list takes no NAME, got 'cam'"),
        (["unload", "http://127.0.0.1:1", "cam", "a=1"], "admin unload takes no settings"),
        # bytes of the command line that are not UTF-8 (surrogates to Python): were a UnicodeEncodeError traceback
        (["load", "http://127.0.0.1:1", "a\udcffb"], "admin load: NAME 'a\\udcffb' is not valid UTF-8 text"),
        (["unload", "http://127.0.0.1:1", "\udcff"], "admin unload: NAME '\\udcff' is not valid UTF-8 text"),
        (["list", "http://127.0.0.1:1", "--token", "\udcff"], "the token (--token or $STREAMGPU_AUTH_TOKEN) is not"),
    ],
)
def test_admin_usage_errors_exit_2_before_any_request(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:  # (port 1: nothing listens; a request would fail, exit 1)
        main(["admin", *argv])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_admin_against_a_port_that_does_not_speak_http_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as listener:  # answers a request with bytes that are no HTTP status line
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]

        def answer() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(b"SGWE not http\r\n")

        thread = threading.Thread(target=answer)
        thread.start()
        assert main(["admin", "list", f"http://127.0.0.1:{port}"]) == 1
        thread.join()
    err = capsys.readouterr().err
    assert err.startswith(f"streamgpu admin: http://127.0.0.1:{port}/v2/repository/index: ") and "HTTP" in err


def test_ctrl_c_before_the_server_runs_is_a_message_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # SIGINT before serve installs its handlers (torch's import takes seconds) raises KeyboardInterrupt
    def interrupted(*args: object, **kwargs: object) -> Config:
        raise KeyboardInterrupt

    monkeypatch.setattr(Config, "load", interrupted)
    assert main(["serve", "--device", "cpu"]) == 130
    assert capsys.readouterr().err == "streamgpu: interrupted\n"


@pytest.mark.parametrize("ring_bytes", [2**63 - 1, 10**20])  # more than memory; past the kernel's file size
def test_a_ring_too_large_to_allocate_fails_serve_naming_ring_bytes(
    ring_bytes: int, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "big.toml"
    path.write_text(f"[server]\nring_bytes = {ring_bytes}\n")
    code = main(["serve", "--port", "0", "--device", "cpu", "--config", str(path)])
    assert code == 1
    assert f"cannot serve: ring_bytes = {ring_bytes}: the receive ring cannot be allocated" in caplog.text
    assert "lower ring_bytes" in caplog.text


def test_check_config_into_a_pipe_whose_reader_ended_exits_without_a_traceback() -> None:
    # `streamgpu check-config | head -1`: head exits, and print raised BrokenPipeError (a traceback)
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is written
    try:
        done = subprocess.run([sys.executable, "-m", "streamgpu", "check-config"], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=60)  # fmt: skip
    finally:
        os.close(write_end)
    assert done.returncode == 1 and done.stderr == "", done.stderr


def test_admin_list_prints_one_line_a_model_whatever_its_folder_is_named(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A repository folder's name with a line separator in it (listed UNAVAILABLE) was printed as it is
    entries = [
        {
            "name": "cam\u2028era",
            "version": 0,
            "state": "UNAVAILABLE",
            "reason": "model name 'cam\u2028era' is not\nplain",
        },
        {"name": "default", "version": 1, "state": "READY", "reason": ""},
    ]
    monkeypatch.setattr(admin_client, "index", lambda url, token="": entries)
    assert main(["admin", "list", "http://127.0.0.1:1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("'cam\\u2028era'\tversion 0\tUNAVAILABLE\t"), lines
    assert lines[1] == "default\tversion 1\tREADY\t"
