"""The streamgpu aiohttp application: one ``Server`` under ``SERVER_KEY``, the routes of every web module."""

from __future__ import annotations

import importlib

from aiohttp import web

from streamgpu.server import Server

SERVER_KEY = web.AppKey("streamgpu.server", Server)

# Each module exposes ``add_routes(app: web.Application) -> None``; imported when an app is built.
ROUTE_MODULES: tuple[str, ...] = ("streamgpu.web.admin", "streamgpu.web.metrics", "streamgpu.web.status")


def create_app(server: Server) -> web.Application:
    """An application serving ``server`` (already started or started by the caller) with every route."""
    app = web.Application()
    app[SERVER_KEY] = server
    for name in ROUTE_MODULES:
        importlib.import_module(name).add_routes(app)
    return app
