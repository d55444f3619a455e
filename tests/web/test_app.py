"""The helpers every HTTP route shares: parsing a client's JSON."""

from __future__ import annotations

import time

import pytest

from streamgpu.web.app import LongIntegerError, parse_json

MIB = 1 << 20


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('{"id": "' + "1" * 5000 + '", "x": NaN}', "NaN is not a JSON number"),
        ('{"x": NaN, "y": 1.' + "1" * 5000 + "}", "NaN is not a JSON number"),
        (b'{"id": "' + b"1" * 5000 + b'", "s": "\xff"}', "can't decode byte 0xff"),
    ],
)
def test_another_error_beside_a_long_run_of_digits_keeps_its_own_message(body: str | bytes, message: str) -> None:
    # Any ValueError of json.loads but a JSONDecodeError was taken for Python's digit limit once digits ran past it
    # anywhere: in a string, a float's fraction
    with pytest.raises(ValueError, match=message) as info:
        parse_json(body)
    assert not isinstance(info.value, LongIntegerError)


def test_a_long_integer_is_found_in_linear_time() -> None:
    """A MiB of 4300-digit integers (each one Python converts) ending in one it does not: the search for the long
    one tried 4301 digits at every character, and held the loop, and every producer, for seconds (3.2 s)."""
    run = "9" * 4300
    n = (MIB - 100) // (len(run) + 1)
    body = '{"data": [' + ",".join([run] * n) + "," + run + "9]}"
    started = time.perf_counter()
    with pytest.raises(LongIntegerError, match=f"at character {len(body) - 4303}:"):
        parse_json(body)
    assert time.perf_counter() - started < 0.5
