"""Command line of the load generator (``python tools/loadgen.py`` or ``streamgpu-loadgen``).

Option names follow perf_analyzer where one exists (``-u``, ``-i``, ``-m``,
``--concurrency-range``, ``--request-rate-range``, ``--request-distribution``,
``-p/--measurement-interval``, ``-s/--stability-percentage``, ``-r/--max-trials``,
``-f/--latency-report-file``). docs/LOADGEN.md describes every option.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from streamgpu import cmdline
from streamgpu.config import AUTH_TOKEN_ENV
from streamgpu.loadgen import sources
from streamgpu.loadgen.config import CONCURRENCY, RATE, Endpoint, LoadLevel, RunConfig
from streamgpu.loadgen.errors import LoadgenError, UsageError
from streamgpu.loadgen.report import Progress, RunReport
from streamgpu.loadgen.runner import run
from streamgpu.loadgen.transports import get_transport

DEFAULT_PORT = 7878
MAX_LEVELS = 10_000  # levels of a range: each is a measured run of its own


def parse_endpoint(text: str) -> Endpoint:
    """``HOST:PORT``, ``HOST`` (default port), ``[IPv6]:PORT`` or ``[IPv6]`` (default port)."""
    host, sep, port = text.strip().rpartition(":")
    # (a bare or bracketed IPv6 address has colons but no port: "[::1]" was read as host "[:" and port "1]")
    if not sep or (host.count(":") and not host.startswith("[")) or text.strip().endswith("]"):
        host, port = text.strip(), str(DEFAULT_PORT)
    host = host.strip("[]")
    if not host:
        raise argparse.ArgumentTypeError(f"bad endpoint {text!r}: expected HOST:PORT")
    number = cmdline.decimal(port, 65535)
    if number is None or number == 0:
        shown = cmdline.shown
        raise argparse.ArgumentTypeError(f"bad endpoint {shown(text)}: port must be 1..65535, got {shown(port)}")
    return Endpoint(host, number)


def parse_range(text: str, *, integer: bool) -> list[float]:
    """perf_analyzer's ``start[:end[:step]]`` (end defaults to start, step to 1) as a list of levels."""
    parts = text.split(":")
    if not 1 <= len(parts) <= 3 or any(not p.strip() for p in parts):
        raise argparse.ArgumentTypeError(f"bad range {cmdline.shown(text)}: expected start[:end[:step]], e.g. 1:8:1")
    try:
        nums = [int(p) if integer else float(p) for p in parts]
    except ValueError:
        kind = "whole numbers" if integer else "numbers"
        raise argparse.ArgumentTypeError(
            f"bad range {cmdline.shown(text)}: start, end and step must be {kind}"
        ) from None
    start = nums[0]
    end = nums[1] if len(nums) > 1 else start
    step = nums[2] if len(nums) > 2 else 1
    if not (start > 0 and end > 0 and step > 0):  # also rejects NaN
        raise argparse.ArgumentTypeError(f"bad range {cmdline.shown(text)}: start, end and step must be > 0")
    if not all(math.isfinite(n) for n in (start, end, step)):
        raise argparse.ArgumentTypeError(f"bad range {cmdline.shown(text)}: start, end and step must be finite")
    if end < start:
        raise argparse.ArgumentTypeError(f"bad range {cmdline.shown(text)}: end {end:g} is below start {start:g}")
    # Counted, not stepped to the end: a step below the resolution of a large start never reached it
    # ("1e300" was "more than 10000 levels"); the slack keeps an end that float steps land a hair past
    count = math.floor((end - start) / step + 1e-9) + 1
    if count > MAX_LEVELS:
        raise argparse.ArgumentTypeError(f"bad range {cmdline.shown(text)}: {count:g} levels, more than {MAX_LEVELS}")
    return [float(start + i * step) for i in range(count)]


def _range(*, integer: bool) -> Callable[[str], list[float]]:
    def parse(text: str) -> list[float]:
        return parse_range(text, integer=integer)

    parse.__name__ = "range"
    return parse


