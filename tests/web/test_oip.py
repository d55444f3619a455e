"""The Open Inference Protocol over HTTP against the real ``tritonclient`` (sync and aio) and raw requests.

Results equal the TCP path's (streamgpu.client) on the same server; every bad request gets a clear
4xx with ``{"error": ...}`` and leaves no ring slot behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import pytest_asyncio
import torch

from streamgpu import client
from streamgpu.config import Config, ListenerSpec, TokenSpec
from streamgpu.metrics import NO_MODEL
from streamgpu.models.spec import ModelSpec
from streamgpu.protocol import wire
from streamgpu.protocol.wire import Status
from streamgpu.server import Server
from streamgpu.web import oip
from tests.test_server import record_withdrawals, slow_batches

tritonhttp = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is a test dependency")
tritonaio = pytest.importorskip("tritonclient.http.aio", reason="tritonclient[http] is a test dependency")
from tritonclient.utils import InferenceServerException  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:torch.jit")
# Checks of what the handlers answer, not of loop behaviour: run on one loop to keep CI short.
ONE_LOOP = pytest.mark.asyncio(loop_factories=["uvloop"])
SPEC = ModelSpec(input_shape=(32, 32, 3), max_batch_size=8, batch_buckets=(1, 4, 8))
USER_SHAPE = (6,)


class Affine(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(USER_SHAPE[0], 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(x)) * 3.0


def config(tmp_path: Path, **kw: Any) -> Config:
    torch.manual_seed(0)
    path = tmp_path / "affine.pt"
    torch.jit.save(torch.jit.script(Affine().eval()), str(path))
    user = ModelSpec(
        name="user", source=f"torchscript:{path}", input_shape=USER_SHAPE, input_dtype="float32", preprocess="none",
        max_batch_size=4, batch_buckets=(1, 4),
    )  # fmt: skip
    base: dict[str, Any] = dict(
        listeners=[ListenerSpec(port=0), ListenerSpec(kind="http", port=0)], device="cpu", models=[SPEC, user],
        shutdown_timeout_s=10.0,
    )  # fmt: skip
    base.update(kw)
    return Config(**base)


@pytest_asyncio.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    async with Server(config(tmp_path)) as srv:
        yield srv
    assert srv.pool.used_bytes == 0


def http_port(server: Server) -> int:
    return server.addresses[1][1]


async def no_slot_held(server: Server) -> None:
    """Ring bytes in use return to 0 (frames being finished may release a moment later)."""
    for _ in range(200):
        if server.pool.used_bytes == 0 and server.pool.slots_in_use == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"ring still holds {server.pool.used_bytes} bytes in {server.pool.slots_in_use} slots")


def frames(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *SPEC.input_shape), dtype=np.uint8)


async def tcp_results(server: Server, batch: np.ndarray, model: str = "default") -> np.ndarray:
    conn = await client.connect("127.0.0.1", server.port)
    try:
        replies = [await conn.infer(frame, model=model) for frame in batch]
    finally:
        await conn.close()
    return np.stack([r.unwrap() for r in replies])


@ONE_LOOP
async def test_health_and_metadata(server: Server) -> None:
    c = tritonaio.InferenceServerClient(f"127.0.0.1:{http_port(server)}")
    try:
        assert await c.is_server_live() and await c.is_server_ready()
        assert await c.is_model_ready("default") and await c.is_model_ready("user", "1")
        assert not await c.is_model_ready("nope")
        meta = await c.get_server_metadata()
        assert meta["name"] == "streamgpu" and "binary_tensor_data" in meta["extensions"]
        # perf_analyzer asks a server's statistics only where its metadata lists the extension
        assert {"statistics", "model_configuration", "model_repository"} <= set(meta["extensions"])
        model = await c.get_model_metadata("default")
        assert model["inputs"] == [{"name": "input", "datatype": "UINT8", "shape": [-1, 32, 32, 3]}]
        assert model["outputs"][0]["name"] == "output" and model["outputs"][0]["datatype"] == "FP32"
        user = await c.get_model_metadata("user")
        assert user["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 6]}]
        with pytest.raises(InferenceServerException, match="unknown model") as info:
            await c.get_model_metadata("nope")
        assert info.value.status() == "404"
    finally:
        await c.close()


@pytest.mark.asyncio
async def test_aio_client_binary_and_json_equal_the_tcp_path(server: Server) -> None:
    batch = frames(5, seed=1)
    expected = await tcp_results(server, batch)
    c = tritonaio.InferenceServerClient(f"127.0.0.1:{http_port(server)}")
    try:
        inp = tritonaio.InferInput("input", list(batch.shape), "UINT8")
        inp.set_data_from_numpy(batch)  # binary tensor data extension, binary outputs (no outputs named)
        result = await c.infer("default", [inp], request_id="r1")
        assert result.get_response()["id"] == "r1"
        np.testing.assert_allclose(result.as_numpy("output"), expected, rtol=1e-5, atol=1e-5)
        one = tritonaio.InferInput("input", list(SPEC.input_shape), "UINT8")  # no batch dimension: one frame
        one.set_data_from_numpy(batch[2], binary_data=False)  # JSON data in, JSON data out
        out = tritonaio.InferRequestedOutput("output", binary_data=False)
        result = await c.infer("default", [one], outputs=[out])
        assert result.get_output("output")["shape"] == [1000]
        np.testing.assert_allclose(result.as_numpy("output"), expected[2], rtol=1e-5, atol=1e-5)
    finally:
        await c.close()
    await no_slot_held(server)


@pytest.mark.asyncio
async def test_sync_client_on_builtin_and_user_torchscript_models_equal_the_tcp_path(server: Server) -> None:
    batch = frames(3, seed=2)
    values = np.random.default_rng(3).standard_normal((4, *USER_SHAPE)).astype(np.float32)
    expected_builtin = await tcp_results(server, batch)
    expected_user = await tcp_results(server, values, model="user")
    port = http_port(server)

    def run() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        c = tritonhttp.InferenceServerClient(f"127.0.0.1:{port}")
        try:
            assert c.is_server_ready()
            inp = tritonhttp.InferInput("input", list(batch.shape), "UINT8")
            inp.set_data_from_numpy(batch)
            builtin = c.infer("default", [inp]).as_numpy("output")
            inp = tritonhttp.InferInput("input", list(values.shape), "FP32")
            inp.set_data_from_numpy(values)
            out = tritonhttp.InferRequestedOutput("output", binary_data=True)
            user = c.infer("user", [inp], outputs=[out]).as_numpy("output")
            inp = tritonhttp.InferInput("input", list(values.shape), "FP32")
            inp.set_data_from_numpy(values, binary_data=False)
            user_json = c.infer("user", [inp], outputs=[tritonhttp.InferRequestedOutput("output", False)])
            return builtin, user, user_json.as_numpy("output")
        finally:
            c.close()

    builtin, user, user_json = await asyncio.to_thread(run)
    np.testing.assert_allclose(builtin, expected_builtin, rtol=1e-5, atol=1e-5)
    assert user.shape == (4, 4) and user.dtype == np.float32
    np.testing.assert_allclose(user, expected_user, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(user_json, expected_user, rtol=1e-6, atol=1e-6)
    await no_slot_held(server)


@pytest.mark.asyncio
async def test_concurrent_requests_share_the_scheduler(server: Server) -> None:
    batch = frames(16, seed=4)
    expected = await tcp_results(server, batch)
    c = tritonaio.InferenceServerClient(f"127.0.0.1:{http_port(server)}")

    async def one(i: int) -> np.ndarray:
        inp = tritonaio.InferInput("input", [1, *SPEC.input_shape], "UINT8")
        inp.set_data_from_numpy(batch[i : i + 1])
        return (await c.infer("default", [inp])).as_numpy("output")[0]

    try:
        results = await asyncio.gather(*(one(i) for i in range(len(batch))))
    finally:
        await c.close()
    np.testing.assert_allclose(np.stack(results), expected, rtol=1e-5, atol=1e-5)
    await no_slot_held(server)


def binary_request(header: dict[str, Any], data: bytes) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    return head + data, {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"}


def frame_header(shape: list[int], size: int, **extra: Any) -> dict[str, Any]:
    tensor = {"name": "input", "datatype": "UINT8", "shape": shape, "parameters": {"binary_data_size": size}}
    return {"inputs": [tensor], **extra}


def json_request(datatype: str, shape: list[int], data: Any) -> bytes:
    return json.dumps({"inputs": [{"name": "input", "datatype": datatype, "shape": shape, "data": data}]}).encode()


async def chunks(spaces: int) -> AsyncIterator[bytes]:
    """A body of ``spaces`` blanks and ``{}``, sent chunked (no Content-Length)."""
    for _ in range(spaces // 65536):
        yield b" " * 65536
    yield b" " * (spaces % 65536) + b"{}"


BAD_REQUESTS: list[tuple[str, int, str, Any]] = [
    ("wrong shape", 400, "does not match model", lambda n: binary_request(frame_header([1, 16, 16, 3], n), bytes(n))),
    ("wrong dtype", 400, "datatype", lambda n: binary_request(
        {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 32, 32, 3],
                     "parameters": {"binary_data_size": n}}]}, bytes(n))),
    ("size disagrees with shape", 400, "binary_data_size", lambda n: binary_request(
        frame_header([1, 32, 32, 3], n - 1), bytes(n - 1))),
    ("body shorter than sizes", 400, "body is", lambda n: binary_request(frame_header([1, 32, 32, 3], n), bytes(10))),
    ("body longer than sizes", 400, "body is", lambda n: binary_request(frame_header([1, 32, 32, 3], n),
                                                                        bytes(n + 5))),
    ("datatype not a string", 400, "datatype", lambda n: binary_request(
        {"inputs": [{"name": "input", "datatype": ["UINT8"], "shape": [1, 32, 32, 3],
                     "parameters": {"binary_data_size": n}}]}, bytes(n))),
    ("unknown input", 400, "unknown input", lambda n: binary_request(
        {"inputs": [{"name": "x", "datatype": "UINT8", "shape": [1], "parameters": {"binary_data_size": 1}}]},
        bytes(1))),
    ("malformed JSON", 400, "not valid JSON", lambda n: (b"{not json", {"Content-Type": "application/json"})),
    ("JSON not an object", 400, "JSON object", lambda n: (b"[1, 2]", {"Content-Type": "application/json"})),
    ("JSON nested past the parser's depth", 400, "not valid JSON", lambda n: (b"[" * 50_000, {})),
    # Parsing holds the loop (~40 ms per MiB of numbers, ~0.5 us more per list): a large tensor goes as binary data
    ("JSON of too many arrays", 400, "arrays and objects", lambda n: (b"[" + b"[0]," * 70_000 + b"[0]]", {})),
    ("JSON body past the JSON limit", 413, "binary_data_size", lambda n: (b" " * oip.JSON_BODY_LIMIT + b"{}", {})),
    ("chunked JSON body past the JSON limit", 413, "binary_data_size", lambda n: (chunks(oip.JSON_BODY_LIMIT), {})),
    ("JSON data of wrong length", 400, "elements", lambda n: (json.dumps(
        {"inputs": [{"name": "input", "datatype": "UINT8", "shape": [32, 32, 3], "data": [1, 2, 3]}]}).encode(), {})),
    ("JSON data out of range", 400, "does not fit UINT8: values must be integers 0..255", lambda n: (
        json_request("UINT8", [32, 32, 3], [300] * n), {})),
    ("JSON data below range", 400, "input 'input' data does not fit UINT8", lambda n: (
        json_request("UINT8", [32, 32, 3], [-1] * n), {})),
    ("JSON data past 64 bits", 400, "does not fit UINT8", lambda n: (
        json_request("UINT8", [32, 32, 3], [2**70] * n), {})),
    ("JSON fractions for an integer datatype", 400, "UINT8 takes integers", lambda n: (
        json_request("UINT8", [32, 32, 3], [1.5] * n), {})),
    # Python's bool is an int and numpy takes true as 1: Triton's JSON parser takes no boolean as a number
    ("JSON booleans for UINT8", 400, "got booleans", lambda n: (
        json_request("UINT8", [32, 32, 3], [True, False] * (n // 2)), {})),
    ("JSON booleans among numbers", 400, "got booleans", lambda n: (
        json_request("UINT8", [32, 32, 3], [[[1, True, 3]] * 32] * 32), {})),
    ("JSON nulls", 400, "got null", lambda n: (json_request("UINT8", [32, 32, 3], [1] * (n - 1) + [None]), {})),
    # Not JSON (RFC 8259), though Python's parser takes them; Triton's refuses them
    ("NaN token", 400, "not valid JSON", lambda n: (
        json_request("UINT8", [32, 32, 3], [0] * n).replace(b"[0, ", b"[NaN, ", 1), {})),
    ("Infinity token in a binary request's header", 400, "not valid JSON", lambda n: binary_request(
        frame_header([1, 32, 32, 3], n, parameters={"timeout": float("inf")}), bytes(n))),
    ("an output named twice", 400, "output 'output' is named twice", lambda n: binary_request(
        frame_header([1, 32, 32, 3], n, outputs=[{"name": "output"}, {"name": "output"}]), bytes(n))),
    ("an output named twice with JSON data", 400, "output 'output' is named twice", lambda n: (json.dumps(
        {"inputs": [{"name": "input", "datatype": "UINT8", "shape": [32, 32, 3], "data": [0] * n}],
         "outputs": [{"name": "output", "parameters": {"binary_data": False}}, {"name": "output"}]}).encode(), {})),
    ("an input named twice", 400, "exactly one input", lambda n: binary_request(
        {"inputs": [frame_header([1, 32, 32, 3], n)["inputs"][0]] * 2}, bytes(2 * n))),
    ("header length past body", 400, "exceeds the body", lambda n: (
        b'{"inputs": []}', {"Inference-Header-Content-Length": "999"})),
    ("header length not a number", 400, "must be an integer", lambda n: (
        b'{"inputs": []}', {"Inference-Header-Content-Length": "ten"})),
    ("header length with a sign", 400, "decimal digits", lambda n: (
        b'{"inputs": []}', {"Inference-Header-Content-Length": "+14"})),
    ("header length with an underscore", 400, "decimal digits", lambda n: (
        b'{"inputs": []}', {"Inference-Header-Content-Length": "1_4"})),
    ("negative header length", 400, "decimal digits", lambda n: (
        b'{"inputs": []}', {"Inference-Header-Content-Length": "-1"})),
    ("bad priority", 400, "priority", lambda n: binary_request(
        frame_header([1, 32, 32, 3], n, parameters={"priority": "high"}), bytes(n))),
    ("a boolean for a dimension", 400, "non-negative integers", lambda n: binary_request(
        frame_header([True, 32, 32, 3], n), bytes(n))),
    ("binary_data_output not a boolean", 400, "binary_data_output", lambda n: binary_request(
        frame_header([1, 32, 32, 3], n, parameters={"binary_data_output": "no"}), bytes(n))),
    ("an output's binary_data not a boolean", 400, "binary_data", lambda n: binary_request(
        frame_header([1, 32, 32, 3], n, outputs=[{"name": "output", "parameters": {"binary_data": "false"}}]),
        bytes(n))),
    ("classification asked", 400, "classification", lambda n: binary_request(
        frame_header([1, 32, 32, 3], n, outputs=[{"name": "output", "parameters": {"classification": 3}}]),
        bytes(n))),
]  # fmt: skip


# The same for the FP32 model ("user", 6 values a frame)
BAD_FP32_REQUESTS: list[tuple[str, int, str, Any]] = [
    ("JSON booleans for FP32", 400, "FP32, got booleans (true, false)", lambda n: (
        json_request("FP32", [6], [True, False, 1.0, 2.0, 3.0, 4.0]), {})),
    ("JSON booleans for FP32, nested", 400, "got booleans", lambda n: (
        json_request("FP32", [2, 6], [[0.5] * 6, [1.0, 2.0, 3.0, 4.0, 5.0, False]]), {})),
    ("JSON strings for FP32", 400, "got strings", lambda n: (json_request("FP32", [6], ["1"] * 6), {})),
    ("JSON value past FP32", 400, "does not fit FP32: values must be finite", lambda n: (
        json_request("FP32", [6], [1e39, 0, 0, 0, 0, 0]), {})),
    ("JSON value past FP64", 400, "element 5 is inf", lambda n: (  # (Python's json parses 1e400 as inf)
        json_request("FP32", [6], [0, 0, 0, 0, 0, 7]).replace(b"7]", b"1e400]"), {})),
    ("JSON integer past FP64", 400, "does not fit FP32", lambda n: (json_request("FP32", [6], [10**400] * 6), {})),
    ("-Infinity token", 400, "not valid JSON", lambda n: (
        json_request("FP32", [6], [0.0] * 6).replace(b"[0.0, ", b"[-Infinity, ", 1), {})),
]  # fmt: skip


@ONE_LOOP
async def test_bad_requests_get_clear_4xx_and_hold_no_slot(server: Server) -> None:
    n = SPEC.frame_nbytes
    base = f"http://127.0.0.1:{http_port(server)}/v2/models"
    async with aiohttp.ClientSession() as session:
        for model, table in (("default", BAD_REQUESTS), ("user", BAD_FP32_REQUESTS)):
            for what, status, needle, make in table:
                body, headers = make(n)
                async with session.post(f"{base}/{model}/infer", data=body, headers=headers) as resp:
                    doc = await resp.json(content_type=None)
                    assert resp.status == status, (what, resp.status, doc)
                    assert needle in doc["error"], (what, doc)
                await no_slot_held(server)
        assert sum(state.metrics.accepted for state in server.model_states()) == 0  # no frame of them taken
        body, headers = binary_request(frame_header([1, 32, 32, 3], n), bytes(n))
        async with session.post(f"{base}/nope/infer", data=body, headers=headers) as resp:
            assert resp.status == 404 and "unknown model" in (await resp.json())["error"]
        async with session.post(f"{base}/default/versions/7/infer", data=body, headers=headers) as resp:
            assert resp.status == 404 and "version" in (await resp.json())["error"]
        async with session.get(f"http://127.0.0.1:{http_port(server)}/v2/no/such/path") as resp:
            assert resp.status == 404 and "error" in await resp.json()
        async with session.post(f"{base}/default/infer", data=body, headers=headers) as resp:  # still serving
            assert resp.status == 200
    await no_slot_held(server)


@ONE_LOOP
async def test_tritonclient_raises_the_servers_message_for_non_finite_json_data_and_a_duplicate_output(
    server: Server,
) -> None:
    """tritonclient writes a non-finite JSON value as Infinity or NaN (Python's json does), which were taken as
    numbers; an output named twice was answered as if named once."""
    c = tritonaio.InferenceServerClient(f"127.0.0.1:{http_port(server)}")
    try:
        inp = tritonaio.InferInput("input", list(USER_SHAPE), "FP32")
        inp.set_data_from_numpy(np.array([1, 2, 3, np.inf, 5, 6], np.float32), binary_data=False)
        with pytest.raises(InferenceServerException, match="Infinity is not a JSON number") as info:
            await c.infer("user", [inp])
        assert info.value.status() == "400"
        inp.set_data_from_numpy(np.ones(USER_SHAPE, np.float32), binary_data=False)
        twice = [tritonaio.InferRequestedOutput("output"), tritonaio.InferRequestedOutput("output")]
        with pytest.raises(InferenceServerException, match="output 'output' is named twice") as info:
            await c.infer("user", [inp], outputs=twice)
        assert info.value.status() == "400"
        assert (await c.infer("user", [inp], outputs=twice[:1])).as_numpy("output").shape == (4,)
    finally:
        await c.close()
    await no_slot_held(server)
    assert sum(state.metrics.accepted for state in server.model_states()) == 1  # the good request's frame alone


@pytest.mark.parametrize("datatype", list(oip.DATATYPES))
def test_json_data_is_taken_up_to_each_datatypes_range_and_refused_past_it(datatype: str) -> None:
    """Integers past an integer datatype were refused (without the input's name or the range); a float past FP16 or
    FP32 (or past FP64: 1e309 parses as inf) became inf, and booleans were numbers."""
    dtype = oip.DATATYPES[datatype]

    def tensor(text: str) -> np.ndarray:
        return oip._json_tensor(json.loads(text), dtype, 2 * dtype.itemsize, [2])

    if dtype.kind == "f":
        top = float(np.finfo(dtype).max)
        np.testing.assert_array_equal(tensor(f"[{-top!r}, {top!r}]"), np.array([-top, top], dtype))
        values = "finite, of magnitude at most"
        outside = [f"[0, {-top * 2!r}]" if dtype.itemsize < 8 else "[0, -1e309]", "[0, 1e309]", f"[0, {2**1100}]"]
    else:
        lo, hi = int(np.iinfo(dtype).min), int(np.iinfo(dtype).max)
        np.testing.assert_array_equal(tensor(f"[{lo}, {hi}]"), np.array([lo, hi], dtype))
        values = f"integers {lo}..{hi}"
        outside = [f"[0, {lo - 1}]", f"[0, {hi + 1}]", f"[0, {2**64}]"]
    for text in outside:
        with pytest.raises(oip.HttpError, match=f"input 'input' data does not fit {datatype}: values must be {values}"
                           ".*; element 1 is") as info:  # fmt: skip
            tensor(text)
        assert info.value.status == 400
    for text in ("[true, 0]", "[1, false]"):
        with pytest.raises(oip.HttpError, match=f"must be numbers of datatype {datatype}, got booleans"):
            tensor(text)


@ONE_LOOP
async def test_limits_priority_and_deadline_parameters(tmp_path: Path) -> None:
    cfg = config(tmp_path, max_payload_bytes=SPEC.frame_nbytes * 2, max_priority=10)
    n = SPEC.frame_nbytes
    async with Server(cfg) as server:
        base = f"http://127.0.0.1:{http_port(server)}/v2/models/default/infer"
        async with aiohttp.ClientSession() as session:
            big = 4 * n + 2 * 1024 * 1024
            body, headers = binary_request(frame_header([big // n, 32, 32, 3], big), bytes(big))
            async with session.post(base, data=body, headers=headers) as resp:
                assert resp.status == 413 and "exceeds" in (await resp.json())["error"]
            body, headers = binary_request(frame_header([1, 32, 32, 3], n, parameters={"priority": 20}), bytes(n))
            async with session.post(base, data=body, headers=headers) as resp:
                assert resp.status == 403 and "priority 20" in (await resp.json())["error"]
            body, headers = binary_request(frame_header([1, 32, 32, 3], n, parameters={"priority": 10}), bytes(n))
            async with session.post(base, data=body, headers=headers) as resp:
                assert resp.status == 200
            body, headers = binary_request(frame_header([1, 32, 32, 3], n, parameters={"timeout": 1}), bytes(n))
            async with session.post(base, data=body, headers=headers) as resp:  # 1 us: passes before it runs
                assert resp.status == 504 and "DEADLINE_MISSED" in (await resp.json())["error"]
        # A gzip body is small on the wire; its tensor data is held to max_payload_bytes all the same.
        c = tritonaio.InferenceServerClient(f"127.0.0.1:{http_port(server)}")
        try:
            for count, status in ((2, None), (3, "413")):
                inp = tritonaio.InferInput("input", [count, *SPEC.input_shape], "UINT8")
                inp.set_data_from_numpy(np.zeros((count, *SPEC.input_shape), np.uint8))
                if status is None:
                    result = await c.infer("default", [inp], request_compression_algorithm="gzip")
                    assert result.as_numpy("output").shape == (2, 1000)
                    continue
                with pytest.raises(InferenceServerException, match="exceeds max_payload_bytes") as info:
                    await c.infer("default", [inp], request_compression_algorithm="gzip")
                assert info.value.status() == status
        finally:
            await c.close()
        await no_slot_held(server)


@ONE_LOOP
async def test_token_needed_when_configured(tmp_path: Path) -> None:
    async with Server(config(tmp_path, auth_token="s3cret")) as server:
        c = tritonaio.InferenceServerClient(f"127.0.0.1:{http_port(server)}")
        inp = tritonaio.InferInput("input", [1, *SPEC.input_shape], "UINT8")
        inp.set_data_from_numpy(frames(1, seed=5))
        try:
            with pytest.raises(InferenceServerException, match="auth token") as info:
                await c.infer("default", [inp])
            assert info.value.status() == "401"
            result = await c.infer("default", [inp], headers={"Authorization": "Bearer s3cret"})
            assert result.as_numpy("output").shape == (1, 1000)
        finally:
            await c.close()
        await no_slot_held(server)


@pytest.mark.asyncio
async def test_a_client_leaving_mid_body_or_trickling_holds_no_slot(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = config(tmp_path, receive_timeout_s=0.3, min_receive_rate=10_000_000)
    n = SPEC.frame_nbytes
    async with Server(cfg) as server:
        port = http_port(server)
        head = json.dumps(frame_header([2, 32, 32, 3], 2 * n)).encode()
        request = (
            f"POST /v2/models/default/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(head) + 2 * n}\r\n"
            f"Inference-Header-Content-Length: {len(head)}\r\n\r\n"
        ).encode() + head
        # Leaves after the first frame and part of the second: the second's slot is given back.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request + bytes(n + n // 2))
        await writer.drain()
        for _ in range(100):
            if server.pool.used_bytes:
                break
            await asyncio.sleep(0.01)
        writer.close()
        await no_slot_held(server)
        # A client that leaves is no error of the server's: no traceback per hostile client in the log.
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
        # Trickles: the payload's time budget runs out (408), the slot is given back.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request + bytes(100))
        await writer.drain()
        response = await asyncio.wait_for(reader.read(65536), 5)
        assert b" 408 " in response.split(b"\r\n")[0] and b"did not arrive" in response, response[:300]
        writer.close()
        await no_slot_held(server)


@ONE_LOOP
async def test_a_tokens_answered_request_looks_for_no_queued_frames(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A token's requests share one producer with its other connections: each request that ended with its
    frames answered had the scheduler look through all the token's queued frames (thousands, ~0.15 us each)."""
    withdrawn = record_withdrawals(monkeypatch)
    async with Server(config(tmp_path, tokens={"fleet": TokenSpec("fleet-key")})) as server:
        c = tritonaio.InferenceServerClient(f"127.0.0.1:{http_port(server)}")
        inp = tritonaio.InferInput("input", [2, *SPEC.input_shape], "UINT8")
        inp.set_data_from_numpy(frames(2, seed=6))
        try:
            result = await c.infer("default", [inp], headers={"Authorization": "Bearer fleet-key"})
            assert result.as_numpy("output").shape == (2, 1000)
        finally:
            await c.close()
        await no_slot_held(server)
    assert withdrawn == []


@ONE_LOOP
async def test_a_tokens_max_connections_counts_its_tcp_connections_websockets_and_http_requests(
    tmp_path: Path,
) -> None:
    """One count per token over every front end: with its one place taken by a TCP connection, the token's
    HTTP requests and WebSockets are refused 503 saying why, while another token's are served."""
    tokens = {"fleet": TokenSpec("fleet-key", max_connections=1), "ops": TokenSpec("ops-key")}
    async with Server(config(tmp_path, tokens=tokens)) as server, aiohttp.ClientSession() as session:
        port = http_port(server)
        why = "too many connections of token 'fleet' (its max_connections is 1)"
        c = tritonaio.InferenceServerClient(f"127.0.0.1:{port}")
        inp = tritonaio.InferInput("input", [1, *SPEC.input_shape], "UINT8")
        inp.set_data_from_numpy(frames(1, seed=5))
        try:
            held = await client.connect("127.0.0.1", server.port, token="fleet-key")
            with pytest.raises(client.HandshakeError, match="OVERLOADED"):
                await client.connect("127.0.0.1", server.port, token="fleet-key")
            with pytest.raises(InferenceServerException, match="too many connections of token") as info:
                await c.infer("default", [inp], headers={"Authorization": "Bearer fleet-key"})
            assert info.value.status() == "503"
            async with session.get(f"http://127.0.0.1:{port}/v1/stream?token=fleet-key") as response:
                assert response.status == 503 and (await response.json())["error"] == why
                assert response.headers[wire.WS_REFUSAL_HEADER] == why  # what WebSocket clients can read
            result = await c.infer("default", [inp], headers={"Authorization": "Bearer ops-key"})
            assert result.as_numpy("output").shape == (1, 1000)
            # Every refusal is counted as the TCP one is: a refused handshake (replies, no model, OVERLOADED)
            refused = [
                n for model, status, n in server.replies.items() if model == NO_MODEL and status == Status.OVERLOADED
            ]
            assert refused == [3]
            await held.close()  # its place is the token's again once the server sees the close
            for attempt in range(100):
                try:
                    result = await c.infer("default", [inp], headers={"Authorization": "Bearer fleet-key"})
                    break
                except InferenceServerException:
                    if attempt == 99:
                        raise
                    await asyncio.sleep(0.01)
            assert result.as_numpy("output").shape == (1, 1000)
        finally:
            await c.close()
        await no_slot_held(server)


@contextlib.asynccontextmanager
async def device_busy_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seconds: float
) -> AsyncIterator[tuple[Server, asyncio.Future[client.Reply]]]:
    """A server (one batch in flight at a time) whose device is busy with one TCP frame for ``seconds``: frames
    sent meanwhile wait in its queue. Yields the server and that frame's reply."""
    slow_batches(monkeypatch, seconds)
    async with Server(config(tmp_path, max_inflight_batches=1)) as server:
        conn = await client.connect("127.0.0.1", server.port)
        running = conn.submit(frames(1, seed=1)[0])
        while server.metrics()["frames_in_flight"] < 1:
            await asyncio.sleep(0.01)
        try:
            yield server, running
        finally:
            await conn.close()


@pytest.mark.asyncio
async def test_a_client_gone_while_its_frames_wait_frees_their_slots_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its handler used to wait on for frames nobody would read, holding their ring slots until their turn
    came (here: after a 1.5 s batch); now the handler is cancelled and its queued frames answered."""
    n = SPEC.frame_nbytes
    async with device_busy_for(tmp_path, monkeypatch, 1.5) as (server, running):
        head = json.dumps(frame_header([2, 32, 32, 3], 2 * n)).encode()
        request = (
            (
                f"POST /v2/models/default/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(head) + 2 * n}\r\n"
                f"Inference-Header-Content-Length: {len(head)}\r\n\r\n"
            ).encode()
            + head
            + bytes(2 * n)
        )
        _reader, writer = await asyncio.open_connection("127.0.0.1", http_port(server))
        writer.write(request)
        await writer.drain()
        while server.pool.slots_in_use < 2:
            await asyncio.sleep(0.01)
        writer.close()
        started = asyncio.get_running_loop().time()
        while server.pool.slots_in_use and asyncio.get_running_loop().time() - started < 1.0:
            await asyncio.sleep(0.01)
        assert server.pool.slots_in_use == 0, f"{server.pool.slots_in_use} slots held 1 s after the client left"
        assert (await running).ok


@pytest.mark.asyncio
async def test_a_json_body_that_stalls_or_never_ends_is_answered_408_and_gives_its_place_back(tmp_path: Path) -> None:
    cfg = config(tmp_path, receive_timeout_s=0.3, min_receive_rate=10_000_000, max_payload_bytes=4 * SPEC.frame_nbytes)
    async with Server(cfg) as server:
        port = http_port(server)
        head = b"POST /v2/models/default/infer HTTP/1.1\r\nHost: x\r\n"
        stalled = head + b'Content-Length: 100\r\n\r\n{"inputs"'  # 9 of the 100 bytes it announces
        endless = head + b"Transfer-Encoding: chunked\r\n\r\n1\r\n[\r\n"  # then a byte every 0.1 s, no last chunk

        async def dribble(writer: asyncio.StreamWriter, trickle: bytes) -> None:
            while trickle:
                await asyncio.sleep(0.1)
                writer.write(trickle)

        for request, trickle in ((stalled, b""), (endless, b"1\r\n \r\n")):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request)
            task = asyncio.ensure_future(dribble(writer, trickle))
            try:
                response = await asyncio.wait_for(reader.read(65536), 5)
            finally:
                task.cancel()
                writer.close()
            assert b" 408 " in response.split(b"\r\n")[0] and b"did not arrive" in response, response[:300]
        for _ in range(100):  # each connection's place under max_connections is given back
            if server.connections == 0:
                break
            await asyncio.sleep(0.01)
        assert server.connections == 0


@pytest.mark.asyncio
async def test_shutdown_answers_requests_in_flight_then_refuses(tmp_path: Path) -> None:
    server = Server(config(tmp_path))
    await server.start()
    port = http_port(server)
    batch = frames(8, seed=6)
    c = tritonaio.InferenceServerClient(f"127.0.0.1:{port}")

    async def one(i: int) -> np.ndarray:
        inp = tritonaio.InferInput("input", [1, *SPEC.input_shape], "UINT8")
        inp.set_data_from_numpy(batch[i : i + 1])
        return (await c.infer("default", [inp])).as_numpy("output")

    tasks = [asyncio.ensure_future(one(i)) for i in range(len(batch))]
    for _ in range(5000):  # stop while frames are in the server
        if server.admission.frames_in_flight:
            break
        await asyncio.sleep(0.001)
    await server.stop()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    await c.close()
    ok = [r for r in results if isinstance(r, np.ndarray)]
    assert ok, [str(r) for r in results]  # those that reached the server before the stop were answered
    for r in results:  # the others: refused SHUTTING_DOWN, or the connection closed under them
        assert isinstance(r, np.ndarray | aiohttp.ClientError) or "SHUTTING_DOWN" in str(r) or "not ready" in str(r), r
    assert server.pool.used_bytes == 0
    with socket.socket() as s:  # the HTTP port is closed
        assert s.connect_ex(("127.0.0.1", port)) != 0


@ONE_LOOP
async def test_http_bind_error_names_the_address(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        cfg = config(tmp_path, listeners=[ListenerSpec(port=0), ListenerSpec(kind="http", port=port)])
        with pytest.raises(OSError, match=f"(?i)http.* 127.0.0.1:{port}"):
            await Server(cfg).start()


def test_http_port_setting_adds_an_http_listener() -> None:
    cfg = Config.load(None, env={}, http_port=8000, host="0.0.0.0")
    assert [(s.kind, s.host, s.port) for s in cfg.listeners] == [("tcp", "0.0.0.0", 7878), ("http", "0.0.0.0", 8000)]
    assert Config.load(None, env={"STREAMGPU_HTTP_PORT": "9001"}).listeners[1].port == 9001
    from streamgpu.cli import build_parser

    assert build_parser().parse_args(["serve", "--http-port", "8000"]).http_port == 8000


@ONE_LOOP
async def test_models_loaded_and_unloaded_while_serving_are_the_ones_served(server: Server) -> None:
    """Metadata, readiness and inference follow the admin API, not the config's model list."""
    c = tritonaio.InferenceServerClient(f"127.0.0.1:{http_port(server)}")
    settings = {"source": "builtin:small", "input_shape": [16, 16, 3], "max_batch_size": 2}
    try:
        await c.load_model("late", config=json.dumps(settings))
        assert await c.is_model_ready("late")
        assert (await c.get_model_metadata("late"))["inputs"][0]["shape"] == [-1, 16, 16, 3]
        inp = tritonaio.InferInput("input", [1, 16, 16, 3], "UINT8")
        inp.set_data_from_numpy(np.zeros((1, 16, 16, 3), np.uint8))
        assert (await c.infer("late", [inp])).as_numpy("output").shape[0] == 1
        await c.unload_model("user")
        assert not await c.is_model_ready("user")
        with pytest.raises(InferenceServerException, match="unknown model") as info:
            await c.get_model_metadata("user")
        assert info.value.status() == "404"
    finally:
        await c.close()


def user_input() -> Any:
    """One zero frame for the config's "user" model, as tritonclient sends it."""
    inp = tritonaio.InferInput("input", [1, *USER_SHAPE], "FP32")
    inp.set_data_from_numpy(np.zeros((1, *USER_SHAPE), np.float32))
    return inp


async def learns_the_new_shape(c: Any, inp: Any) -> None:
    """After a new version of "user" returning 2 values a frame: metadata's output shape is not known until the
    version answers a request, then it is the version's own."""
    assert (await c.get_model_metadata("user"))["outputs"][0]["shape"] == [-1, -1]
    assert (await c.infer("user", [inp])).as_numpy("output").shape == (1, 2)
    assert (await c.get_model_metadata("user"))["outputs"][0]["shape"] == [-1, 2]


@ONE_LOOP
async def test_metadata_forgets_the_output_shape_of_a_version_swapped_out(server: Server, tmp_path: Path) -> None:
    """The output shape metadata gives is learned from a result; a new version returning another shape kept the
    old version's in the metadata until it answered an HTTP request itself."""
    c = tritonaio.InferenceServerClient(f"127.0.0.1:{http_port(server)}")
    narrow = tmp_path / "narrow.ts"
    torch.jit.save(torch.jit.script(torch.nn.Linear(USER_SHAPE[0], 2)), str(narrow))
    try:
        inp = user_input()
        assert (await c.infer("user", [inp])).as_numpy("output").shape == (1, 4)
        assert (await c.get_model_metadata("user"))["outputs"][0]["shape"] == [-1, 4]
        await server.swap_model("user", dataclasses.replace(server.model_specs["user"], source=f"torchscript:{narrow}"))
        await learns_the_new_shape(c, inp)
    finally:
        await c.close()


@ONE_LOOP
async def test_a_models_version_is_the_repository_indexs_and_follows_a_swap(server: Server, tmp_path: Path) -> None:
    """Every route said version 1 while the repository index counted the swaps: a client taking the version
    from the index (or from metadata, after a swap) was answered 404."""
    c = tritonaio.InferenceServerClient(f"127.0.0.1:{http_port(server)}")
    other = tmp_path / "other.ts"
    torch.jit.save(torch.jit.script(torch.nn.Linear(USER_SHAPE[0], 4)), str(other))
    inp = user_input()

    async def indexed() -> str:
        return next(str(m["version"]) for m in await c.get_model_repository_index() if m["name"] == "user")

    try:
        assert await indexed() == "1" and (await c.get_model_metadata("user"))["versions"] == ["1"]
        await server.swap_model("user", dataclasses.replace(server.model_specs["user"], source=f"torchscript:{other}"))
        assert await indexed() == "2"
        assert (await c.get_model_metadata("user"))["versions"] == ["2"]
        assert (await c.get_model_metadata("user", model_version="2"))["name"] == "user"
        assert await c.is_model_ready("user", model_version="2") and not await c.is_model_ready("user", "1")
        assert (await c.infer("user", [inp], model_version="2")).get_response()["model_version"] == "2"
        assert (await c.infer("user", [inp])).get_response()["model_version"] == "2"
        with pytest.raises(InferenceServerException, match="version 2 serves") as info:
            await c.infer("user", [inp], model_version="1")
        assert info.value.status() == "404"
    finally:
        await c.close()


@ONE_LOOP
async def test_metadata_forgets_the_output_shape_of_a_version_loaded_again_from_the_same_settings(
    server: Server, tmp_path: Path
) -> None:
    """A load without settings reuses the model's last settings (the same spec object): the new version, read
    from a file replaced meanwhile, was given the old version's output shape until it answered a request."""
    c = tritonaio.InferenceServerClient(f"127.0.0.1:{http_port(server)}")
    inp = user_input()
    try:
        assert (await c.infer("user", [inp])).as_numpy("output").shape == (1, 4)
        assert (await c.get_model_metadata("user"))["outputs"][0]["shape"] == [-1, 4]
        torch.jit.save(torch.jit.script(torch.nn.Linear(USER_SHAPE[0], 2)), str(tmp_path / "affine.pt"))
        for unload_first in (False, True):  # a swap; then an unload and a load
            if unload_first:
                await c.unload_model("user")
            await c.load_model("user")
            await learns_the_new_shape(c, inp)
    finally:
        await c.close()


@ONE_LOOP
async def test_a_version_not_serving_is_answered_404_naming_the_route_that_lists_the_versions(server: Server) -> None:
    """The 404 sent a client to 'GET /v2/repository/index', which is a POST route: a GET of it is 405."""
    base = f"http://127.0.0.1:{http_port(server)}"
    async with aiohttp.ClientSession() as session:
        for version in ("2", "01", "-1", "%201", "1.0", "x" * 4000):
            async with session.get(f"{base}/v2/models/user/versions/{version}/ready") as resp:
                error = (await resp.json())["error"]
                assert resp.status == 404 and "version 1 serves" in error, (version, error)
        method, path = error.partition("; ")[2].split()[:2]
        async with session.request(method, base + path) as resp:
            assert resp.status == 200 and {"name": "user", "version": "1", "state": "READY", "reason": ""} in (
                await resp.json()
            )


async def unknown_and_not_serving_are_404(ask: Callable[..., Awaitable[Any]]) -> None:
    """``ask(name, model_version=...)`` (a tritonclient call) of an unknown model and of a version not serving:
    both answered 404."""
    for name, version in (("nope", ""), ("user", "2")):
        with pytest.raises(InferenceServerException) as info:
            await ask(name, model_version=version)
        assert info.value.status() == "404"


@ONE_LOOP
async def test_model_config_is_tritons_batch_limit_and_tensors(server: Server) -> None:
    """Triton's clients (and perf_analyzer) read GET .../config for the batch limit and the tensors' types and
    dimensions past the batch; it was 404."""
    c = tritonaio.InferenceServerClient(f"127.0.0.1:{http_port(server)}")
    try:
        user = await c.get_model_config("user")
        assert user["name"] == "user" and user["max_batch_size"] == 4
        assert user["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": [6]}]
        assert user["output"] == [{"name": "output", "data_type": "TYPE_FP32", "dims": [-1]}]  # not answered yet
        await c.infer("user", [user_input()])
        assert (await c.get_model_config("user", model_version="1"))["output"][0]["dims"] == [4]
        default = await c.get_model_config("default")
        assert default["input"] == [{"name": "input", "data_type": "TYPE_UINT8", "dims": [32, 32, 3]}]
        assert default["max_batch_size"] == SPEC.max_batch_size
        await unknown_and_not_serving_are_404(c.get_model_config)
    finally:
        await c.close()


