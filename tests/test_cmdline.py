"""Command-line argument types: integers in a range without Python's digit-limit error, long values cut in messages."""

from __future__ import annotations

import argparse

import pytest

from streamgpu.cmdline import decimal, integer, shown, whole


@pytest.mark.parametrize(
    ("text", "hi", "value"),
    [("0", 255, 0), ("255", 255, 255), ("256", 255, None), ("0" * 5000 + "7", 255, 7), ("9" * 5000, 255, None),
     ("+7", 255, None), (" 7", 255, None), ("1_0", 255, None), ("²", 255, None), ("", 255, None),
     ("-1", 255, None)],
)  # fmt: skip
def test_decimal_takes_ascii_digits_in_range_only(text: str, hi: int, value: int | None) -> None:
    assert decimal(text, hi) == value


def test_a_long_value_is_cut_in_messages() -> None:
    assert shown("abc") == "'abc'"
    assert shown("9" * 5000) == "'99999999999999999999'... (5000 characters)"


def test_integer_names_its_range() -> None:
    parse = integer(65535)
    assert parse("7878") == 7878
    with pytest.raises(argparse.ArgumentTypeError, match=r"must be an integer 0\.\.65535, got '65536'"):
        parse("65536")


def test_whole_cuts_a_value_of_thousands_of_digits_and_leaves_the_range_to_the_setting() -> None:
    assert whole("99999") == 99999 and whole("-1") == -1  # (out of a port's range: the setting says so, naming itself)
    with pytest.raises(argparse.ArgumentTypeError, match=r"at most 20 digits, got '9{20}'\.\.\. \(5000 characters\)"):
        whole("9" * 5000)
    with pytest.raises(argparse.ArgumentTypeError, match=r"must be an integer, got 'x'"):
        whole("x")
