"""Draw the latency-throughput curves of ``bench_e2e.py --suite curves`` (needs matplotlib).

    python tools/plot_curves.py bench_e2e.json docs/latency_throughput.png

One line per server: frames/s (x) against p50 latency (solid) and p99 (dashed),
one point per level of frames in flight, on log-scaled latency.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from typing import Any


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", help="bench_e2e.py's JSON, with a 'curves' suite")
    parser.add_argument("png", help="where to write the plot")
    args = parser.parse_args()
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot_curves needs matplotlib: pip install matplotlib", file=sys.stderr)
        return 2
    with open(args.report) as f:
        report: dict[str, Any] = json.load(f)
    if "curves" not in report:
        print(f"{args.report} has no 'curves' suite: run bench_e2e.py --suite curves", file=sys.stderr)
        return 2
    series: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in report["curves"]["rows"]:
        series[r["config"]].append(r)
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, rows in series.items():
        rows.sort(key=lambda r: r["level"])
        (line,) = ax.plot([r["frames_per_s"] for r in rows], [r["p50_ms"] for r in rows], "o-", label=f"{name} p50")
        ax.plot([r["frames_per_s"] for r in rows], [r["p99_ms"] for r in rows], "--", color=line.get_color(),
                label=f"{name} p99")  # fmt: skip
    ax.set_yscale("log")
    ax.set_xlabel("frames/s")
    ax.set_ylabel("latency, ms (log)")
    where = f"{report.get('card', '')}, {report.get('date', '')}"
    ax.set_title(f"ResNet-50 fp16, 224x224x3 frames, 1-256 in flight ({where})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(args.png, dpi=120)
    print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
