"""The helpers every HTTP route shares: parsing a client's JSON; the application embedded in another's."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from streamgpu.config import Config, ListenerSpec
from streamgpu.models.spec import ModelSpec
from streamgpu.web.app import LongIntegerError, parse_json, setup

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


@pytest.mark.asyncio
async def test_an_embedded_application_refuses_a_malformed_request_without_an_error_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Embedded (``setup``), a request answered before its body was read (a bad token, a bad binary tensor header,
    a wrong content length, an unknown model or path) whose body then did not decode: aiohttp read it away after
    the reply and logged an ERROR with a traceback ("Unhandled exception") per request, in the application's log,
    where streamgpu's own listener logs one INFO line."""
    caplog.set_level(logging.INFO)
    app = web.Application()
    spec = ModelSpec(input_shape=(4, 4, 3), max_batch_size=1, batch_buckets=(1,))
    setup(app, Config(listeners=[ListenerSpec(port=0)], device="cpu", models=[spec], auth_token="s3cret"), prefix="/ml")
    # (a connection each: one whose body turns out malformed after the reply is closed)
    infer, gzip = "/ml/v2/models/default/infer", {"Content-Encoding": "gzip", "Connection": "close"}
    auth = {"Authorization": "Bearer s3cret", **gzip}
    async with TestClient(TestServer(app)) as http:
        answered = []
        for path, headers, body in [
            (infer, {"Authorization": "Bearer wrong", **gzip}, b"not gzip" * 1000),  # 401
            (infer, {**auth, "Inference-Header-Content-Length": "x"}, b"not gzip"),  # 400: its binary header
            ("/ml/v2/models/nope/infer", auth, b"not gzip"),  # 404 (ours)
            ("/ml/nope", auth, b"not gzip"),  # 404 (aiohttp's)
        ]:
            async with http.post(path, data=body, headers=headers) as resp:
                answered.append((resp.status, await resp.text()))
        reader, writer = await asyncio.open_connection(http.host, http.port)  # 413: its content length
        writer.write(f"POST {infer} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\nContent-Encoding: gzip\r\n"
                     "Content-Length: 999999999\r\n\r\nnot gzip".encode())  # fmt: skip
        head, _, rest = (await asyncio.wait_for(reader.read(), 5)).partition(b"\r\n\r\n")
        writer.close()
        answered.append((int(head.split()[1]), rest.decode()))
        async with http.post(infer, data=b"{not json", headers={"Authorization": "Bearer s3cret"}) as resp:
            answered.append((resp.status, await resp.text()))  # (read whole, then refused: quiet before too)

        def refused() -> list[logging.LogRecord]:
            return [r for r in caplog.records if "malformed request refused" in r.getMessage()]

        def errors() -> list[logging.LogRecord]:
            return [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]

        async with asyncio.timeout(5):
            while len(refused()) < 5 and not errors():
                await asyncio.sleep(0.01)
        assert not errors(), caplog.text
    assert [status for status, _ in answered] == [401, 400, 404, 404, 413, 400], answered
    assert "auth token" in json.loads(answered[0][1])["error"] and "not valid JSON" in answered[-1][1]
    assert all(r.levelno == logging.INFO for r in refused())
    assert "(400 Can not decode content-encoding: gzip): the body of POST /ml/v2/models/nope/infer from 127.0.0.1, " \
           "read after its 404 reply" in caplog.text  # fmt: skip
