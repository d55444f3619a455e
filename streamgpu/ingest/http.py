"""The HTTP front end: the streamgpu aiohttp application (``streamgpu.web``) as one more listener.

``ListenerSpec(kind="http", host, port)`` (``streamgpu serve --http-port P``) serves
``streamgpu.web.app.create_app(server)``: the Open Inference Protocol, WebSocket streams and
whatever other route modules the web package has. Its frames go through the server's
``Admission`` like TCP frames. Built the way aiohttp's ``web_runner`` serves an application
(an ``AppRunner`` and a listening socket), but the socket is this listener's own, so that
shutdown follows the server's steps: stop accepting, drain, close.

Connections count under ``max_connections`` as TCP producers' do, from accept to close: an
idle keep-alive connection holds its place until ``http_keepalive_timeout_s`` closes it (aiohttp's
own default is an hour). A connection past the cap is answered ``503`` with a JSON reason and
closed, and counted as a refused handshake (``/metrics``: OVERLOADED, one log line).

A malformed request is the client's fault, not the server's: aiohttp answers 400 for a request line,
header or chunked body its parser refuses, and after an early reply (401, 413, ...) reads the unread
body away, which may turn out undecodable; both cost one INFO line here, never an ERROR with a
traceback (``_ServerLog``). A handler's own exception is still an ERROR.
"""

from __future__ import annotations

import asyncio
import json
import logging
import typing
from typing import Any

from aiohttp import web
from aiohttp.http import HttpProcessingError
from aiohttp.log import server_logger

from streamgpu.ingest.base import Listener, peer_name, write_eof_or_abort
from streamgpu.protocol.wire import Status

# How long close() lets handlers finish writing their responses (their frames are already
# answered: the server drains the scheduler before closing listeners).
CLOSE_GRACE_S = 1.0
# How long a refused connection is read (and what comes dropped) after its 503, so the peer
# reads the response instead of a reset; then it is cut.
REFUSAL_LINGER_S = 1.0


class HttpListener(Listener):
    """Serves the web application on one TCP address."""

    kind = "http"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None
        self._refused = 0

    async def start(self) -> None:
        from streamgpu.web.app import create_app  # the web package imports the server: import late

        assert self.server is not None, "an http listener is started by its Server"
        self._runner = runner = web.AppRunner(
            create_app(self.server, connections_counted=True), access_log=None, handle_signals=False,
            shutdown_timeout=CLOSE_GRACE_S, keepalive_timeout=self.admission.config.http_keepalive_timeout_s,
            # A client that leaves mid-request: its handler is cancelled, so its frames still queued are answered
            # at once (Admission.leave) instead of holding ring space until their turn
            handler_cancellation=True, logger=_ServerLog(server_logger),
        )  # fmt: skip
        await runner.setup()
        host, port = self.spec.host, self.spec.port
        try:
            self._server = await asyncio.get_running_loop().create_server(self._accept, host, port)
        except OSError as exc:
            await runner.cleanup()
            self._runner = None
            raise OSError(exc.errno, f"cannot listen for HTTP on {host}:{port}: {exc.strerror or exc}") from exc

    def _accept(self) -> asyncio.BaseProtocol:
        """The protocol for one accepted connection: aiohttp's handler, holding a place under
        ``max_connections`` until it is lost, or a 503 refusal when no place is left."""
        if not self.admission.open_connection():
            self._refused += 1
            return _Refusal(self)
        assert self._runner is not None and self._runner.server is not None
        return _Counted(self._runner.server(), self)

    @property
    def addresses(self) -> list[tuple[str, int]]:
        if self._server is None:
            return []
        return [s.getsockname()[:2] for s in self._server.sockets]

    def stop_accepting(self) -> None:
        # New connections are refused; requests already in a handler finish (their frames are
        # refused SHUTTING_DOWN by admission, those already submitted are drained by the server).
        if self._server is not None:
            self._server.close()

    async def close(self, timeout: float) -> None:
        if self._runner is not None:
            await self._runner.cleanup()  # closes idle connections, waits CLOSE_GRACE_S for handlers
            self._runner = None
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def sweep(self, now: float) -> None:
        """Nothing to sweep: each request's payload has its own time budget in its handler, and an idle
        connection its keep-alive timeout."""

    def stats(self) -> dict[str, Any]:
        connections = len(self._runner.server.connections) if self._runner and self._runner.server else 0
        return {"kind": self.kind, "connections": connections, "refused_connections": self._refused}


class _ServerLog(logging.LoggerAdapter[logging.Logger]):
    """aiohttp's server log, but a malformed request (``_client_fault``) is one INFO line, not an ERROR with a
    traceback: a hostile client could otherwise fill the log, and bury real errors, one request each."""

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        fault = _client_fault(kwargs.get("exc_info")) if level >= logging.ERROR else None
        if fault is None:
            super().log(level, msg, *args, **kwargs)
            return
        why = " ".join(fault.message.split())[:200]  # (one line: aiohttp's shows the bytes, escaped, on several)
        kwargs.pop("exc_info")
        super().log(logging.INFO, f"malformed request refused (%d %s): {msg}", fault.code, why, *args, **kwargs)


def _client_fault(exc: object) -> HttpProcessingError | None:
    """The 4xx aiohttp's parser raised for a malformed request (a bad request line or header, a body it cannot
    decode or de-chunk) that ``exc`` is, or that it wraps (``web.RequestPayloadError``: the body's error as a
    handler, or aiohttp's read of a body left unread after the reply, gets it); None for anything else."""
    if isinstance(exc, web.RequestPayloadError):
        exc = exc.__cause__
    if isinstance(exc, HttpProcessingError) and 400 <= exc.code < 500:
        return exc
    return None


class _Counted(asyncio.Protocol):
    """aiohttp's request handler for one connection, which gives its ``max_connections`` place back when
    the connection is lost (aiohttp offers no hook for that: every protocol call is passed on)."""

    def __init__(self, handler: asyncio.Protocol, listener: HttpListener) -> None:
        self._handler = handler
        self._listener: HttpListener | None = listener

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._handler.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._handler.data_received(data)

    def eof_received(self) -> bool | None:
        return self._handler.eof_received()

    def pause_writing(self) -> None:
        self._handler.pause_writing()

    def resume_writing(self) -> None:
        self._handler.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            self._handler.connection_lost(exc)
        finally:
            if self._listener is not None:
                self._listener.admission.close_connection()
                self._listener = None


class _Refusal(asyncio.Protocol):
    """A connection past ``max_connections``: a 503 with the reason, then closed."""

    def __init__(self, listener: HttpListener) -> None:
        self._listener = listener
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        stream = typing.cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        admission = self._listener.admission
        reason = f"too many connections ({admission.config.max_connections})"
        admission.refused_handshake(peer_name(stream), Status.OVERLOADED, reason)
        body = json.dumps({"error": reason}).encode()
        head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
                "\r\nConnection: close\r\nRetry-After: 1\r\n\r\n")  # fmt: skip
        stream.write(head.encode() + body)
        # The response is all; reading on until the peer closes (or the timer). Aborted if it reset already.
        if stream.can_write_eof() and not write_eof_or_abort(stream):
            return
        self._timer = asyncio.get_running_loop().call_later(REFUSAL_LINGER_S, stream.abort)

    def data_received(self, data: bytes) -> None:
        pass  # the request is not read: dropped

    def eof_received(self) -> bool:
        return False  # the peer is done too: close

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
