"""tools/soak_udp.py for a few seconds: the soak's checks hold, and they catch a server that breaks them."""

from __future__ import annotations

import importlib.util
import io
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


def soak_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("soak_udp", ROOT / "tools" / "soak_udp.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["soak_udp"] = module
    spec.loader.exec_module(module)
    return module


SHORT: dict[str, Any] = dict(
    seconds=4.0, interval=1.0, shape=(32, 32, 3), window=8, loss=0.05, dup=0.02, warmup=1.0, rss_slack_mb=64.0,
    steady=0.2, reassembly_timeout_s=0.2,
)  # fmt: skip


@pytest.mark.asyncio(loop_factories=["asyncio"])  # the server (its own process) runs uvloop where present
async def test_a_short_soak_passes_every_check() -> None:
    soak = soak_module()
    out = io.StringIO()
    report = await soak.soak(**SHORT, out=out)
    assert report.ok, out.getvalue()
    lossy = report.producers["lossy"]
    assert lossy["statuses"]["OK"] > 0 and lossy["statuses"]["INCOMPLETE"] > 0  # both paths ran
    assert report.producers["server_udp_stats"]["duplicates"] > 0
    assert len(report.rows) == 4 and "PASS  server memory flat" in out.getvalue()


def test_the_checks_fail_on_a_wrong_or_missing_answer() -> None:
    """judge() on made-up tallies: a damaged frame answered OK, a clean INCOMPLETE, a slot left held."""
    soak = soak_module()
    damage = soak.Damage.__new__(soak.Damage)
    damage.damaged, damage.sent, damage.datagrams = {(0, 1), (0, 2)}, {(0, 1), (0, 2), (0, 3)}, {}
    lossy, clean = soak.Tally("lossy"), soak.Tally("clean")
    lossy.statuses.update({"OK": 2, "INCOMPLETE": 1})
    lossy.note("frame 2 lost datagrams but was answered OK")
    clean.statuses.update({"OK": 10, "INCOMPLETE": 1})
    rows = [{"t": t, "rss": 100 << 20, "ring_used": 0, "slots": 0, "partial": 0, "span": 1.0, "clean_ok": 5}
            for t in range(4)]  # fmt: skip
    final = {"ring_used": 4096, "slots": 1, "partial": 0, "udp": {}}
    report = soak.judge(rows, final, {"lossy": lossy, "clean": clean}, damage, {"lossy": 0, "clean": 0}, 0.0, 16.0,
                        0.5, io.StringIO())  # fmt: skip
    assert [ok for ok, _ in report.checks.values()] == [False, False, False, False]
