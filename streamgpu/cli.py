"""``streamgpu`` command line: a thin layer over the programmatic API."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import math
import os
import signal
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from streamgpu import __version__
from streamgpu.cmdline import STOP_SIGNALS, decimal, discard_output, honour_interrupts, integer, shown, whole
from streamgpu.config import (
    AUTH_TOKEN_ENV,
    LOG_FORMATS,
    LOG_LEVELS,
    OLD_TOKEN_ENV,
    Config,
    ListenerSpec,
    check_env_names,
)
from streamgpu.errors import ConfigError, StreamgpuError
from streamgpu.gpu import DEVICES
from streamgpu.loops import LOOPS
from streamgpu.models.spec import PREPROCESS_KINDS
from streamgpu.protocol import wire

RAW_MODES = ("live", "every")


def raw_listener_flag(text: str) -> tuple[int, str, bool]:
    """``--raw tcp:PORT:MODEL[:live|:every]`` -> (port, model, live)."""
    parts = text.split(":")
    if len(parts) not in (3, 4) or parts[0] != "tcp" or not parts[2]:
        raise argparse.ArgumentTypeError(f"expected tcp:PORT:MODEL or tcp:PORT:MODEL:live|every, got {shown(text)}")
    if (port := decimal(parts[1], 65535)) is None:
        raise argparse.ArgumentTypeError(f"PORT must be 0..65535, got {shown(parts[1])} in {shown(text)}")
    mode = parts[3] if len(parts) == 4 else "live"
    if mode not in RAW_MODES:
        raise argparse.ArgumentTypeError(f"mode must be one of {RAW_MODES}, got {mode!r} in {shown(text)}")
    return port, parts[2], mode == "live"


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.replace("x", ",").split(","))
    except ValueError:
        dims = ()
    if not dims or any(d <= 0 for d in dims) or len(dims) > wire.MAX_NDIM:
        raise argparse.ArgumentTypeError(f"expected 1..{wire.MAX_NDIM} positive sizes like 224,224,3, got {text!r}")
    return dims


def _positive(kind: type[int] | type[float], zero: bool = False) -> Callable[[str], int | float]:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
            raise argparse.ArgumentTypeError(f"must be {'>= 0' if zero else '> 0'}, got {text!r}")
        return value

    return parse


def _settings_flags() -> argparse.ArgumentParser:
    """The flags ``serve`` and ``check-config`` share: each overrides one setting of the config."""
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument("--host", help="address to bind (default 127.0.0.1)")
    flags.add_argument("--port", type=whole, help="TCP port (default 7878; 0 picks a free one)")
    flags.add_argument(
        "--http-port", type=whole, metavar="P",
        help="also serve HTTP (Open Inference Protocol, WebSocket streams) on port P (0: a free one)",
    )  # fmt: skip
    flags.add_argument(
        "--udp-port", type=whole, metavar="PORT", help="also take chunked frames over UDP on this port (same host)"
    )
    flags.add_argument("--device", choices=DEVICES, help="auto (cuda when usable), cuda or cpu")
    flags.add_argument("--devices", type=_indices, metavar="0,1", help="GPU indices to serve on (default 0)")
    flags.add_argument("--loop", choices=LOOPS, help="event loop (default auto: uvloop when installed)")
    flags.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, help="default INFO (any case)")
    flags.add_argument("--log-format", choices=LOG_FORMATS, help="log lines as text (default) or JSON")
    flags.add_argument(
        "--raw", metavar="tcp:PORT:MODEL[:live|:every]", action="append", type=raw_listener_flag, default=[],
        help="also take raw frames (no header; MODEL's input shape and dtype, back to back, as ffmpeg -f rawvideo "
        "sends) on PORT at --host; live (default): the newest frame wins, every: none dropped. Repeatable",
    )  # fmt: skip
    flags.add_argument("--results-port", type=whole, metavar="PORT", help="serve JSON-lines results on PORT")
    flags.add_argument("--results-file", metavar="FILE", help="append JSON-lines results to FILE")
    flags.add_argument(
        "--ingest-workers", type=whole, metavar="N",
        help="N processes read and answer connections (default 0: this one)",
    )  # fmt: skip
    model = flags.add_argument_group("the first model (no TOML needed for one model)")
    model.add_argument(
        "--model", metavar="SOURCE", help="builtin:small (default), builtin:resnet50, torchscript:PATH, export:PATH"
    )
    model.add_argument("--model-name", metavar="NAME", help="the name producers send (default 'default')")
    model.add_argument("--input-shape", metavar="D,D,..", type=_shape, help="one frame's shape: 1024 or 480,640,3")
    model.add_argument("--input-dtype", metavar="DTYPE", help="one frame's dtype, e.g. uint8 (default), float32")
    model.add_argument(
        "--preprocess", choices=PREPROCESS_KINDS, help="image (uint8 HWC -> normalized NCHW) or none; "
        "default: image for uint8 [H, W, C] frames, none otherwise"
    )  # fmt: skip
    return flags


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamgpu", description="Stream frames over the network into DNNs on a GPU.")
    parser.add_argument("--version", action="version", version=f"streamgpu {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    flags = _settings_flags()
    serve = commands.add_parser("serve", parents=[flags], help="run a server until SIGINT/SIGTERM")
    serve.add_argument("--config", metavar="FILE", help="TOML config (see configs/example.toml)")
    check = commands.add_parser(
        "check-config", parents=[flags], help="print the resolved settings (file, environment, flags) and exit"
    )
    check.add_argument("config_file", metavar="FILE", nargs="?", help="TOML config (see configs/example.toml)")
    check.add_argument("--config", metavar="FILE", help="the same, as serve takes it")
    commands.add_parser("setup-gpu", help="install the cupy build matching torch's CUDA (the fast data path)")
    admin = commands.add_parser("admin", help="load, swap, unload and list a running server's models (over HTTP)")
    admin.add_argument("action", choices=("load", "unload", "list"))
    admin.add_argument("url", metavar="URL", help="the server's HTTP address, e.g. http://127.0.0.1:8000")
    admin.add_argument("name", nargs="?", metavar="NAME", help="the model (load, unload)")
    admin.add_argument("settings", nargs="*", metavar="KEY=VALUE",
                       help="load: model settings, e.g. source=export:model.pt2 max_batch_size=16 (none: the "
                            "server's repository folder NAME, or its last settings)")  # fmt: skip
    admin.add_argument("--token", default="", help=f"the server's auth_token (default: ${AUTH_TOKEN_ENV})")

    send = commands.add_parser("send", help="send raw frames from stdin or a file; print replies as JSON lines")
    from streamgpu.loadgen.transports import transport_names

    send.add_argument("--host", default="127.0.0.1", help="server address (default 127.0.0.1)")
    send.add_argument("--port", type=integer(65535), default=7878, help="server port (default 7878)")
    send.add_argument("--transport", choices=transport_names(), default="tcp", help="default tcp")
    send.add_argument("--token", default="", help=f"auth token (default: ${AUTH_TOKEN_ENV}; not over udp)")
    send.add_argument("--model", default="default", help="model name (default 'default')")
    send.add_argument("--shape", type=_shape, default=(224, 224, 3), help="one frame's shape (default 224,224,3)")
    dtypes = sorted(dt.name for dt in wire.DTYPES.values())
    send.add_argument("--dtype", choices=dtypes, default="uint8", help="element type (default uint8)")
    source = send.add_mutually_exclusive_group()
    source.add_argument("--input", default="-", metavar="FILE", help="raw frames back to back (default -: stdin)")
    source.add_argument("--video", default="", metavar="FILE", help="a video decoded with PyAV: RGB frames of --shape")
    send.add_argument("--stream-id", type=integer(0xFFFFFFFF), default=0, help="u32 stream id (default 0)")
    send.add_argument("--live", action="store_true", help="live mode: a newer frame supersedes queued ones")
    send.add_argument("--deadline", type=_positive(float), metavar="SECONDS", help="per-frame deadline")
    send.add_argument("--priority", type=integer(255), default=0, help="0..255 (default 0)")
    send.add_argument("--in-flight", type=_positive(int), default=8, help="frames sent ahead of replies (default 8)")
    send.add_argument("--rate", type=_positive(float, zero=True), default=0.0, help="frames/s (default 0: no pacing)")
    send.add_argument("--count", type=_positive(int, zero=True), default=0, help="at most N frames (0: all)")
    send.add_argument("--top-k", type=_positive(int, zero=True), default=5, help="results as top k (0: whole)")
    send.add_argument("--subscribers", action="store_true",
                      help="udp only: no replies; the server publishes results to the --stream-id's subscribers "
                           "(/v1/stream WebSocket, results port or file) and nothing is printed per frame")  # fmt: skip
    return parser


def admin(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``streamgpu admin``: one request to a running server's model administration routes."""
    import json
    import os

    from streamgpu.web import admin_client

    # usage errors exit 2 here, before any request; 1 is for a server's refusal or no reply
    _check_env(parser)
    token = args.token or os.environ.get(AUTH_TOKEN_ENV, "")
    if args.action != "list" and not args.name:
        parser.error(f"admin {args.action} needs NAME")
    if args.action == "list" and args.name:
        parser.error(f"admin list takes no NAME, got {args.name!r}")
    if args.action != "load" and args.settings:
        parser.error(f"admin {args.action} takes no settings")
    if (why := admin_client.url_problem(args.url)) is not None:
        parser.error(f"admin {args.action}: {why}")
    if args.name and not admin_client.is_text(args.name):  # (no model has such a name)
        parser.error(f"admin {args.action}: NAME {args.name!r} is not valid UTF-8 text")
    if not admin_client.is_text(token):
        parser.error(f"admin {args.action}: the token (--token or ${AUTH_TOKEN_ENV}) is not valid UTF-8 text")
    try:
        settings = admin_client.parse_settings(args.settings)
    except ValueError as exc:
        parser.error(f"admin load: {exc}")
    try:
        if args.action == "list":
            for entry in admin_client.index(args.url, token):
                # One line a model: a repository folder's name (listed UNAVAILABLE) may hold a line break
                name, reason = _printable(str(entry["name"])), _printable(str(entry.get("reason", "")))
                print(f"{name}\tversion {entry['version']}\t{entry['state']}\t{reason}")
        elif args.action == "load":
            admin_client.load(args.url, args.name, settings, token)
            print(json.dumps(next((e for e in admin_client.index(args.url, token) if e["name"] == args.name), {})))
        else:
            admin_client.unload(args.url, args.name, token)
    except admin_client.AdminError as exc:
        print(f"streamgpu admin: {exc}", file=sys.stderr)
        return 1
    return 0


