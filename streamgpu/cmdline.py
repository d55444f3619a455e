"""What the command lines of ``streamgpu`` and its load generator share: integer argument types, values quoted in
messages, the signals that stop a server, output whose reader ended, and SIGINT honoured where the process
started with it ignored. Light on purpose (argparse, signal): ingest worker processes import it too."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator
from typing import TextIO

# The signals that stop ``streamgpu serve`` (Ctrl-C, systemd's stop): its handlers, the ones it puts back, the ones
# its ingest workers ignore (the parent drives their shutdown) and the ones its exit does not wait for
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def decimal(text: str, hi: int) -> int | None:
    """``text``, decimal digits, as an integer 0..``hi``; None when it is none. Thousands of digits are out of
    range here, not Python's int() error (its digit limit, sys.set_int_max_str_digits)."""
    digits = text.lstrip("0") or "0"  # (int()'s digit limit counts leading zeros)
    if not (text.isascii() and text.isdigit()) or len(digits) > len(str(hi)):
        return None
    value = int(digits)
    return value if value <= hi else None


def discard_output(stream: TextIO) -> None:
    """``stream``'s reader ended (``... | head``): what is still buffered for it, flushed at exit, goes to /dev/null
    rather than raising BrokenPipeError there (a traceback)."""
    with contextlib.suppress(OSError, ValueError):  # (a stream with no descriptor, or closed)
        os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())


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


# More digits than any setting's range needs: past it a value is refused here, cut in the message, where int()
# would print every digit (or, past 4300, refuse with a message about Python's limit)
WHOLE_DIGITS = 20


def whole(text: str) -> int:
    """An argparse type: an integer, whose range the setting it sets checks (naming the setting); one that is not
    an integer, or has more than ``WHOLE_DIGITS`` digits, is refused here with the value cut."""
    if len(text.strip().lstrip("+-").lstrip("0")) > WHOLE_DIGITS:
        raise argparse.ArgumentTypeError(f"must be an integer of at most {WHOLE_DIGITS} digits, got {shown(text)}")
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {shown(text)}") from None


@contextlib.contextmanager
def honour_interrupts() -> Iterator[None]:
    """For the ``with`` block, make SIGINT interrupt, also where the process started with it ignored: a script's
    background job (``streamgpu serve &``) does, by POSIX rule. ``serve`` installs its own handler once its loop
    runs, so a ``kill -INT`` sent while it imported torch and loaded models was lost (the server then served on)
    and one sent later stopped it; now both do. Ignored again on leaving: a program that calls a command line's
    ``main`` finds its SIGINT as it left it. Only the main thread sets handlers; elsewhere this does nothing."""
    main = threading.current_thread() is threading.main_thread()
    if ignored := main and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        if ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
