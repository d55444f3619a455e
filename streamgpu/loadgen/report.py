"""Reporting: the readable table, CSV (one row per load level), JSON, a PNG plot, progress."""

from __future__ import annotations

import csv
import io
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from streamgpu.loadgen.config import CONCURRENCY, RunConfig
from streamgpu.loadgen.errors import UsageError
from streamgpu.loadgen.measure import ERROR, PERCENTILES, LevelResult, WindowPolicy
from streamgpu.protocol.wire import Status

#: Figures compared by --compare, as (name, getter); ratios are compared / base.
FIGURES: tuple[tuple[str, Any], ...] = (
    ("throughput", lambda r: r.throughput),
    ("latency_mean", lambda r: r.latency["mean"]),
    *((f"latency_p{p}", (lambda q: lambda r: r.latency[f"p{q}"])(p)) for p in PERCENTILES),
    ("server_total_us", lambda r: r.server_us["total_us"]),
    ("server_queue_us", lambda r: r.server_us["queue_us"]),
    ("server_compute_us", lambda r: r.server_us["compute_us"]),
    ("cpu_cores", lambda r: r.cpu_cores),
)

#: CSV columns of the slowest replies (latency at or above p99): their mean latency and server stages.
TAIL_COLUMNS: tuple[str, ...] = (
    "Tail Server Receive", "Tail Server Queue", "Tail Server Transfer", "Tail Server Compute", "Tail Server Total",
    "Tail Latency", "Tail Network+Client", "Tail Batch",
)  # fmt: skip

#: Status columns of the CSV: every wire status, then transport errors, whether seen or not.
CSV_STATUSES: tuple[str, ...] = (*(s.name for s in Status), ERROR)

#: A generator process busier than this (CPU seconds per second) may be the bottleneck.
BUSY_CPU = 0.9


def _ratio(new: float, base: float) -> float:
    if math.isnan(new) or math.isnan(base) or base == 0:
        return math.nan
    return new / base


@dataclass
class Comparison:
    """The same level against the base endpoint and the compared one."""

    level: float
    base: str
    other: str
    ratios: dict[str, float]  # other / base, per FIGURES name