def _printable(text: str) -> str:
    """``text`` as it is when it prints as itself, else its repr (escapes instead of line breaks and controls)."""
    return text if text.isprintable() else repr(text)


def _indices(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated GPU indices like 0,1, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    with honour_interrupts():
        try:
            return _main(argv)
        except KeyboardInterrupt:  # Ctrl-C before serve's signal handlers (imports, model loads) or in a command
            print("streamgpu: interrupted", file=sys.stderr)
            return 130
        except BrokenPipeError:  # stdout's reader ended (check-config | head): the rest is not wanted
            discard_output(sys.stdout)
            return 1


def console() -> NoReturn:
    """The ``streamgpu`` command (and ``python -m streamgpu``): ``main``, then exit with its status. A SIGINT or
    SIGTERM while the process exits (torch's teardown takes a fraction of a second after a drain) ends it at once
    with that status, as the README promises of a second signal, where Python's handler raised KeyboardInterrupt
    inside an exit hook and printed its traceback. (``main`` itself leaves a caller's handlers as they were.)"""
    status = main()

    def exit_now(signum: int, frame: object) -> None:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):  # (closed, or its reader gone)
                stream.flush()
        os._exit(status)

    for sig in STOP_SIGNALS:
        signal.signal(sig, exit_now)
    sys.exit(status)


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "admin":
        return admin(args, parser)
    if args.command == "send":
        return _send(parser, args)
    if args.command == "setup-gpu":
        from streamgpu.gpu.setup import setup_gpu

        return setup_gpu()
    if args.command == "check-config":
        if args.config_file and args.config and args.config_file != args.config:
            parser.error("check-config: give the config file once, as FILE or --config FILE")
        args.config = args.config or args.config_file
    config = serve_config(parser, args)
    if args.command == "check-config":
        if problems := config.file_problems():  # (serve finds them as it loads)
            parser.error("; ".join(problems))
        print(json.dumps(config.resolved(), indent=2, default=_plain))
        return 0
    from streamgpu.logs import configure

    configure(config)
    from streamgpu.serve import run

    try:
        return run(config)
    except (StreamgpuError, OSError) as exc:
        logging.getLogger("streamgpu").error("cannot serve: %s", exc)
        return 1


