"""The aiohttp front end: Open Inference Protocol over HTTP, WebSocket streams, /metrics, health,
the status page, and the helpers that embed a streamgpu server in an existing aiohttp application.

``streamgpu.web.app`` owns the application and the typed key under which it keeps its ``Server``;
each other module here adds its own routes with ``add_routes(app)`` and reads the server with
``request.app[SERVER_KEY]``.
"""
