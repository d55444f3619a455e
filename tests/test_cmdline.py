"""Command-line argument types: integers in a range without Python's digit-limit error, long values cut in messages;
SIGINT honoured for the call of a command line's main."""

from __future__ import annotations

import argparse
import contextlib
import io
import signal
import threading
from collections.abc import Callable

import pytest

from streamgpu import cli
from streamgpu.cmdline import decimal, honour_interrupts, integer, shown, whole
from streamgpu.loadgen import cli as loadgen_cli


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


@pytest.mark.parametrize("main", [cli.main, loadgen_cli.main], ids=["streamgpu", "loadgen"])
def test_sigint_ignored_by_the_caller_is_honoured_for_the_call_and_ignored_again_after(
    main: Callable[[list[str]], int],
) -> None:
    # A program calling a command line's main with SIGINT ignored found it at Python's default after the call
    seen = []
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with honour_interrupts():
            seen.append(signal.getsignal(signal.SIGINT))
        with contextlib.suppress(KeyboardInterrupt), honour_interrupts():
            raise KeyboardInterrupt
        seen.append(signal.getsignal(signal.SIGINT))
        with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
            main(["--version"] if main is cli.main else ["--help"])
        seen.append(signal.getsignal(signal.SIGINT))
    finally:
        signal.signal(signal.SIGINT, before)
    assert seen == [signal.default_int_handler, signal.SIG_IGN, signal.SIG_IGN]


def test_honour_interrupts_leaves_sigint_alone_outside_the_main_thread() -> None:
    seen = []

    def call() -> None:
        with honour_interrupts():  # (signal.signal would raise ValueError here)
            seen.append(signal.getsignal(signal.SIGINT))

    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        thread = threading.Thread(target=call)
        thread.start()
        thread.join()
        assert seen == [signal.SIG_IGN] and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