@ONE_LOOP
async def test_inference_statistics_count_and_time_the_frames_served(server: Server) -> None:
    """Triton's statistics extension (tritonclient's get_inference_statistics, perf_analyzer's server-side
    figures): it was 404."""
    c = tritonaio.InferenceServerClient(f"127.0.0.1:{http_port(server)}")
    try:
        before = (await c.get_inference_statistics("user"))["model_stats"]
        assert before[0]["inference_count"] == 0 and before[0]["last_inference"] == 0
        for _ in range(3):
            await c.infer("user", [user_input()])
        (user,) = (await c.get_inference_statistics("user", model_version="1"))["model_stats"]
        assert user["name"] == "user" and user["version"] == "1"
        assert user["inference_count"] == 3 and 1 <= user["execution_count"] <= 3
        assert user["last_inference"] > 1_700_000_000_000  # ms since the epoch
        stats = user["inference_stats"]
        assert stats["success"]["count"] == 3 and stats["success"]["ns"] > 0
        assert stats["queue"]["count"] == 3 and stats["compute_infer"]["count"] == user["execution_count"]
        assert stats["fail"]["count"] == 0
        every = {m["name"] for m in (await c.get_inference_statistics())["model_stats"]}
        assert every == {"default", "user"}
        await unknown_and_not_serving_are_404(c.get_inference_statistics)
    finally:
        await c.close()