@dataclass
class RunReport:
    """Everything a run measured, ready to print or save."""

    config: dict[str, Any]
    frame_bytes: int
    results: list[LevelResult]
    warnings: list[str] = field(default_factory=list)
    started: float = 0.0  # Unix time

    @classmethod
    def build(cls, cfg: RunConfig, results: list[LevelResult], warnings: list[str], *, started: float) -> RunReport:
        """Make the report and add the warnings the figures call for."""
        warnings = list(warnings)
        for r in results:
            where = f"{r.endpoint} at {_level_text(r)}"
            if r.behind:
                warnings.append(
                    f"{where}: the generator fell behind its schedule (sent {r.send_rate:.1f} frames/s,"
                    f" p99 send lag {r.send_lag_p99_s * 1e3:.2f} ms); use --processes or a lower rate"
                )
            for name, text in r.messages.items():
                warnings.append(f"{where}: {r.statuses.get(name, 0)} replies {name}, e.g. {text!r}")
            if not r.stable:
                warnings.append(f"{where}: not stable within {r.windows} windows of ±{cfg.stability_pct:g} %")
            if r.busiest_cpu > BUSY_CPU:
                warnings.append(
                    f"{where}: the busiest generator process used {100 * r.busiest_cpu:.0f} % of a core;"
                    " the generator may be the bottleneck (use --processes)"
                )
        config = asdict(cfg)
        config["endpoints"] = [str(e) for e in cfg.endpoints]
        config["token"] = "***" if cfg.token else ""  # reports are shared: never the secret itself
        return cls(config=config, frame_bytes=cfg.frame_bytes, results=results, warnings=warnings, started=started)

    def comparisons(self) -> list[Comparison]:
        """With two endpoints, each level's figures of the second as ratios of the first's."""
        if len(self.config["endpoints"]) < 2:
            return []
        out = []
        for base, other in zip(self.results[0::2], self.results[1::2], strict=True):
            ratios = {name: _ratio(get(other), get(base)) for name, get in FIGURES}
            out.append(Comparison(level=base.level, base=base.endpoint, other=other.endpoint, ratios=ratios))
        return out

    def status_names(self) -> list[str]:
        """Every status seen, in wire order (OK first), transport errors last."""
        seen = {name for r in self.results for name in r.statuses}
        names = [s.name for s in Status if s.name in seen]
        return names + ([ERROR] if ERROR in seen else [])

    # --- outputs ---------------------------------------------------------------

    def table(self) -> str:
        """A fixed-width table for people (latencies in ms)."""
        statuses = self.status_names()
        mode_header = "in flight" if self._mode() == CONCURRENCY else "target/s"
        headers = [mode_header, "endpoint", "frames/s", "avg ms", *(f"p{p} ms" for p in PERCENTILES)]
        headers += ["srv ms", "queue ms", "compute ms", "send/s", *statuses, "gen cpu", "stable"]
        rows = []
        for r in self.results:
            ms = r.latency
            rows.append([
                f"{r.level:g}", r.endpoint, f"{r.throughput:.1f}", _ms(ms["mean"]),
                *(_ms(ms[f"p{p}"]) for p in PERCENTILES),
                _ms(r.server_us["total_us"] / 1e6), _ms(r.server_us["queue_us"] / 1e6),
                _ms(r.server_us["compute_us"] / 1e6), f"{r.send_rate:.1f}",
                *(str(r.statuses.get(s, 0)) for s in statuses),
                f"{100 * r.cpu_cores:.0f}%", "yes" if r.stable else "NO",
            ])  # fmt: skip
        for c in self.comparisons():
            g = c.ratios
            rows.append([
                f"{c.level:g}", "ratio", _x(g["throughput"]), _x(g["latency_mean"]),
                *(_x(g[f"latency_p{p}"]) for p in PERCENTILES),
                _x(g["server_total_us"]), _x(g["server_queue_us"]), _x(g["server_compute_us"]), "",
                *("" for _ in statuses), _x(g["cpu_cores"]), "",
            ])  # fmt: skip
        widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
        lines = [self._title(), "  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))]
        lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in rows]
        if self.comparisons():
            lines.append(f"ratio = {self.config['endpoints'][1]} / {self.config['endpoints'][0]}")
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)

    def csv_rows(self) -> tuple[list[str], list[dict[str, Any]]]:
        """perf_analyzer-like columns (latencies and server times in usec), one row per level and endpoint.

        The columns are the same for every run (a column per wire status, then ERROR), so files of
        different runs line up.
        """
        statuses = CSV_STATUSES
        level_col = "Concurrency" if self._mode() == CONCURRENCY else "Request Rate"
        header = [
            level_col, "Inferences/Second", "Server Receive", "Server Queue", "Server Transfer", "Server Compute",
            "Server Total", "Network+Client", "Avg Batch", *TAIL_COLUMNS, *(f"p{p} latency" for p in PERCENTILES),
            "Avg latency",
            "Min latency", "Max latency", "Send Rate", "Send Lag p99", "Sent", "Completed", *statuses,
            "Generator CPU", "Processes", "Windows", "Stable", "Endpoint",
        ]  # fmt: skip
        rows: list[dict[str, Any]] = []
        for r in self.results:
            us = {k: _us(v) for k, v in r.latency.items()}
            s, t = r.server_us, r.server_tail_us
            rows.append({
                level_col: f"{r.level:g}", "Inferences/Second": _num(r.throughput, 2),
                "Server Receive": _num(s["receive_us"]), "Server Queue": _num(s["queue_us"]),
                "Server Transfer": _num(s["transfer_us"]), "Server Compute": _num(s["compute_us"]),
                "Server Total": _num(s["total_us"]),
                "Network+Client": _num(r.latency["mean"] * 1e6 - s["total_us"]),
                "Avg Batch": _num(s["batch_size"], 2),
                "Tail Server Receive": _num(t["receive_us"]), "Tail Server Queue": _num(t["queue_us"]),
                "Tail Server Transfer": _num(t["transfer_us"]), "Tail Server Compute": _num(t["compute_us"]),
                "Tail Server Total": _num(t["total_us"]), "Tail Latency": us["tail"],
                "Tail Network+Client": _num(r.latency["tail"] * 1e6 - t["total_us"]),
                "Tail Batch": _num(t["batch_size"], 2),
                **{f"p{p} latency": us[f"p{p}"] for p in PERCENTILES},
                "Avg latency": us["mean"], "Min latency": us["min"], "Max latency": us["max"],
                "Send Rate": _num(r.send_rate, 2), "Send Lag p99": _us(r.send_lag_p99_s), "Sent": r.sent,
                "Completed": r.completed, **{name: r.statuses.get(name, 0) for name in statuses},
                "Generator CPU": _num(r.cpu_cores, 3), "Processes": r.processes, "Windows": r.windows,
                "Stable": int(r.stable), "Endpoint": r.endpoint,
            })  # fmt: skip
        ratio_cols = {
            "Inferences/Second": "throughput", "Avg latency": "latency_mean",
            **{f"p{p} latency": f"latency_p{p}" for p in PERCENTILES}, "Server Total": "server_total_us",
            "Server Queue": "server_queue_us", "Server Compute": "server_compute_us", "Generator CPU": "cpu_cores",
        }  # fmt: skip
        for c in self.comparisons():
            row: dict[str, Any] = {col: _num(c.ratios[name], 4) for col, name in ratio_cols.items()}
            rows.append({level_col: f"{c.level:g}", **row, "Endpoint": "ratio"})
        return header, rows

    def to_csv(self) -> str:
        header, rows = self.csv_rows()
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=header, restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return out.getvalue()

    def to_json(self) -> str:
        """All figures (latencies in seconds, server times in us); NaN becomes null."""
        doc = {
            "format": "streamgpu-loadgen/1",
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
            "config": self.config,
            "frame_bytes": self.frame_bytes,
            "results": [asdict(r) for r in self.results],
            "comparison": [asdict(c) for c in self.comparisons()],
            "warnings": self.warnings,
        }
        return json.dumps(_no_nan(doc), indent=2)

    def plot(self, path: str | Path) -> None:
        """Save the latency-throughput curve (p50 and p99 per endpoint) as a PNG; needs matplotlib."""
        try:
            import matplotlib

            matplotlib.use("Agg")  # files only, never a display
            import matplotlib.pyplot as plt
        except ImportError:
            raise UsageError("--plot needs matplotlib: pip install 'streamgpu[plot]'") from None
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for endpoint in self.config["endpoints"]:
            rs = [r for r in self.results if r.endpoint == endpoint]
            x = [r.throughput for r in rs]
            for p, style in ((50, "o-"), (99, "s--")):
                ax.plot(x, [r.latency[f"p{p}"] * 1e3 for r in rs], style, label=f"{endpoint} p{p}")
            for r in rs:
                ax.annotate(f"{r.level:g}", (r.throughput, r.latency["p50"] * 1e3), fontsize=7)
        ax.set_xlabel("throughput (frames/s)")
        ax.set_ylabel("latency (ms)")
        ax.set_title(self._title(), fontsize=8)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

    def _mode(self) -> str:
        return self.results[0].mode if self.results else CONCURRENCY

    def _title(self) -> str:
        c = self.config
        shape = "x".join(map(str, c["shape"]))
        mode = "closed loop" if self._mode() == CONCURRENCY else f"open loop ({c['distribution']})"
        streams = c["streams"] if c["streams"] is not None else c["processes"]
        return (
            f"streamgpu loadgen: {c['transport']} {', '.join(c['endpoints'])}; {mode}; frame {shape} {c['dtype']}"
            f" ({self.frame_bytes} B); streams {streams}; processes {c['processes']}"
        )


