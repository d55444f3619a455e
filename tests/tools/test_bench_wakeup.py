"""tools/bench_wakeup.py runs every combination of sleeping and polling sides and prints its round trips."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[2] / "tools" / "bench_wakeup.py"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks its echo process")
def test_every_combination_of_sleeping_and_polling_sides_is_measured_at_every_gap() -> None:
    out = subprocess.run([sys.executable, str(TOOL), "--round-trips", "300"], capture_output=True, text=True,
                         timeout=120, check=True).stdout  # fmt: skip
    rows = re.findall(r"^(sleeps|polls)\s+(sleeps|polls)\s+(\d+) \|\s+([\d.]+) \|\s+([\d.]+) \|\s+([\d.]+)$", out, re.M)
    assert [(child, parent, int(gap)) for child, parent, gap, *_ in rows] == [
        (child, parent, gap) for gap in (0, 200, 1000)
        for child, parent in (("sleeps", "sleeps"), ("polls", "sleeps"), ("sleeps", "polls"), ("polls", "polls"))
    ]  # fmt: skip
    assert all(0 < float(p50) <= float(p99) for *_, p50, p99, _mean in rows)