@pytest.mark.asyncio
async def test_a_body_that_does_not_decompress_is_a_400_not_a_server_error(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    """A Content-Encoding body aiohttp cannot decode raised out of the handler: a text/plain 500 and a traceback
    logged per request (twice: aiohttp's lingering read of the body raised again)."""
    n = SPEC.frame_nbytes
    base = f"http://127.0.0.1:{http_port(server)}/v2"
    head = json.dumps(frame_header([1, 32, 32, 3], n)).encode()
    requests = [  # the JSON body, the binary inputs after a readable header (gzip's stream fails at its first byte)
        ("models/default/infer", b"not gzip at all", {}),
        ("models/default/infer", head + b"\x1f\x8b\x08\x00" + bytes(n), {"Inference-Header-Content-Length": "4"}),
        ("repository/index", b"not gzip at all", {}),
    ]
    async with aiohttp.ClientSession() as session:
        for path, body, headers in requests:
            headers = {"Content-Encoding": "gzip", **headers}
            async with session.post(f"{base}/{path}", data=body, headers=headers) as resp:
                assert resp.status == 400, (path, resp.status, await resp.text())
                assert "cannot be decoded" in (await resp.json())["error"], path
    await no_slot_held(server)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


@pytest.mark.asyncio
async def test_a_request_whose_frames_straddle_a_swap_to_another_output_shape_is_answered_503(
    server: Server, tmp_path: Path
) -> None:
    """Its frames' results (4 values from the old version, 2 from the new) were stacked into one tensor: a
    ValueError out of the handler, a text/plain 500."""
    narrow = tmp_path / "narrow.ts"
    torch.jit.save(torch.jit.script(torch.nn.Linear(USER_SHAPE[0], 2)), str(narrow))
    n = 4 * USER_SHAPE[0]
    head = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, *USER_SHAPE],
                                   "parameters": {"binary_data_size": 2 * n}}]}).encode()  # fmt: skip
    reader, writer = await asyncio.open_connection("127.0.0.1", http_port(server))
    writer.write(
        f"POST /v2/models/user/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(head) + 2 * n}\r\n"
        f"Inference-Header-Content-Length: {len(head)}\r\n\r\n".encode()
        + head
        + bytes(n)  # the first frame only
    )
    metrics = next(state.metrics for state in server.model_states() if state.name == "user")
    while metrics.completed < 1:  # the first frame ran on version 1
        await asyncio.sleep(0.01)
    await server.swap_model("user", dataclasses.replace(server.model_specs["user"], source=f"torchscript:{narrow}"))
    writer.write(bytes(n))  # the second runs on version 2
    try:
        response = await asyncio.wait_for(reader.read(65536), 5)
    finally:
        writer.close()
    status, _, body = response.partition(b"\r\n\r\n")
    assert b" 503 " in status.split(b"\r\n")[0] and b"send it again" in body, response
    assert "swapped" in json.loads(body)["error"]
    await no_slot_held(server)


