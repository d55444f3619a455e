"""The stand-alone HTTP listener's connections: each holds a place under ``max_connections`` from accept
to close (idle keep-alive included) beside TCP producers', past the cap a 503, and an idle one is closed
after ``http_keepalive_timeout_s``."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest

from streamgpu import client
from streamgpu.config import Config, ListenerSpec
from streamgpu.ingest.http import _Refusal
from streamgpu.models.spec import ModelSpec
from streamgpu.protocol.wire import Status
from streamgpu.server import Server
from streamgpu.web import oip

SPEC = ModelSpec(input_shape=(8, 8, 3), max_batch_size=4, batch_buckets=(1, 4))
REQUEST = b"GET /v2/health/live HTTP/1.1\r\nHost: streamgpu\r\n\r\n"


@contextlib.asynccontextmanager
async def serving(**kw: Any) -> AsyncIterator[Server]:
    cfg = Config(listeners=[ListenerSpec(port=0), ListenerSpec("http", port=0)], device="cpu", models=[SPEC], **kw)
    async with Server(cfg) as server:
        yield server
    assert server.connections == 0


async def keep_alive(server: Server) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """A connection that made one request (HTTP/1.1: kept alive) and now idles; and its response."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.addresses[1][1])
    writer.write(REQUEST)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    fields = dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:] if line)
    length = int({k.lower(): v for k, v in fields.items()}[b"content-length"])
    return reader, writer, head + await reader.readexactly(length)


async def until(condition: Any, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


@pytest.mark.asyncio
async def test_idle_keep_alive_connections_hold_places_under_max_connections() -> None:
    async with serving(max_connections=2, http_keepalive_timeout_s=30) as server:
        idle = [await keep_alive(server) for _ in range(2)]
        assert all(response.startswith(b"HTTP/1.1 200") for _, _, response in idle)
        assert server.connections == 2  # both idle, both counted
        # The next HTTP connection is refused with the reason; so is a TCP producer (one cap for all).
        reader, writer, response = await keep_alive(server)
        assert response.startswith(b"HTTP/1.1 503") and b'{"error": "too many connections (2)"}' in response
        assert await asyncio.wait_for(reader.read(), 5) == b""  # and closed
        writer.close()
        with pytest.raises(client.HandshakeError, match="too many connections"):
            await client.connect("127.0.0.1", server.port)
        refused = dict(((model, status), n) for model, status, n in server.replies.items())
        assert refused[("", Status.OVERLOADED)] == 2
        # Closing one idle connection frees its place.
        idle[0][1].close()
        await until(lambda: server.connections == 1)
        _, again, response = await keep_alive(server)
        assert response.startswith(b"HTTP/1.1 200")
        for w in (idle[1][1], again):
            w.close()
        await until(lambda: server.connections == 0)


@pytest.mark.asyncio
async def test_an_idle_http_connection_is_closed_after_the_keep_alive_timeout() -> None:
    async with serving(max_connections=2, http_keepalive_timeout_s=0.3) as server:
        reader, writer, response = await keep_alive(server)
        assert response.startswith(b"HTTP/1.1 200")
        silent_reader, silent_writer = await asyncio.open_connection("127.0.0.1", server.addresses[1][1])
        await until(lambda: server.connections == 2)
        # Both the idle keep-alive and the connection that never sent a request are closed by the server.
        assert await asyncio.wait_for(reader.read(), 3) == b""
        assert await asyncio.wait_for(silent_reader.read(), 3) == b""
        await until(lambda: server.connections == 0)
        writer.close()
        silent_writer.close()


class _ResetTransport:
    """A socket whose peer reset it before the server read the reset: ``write_eof`` raises ENOTCONN."""

    def __init__(self) -> None:
        self.written = b""
        self.aborted = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def write(self, data: bytes) -> None:
        self.written += data

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        raise OSError(errno.ENOTCONN, "Transport endpoint is not connected")

    def abort(self) -> None:
        self.aborted = True


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
async def test_a_refused_connection_already_reset_is_aborted_without_an_error() -> None:
    """Regression: refusing a connection past the cap whose peer had reset it raised OSError out of
    ``connection_made`` (the loop logged it, and the connection stayed open until its next read)."""
    refused: list[str] = []
    admission = SimpleNamespace(config=SimpleNamespace(max_connections=2),
                                refused_handshake=lambda peer, status, reason: refused.append(reason))  # fmt: skip
    transport = _ResetTransport()
    _Refusal(SimpleNamespace(admission=admission)).connection_made(transport)  # type: ignore[arg-type]
    assert transport.aborted and transport.written.startswith(b"HTTP/1.1 503")
    assert refused == ["too many connections (2)"]


def errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.asyncio
async def test_a_malformed_request_is_refused_without_an_error_logged(caplog: pytest.LogCaptureFixture) -> None:
    """A refused client is no server error. A body aiohttp cannot decode, sent to a request answered early (401:
    its body never read, then read away by aiohttp after the reply), and a request aiohttp's parser refuses (a
    bad header: 400) each logged an ERROR with a traceback ("Unhandled exception", "Error handling request")."""
    caplog.set_level(logging.INFO)
    async with serving(auth_token="s3cret") as server, aiohttp.ClientSession() as session:
        base = f"http://127.0.0.1:{server.addresses[1][1]}"
        headers = {"Authorization": "Bearer wrong", "Content-Encoding": "gzip"}
        async with session.post(f"{base}/v2/models/default/infer", data=b"not gzip" * 1000, headers=headers) as resp:
            assert resp.status == 401 and "auth token" in (await resp.json())["error"]
        reader, writer = await asyncio.open_connection("127.0.0.1", server.addresses[1][1])
        writer.write(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nBad\x01Name: y\r\n\r\n")
        assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.0 400 Bad Request")
        writer.close()

        def logged() -> list[logging.LogRecord]:
            return [r for r in caplog.records if r.name == "aiohttp.server" and r.levelno >= logging.INFO]

        await until(lambda: len(logged()) == 2)
    assert not errors(caplog), caplog.text
    early, parser = logged()
    assert early.levelno == parser.levelno == logging.INFO and not early.exc_info and not parser.exc_info
    assert "content-encoding: gzip" in early.getMessage() and "Invalid header token" in parser.getMessage()


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
async def test_a_handlers_own_exception_is_still_logged_as_an_error(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*_: Any) -> Any:
        raise RuntimeError("handler bug")

    monkeypatch.setattr(oip, "_infer", broken)
    async with serving() as server, aiohttp.ClientSession() as session:
        url = f"http://127.0.0.1:{server.addresses[1][1]}/v2/models/default/infer"
        async with session.post(url, data=b"{}") as resp:
            assert resp.status == 500
    assert [r.exc_info[1] for r in errors(caplog) if r.exc_info] and "handler bug" in caplog.text
