"""The model administration routes (streamgpu.web.admin) as an application embedding the server reaches them; the
routes themselves are tested end to end in tests/test_lifecycle.py."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from streamgpu.config import Config, ListenerSpec
from streamgpu.models.spec import ModelSpec
from streamgpu.web.app import setup

SPEC = ModelSpec(name="m", source="builtin:small", input_shape=(16, 16, 3), max_batch_size=2, batch_buckets=(1, 2))


@pytest.mark.asyncio
async def test_embedded_under_a_prefix_admin_refusals_are_answered_with_their_status(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Embedded under a prefix (``setup(app, config, prefix="/ml")``), the routes' refusals were each a 500 and a
    logged traceback, a missing token's 401 too: the middleware that answers them looked for paths starting with
    /v2/repository/, and these start with /ml. Each is answered ``{"error": MESSAGE}`` with its own status."""
    app = web.Application()
    setup(app, Config(listeners=[ListenerSpec(port=0)], device="cpu", models=[SPEC], auth_token="sesame"),
          prefix="/ml")  # fmt: skip
    auth = {"Authorization": "Bearer sesame"}
    asked: list[tuple[str, dict[str, str], Any, int, str]] = [
        ("index", {}, None, 401, "Bearer"),
        ("index", auth, {"ready": "yes"}, 400, "'ready' must be true or false"),
        ("models/nothing/unload", auth, None, 404, "no model named 'nothing'"),
        ("models/nothing/load", auth, None, 404, "not served before"),
        ("models/m/load", auth, {"parameters": {"config": {"source": "builtin:small"}}}, 400, "the same frames"),
        ("models/m/load", auth, {"parameters": {"config": {"source": "torchscript:/etc/passwd"}}}, 403,
         "model_repository"),
    ]  # fmt: skip
    async with TestClient(TestServer(app)) as http:
        for route, headers, body, status, says in asked:
            r = await http.post(f"/ml/v2/repository/{route}", headers=headers, json=body)
            assert r.status == status, (route, r.status, await r.text())
            assert says in (await r.json())["error"], route
        r = await http.post("/ml/v2/repository/index", headers=auth)
        assert r.status == 200 and [e["name"] for e in await r.json()] == ["m"]
    assert not [rec for rec in caplog.records if rec.exc_info], "a refusal logged a traceback"


@pytest.mark.asyncio
async def test_an_index_request_with_a_key_it_does_not_know_is_refused_naming_it() -> None:
    """``{"redy": true}`` (or Triton's ``"ready"`` misplaced) was ignored: every model listed, answered 200, where
    the client asked for the ready ones. The load request refuses keys it does not know; so does the index."""
    app = web.Application()
    setup(app, Config(listeners=[ListenerSpec(port=0)], device="cpu", models=[SPEC]), prefix="/ml")
    async with TestClient(TestServer(app)) as http:
        for body in ({"redy": True}, {"ready": True, "parameters": {}}):
            r = await http.post("/ml/v2/repository/index", json=body)
            assert r.status == 400, (body, r.status, await r.text())
            error = (await r.json())["error"]
            assert "unknown keys" in error and repr(sorted(set(body) - {"ready"})[0]) in error, error
        r = await http.post("/ml/v2/repository/index", json={"ready": True})
        assert r.status == 200 and [e["name"] for e in await r.json()] == ["m"]