def serve_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Config:
    """``streamgpu serve``'s config: file, environment, then flags; a bad one exits naming the setting or flag."""
    first_model = {"name": args.model_name, "input_shape": args.input_shape, "input_dtype": args.input_dtype,
                   "preprocess": args.preprocess}  # fmt: skip
    try:
        config = Config.load(
            args.config, host=args.host, port=args.port, http_port=args.http_port, udp_port=args.udp_port,
            device=args.device, devices=args.devices, model=args.model, loop=args.loop, log_level=args.log_level,
            log_format=args.log_format, results_port=args.results_port, results_file=args.results_file,
            ingest_workers=args.ingest_workers, first_model=first_model,
        )  # fmt: skip
    except ConfigError as exc:
        parser.error(str(exc))
    if args.raw:
        host = config.listeners[0].host
        raw = [ListenerSpec("raw", host, port, {"model": model, "live": live}) for port, model, live in args.raw]
        try:
            config = config.with_listeners(raw)
        except ConfigError as exc:
            parser.error(f"argument --raw: {exc}")
    return config


def _check_env(parser: argparse.ArgumentParser) -> None:
    """A mistyped ``STREAMGPU_`` variable (``STREAMGPU_AUTH_TOKN``) is refused as the server refuses it."""
    try:
        check_env_names(os.environ)
    except ConfigError as exc:
        parser.error(str(exc))


