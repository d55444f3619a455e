"""The HTTP front end: the streamgpu aiohttp application (``streamgpu.web``) as one more listener.

``ListenerSpec(kind="http", host, port)`` (``streamgpu serve --http-port P``) serves
``streamgpu.web.app.create_app(server)``: the Open Inference Protocol, WebSocket streams and
whatever other route modules the web package has. Its frames go through the server's
``Admission`` like TCP frames. Built the way aiohttp's ``web_runner`` serves an application
(an ``AppRunner`` and a listening socket), but the socket is this listener's own, so that
shutdown follows the server's steps: stop accepting, drain, close.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from streamgpu.ingest.base import Listener

# How long close() lets handlers finish writing their responses (their frames are already
# answered: the server drains the scheduler before closing listeners).
CLOSE_GRACE_S = 1.0


class HttpListener(Listener):
    """Serves the web application on one TCP address."""

    kind = "http"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        from streamgpu.web.app import create_app  # the web package imports the server: import late

        assert self.server is not None, "an http listener is started by its Server"
        self._runner = runner = web.AppRunner(
            create_app(self.server), access_log=None, handle_signals=False, shutdown_timeout=CLOSE_GRACE_S
        )
        await runner.setup()
        assert runner.server is not None
        host, port = self.spec.host, self.spec.port
        try:
            self._server = await asyncio.get_running_loop().create_server(runner.server, host, port)
        except OSError as exc:
            await runner.cleanup()
            self._runner = None
            raise OSError(exc.errno, f"cannot listen for HTTP on {host}:{port}: {exc.strerror or exc}") from exc

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
        """Nothing to sweep: each request's payload has its own time budget in its handler."""

    def stats(self) -> dict[str, Any]:
        connections = len(self._runner.server.connections) if self._runner and self._runner.server else 0
        return {"kind": self.kind, "connections": connections}
