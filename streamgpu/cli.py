"""``streamgpu`` command line: a thin layer over the programmatic API."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from streamgpu import __version__
from streamgpu.config import LOG_LEVELS, Config
from streamgpu.errors import ConfigError, StreamgpuError
from streamgpu.gpu import DEVICES
from streamgpu.loops import LOOPS
from streamgpu.models.spec import PREPROCESS_KINDS


def _shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(d) for d in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape like 224,224,3 or 1024") from None


def _settings_flags() -> argparse.ArgumentParser:
    """The flags ``serve`` and ``check-config`` share: each overrides one setting of the config."""
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument("--host", help="address to bind (default 127.0.0.1)")
    flags.add_argument("--port", type=int, help="TCP port (default 7878; 0 picks a free one)")
    flags.add_argument("--device", choices=DEVICES, help="auto (cuda when usable), cuda or cpu")
    flags.add_argument("--devices", type=_indices, metavar="0,1", help="GPU indices to serve on (default 0)")
    flags.add_argument("--loop", choices=LOOPS, help="event loop (default auto: uvloop when installed)")
    flags.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, help="default INFO (any case)")
    flags.add_argument("--log-format", choices=("text", "json"), help="log lines as text (default) or JSON")
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
    check.add_argument("config", metavar="FILE", nargs="?", help="TOML config (see configs/example.toml)")
    commands.add_parser("setup-gpu", help="install the cupy build matching torch's CUDA (the fast data path)")
    return parser


def load_config(args: argparse.Namespace) -> Config:
    """The Config the parsed flags name (file, then STREAMGPU_* environment, then flags)."""
    first_model = {"name": args.model_name, "input_shape": args.input_shape, "input_dtype": args.input_dtype,
                   "preprocess": args.preprocess}  # fmt: skip
    return Config.load(
        args.config, host=args.host, port=args.port, device=args.device, devices=args.devices, model=args.model,
        loop=args.loop, log_level=args.log_level, log_format=args.log_format, first_model=first_model,
    )  # fmt: skip


def _indices(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated GPU indices like 0,1, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "setup-gpu":
        from streamgpu.gpu.setup import setup_gpu

        return setup_gpu()
    try:
        config = load_config(args)
    except ConfigError as exc:
        parser.error(str(exc))
    if args.command == "check-config":
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


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple | set) else str(value)


if __name__ == "__main__":
    sys.exit(main())