@pytest.mark.asyncio
async def test_a_client_leaving_mid_body_logs_no_error_where_handlers_are_not_cancelled(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    """Embedded in an application (aiohttp's default: a handler runs on when its client leaves), a model
    administration body cut short raised ConnectionResetError out of its handler: a traceback logged per client."""
    from aiohttp import web

    from streamgpu.web.app import create_app

    runner = web.AppRunner(create_app(server))  # (aiohttp's TestServer cancels handlers)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        for path in ("/v2/repository/models/user/load", "/v2/models/user/infer"):
            _reader, writer = await asyncio.open_connection(*runner.addresses[0][:2])
            writer.write(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{{".encode())
            await writer.drain()
            await asyncio.sleep(0.05)  # the handler reads the body
            writer.close()
        for _ in range(30):  # (the error came within milliseconds)
            assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
            await asyncio.sleep(0.01)
    finally:
        await runner.cleanup()


@ONE_LOOP
async def test_an_output_too_large_for_json_is_refused_naming_binary_data(server: Server) -> None:
    """A binary request (nothing to parse) asking a JSON reply: 300 frames of 1000 values made 6 MB of JSON text
    written on the event loop (~0.5 us a value here: a 64 MiB request of them held every producer ~10 s)."""
    count, n = 300, SPEC.frame_nbytes
    body, headers = binary_request(frame_header([count, 32, 32, 3], count * n), bytes(count * n))
    url = f"http://127.0.0.1:{http_port(server)}/v2/models/default/infer"
    async with aiohttp.ClientSession() as session, session.post(url, data=body, headers=headers) as resp:
        doc = await resp.json(content_type=None)
        assert resp.status == 400 and "binary_data_output" in doc["error"], (resp.status, str(doc)[:200])
    await no_slot_held(server)


@pytest.mark.asyncio
async def test_a_request_takes_no_more_frames_once_one_of_them_failed(server: Server) -> None:
    """A frame of a request answered with an error (here its 1 us deadline passed) makes the request's reply that
    error: the frames after it were still received and run, for a reply that could only be the error (a request of
    1,500 frames ran 1,033 after one was refused OVERLOADED), the client kept sending them meanwhile."""
    n = 4 * USER_SHAPE[0]
    head = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [3, *USER_SHAPE],
                                   "parameters": {"binary_data_size": 3 * n}}],
                       "parameters": {"timeout": 1}}).encode()  # fmt: skip
    reader, writer = await asyncio.open_connection("127.0.0.1", http_port(server))
    writer.write(
        f"POST /v2/models/user/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(head) + 3 * n}\r\n"
        f"Inference-Header-Content-Length: {len(head)}\r\n\r\n".encode()
        + head
        + bytes(n)  # the first frame only: the others never come
    )
    try:
        response = await asyncio.wait_for(reader.read(65536), 5)
    finally:
        writer.close()
    status, _, body = response.partition(b"\r\n\r\n")
    assert b" 200 " not in status.split(b"\r\n")[0] and b"deadline" in body.lower(), response
    await no_slot_held(server)


