"""The streamgpu aiohttp application: one ``Server`` under ``SERVER_KEY``, the routes of every web module.

Two ways to serve it:

* stand-alone: ``streamgpu serve --http-port P`` (or a ``kind = "http"`` listener in the config)
  serves ``create_app(server)`` as one more listener of the server (``streamgpu.ingest.http``);
* embedded: ``setup(app, config, prefix="/streamgpu")`` mounts the same routes under ``prefix``
  of an existing aiohttp application and runs the server's whole lifecycle on that application's
  loop (started on startup through ``cleanup_ctx``, drained and stopped on shutdown).
"""

from __future__ import annotations

import asyncio
import importlib
import json
import re
import sys
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from streamgpu.config import Config
from streamgpu.server import Server

SERVER_KEY = web.AppKey("streamgpu.server", Server)
# True when streamgpu's own HTTP listener serves the application: it counts every connection under
# ``max_connections`` from accept to close (idle keep-alive included). Embedded in another server,
# whose connections streamgpu does not see, each inference request and WebSocket counts instead.
CONNECTIONS_COUNTED_KEY = web.AppKey("streamgpu.connections_counted", bool)

# Each module exposes ``add_routes(app: web.Application) -> None``; imported when an app is built.
ROUTE_MODULES: tuple[str, ...] = (
    "streamgpu.web.admin",
    "streamgpu.web.metrics",
    "streamgpu.web.status",
    "streamgpu.web.oip",
    "streamgpu.web.stream",
)


def create_app(server: Server, *, connections_counted: bool = False) -> web.Application:
    """An application serving ``server`` (already started or started by the caller) with every route
    (``connections_counted``: its server counts each connection under ``max_connections`` itself)."""
    app = web.Application()
    app[SERVER_KEY] = server
    app[CONNECTIONS_COUNTED_KEY] = connections_counted
    for name in ROUTE_MODULES:
        importlib.import_module(name).add_routes(app)
    return app


def take_place(request: web.Request) -> bool:
    """A place under ``max_connections`` for this request (or WebSocket), unless its connection
    holds one already; False: none is left (answer 503). ``give_place`` when it ends."""
    return request.app[CONNECTIONS_COUNTED_KEY] or request.app[SERVER_KEY].admission.open_connection()


def give_place(request: web.Request) -> None:
    """The request that ``take_place`` admitted has ended."""
    if not request.app[CONNECTIONS_COUNTED_KEY]:
        request.app[SERVER_KEY].admission.close_connection()


class HttpError(Exception):
    """A request answered with an HTTP error status and ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


async def read_body(content: Any, limit: int, budget_s: float, too_large: str) -> bytes:
    """A whole request body (one to parse: JSON), at most ``limit`` bytes (else 413 ``too_large``), within
    ``budget_s`` (408: a stalled or endless chunked body would otherwise hold its connection's place for good)."""
    parts = []
    total = 0
    try:
        async with asyncio.timeout(budget_s):
            while chunk := await content.readany():
                total += len(chunk)
                if total > limit:
                    raise HttpError(413, too_large)
                parts.append(chunk)
    except TimeoutError:
        raise HttpError(408, f"the request body did not arrive within {budget_s:.3g} s") from None
    return b"".join(parts)


# Arrays and objects a client's JSON may hold: parsing holds the event loop, and every producer with it, ~0.5 us
# per container on top of ~25 ms per MiB (a 4 MiB body of [0] lists took 0.67 s to parse, and 0.15 s more to make
# a tensor of). One nested 224x224x3 image is 50,401 lists; tensors are sent flat or as binary data.
MAX_JSON_CONTAINERS = 65536


def parse_json(raw: str | bytes) -> Any:
    """``json.loads`` of a client's text; NaN and Infinity (not JSON, though ``json`` reads them), nesting past the
    parser's depth, or more than ``MAX_JSON_CONTAINERS`` arrays and objects, is a ``ValueError`` like any other
    malformed JSON (``json`` raises RecursionError there, which would make the request a 500); an integer of more
    digits than Python converts is a ``LongIntegerError`` saying so (``json``'s message names a Python setting)."""
    brackets = raw.count(b"[") + raw.count(b"{") if isinstance(raw, bytes) else raw.count("[") + raw.count("{")
    if brackets > MAX_JSON_CONTAINERS:  # (brackets inside strings count too: an overestimate, never under)
        raise ValueError(
            f"more than {MAX_JSON_CONTAINERS} arrays and objects (parsing them holds the server): send tensor data "
            "flat (one list per input) or as binary data"
        )
    try:
        return json.loads(raw, parse_constant=_not_json)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    except ValueError as exc:
        # json's int() refuses an integer past Python's digit limit with a message about Python: looked for only
        # now (a parse_int hook would slow every number of a tensor), and only for that error (a plain ValueError:
        # not a JSONDecodeError, UnicodeDecodeError or _NotJson), where a run of digits that long must be
        limit = sys.get_int_max_str_digits()  # (0: no limit)
        if type(exc) is not ValueError or not limit:
            raise
        text = raw.decode("latin-1") if isinstance(raw, bytes) else raw
        # Tried at the start of a run of digits only: at every digit, each try reads up to the run's end, and a
        # MiB of 4300-digit runs held the loop for seconds
        if (long := re.search(f"(?<![0-9])[0-9]{{{limit + 1}}}", text)) is None:
            raise
        raise LongIntegerError(
            f"an integer of more than {limit} digits at character {long.start()}: no id, setting or tensor value "
            "is that large"
        ) from None


class LongIntegerError(ValueError):
    """A JSON integer longer than Python converts (``sys.get_int_max_str_digits``): out of every range."""


class _NotJson(ValueError):
    """NaN, Infinity or -Infinity in a client's JSON (``_not_json``)."""


def _not_json(token: str) -> Any:
    """Python's ``json`` reads NaN, Infinity and -Infinity; JSON (RFC 8259) and Triton's parser have no such tokens."""
    raise _NotJson(f"{token} is not a JSON number (send finite numbers)")


def setup(app: web.Application, config: Config | Server | None = None, *, prefix: str = "/streamgpu") -> Server:
    """Embed a streamgpu server in ``app``: its routes under ``prefix``, its lifecycle on ``app``'s.

    ``config`` is a ``Config`` (a ``Server`` is made from it), a ``Server`` not yet started, or
    None (the defaults). The server starts when ``app`` starts (on its loop: models load, the
    server's own listeners bind) and on shutdown stops accepting, answers every frame it took
    (up to ``shutdown_timeout_s``) and closes. ``app[SERVER_KEY]`` (and the sub-application's)
    is the ``Server``, for the application's own handlers. Returns it.
    """
    server = config if isinstance(config, Server) else Server(config)
    sub = create_app(server)

    async def lifecycle(_app: web.Application) -> AsyncIterator[None]:
        await server.start()
        try:
            yield
        finally:
            await server.stop()

    async def drain(_app: web.Application) -> None:
        await server.stop()

    # On the sub-application: the parent runs its sub-applications' cleanup contexts, and
    # the streamgpu part stays one self-contained unit (its routes and its server together).
    sub.cleanup_ctx.append(lifecycle)
    # The server drains on shutdown, before the WebSockets are closed (stream.py's on_shutdown) and while every
    # request can still get its reply, as the stand-alone listener does; cleanup (``lifecycle``) would come after
    # the sockets' close and drop their frames' replies. Cleanup still stops it (a no-op once stopped).
    sub.on_shutdown.insert(0, drain)
    app[SERVER_KEY] = server
    app.add_subapp(prefix, sub)
    return server