def _positive(kind: type[int] | type[float], *, zero: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{cmdline.shown(text)} is not {what}") from None
        if value == float("inf"):  # a warmup, window or timeout that never ends
            raise argparse.ArgumentTypeError(f"must be a finite number {'>= 0' if zero else '> 0'}, got {text}")
        if not (value > 0 or (zero and value == 0)):
            raise argparse.ArgumentTypeError(f"must be {'>= 0' if zero else '> 0'}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def _typed(fn: Callable[[str], object]) -> Callable[[str], object]:
    """Wrap a ValueError-raising parser so argparse reports its message."""

    def parse(text: str) -> object:
        try:
            return fn(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser (documented option by option in docs/LOADGEN.md)."""
    p = argparse.ArgumentParser(
        prog="loadgen",
        description="Load generator for streamgpu servers: closed- or open-loop load, measured until stable.",
    )
    pos_int, pos_float = _positive(int), _positive(float)
    t = p.add_argument_group("target")
    t.add_argument(
        "-u",
        "--url",
        type=parse_endpoint,
        default=Endpoint("localhost", DEFAULT_PORT),
        metavar="HOST:PORT",
        help=f"server address (default localhost:{DEFAULT_PORT})",
    )
    t.add_argument(
        "--compare",
        type=parse_endpoint,
        metavar="HOST:PORT",
        help="also run every level against this endpoint and report each figure's ratio to -u",
    )
    t.add_argument("-i", "--transport", default="tcp", help="transport plug-in (default tcp)")
    t.add_argument(
        "--loss", type=float, default=0.0, metavar="FRACTION",
        help="udp transport: drop this fraction of datagrams on the sending side (default 0)",
    )  # fmt: skip
    t.add_argument("--token", default="",
                   help=f"auth token sent in the handshake (default: ${AUTH_TOKEN_ENV}; none over udp)")  # fmt: skip
    t.add_argument("--connect-timeout", type=pos_float, default=10.0, metavar="S", help="seconds (default 10)")
    t.add_argument(
        "--connections",
        type=pos_int,
        default=1,
        metavar="N",
        help="connections per generator process and endpoint (default 1)",
    )
    f = p.add_argument_group("frames")
    f.add_argument("-m", "--model", default="default", help="model name in each frame (default 'default')")
    f.add_argument(
        "--shape",
        type=_typed(sources.parse_shape),
        default=(224, 224, 3),
        metavar="DIMS",
        help="frame shape, e.g. 224x224x3 or 3,224,224 (default 224x224x3)",
    )
    f.add_argument("--dtype", type=_typed(sources.parse_dtype), default="uint8", help="element type (default uint8)")
    src = f.add_mutually_exclusive_group()
    src.add_argument("--images", nargs="+", metavar="FILE", help="send these image files (needs Pillow)")
    src.add_argument("--video", metavar="FILE", help="send the frames of this video file (needs imageio)")
    f.add_argument("--seed", type=int, default=0, help="seed of synthetic frames and Poisson intervals (default 0)")
    f.add_argument(
        "--streams", type=pos_int, metavar="N", help="stream ids to spread frames over (default 1 per process)"
    )
    f.add_argument("--deadline-ms", type=pos_float, metavar="MS", help="deadline budget in each frame (default none)")
    f.add_argument("--priority", type=cmdline.integer(255), default=0, help="frame priority 0..255 (default 0)")
    f.add_argument("--live", action="store_true", help="set the live-stream flag (server keeps the newest frame)")
    lo = p.add_argument_group("load")
    mode = lo.add_mutually_exclusive_group()
    mode.add_argument(
        "--concurrency-range",
        type=_range(integer=True),
        metavar="START[:END[:STEP]]",
        help="closed loop: frames in flight (default 1)",
    )
    mode.add_argument(
        "--request-rate-range",
        type=_range(integer=False),
        metavar="START[:END[:STEP]]",
        help="open loop: frames per second",
    )
    lo.add_argument(
        "--request-distribution",
        choices=("constant", "poisson"),
        default="constant",
        help="open-loop send intervals (default constant)",
    )
    lo.add_argument(
        "--max-outstanding",
        type=pos_int,
        default=10_000,
        metavar="N",
        help="open loop: frames in flight before sending waits (default 10000)",
    )
    lo.add_argument(
        "--processes",
        type=pos_int,
        default=1,
        metavar="N",
        help="spread the load over N generator processes (default 1)",
    )
    lo.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto", help="event loop (default auto)")
    m = p.add_argument_group("measurement")
    m.add_argument(
        "--warmup",
        type=_positive(float, zero=True),
        default=1.0,
        metavar="S",
        help="seconds of load before measuring (default 1)",
    )
    m.add_argument(
        "-p",
        "--measurement-interval",
        type=pos_float,
        default=5000.0,
        metavar="MS",
        help="window length in ms (default 5000)",
    )
    m.add_argument(
        "-s",
        "--stability-percentage",
        type=pos_float,
        default=10.0,
        metavar="PCT",
        help="throughput and latency of the last 3 windows within this %% (default 10)",
    )
    m.add_argument(
        "-r", "--max-trials", type=pos_int, default=10, metavar="N", help="most windows per level (default 10)"
    )
    fixed = m.add_mutually_exclusive_group()
    fixed.add_argument("--duration", type=pos_float, metavar="S", help="measure one window of S seconds instead")
    fixed.add_argument("--count", type=pos_int, metavar="N", help="measure exactly N frames per level instead")
    m.add_argument(
        "--percentile",
        type=pos_float,
        metavar="P",
        help="judge stability and --latency-threshold by the P-th percentile latency, not the mean (perf_analyzer's)",
    )
    m.add_argument(
        "--latency-threshold",
        type=pos_float,
        metavar="MS",
        help="stop the sweep after the first level whose latency (mean, or --percentile) exceeds MS",
    )
    m.add_argument(
        "--max-lag-ms",
        type=pos_float,
        default=10.0,
        metavar="MS",
        help="open loop: warn when the p99 send lag exceeds this (default 10)",
    )
    o = p.add_argument_group("output")
    o.add_argument("-f", "--latency-report-file", metavar="CSV", help="write one CSV row per level")
    o.add_argument("--json", metavar="FILE", help="write the full report as JSON")
    o.add_argument("--plot", metavar="PNG", help="plot latency against throughput (needs matplotlib)")
    o.add_argument("--progress", action="store_true", help="show a progress bar even when stderr is not a TTY")
    o.add_argument("--quiet", action="store_true", help="do not print the table")
    return p  # fmt: skip


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The RunConfig an argparse namespace describes (UsageError if inconsistent)."""
    if args.request_rate_range is not None:
        values, mode = args.request_rate_range, RATE
    else:
        values, mode = args.concurrency_range or [1.0], CONCURRENCY
    get_transport(args.transport).configure(loss=args.loss)  # UsageError for an unknown name or option, now
    cfg = RunConfig(
        endpoints=[args.url] + ([args.compare] if args.compare else []),
        levels=[LoadLevel(mode, v) for v in values],
        transport=args.transport,
        loss=args.loss,
        # (udp has no handshake: a token in the environment, the server's own maybe, is not sent)
        token=args.token or ("" if args.transport == "udp" else os.environ.get(AUTH_TOKEN_ENV, "")),
        connect_timeout_s=args.connect_timeout,
        model=args.model,
        shape=tuple(args.shape),
        dtype=np.dtype(args.dtype).name,
        images=list(args.images or []),
        video=args.video,
        seed=args.seed,
        streams=args.streams,
        connections=args.connections,
        deadline_s=args.deadline_ms / 1e3 if args.deadline_ms is not None else None,
        priority=args.priority,
        live=args.live,
        distribution=args.request_distribution,
        warmup_s=args.warmup,
        window_s=args.measurement_interval / 1e3,
        stability_pct=args.stability_percentage,
        max_windows=args.max_trials,
        duration_s=args.duration,
        count=args.count,
        max_outstanding=args.max_outstanding,
        max_lag_s=args.max_lag_ms / 1e3,
        processes=args.processes,
        loop=args.loop,
        percentile=args.percentile,
        latency_threshold_s=args.latency_threshold / 1e3 if args.latency_threshold is not None else None,
    )
    cfg.validate()
    named: dict[Path, str] = {}
    for flag, name in (("-f/--latency-report-file", args.latency_report_file), ("--json", args.json),
                       ("--plot", args.plot)):  # fmt: skip
        if name and (why := _output_problem(Path(name))):  # refused now, not after a run whose results it would lose
            raise UsageError(f"{flag}: {why}")
        if name and (other := named.setdefault(Path(name).resolve(), flag)) != flag:  # (one would overwrite the other)
            raise UsageError(f"{other} and {flag} name the same file {name!r}; name one file each")
    if args.plot:
        try:
            import matplotlib  # noqa: F401 - fail before the run, not after it
        except ImportError:
            raise UsageError("--plot needs matplotlib: pip install 'streamgpu[plot]'") from None
    return cfg


def _output_problem(path: Path) -> str | None:
    """Why a result file could not be written at ``path`` (replaced through a new file beside it, or, the plot,
    written in place), or None. A read-only file is refused for every option, though a rename could replace it."""
    if not path.parent.is_dir():
        if path.parent.exists():
            return f"'{path.parent}' is not a folder; name a file in a folder"
        return f"folder '{path.parent}' does not exist; create it or name another file"
    if path.is_dir():
        return f"'{path}' is a folder; name a file"
    if path.exists() and not os.access(path, os.W_OK):  # (root may write any: access says what open would)
        return f"'{path}' exists and cannot be written (read-only); make it writable or name another file"
    try:  # a file made and removed: os.access says yes to root whatever the folder
        with tempfile.NamedTemporaryFile(dir=path.parent):
            pass
    except OSError as exc:
        return f"'{path}' cannot be written: no file can be made in folder '{path.parent}' ({exc.strerror})"
    return None


def write_outputs(report: RunReport, args: argparse.Namespace, *, final: bool = True) -> None:
    """Write the files asked for: CSV and JSON after every level (a crash keeps the finished ones), PNG at the end."""
    if args.latency_report_file:
        _replace(Path(args.latency_report_file), report.to_csv())
    if args.json:
        _replace(Path(args.json), report.to_json() + "\n")
    if args.plot and final:
        report.plot(args.plot)


def _replace(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all (a reader never sees half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the load generator; returns the exit status (0 ok, 1 run failed, 2 usage error)."""
    with cmdline.honour_interrupts():
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed usage and the reason
        return exc.code if isinstance(exc.code, int) else 2
    finished: list[RunReport] = []  # the report of the levels finished so far, printed on Ctrl-C

    def on_level(partial: RunReport) -> None:
        finished[:] = [partial]
        write_outputs(partial, args, final=False)

    try:
        cfg = config_from_args(args)
        progress = Progress(enabled=args.progress or sys.stderr.isatty())
        report = run(cfg, progress, on_level=on_level)
        if not args.quiet:
            print(report.table())
        else:
            for warning in report.warnings:
                print(f"warning: {warning}", file=sys.stderr)
        write_outputs(report, args)
        if not any(r.statuses.get("OK") for r in report.results):
            seen = {name: sum(r.statuses.get(name, 0) for r in report.results) for name in report.status_names()}
            print(f"{parser.prog}: error: no reply was OK (replies: {seen or 'none'})", file=sys.stderr)
            return 1
    except UsageError as exc:
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # stdout's reader ended (... | head): the table is not wanted
        print(f"{parser.prog}: the output's reader ended (stdout: Broken pipe): stopped", file=sys.stderr)
        cmdline.discard_output(sys.stdout)
        return 1
    except (LoadgenError, OSError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if shown := bool(finished) and not args.quiet:
            print(finished[0].table())
        print(f"{parser.prog}: interrupted" + ("; the table shows the levels finished before" if shown else ""),
              file=sys.stderr)  # fmt: skip
        return 130
    return 0