def _level_text(r: LevelResult) -> str:
    return f"{r.level:g} in flight" if r.mode == CONCURRENCY else f"{r.level:g} frames/s"


def _ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1e3:.3f}"


def _x(ratio: float) -> str:
    return "-" if math.isnan(ratio) else f"{ratio:.3f}x"


def _us(seconds: float) -> int | str:
    return "" if math.isnan(seconds) else round(seconds * 1e6)


def _num(value: float, digits: int = 0) -> float | int | str:
    if math.isnan(value):
        return ""
    return round(value) if digits == 0 else round(value, digits)


def _no_nan(obj: Any) -> Any:
    if isinstance(obj, float):
        return None if math.isnan(obj) else obj
    if isinstance(obj, dict):
        return {k: _no_nan(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_no_nan(v) for v in obj]
    return obj


class Progress:
    """A one-line progress bar on stderr (the CLI enables it on a TTY or with --progress)."""

    WIDTH = 24

    def __init__(self, enabled: bool, stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self._stream = stream or sys.stderr
        self._done = 0
        self._total = 1
        self._shown = False

    def level(self, label: str, done: int, total: int) -> None:
        """A new level starts (``done`` of ``total`` levels are finished)."""
        self._done, self._total = done, max(total, 1)
        self._draw(0.0, f"{label}: warming up")

    def window(self, label: str, policy: WindowPolicy) -> None:
        """A window of the current level was measured."""
        w = policy.windows[-1]
        fraction = 1.0 if policy.fixed else len(policy.windows) / policy.max_windows
        text = f"{label}: window {len(policy.windows)}, {w.throughput:.1f} frames/s, avg {_ms(w.mean_latency)} ms"
        self._draw(fraction, text)

    def _draw(self, fraction: float, text: str) -> None:
        if not self.enabled:
            return
        overall = (self._done + min(fraction, 1.0)) / self._total
        filled = round(overall * self.WIDTH)
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        self._stream.write(f"\r\x1b[K[{bar}] {self._done + 1}/{self._total} {text}")
        self._stream.flush()
        self._shown = True

    def close(self) -> None:
        if self._shown:
            self._stream.write("\n")
            self._stream.flush()
            self._shown = False
