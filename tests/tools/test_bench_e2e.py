"""tools/bench_e2e.py's ``--variant``: streamgpu servers with other model settings, named on the command line."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
from bench_e2e import parse_variant


def test_a_variant_gives_its_name_and_settings_with_values_read_as_json_where_they_parse() -> None:
    assert parse_variant("burst8:batch_policy=fixed,max_batch_size=8,max_queue_delay_ms=0.5,compile=off") == (
        "burst8",
        {"batch_policy": "fixed", "max_batch_size": 8, "max_queue_delay_ms": 0.5, "compile": "off"},
    )
    assert parse_variant("plain") == ("plain", {})


@pytest.mark.parametrize("text", ["burst8:max_batch_size", "burst8:=8", ":max_batch_size=8", ":"])
def test_a_variant_without_a_name_or_a_value_is_refused_with_its_form(text: str) -> None:
    with pytest.raises(SystemExit, match="expected NAME:KEY=VALUE"):
        parse_variant(text)