def _send_token(args: argparse.Namespace) -> str:
    """``--token``, else ``$STREAMGPU_AUTH_TOKEN``, else the deprecated ``$STREAMGPU_TOKEN`` (with a warning)."""
    if args.token or args.transport == "udp":  # (udp has no handshake: a token in the environment is not sent)
        return str(args.token)
    if AUTH_TOKEN_ENV in os.environ or OLD_TOKEN_ENV not in os.environ:
        return os.environ.get(AUTH_TOKEN_ENV, "")
    print(f"streamgpu send: warning: {OLD_TOKEN_ENV} is deprecated, set {AUTH_TOKEN_ENV} instead", file=sys.stderr)
    return os.environ[OLD_TOKEN_ENV]


def _send(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    import numpy as np

    from streamgpu.protocol import udp
    from streamgpu.send import SendOptions, run

    _check_env(parser)
    if not 1 <= len(args.model.encode()) <= wire.MAX_MODEL_NAME:
        parser.error(f"argument --model: must be 1..{wire.MAX_MODEL_NAME} UTF-8 bytes")
    if args.subscribers and args.transport != "udp":
        parser.error(f"argument --subscribers: needs --transport udp (a {args.transport} producer always gets its "
                     "replies, and its results are published to subscribers anyway)")  # fmt: skip
    frame_bytes = math.prod(args.shape) * np.dtype(args.dtype).itemsize
    udp_max = udp.MAX_CHUNKS * (udp.DEFAULT_DATAGRAM_BYTES - udp.HEADER_SIZE)  # less chunk 0's frame header
    if args.transport == "udp" and frame_bytes > udp_max:
        parser.error(f"argument --shape: a {args.dtype} {list(args.shape)} frame is {frame_bytes} bytes, "
                     f"more than udp carries ({udp.MAX_CHUNKS} datagrams, ~{udp_max} bytes): "
                     "use --transport tcp")  # fmt: skip
    if args.transport == "udp" and args.token:
        parser.error("argument --token: udp has no handshake, so no token (the server's allow list decides)")
    if args.deadline is not None:
        from streamgpu.client import deadline_to_us

        try:  # (a header carries it as a u32 of microseconds: ~71 minutes at most)
            deadline_to_us(args.deadline)
        except ValueError as exc:
            parser.error(f"argument --deadline: {exc}")
    if args.input != "-" and not os.path.exists(args.input):  # (a pipe, <(ffmpeg ...), or a device may be read)
        parser.error(f"argument --input: no such file {args.input!r}")
    if args.input != "-" and os.path.isdir(args.input):
        parser.error(f"argument --input: {args.input!r} is a folder, not a file of frames")
    if args.video:
        if not os.path.isfile(args.video):
            parser.error(f"argument --video: no such file {args.video!r}")
        if importlib.util.find_spec("av") is None:
            parser.error("argument --video: needs PyAV (pip install av, or streamgpu[video])")
        if len(args.shape) != 3 or args.shape[2] != 3 or args.dtype != "uint8":
            parser.error(f"argument --video: decodes to uint8 H,W,3 frames, not {args.dtype} {list(args.shape)}")
    token = _send_token(args)
    if (why := wire.token_problem(token)) is not None:
        parser.error(f"argument --token: the token (--token or ${AUTH_TOKEN_ENV}) {why}")
    opts = SendOptions(
        host=args.host, port=args.port, transport=args.transport, token=token, model=args.model,
        shape=args.shape, dtype=args.dtype, input=args.input, video=args.video, stream_id=args.stream_id,
        live=args.live, deadline=args.deadline, priority=args.priority, in_flight=args.in_flight, rate=args.rate,
        count=args.count, top_k=args.top_k, subscribers=args.subscribers,
    )  # fmt: skip
    return run(opts)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple | set) else str(value)


if __name__ == "__main__":
    sys.exit(main())