@pytest.mark.asyncio
async def test_an_integer_of_thousands_of_digits_is_a_4xx_naming_the_limit_not_pythons_message(
    server: Server,
) -> None:
    """Python refuses int() of more than 4300 digits: a header length of 5000 digits was a 500, and a JSON
    integer of 5000 digits (a priority, a tensor value, a setting) a 400 quoting Python (sys.set_int_max_str_digits)."""
    n, big = SPEC.frame_nbytes, "1" * 5000
    digits = big.encode()
    root = f"http://127.0.0.1:{http_port(server)}/v2"
    head = json.dumps(frame_header([1, 32, 32, 3], n)).encode()
    async with aiohttp.ClientSession() as session:
        headers = {"Inference-Header-Content-Length": big, "Content-Type": "application/octet-stream"}
        async with session.post(f"{root}/models/default/infer", data=head + bytes(n), headers=headers) as resp:
            assert resp.status == 413, await resp.text()
            assert (await resp.json())["error"] == f"{oip.HEADER_LENGTH} of 5000 digits exceeds {oip.HEADER_ALLOWANCE}"
        headers["Inference-Header-Content-Length"] = "0" * 5000 + str(len(head))  # (int() counts the zeros too)
        async with session.post(f"{root}/models/default/infer", data=head + bytes(n), headers=headers) as resp:
            assert resp.status == 200, await resp.text()
        tensor = {"name": "input", "datatype": "UINT8", "shape": [32, 32, 3], "data": [0] * n}
        priority = json.dumps({"parameters": {"priority": 7}, "inputs": [tensor]}).encode()
        for route, body in [
            ("models/default/infer", priority.replace(b'"priority": 7', b'"priority": ' + digits)),
            ("models/default/infer", json_request("UINT8", [32, 32, 3], [0] * n).replace(b"[0", b"[" + digits, 1)),
            ("repository/models/default/load", f'{{"parameters": {{"config": {{"max_batch_size": {big}}}}}}}'.encode()),
        ]:  # fmt: skip
            async with session.post(f"{root}/{route}", data=body) as resp:
                error = (await resp.json())["error"]
                assert resp.status == 400 and "an integer of more than 4300 digits at character" in error, error
                assert "sys.set_int_max_str_digits" not in error
    await no_slot_held(server)


