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
    serve.add_argument("--device", choices=DEVICES, help="auto (cuda when usable), cuda or cpu")
    serve.add_argument("--devices", type=_indices, metavar="0,1", help="GPU indices to serve on (default 0)")
    serve.add_argument(
        "--model", metavar="SOURCE", help="source of the first model: builtin:small (default), builtin:resnet50, "
        "torchscript:PATH, export:PATH"
    )  # fmt: skip
    serve.add_argument("--loop", choices=LOOPS, help="event loop (default auto: uvloop when installed)")
    serve.add_argument("--log-level", choices=LOG_LEVELS, help="default INFO")
    admin = commands.add_parser("admin", help="load, swap, unload and list a running server's models (over HTTP)")
    admin.add_argument("action", choices=("load", "unload", "list"))
    admin.add_argument("url", metavar="URL", help="the server's HTTP address, e.g. http://127.0.0.1:8000")
    admin.add_argument("name", nargs="?", metavar="NAME", help="the model (load, unload)")
    admin.add_argument("settings", nargs="*", metavar="KEY=VALUE",
                       help="load: model settings, e.g. source=export:model.pt2 max_batch_size=16 (none: the "
                            "server's repository folder NAME, or its last settings)")  # fmt: skip
    admin.add_argument("--token", default="", help="the server's auth_token (default: $STREAMGPU_AUTH_TOKEN)")
    return parser


def admin(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``streamgpu admin``: one request to a running server's model administration routes."""
    import json
    import os

    from streamgpu.web import admin_client

    token = args.token or os.environ.get("STREAMGPU_AUTH_TOKEN", "")
    if args.action != "list" and not args.name:
        parser.error(f"admin {args.action} needs NAME")
    if args.action != "load" and args.settings:
        parser.error(f"admin {args.action} takes no settings")
    try:
        if args.action == "list":
            for entry in admin_client.index(args.url, token):
                print(f"{entry['name']}\tversion {entry['version']}\t{entry['state']}\t{entry.get('reason', '')}")
        elif args.action == "load":
            admin_client.load(args.url, args.name, admin_client.parse_settings(args.settings), token)
            print(json.dumps(next((e for e in admin_client.index(args.url, token) if e["name"] == args.name), {})))
        else:
            admin_client.unload(args.url, args.name, token)
    except admin_client.AdminError as exc:
        print(f"streamgpu admin: {exc}", file=sys.stderr)
        return 1
    return 0


def _indices(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated GPU indices like 0,1, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "admin":
        return admin(args, parser)
    try:
        config = Config.load(
            args.config, host=args.host, port=args.port, device=args.device, devices=args.devices, model=args.model,
            loop=args.loop, log_level=args.log_level,
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
