"""Model administration over HTTP: Triton's model-repository extension.

    POST /v2/repository/index                   every model known: [{name, version, state, reason}]
    POST /v2/repository/models/{name}/load      load NAME, or a new version of it (swapped in while serving)
    POST /v2/repository/models/{name}/unload    stop serving NAME (queued frames finish first)

A load's body is optional JSON: ``{"parameters": {"config": SETTINGS}}``, where
SETTINGS (an object, or a string holding one, as Triton sends it) are the
model's settings as a ``[[models]]`` table of the server config takes them
(``source``, ``input_shape``, ``max_batch_size``...; the name comes from the
URL); model files in the body (Triton's ``file:PATH`` parameters) are refused, as is any other key.
Without settings the model is loaded from its folder in the
``model_repository``, or, for a model the server has served before, from its
last settings. Over HTTP a file ``source`` must lie inside ``model_repository``
(``builtin:`` sources are always allowed): a request cannot make the server
read arbitrary files, and NAME is one folder name (no ``/``, ``.`` or ``..``).
When the server has an ``auth_token``, these routes need
``Authorization: Bearer AUTH_TOKEN``; with named tokens and no ``auth_token``,
they are refused. Success is 200 with ``{}`` (the index: the list); failure
400 (404 for a model the server does not know, 401, 403) with ``{"error": MESSAGE}``.
docs/MODELS.md describes the whole lifecycle.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import os
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from streamgpu.config import model_spec
from streamgpu.errors import ModelNotFoundError, StreamgpuError
from streamgpu.models.repository import folder_name_problem, folder_source, folder_spec
from streamgpu.models.spec import ModelSpec
from streamgpu.server import Server
from streamgpu.web.app import SERVER_KEY, HttpError, parse_json, read_body

Handler = Callable[[web.Request], Awaitable[web.Response]]


def _server(request: web.Request) -> Server:
    server = request.app[SERVER_KEY]
    token = server.config.auth_token
    if token:
        auth = request.headers.get("Authorization", "")
        given = auth[len("Bearer ") :] if auth.startswith("Bearer ") else ""
        # (bytes that are not UTF-8 reach us as surrogates, which .encode() refuses: a 500; encoded so, they match
        # no token)
        if not hmac.compare_digest(given.encode("utf-8", "surrogatepass"), token.encode()):
            raise HttpError(
                401, "model administration needs 'Authorization: Bearer AUTH_TOKEN' (the server's auth_token)"
            )
    elif server.config.tokens:  # frames need a token: models are not anyone's to unload (nor a producer's)
        raise HttpError(403, "model administration needs the server's auth_token, which is not set (named tokens "
                             "are producers': they do not administer models)")  # fmt: skip
    return server


async def _body(request: web.Request) -> dict[str, Any]:
    limit = request.client_max_size  # (what aiohttp would accept), within the payload time budget of that much
    budget = request.app[SERVER_KEY].admission.payload_budget_s(min(request.content_length or limit, limit))
    raw = await read_body(request.content, limit, budget, f"request body exceeds {limit} bytes")
    if not raw.strip():
        return {}
    try:
        body = parse_json(raw)
    except ValueError as exc:
        raise HttpError(400, f"request body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise HttpError(400, "request body must be a JSON object")
    return body


def _settings(body: dict[str, Any]) -> dict[str, Any] | None:
    params = body.get("parameters", {})
    if not isinstance(params, dict):
        raise HttpError(400, "'parameters' must be an object")
    if files := sorted(key for key in params if key.startswith("file:")):  # not to be answered with other files
        raise HttpError(400, f"model files in the request ({', '.join(map(repr, files))}) are not taken: put them "
                             "in the model's folder of the model_repository")  # fmt: skip
    # Settings misplaced (a forgotten "parameters", a misspelt "config") would load from the last ones instead
    if unknown := sorted(set(body) - {"parameters"}) + sorted(set(params) - {"config"}):
        raise HttpError(400, f"unknown keys {', '.join(map(repr, unknown))} in the load request: its settings go "
                             'in {"parameters": {"config": SETTINGS}}')  # fmt: skip
    settings = params.get("config")
    if isinstance(settings, str):
        try:
            settings = parse_json(settings)
        except ValueError as exc:
            raise HttpError(400, f"parameters.config is not JSON: {exc}") from None
    if settings is not None and not isinstance(settings, dict):
        raise HttpError(400, "parameters.config must be an object of model settings")
    return settings


def _spec_for(server: Server, name: str, settings: dict[str, Any] | None) -> ModelSpec:
    """The spec a load asks for; a file it names (in its settings or its repository folder) is checked
    to lie inside the repository. Not the last settings of a model served before: their file is the
    operator's (the config's) or was checked when a request named it."""
    repository = server.config.model_repository
    if settings is not None:
        settings = dict(settings)
        source = settings.get("source")
        if isinstance(source, str) and repository:  # relative file paths are the repository's model folder
            settings["source"] = folder_source(os.path.join(repository, name), source)
        spec = model_spec(settings, f"model {name!r} (load request)", name=name)  # (first: a bad setting is named)
        if "source" not in settings:  # (ModelSpec's default, builtin:small, would serve random weights under name)
            raise HttpError(400, f"model {name!r} (load request): the settings name no source: send all of them, "
                                 "source included, or none (its repository folder's or last ones)")  # fmt: skip
        return _checked(server, spec)
    folder = os.path.join(repository, name) if repository else ""
    if folder and os.path.isdir(folder):
        return _checked(server, folder_spec(folder))
    known = server.known_spec(name)
    if known is None:
        where = f"no folder {name!r} in the model repository" if repository else "no model_repository"
        raise HttpError(404, f"model {name!r}: no settings in the request, {where}, and not served before")
    return known


def _checked(server: Server, spec: ModelSpec) -> ModelSpec:
    """``spec``, once its file source is found inside the model repository (symlinks resolved)."""
    scheme, _, path = spec.source.partition(":")
    if scheme == "builtin":
        return spec
    repository = server.config.model_repository
    inside = repository and os.path.commonpath(
        [os.path.realpath(repository), os.path.realpath(path)]
    ) == os.path.realpath(repository)  # fmt: skip
    if not inside:
        raise HttpError(403, f"model {spec.name!r}: over HTTP a file source must lie inside the server's "
                              f"model_repository ({repository or 'not set'}), got {path!r}")  # fmt: skip
    return spec


async def index(request: web.Request) -> web.Response:
    server = _server(request)
    body = await _body(request)
    if unknown := sorted(set(body) - {"ready"}):  # (a misspelt "ready" listed every model, answered 200)
        raise HttpError(400, f"unknown keys {', '.join(map(repr, unknown))} in the index request: it takes "
                             '{"ready": true} or nothing')  # fmt: skip
    ready = body.get("ready", False)
    if not isinstance(ready, bool):  # ("false" or 0 would be taken for true, or "true" for false)
        raise HttpError(400, f"'ready' must be true or false, got {ready!r}")
    entries = server.model_index()
    if ready:
        entries = [e for e in entries if e["state"] == "READY"]
    return web.json_response(entries)


def _check_name(name: str) -> None:
    """A name loaded over HTTP is one folder of the model repository (as Triton's are)."""
    if (problem := folder_name_problem(name)) is not None:
        raise HttpError(400, problem)


async def load(request: web.Request) -> web.Response:
    server = _server(request)
    name = request.match_info["name"]
    _check_name(name)
    settings = _settings(await _body(request))
    spec = await asyncio.get_running_loop().run_in_executor(None, _spec_for, server, name, settings)  # reads files
    await server.load_model(spec)
    return web.json_response({})


async def unload(request: web.Request) -> web.Response:
    server = _server(request)
    await server.unload_model(request.match_info["name"])  # to its end even if the client leaves (ModelManager)
    return web.json_response({})


def _answered(handler: Handler) -> Handler:
    """``handler``, its refusals answered ``{"error": MESSAGE}`` with their status. (A middleware did it for paths
    starting with /v2/repository/: embedded under a prefix, every refusal, a missing token's 401 too, was a 500.)"""

    @functools.wraps(handler)
    async def answered(request: web.Request) -> web.Response:
        try:
            return await handler(request)
        except HttpError as exc:
            return web.json_response({"error": str(exc)}, status=exc.status)
        except ModelNotFoundError as exc:
            return web.json_response({"error": str(exc)}, status=404)
        except StreamgpuError as exc:  # ModelLoadError, ConfigError: the message says what to fix
            return web.json_response({"error": str(exc)}, status=400)

    return answered


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v2/repository/index", _answered(index))
    app.router.add_post("/v2/repository/models/{name}/load", _answered(load))
    app.router.add_post("/v2/repository/models/{name}/unload", _answered(unload))
