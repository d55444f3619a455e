"""The load generator's ``http`` and ``ws`` transports against a real server (CPU backend, HTTP listener)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest
from fakeserver import FakeServer
from loadgen_support import FAST, Cli, serving

from streamgpu.config import Config, ListenerSpec
from streamgpu.loadgen import CONCURRENCY, Endpoint, LoadLevel, RunConfig, run
from streamgpu.loadgen.errors import UsageError
from streamgpu.loadgen.transports import get_transport
from streamgpu.loadgen.web_transports import status_of
from streamgpu.models.spec import ModelSpec
from streamgpu.protocol.wire import Status
from streamgpu.server import Server

pytest.importorskip("aiohttp", reason="aiohttp (the server extra) carries the http and ws transports")

SHAPE = (16, 16, 3)


@pytest.fixture(scope="module")
def web_server() -> Iterator[Server]:
    """A server with an HTTP listener (which also serves /v1/stream)."""
    spec = ModelSpec(input_shape=SHAPE, max_batch_size=8, batch_buckets=(1, 8))
    with serving(Config(listeners=[ListenerSpec(kind="http", port=0)], device="cpu", models=[spec])) as server:
        yield server


def _run(server: Server, transport: str, **kw: object) -> RunConfig:
    base: dict[str, object] = dict(
        endpoints=[Endpoint("127.0.0.1", server.addresses[0][1])], levels=[LoadLevel(CONCURRENCY, 4)],
        transport=transport, count=60, shape=SHAPE, warmup_s=0.0, window_s=0.3,
    )  # fmt: skip
    base.update(kw)
    return RunConfig(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("transport", ["http", "ws"])
def test_web_transport_frames_answered(web_server: Server, transport: str) -> None:
    before = web_server.metrics()["models"]["default"]["completed"]
    (r,) = run(_run(web_server, transport)).results
    assert r.sent == r.completed == 60
    assert r.statuses.get("OK", 0) == 60, r.statuses
    assert r.throughput > 0 and r.latency["p50"] > 0
    assert r.server_us["total_us"] > 0  # the server's timings came back (REPLY header / OIP response parameters)
    assert web_server.metrics()["models"]["default"]["completed"] - before == 60  # the server computed them all


@pytest.mark.parametrize("transport", ["http", "ws"])
def test_web_transport_unknown_model_is_counted(web_server: Server, transport: str) -> None:
    (r,) = run(_run(web_server, transport, model="nope", count=10)).results
    assert r.sent == r.completed == 10
    assert r.statuses.get("UNKNOWN_MODEL", 0) == 10 and not r.statuses.get("OK"), r.statuses


def test_http_status_mapping() -> None:
    assert status_of(200, "") is Status.OK
    assert status_of(504, "DEADLINE_MISSED: late") is Status.DEADLINE_MISSED
    assert status_of(503, "server is not ready (starting or shutting down)") is Status.SHUTTING_DOWN
    assert status_of(503, "OVERLOADED: queue full") is Status.OVERLOADED
    assert status_of(503, "too many connections (8)") is Status.OVERLOADED
    assert status_of(404, "unknown model 'x'") is Status.UNKNOWN_MODEL
    assert status_of(413, "request body too big") is Status.TOO_LARGE
    assert status_of(401, "missing token") is Status.UNAUTHORIZED
    assert status_of(400, "bad JSON") is Status.BAD_FRAME
    assert status_of(502, "bad gateway") is Status.INTERNAL_ERROR


def test_web_transports_send_the_token_as_bearer() -> None:
    spec = ModelSpec(input_shape=SHAPE, max_batch_size=8, batch_buckets=(1, 8))
    cfg = Config(listeners=[ListenerSpec(kind="http", port=0)], device="cpu", models=[spec], auth_token="s3cret")
    with serving(cfg) as server:
        for transport in ("http", "ws"):
            (r,) = run(_run(server, transport, count=8, token="s3cret")).results
            assert r.statuses == {"OK": 8}, (transport, r.statuses)
        (r,) = run(_run(server, "http", count=4, token="wrong")).results  # each request refused with 401
        assert r.statuses == {"UNAUTHORIZED": 4}, r.statuses
        # the upgrade itself is refused, and says why (aiohttp reads no body of a refused upgrade: the header)
        with pytest.raises(UsageError, match=r"cannot connect.*over ws.*401 bad or missing auth token"):
            run(_run(server, "ws", count=4, token="wrong"))


@pytest.mark.parametrize("transport", ["http", "ws"])
def test_web_transport_against_a_port_that_speaks_no_http_is_a_usage_error(cli: Cli, transport: str) -> None:
    # aiohttp's ServerDisconnectedError (the wire port hangs up on "GET ") is no OSError: it ended in a traceback
    with FakeServer(0.001) as wire_port:
        rc, _, err = cli("-u", wire_port.url, "-i", transport, "--count", "1", *FAST)
    assert rc == 2 and f"cannot connect to {wire_port.url} over {transport}" in err, err
    assert "Traceback" not in err and wire_port.stats.frames == 0


@pytest.mark.parametrize("transport", ["http", "ws"])
def test_a_web_transport_without_aiohttp_names_the_package(transport: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The producer-side install (no server extra) has no aiohttp: a ModuleNotFoundError traceback
    monkeypatch.setitem(sys.modules, "aiohttp", None)  # (import aiohttp raises ImportError)
    with pytest.raises(ConnectionError, match=rf"the {transport} transport needs aiohttp, which is not installed"):
        asyncio.run(get_transport(transport).connect("127.0.0.1", 1))


def test_the_web_transports_run_without_the_server_packages() -> None:
    # The http transport took its names and datatypes from the server's OIP module, which imports torch
    code = textwrap.dedent("""
        import asyncio, sys
        sys.modules["torch"] = None  # (import torch raises ImportError)
        import numpy as np
        from streamgpu.loadgen.web_transports import HttpConnection

        async def main():  # a request made (its POST fails: no session), as a frame is sent
            conn = HttpConnection(None, "http://127.0.0.1:1", {})
            try:
                await conn.submit(np.zeros((2, 2, 3), np.uint8))
            except ConnectionError:
                pass

        asyncio.run(main())
        assert "streamgpu.web.oip" not in sys.modules and "streamgpu.server" not in sys.modules
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
