"""The live status page: ``GET /`` (HTML + a little JavaScript from the package, no build step) and the
JSON it polls every second, ``GET /v1/status``: models, device, throughput, latency percentiles,
queue lengths, reply counts by status, and the raw ports with the stream id their results are
published under (what a WebSocket subscriber names)."""

from __future__ import annotations

import importlib.resources
import time
from typing import Any

from aiohttp import web

from streamgpu import __version__
from streamgpu.server import Server
from streamgpu.web.app import SERVER_KEY

STARTED_KEY = web.AppKey("streamgpu.status.started", float)


def status(server: Server, started: float) -> dict[str, Any]:
    """What the page shows, as plain data (counters are cumulative; the page turns them into rates)."""
    out: dict[str, Any] = {"version": __version__, "uptime_s": time.monotonic() - started, "running": server.started}
    if not server.initialized:
        return out
    metrics = server.metrics()
    backend = server.backend
    replies: dict[str, dict[str, int]] = {}
    for model, code, n in server.replies.items():
        replies.setdefault(model, {})[code.name] = n
    models = []
    for name, snap in metrics["models"].items():
        spec = server.known_spec(name)  # the config's, or loaded since (admin API, model repository)
        assert spec is not None, "the scheduler's models are the model manager's"
        models.append({
            "name": name, "source": spec.source, "input": f"{spec.input_dtype} {list(spec.input_shape)}",
            "queue_length": snap["queue_length"], "in_flight_batches": snap["in_flight_batches"],
            "completed": snap["completed"], "batches": snap["batches"], "replies": replies.get(name, {}),
            "latency_us": {k: snap[f"{k}_us"] for k in ("total", "queue_wait", "transfer", "compute")},
        })  # fmt: skip
    return {
        **out,
        "device": backend.device_name if backend is not None else "stopped",
        "data_path": backend.data_path if backend is not None else "",
        "gpu_memory": server.device_memory(),
        "connections": metrics["connections"],
        "frames_in_flight": metrics["frames_in_flight"],
        "ring": {"used_bytes": metrics["ring"]["used_bytes"], "capacity": metrics["ring"]["capacity"]},
        "models": models,
        "replies_without_model": replies.get("", {}),
        "udp_listeners": [stats for stats in metrics["listeners"] if stats["kind"] == "udp"],
        "raw_streams": [
            {key: listener[key] for key in ("port", "model", "stream_id", "live", "connections", "frames")}
            for listener in metrics["listeners"]
            if listener["kind"] == "raw"
        ],
    }


async def status_json(request: web.Request) -> web.Response:
    return web.json_response(status(request.app[SERVER_KEY], request.app[STARTED_KEY]))


def add_routes(app: web.Application) -> None:
    page = importlib.resources.files("streamgpu.web").joinpath("static/status.html").read_bytes()

    async def index(request: web.Request) -> web.Response:
        return web.Response(body=page, content_type="text/html", charset="utf-8")

    app[STARTED_KEY] = time.monotonic()
    app.router.add_get("/", index)
    app.router.add_get("/v1/status", status_json)
