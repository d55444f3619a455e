"""``streamgpu`` command line: a thin layer over the programmatic API."""

from __future__ import annotations

import argparse
import logging
import sys

from streamgpu.config import LOG_LEVELS, Config
from streamgpu.errors import ConfigError, StreamgpuError
from streamgpu.gpu import DEVICES
from streamgpu.loops import LOOPS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamgpu", description="Stream frames over the network into DNNs on a GPU.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser("serve", help="run a server until SIGINT/SIGTERM")
    serve.add_argument("--config", metavar="FILE", help="TOML config (see configs/example.toml)")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="TCP port (default 7878; 0 picks a free one)")
    serve.add_argument("--http-port", type=int, metavar="P",
                       help="also serve HTTP (Open Inference Protocol, WebSocket streams) on port P (0: a free one)")
    serve.add_argument("--device", choices=DEVICES, help="auto (cuda when usable), cuda or cpu")
    serve.add_argument("--devices", type=_indices, metavar="0,1", help="GPU indices to serve on (default 0)")
    serve.add_argument(
        "--model", metavar="SOURCE", help="source of the first model: builtin:small (default), builtin:resnet50, "
        "torchscript:PATH, export:PATH"
    )  # fmt: skip
    serve.add_argument("--loop", choices=LOOPS, help="event loop (default auto: uvloop when installed)")
    serve.add_argument("--log-level", choices=LOG_LEVELS, help="default INFO")
    return parser


def _indices(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated GPU indices like 0,1, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = Config.load(
            args.config, host=args.host, port=args.port, http_port=args.http_port, device=args.device,
            devices=args.devices, model=args.model, loop=args.loop, log_level=args.log_level,
        )  # fmt: skip
    except ConfigError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from streamgpu.serve import run

    try:
        return run(config)
    except (StreamgpuError, OSError) as exc:
        logging.getLogger("streamgpu").error("cannot serve: %s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