@ONE_LOOP
async def test_a_request_of_more_frames_than_its_models_queue_holds_is_served_not_refused(tmp_path: Path) -> None:
    """A request's frames were taken as fast as its body came, with no bound like a connection's
    (``max_frames_per_connection``): one request of more frames than its model's queue holds filled that queue and
    was answered 503 "queue is full" by an idle server (a tritonclient request of 2,000 16x16x3 frames against the
    default max_queue of 1,024), the frames taken until then left to run for nothing. Now a request has at most
    ``max_frames_per_connection`` frames in the server at once, as a TCP or WebSocket connection: the rest of its
    body waits (TCP flow control), and every frame is served."""
    count, n = 100, SPEC.frame_nbytes
    small_queue = dataclasses.replace(SPEC, max_queue=32)
    async with Server(config(tmp_path, models=[small_queue], max_frames_per_connection=8)) as server:
        batch = frames(count, seed=11)
        body, headers = binary_request(
            frame_header([count, 32, 32, 3], count * n, parameters={"binary_data_output": True}), batch.tobytes()
        )
        url = f"http://127.0.0.1:{http_port(server)}/v2/models/default/infer"
        async with aiohttp.ClientSession() as session, session.post(url, data=body, headers=headers) as resp:
            raw = await resp.read()
            assert resp.status == 200, raw[:300]
        head_len = int(resp.headers[oip.HEADER_LENGTH])
        doc = json.loads(raw[:head_len])
        assert doc["outputs"][0]["shape"] == [count, 1000]
        got = np.frombuffer(raw[head_len:], np.float32).reshape(count, 1000)
        expected = await tcp_results(server, batch[[0, count // 2, count - 1]])
        np.testing.assert_allclose(got[[0, count // 2, count - 1]], expected, rtol=1e-5, atol=1e-5)
        assert server.metrics()["models"]["default"]["rejected_overloaded"] == 0
        await no_slot_held(server)


@pytest.mark.asyncio
async def test_the_frames_of_a_request_answered_with_an_error_are_not_run_for_nobody(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request answered with an error on a connection that stays open (here its chunked body ended a frame
    short: 400): the frames it had already sent waited their turn and ran, for a reply already given, holding
    their ring slots until then (here behind a 1.5 s batch), and the client could send such requests again and
    again. They are now answered at once, as a closed connection's, their slots freed."""
    n = SPEC.frame_nbytes
    async with device_busy_for(tmp_path, monkeypatch, 1.5) as (server, running):
        before = server.pool.slots_in_use
        head = json.dumps(frame_header([3, 32, 32, 3], 3 * n)).encode()
        body = head + bytes(2 * n)  # two frames of three: then the body ends

        def chunk(data: bytes) -> bytes:
            return f"{len(data):x}\r\n".encode() + data + b"\r\n"

        reader, writer = await asyncio.open_connection("127.0.0.1", http_port(server))
        writer.write(
            f"POST /v2/models/default/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            f"Inference-Header-Content-Length: {len(head)}\r\n\r\n".encode()
            + chunk(body)
            + b"0\r\n\r\n"
        )
        await writer.drain()
        try:
            response = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert b" 400 " in response.split(b"\r\n")[0], response
            assert b"Connection: close" not in response  # the connection stays: its frames are not abandoned by it
            started = asyncio.get_running_loop().time()
            while server.pool.slots_in_use > before and asyncio.get_running_loop().time() - started < 1.0:
                await asyncio.sleep(0.01)
            assert server.pool.slots_in_use == before, (
                f"{server.pool.slots_in_use - before} slots held 1 s after the request was answered 400"
            )
        finally:
            writer.close()
        assert (await running).ok
        assert server.metrics()["models"]["default"]["completed"] == 1  # the request's frames never ran
