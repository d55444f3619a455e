"""Command-line argument types shared by ``streamgpu`` and its load generator: integers in a range, and
values quoted in messages. Light on purpose (argparse only): the load generator imports it too."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def decimal(text: str, hi: int) -> int | None:
    """``text``, decimal digits, as an integer 0..``hi``; None when it is none. Thousands of digits are out of
    range here, not Python's int() error (its digit limit, sys.set_int_max_str_digits)."""
    digits = text.lstrip("0") or "0"  # (int()'s digit limit counts leading zeros)
    if not (text.isascii() and text.isdigit()) or len(digits) > len(str(hi)):
        return None
    value = int(digits)
    return value if value <= hi else None


def shown(text: str) -> str:
    """``text`` quoted for a message, a long one cut (a flag of thousands of digits)."""
    return repr(text) if len(text) <= 40 else f"{text[:20]!r}... ({len(text)} characters)"


def integer(hi: int) -> Callable[[str], int]:
    """An argparse type: an integer 0..``hi``, named with its range when it is not one."""

    def parse(text: str) -> int:
        if (value := decimal(text, hi)) is None:
            raise argparse.ArgumentTypeError(f"must be an integer 0..{hi}, got {shown(text)}")
        return value

    return parse
