"""The Open Inference Protocol (KServe v2, as Triton serves it) over HTTP/REST.

Routes (docs/HTTP.md is the user's description)::

    GET  /v2                                        server metadata and extensions
    GET  /v2/health/live                            200 while the process serves HTTP
    GET  /v2/health/ready                           200 while the server accepts frames, else 503
    GET  /v2/models/{name}[/versions/N]             model metadata: inputs, outputs, dtypes, shapes
    GET  /v2/models/{name}[/versions/N]/ready       200 when the model is served and the server ready
    GET  /v2/models/{name}[/versions/N]/config      Triton's model configuration: max_batch_size, tensors
    GET  /v2/models[/{name}[/versions/N]]/stats     Triton's statistics extension: counts and times
    POST /v2/models/{name}[/versions/N]/infer       inference: JSON tensors or the binary tensor data
                                                    extension (Inference-Header-Content-Length)

A model has one input, ``input`` (the frame, with an optional leading batch dimension: ``[N,
*input_shape]`` runs N frames, each admitted, scheduled and batched like a TCP frame), and one
output, ``output``. Binary input bytes go from the request body straight into ring slots, one
frame at a time as they arrive; JSON ``data`` inputs are parsed then copied in. Request
``parameters``: ``timeout`` (microseconds, Triton's meaning: the frame's deadline from its
arrival) and ``priority`` (0..255, streamgpu's meaning: higher is more urgent). Errors are
``{"error": "..."}`` with a 4xx/5xx status (``HTTP_STATUS``).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from aiohttp import web

import streamgpu
from streamgpu.frame import Outcome
from streamgpu.ingest.admission import Admission, Producer, Refused
from streamgpu.metrics import Histogram
from streamgpu.models.spec import ModelSpec
from streamgpu.protocol.oip import DATATYPE_OF, DATATYPES, HEADER_LENGTH, INPUT_NAME, OUTPUT_NAME
from streamgpu.protocol.wire import FrameHeader, Status
from streamgpu.scheduler.metrics import ModelMetrics
from streamgpu.web.app import SERVER_KEY, HttpError, give_place, parse_json, read_body, take_place
from streamgpu.web.frames import next_stream_key, receive_frame

PLATFORM = "pytorch"
# Room for the JSON inference header beside the tensor bytes: a request body may be at most
# max_payload_bytes + this (the tensor data of one request is at most max_payload_bytes).
HEADER_ALLOWANCE = 1024 * 1024
# A request whose tensors are JSON numbers may be at most this large: parsing it and making its tensor hold the
# event loop, and every producer with it, ~40 ms per MiB of flat numbers (binary data is not parsed).
JSON_BODY_LIMIT = 1024 * 1024
# A JSON reply may carry at most this many output values (some 4 MiB of text): writing them holds the event loop
# ~0.5 us each (a request's worth of binary input can ask tens of millions); more go as binary data.
JSON_OUTPUT_LIMIT = 256 * 1024
# Triton's names for the extensions served (perf_analyzer reads a server's statistics only where it says "statistics")
EXTENSIONS = ["binary_tensor_data", "model_configuration", "model_repository", "statistics"]


# How a refused or failed frame's status is answered over HTTP.
HTTP_STATUS: dict[Status, int] = {
    Status.BAD_FRAME: 400,
    Status.TOO_LARGE: 413,
    Status.UNKNOWN_MODEL: 404,
    Status.OVERLOADED: 503,
    Status.DEADLINE_MISSED: 504,
    Status.INTERNAL_ERROR: 500,
    Status.SHUTTING_DOWN: 503,
    Status.SUPERSEDED: 409,
    Status.UNAUTHORIZED: 403,
    Status.UNSUPPORTED_VERSION: 400,
    Status.RECEIVE_TIMEOUT: 408,
}


def error_response(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


# -- health and metadata ----------------------------------------------------------------------------


async def server_metadata(request: web.Request) -> web.Response:
    return web.json_response({"name": "streamgpu", "version": streamgpu.__version__, "extensions": EXTENSIONS})


async def live(request: web.Request) -> web.Response:
    return web.Response(status=200)


async def ready(request: web.Request) -> web.Response:
    return web.Response(status=200 if request.app[SERVER_KEY].started else 503)


def _spec(request: web.Request) -> tuple[ModelSpec, str]:
    """The model the path names as served now, and its version (the repository index's: one more at each
    swap); 404 for an unknown model, or a version not the one serving. The config's models, those loaded
    since (admin API, model repository), none unloaded."""
    server = request.app[SERVER_KEY]
    name = request.match_info["name"]
    served = server.served(name) if server.initialized else None
    if served is None:
        raise HttpError(404, f"unknown model: {name!r}")
    spec, serving = served
    version = request.match_info.get("version", str(serving))
    if version != str(serving):
        raise HttpError(404, f"model {name!r} has no version {version!r} serving: version {serving} serves "
                             "(a swap replaces the version; POST /v2/repository/index lists them)")  # fmt: skip
    return spec, version


async def model_ready(request: web.Request) -> web.Response:
    try:
        _spec(request)
    except HttpError as exc:
        return error_response(exc.status, exc.message)
    return web.Response(status=200 if request.app[SERVER_KEY].started else 503)


def _metadata(spec: ModelSpec, version: str, output: tuple[int, ...]) -> dict[str, Any]:
    """The Open Inference Protocol's model metadata (shapes with the batch first)."""
    return {
        "name": spec.name,
        "versions": [version],
        "platform": PLATFORM,
        "inputs": [{"name": INPUT_NAME, "datatype": DATATYPE_OF[spec.frame_dtype], "shape": [-1, *spec.input_shape]}],
        "outputs": [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, *output]}],
    }  # fmt: skip


def _config(spec: ModelSpec, version: str, output: tuple[int, ...]) -> dict[str, Any]:
    """Triton's model configuration (what its clients and perf_analyzer read): the batch limit, and each
    tensor's type and dimensions past the batch."""
    return {
        "name": spec.name,
        "platform": PLATFORM,
        "max_batch_size": spec.max_batch_size,
        "input": [{"name": INPUT_NAME, "data_type": f"TYPE_{DATATYPE_OF[spec.frame_dtype]}",
                   "dims": list(spec.input_shape)}],
        "output": [{"name": OUTPUT_NAME, "data_type": "TYPE_FP32", "dims": list(output)}],
    }  # fmt: skip


def _model_document(
    describe: Callable[[ModelSpec, str, tuple[int, ...]], dict[str, Any]],
) -> Callable[[web.Request], Awaitable[web.Response]]:
    """A GET route answering ``describe(spec, version, output shape)`` of the model the path names (404 as
    ``_spec`` says)."""

    async def handler(request: web.Request) -> web.Response:
        try:
            spec, version = _spec(request)
        except HttpError as exc:
            return error_response(exc.status, exc.message)
        return web.json_response(describe(spec, version, _output_shape(request.app, spec, version)))

    return handler


async def model_stats(request: web.Request) -> web.Response:
    """Triton's statistics extension: the model the path names, or every model served (``/v2/models/stats``)."""
    server = request.app[SERVER_KEY]
    if "name" in request.match_info:
        try:
            spec, version = _spec(request)
        except HttpError as exc:
            return error_response(exc.status, exc.message)
        served = {spec.name: version}
    else:
        names = server.model_specs if server.initialized else {}
        served = {name: str(now[1]) for name in names if (now := server.served(name)) is not None}
    states = [state for state in server.model_states() if state.name in served] if served else []
    return web.json_response({"model_stats": [_stats(s.name, served[s.name], s.metrics) for s in states]})


def _stats(name: str, version: str, m: ModelMetrics) -> dict[str, Any]:
    """One model's counters as Triton reports them: a count and the nanoseconds they took in all. Since the
    name was loaded, over every version swapped in since (an unload and a load start again): success per OK
    frame (header to reply), queue per frame that ran, compute_input (the batch's copy to the device) and
    compute_infer (the rest, to results on the host) per batch; fail counts frames answered with an error (no
    time kept)."""

    def timed(histogram: Histogram) -> dict[str, int]:
        return {"count": sum(histogram.counts), "ns": round(histogram.sum * 1e9)}

    failed = m.failed + m.deadline_missed + m.rejected_overloaded
    return {
        "name": name, "version": version, "last_inference": m.last_completed_ms,
        "inference_count": m.completed, "execution_count": m.batches,
        "inference_stats": {
            "success": timed(m.e2e_s), "fail": {"count": failed, "ns": 0}, "queue": timed(m.queue_s),
            "compute_input": timed(m.transfer_s), "compute_infer": timed(m.compute_s),
            "compute_output": {"count": 0, "ns": 0},
        },
    }  # fmt: skip


def _output_shape(app: web.Application, spec: ModelSpec, version: str) -> tuple[int, ...]:
    """One frame's output shape, known once this version answered a request (one swapped out or unloaded since
    may have returned another), else (-1,)."""
    learned = _output_shapes(app).get(spec.name)
    return learned[1] if learned is not None and learned[0] == version else (-1,)


# Each model's output shape (one frame's), learned from its first result, with the version that returned it
# (not its spec: a load without settings reuses the last one, whose file may have changed): metadata says -1 before.
_OUTPUT_SHAPES: web.AppKey[dict[str, tuple[str, tuple[int, ...]]]] = web.AppKey("streamgpu.oip.output_shapes")


def _output_shapes(app: web.Application) -> dict[str, tuple[str, tuple[int, ...]]]:
    return app[_OUTPUT_SHAPES]


# -- inference --------------------------------------------------------------------------------------


class _Request:
    """One parsed inference request: its frames' header template and how to answer."""

    def __init__(self, spec: ModelSpec, doc: Any, binary_len: int | None) -> None:
        if not isinstance(doc, dict):
            raise HttpError(400, "the inference request must be a JSON object")
        self.id = doc.get("id")
        if self.id is not None and not isinstance(self.id, str):
            raise HttpError(400, "'id' must be a string")
        params = _dict(doc.get("parameters", {}), "parameters")
        self.deadline_us = _int_param(params, "timeout", 2**32 - 1)
        self.priority = _int_param(params, "priority", 255)
        inputs = doc.get("inputs")
        if not isinstance(inputs, list) or len(inputs) != 1:
            raise HttpError(400, f"model {spec.name!r} takes exactly one input, named {INPUT_NAME!r}")
        tensor = _dict(inputs[0], "inputs[0]")
        if tensor.get("name") != INPUT_NAME:
            raise HttpError(400, f"unknown input {tensor.get('name')!r}: model {spec.name!r} has input {INPUT_NAME!r}")
        datatype = tensor.get("datatype")
        if not isinstance(datatype, str) or DATATYPES.get(datatype) != spec.frame_dtype:  # (a list: unhashable)
            raise HttpError(400, f"input {INPUT_NAME!r} has datatype {DATATYPE_OF[spec.frame_dtype]}, got {datatype!r}")
        shape = tensor.get("shape")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise HttpError(400, f"input shape must be a list of non-negative integers, got {shape!r}")
        frame_shape = list(spec.input_shape)
        if shape == frame_shape:
            self.frames, self.batched = 1, False
        elif len(shape) == len(frame_shape) + 1 and shape[1:] == frame_shape and shape[0] >= 1:
            self.frames, self.batched = shape[0], True
        else:
            raise HttpError(
                400, f"input shape {shape} does not match model {spec.name!r}: expected {frame_shape} or"
                f" [N, {', '.join(map(str, frame_shape))}]"
            )  # fmt: skip
        self.frame_nbytes = spec.frame_nbytes
        nbytes = self.frames * self.frame_nbytes
        in_params = _dict(tensor.get("parameters", {}), "inputs[0].parameters")
        size = in_params.get("binary_data_size")
        self.data: np.ndarray | None = None
        if size is not None:
            if "data" in tensor:
                raise HttpError(400, "input has both 'data' and parameters.binary_data_size")
            if binary_len is None:
                raise HttpError(400, "binary_data_size needs the Inference-Header-Content-Length header")
            if size != nbytes:
                raise HttpError(400, f"binary_data_size is {size}; input shape {shape} of {datatype} needs {nbytes}")
        else:
            if "data" not in tensor:
                raise HttpError(400, "input has neither 'data' nor parameters.binary_data_size")
            self.data = _json_tensor(tensor["data"], spec.frame_dtype, nbytes, shape)
        self.binary_len = nbytes if size is not None else 0
        self.binary_output = _bool_param(params, "binary_data_output", False, "parameters")
        outputs = doc.get("outputs")
        if outputs is not None:
            if not isinstance(outputs, list):
                raise HttpError(400, "'outputs' must be a list")
            for i, out in enumerate(outputs):
                out = _dict(out, f"outputs[{i}]")
                if out.get("name") != OUTPUT_NAME:
                    raise HttpError(400, f"unknown output {out.get('name')!r}: model {spec.name!r} has {OUTPUT_NAME!r}")
                if i:  # (each is the one output: a second is a duplicate, whose parameters might disagree)
                    raise HttpError(400, f"output {OUTPUT_NAME!r} is named twice in 'outputs': name each output once")
                out_params = _dict(out.get("parameters", {}), f"outputs[{i}].parameters")
                if "classification" in out_params:
                    raise HttpError(400, "the classification extension is not supported")
                self.binary_output = _bool_param(
                    out_params, "binary_data", self.binary_output, f"outputs[{i}].parameters"
                )

    def header(self, spec: ModelSpec, index: int) -> FrameHeader:
        return FrameHeader(
            0, index, spec.name, spec.frame_dtype_code, spec.input_shape, self.frame_nbytes,
            deadline_us=self.deadline_us, priority=self.priority,
        )  # fmt: skip


def _dict(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise HttpError(400, f"{where} must be a JSON object")
    return value


def _bool_param(params: dict[str, Any], key: str, default: bool, where: str) -> bool:
    value = params.get(key, default)
    if not isinstance(value, bool):  # bool("false") is True: a string or number here is a client's mistake
        raise HttpError(400, f"{where}.{key} must be true or false, got {value!r}")
    return value


def _int_param(params: dict[str, Any], key: str, hi: int) -> int:
    value = params.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= hi:
        raise HttpError(400, f"parameters.{key} must be an integer 0..{hi}, got {value!r}")
    return value


# JSON's names for the non-numbers ``json`` makes
_JSON_KINDS: dict[type, str] = {bool: "booleans (true, false)", type(None): "null", str: "strings", dict: "objects"}


def _json_tensor(data: Any, dtype: np.dtype, nbytes: int, shape: list[int]) -> np.ndarray:
    """A JSON ``data`` list (flat, row-major, or nested) as a flat array of ``dtype``. Numbers only (numpy would take
    true as 1: Triton's parser takes no boolean for a number), integers for an integer datatype (as Triton), each
    in the datatype's range: a value that does not fit is refused (not wrapped, as Triton does, nor made inf)."""
    datatype = DATATYPE_OF[dtype]
    try:
        array = np.asarray(data)
    except (ValueError, TypeError) as exc:
        raise HttpError(400, f"input {INPUT_NAME!r} data is not a tensor: {exc}") from None
    leaves = data if array.ndim else [data]
    for _ in range(array.ndim - 1):
        leaves = itertools.chain.from_iterable(leaves)
    kinds = set(map(type, leaves))  # one pass at C speed: ~20 ns a value, a fraction of parsing it
    if not kinds <= {int, float}:
        got = ", ".join(sorted(_JSON_KINDS.get(kind, kind.__name__) for kind in kinds - {int, float}))
        raise HttpError(400, f"input {INPUT_NAME!r} data must be numbers of datatype {datatype}, got {got}")
    flat = array.reshape(-1)
    if flat.size * dtype.itemsize != nbytes:
        raise HttpError(
            400, f"input {INPUT_NAME!r} data has {flat.size} elements; shape {shape} needs {nbytes // dtype.itemsize}"
        )  # fmt: skip
    # Range checks on the values as parsed: Python ints compare exactly (one past 64 bits, which numpy keeps as
    # an int object, too); NaN and inf (1e400 parses as inf) compare false
    if dtype.kind == "f":
        top = float(np.finfo(dtype).max)
        bad = ~(abs(flat) <= top)
        if bad.any():
            raise _out_of_range(datatype, f"finite, of magnitude at most {top:.7g}", flat, bad)
        return flat.astype(dtype)
    if float in kinds:
        raise HttpError(
            400, f"input {INPUT_NAME!r} data: {datatype} takes integers, got numbers with a fraction or exponent"
            " (such as 1.5, 2.0 or 1e3)"
        )  # fmt: skip
    if flat.dtype.kind == "f":  # integers numpy made floats ([0, 2**63]: int64 and uint64), compared exactly
        flat = np.asarray(data, dtype=object).reshape(-1)
    info = np.iinfo(dtype)
    bad = (flat < int(info.min)) | (flat > int(info.max))
    if bad.any():
        raise _out_of_range(datatype, f"integers {info.min}..{info.max}", flat, bad)
    return flat.astype(dtype)


def _out_of_range(datatype: str, values: str, flat: np.ndarray, bad: np.ndarray) -> HttpError:
    index = int(np.argmax(bad))
    shown = repr(flat[index].item() if isinstance(flat[index], np.generic) else flat[index])
    shown = shown if len(shown) <= 24 else f"{shown[:20]}... ({len(shown.lstrip('-'))} digits)"
    return HttpError(
        400, f"input {INPUT_NAME!r} data does not fit {datatype}: values must be {values}; element {index} is {shown}"
    )


def _producer(request: web.Request, admission: Admission) -> Producer:
    """The request's producer: its bearer token's (shared by every request presenting it), or its own."""
    auth = request.headers.get("Authorization", "")
    token = auth[len("Bearer ") :] if auth.startswith("Bearer ") else ""
    grant = admission.authenticate(token)
    if grant is None:
        raise HttpError(401, "bad or missing auth token (send 'Authorization: Bearer TOKEN')")
    peer = request.remote or "?"
    try:
        return admission.producer_for(grant, f"http:{peer}")
    except Refused as refused:  # its token has its max_connections (requests in the server) open
        admission.refused_handshake(f"http:{peer}", refused.status, refused.message)  # (counted, logged: as TCP's)
        raise HttpError(HTTP_STATUS[refused.status], refused.message) from None


async def infer(request: web.Request) -> web.StreamResponse:
    server = request.app[SERVER_KEY]
    try:
        spec, version = _spec(request)
        if not server.started:
            raise HttpError(503, "server is not ready (starting or shutting down)")
        admission = server.admission
        producer = _producer(request, admission)
    except HttpError as exc:
        return error_response(exc.status, exc.message)
    if not take_place(request):
        admission.leave(producer, queued=False)
        return error_response(503, f"too many connections ({admission.config.max_connections})")
    answered = False  # every frame of the request answered: none left queued for ``leave`` to look for
    try:
        response = await _infer(request, spec, version, admission, producer)
        answered = True
        return response
    except HttpError as exc:
        return error_response(exc.status, exc.message)
    except Refused as refused:
        return error_response(HTTP_STATUS[refused.status], f"{refused.status.name}: {refused.message}")
    finally:
        give_place(request)
        admission.leave(producer, queued=not answered)


async def _infer(
    request: web.Request, spec: ModelSpec, version: str, admission: Admission, producer: Producer
) -> web.StreamResponse:
    """``version``: the one serving when the request came (a swap meanwhile may run its frames on the next)."""
    limit = admission.config.max_payload_bytes + HEADER_ALLOWANCE
    length = request.content_length
    if length is not None and length > limit:
        raise HttpError(413, f"request body of {length} bytes exceeds {limit} (max_payload_bytes + header allowance)")
    content = request.content
    header_len = _header_length(request)
    if header_len is not None:
        if length is not None and not request.headers.get("Content-Encoding") and header_len > length:
            raise HttpError(400, f"{HEADER_LENGTH} {header_len} exceeds the body's {length} bytes")
        raw = await _read_exactly(content, header_len, admission, "inference header")
    else:
        if limit > JSON_BODY_LIMIT:
            limit = JSON_BODY_LIMIT
            too_large = (
                f"a request body without binary data may be at most {limit} bytes (parsing it holds the server):"
                f" send the tensor as binary data (parameters.binary_data_size, header {HEADER_LENGTH})"
            )
        else:
            too_large = f"request body exceeds {limit} bytes (max_payload_bytes + header allowance)"
        if length is not None and length > limit:
            raise HttpError(413, too_large)
        raw = await read_body(content, limit, admission.payload_budget_s(length or limit), too_large)
    try:
        doc = parse_json(raw)
    except ValueError as exc:  # UnicodeDecodeError included
        raise HttpError(400, f"the inference request is not valid JSON: {exc}") from None
    req = _Request(spec, doc, header_len)
    if req.frames * req.frame_nbytes > admission.config.max_payload_bytes:  # a compressed body can claim more
        raise HttpError(
            413, f"tensor data of {req.frames * req.frame_nbytes} bytes exceeds max_payload_bytes"
            f" ({admission.config.max_payload_bytes})"
        )  # fmt: skip
    plain = header_len is not None and length is not None and not request.headers.get("Content-Encoding")
    if plain and header_len + req.binary_len != length:  # type: ignore[operator]
        raise HttpError(
            400, f"body is {length} bytes; the header ({header_len}) and binary inputs ({req.binary_len}) make"
            f" {header_len + req.binary_len}"  # type: ignore[operator]
        )  # fmt: skip
    stream = next_stream_key("http")
    transport = request.transport

    # Answered with an error while its frames wait (a frame failed, the body ended short): on a connection that stays
    # open they would still run, for nobody, holding their slots until then; Admission.leave answers them now.
    given_up = False

    def abandoned() -> bool:
        return given_up or transport is None or transport.is_closing()

    # A frame answered with an error makes the reply that error: the frames after it are not taken (nor read),
    # rather than received and run for nothing while other producers wait.
    failures: list[Outcome] = []

    def failed_one(f: asyncio.Future[Outcome]) -> None:
        if not f.cancelled() and f.exception() is None and not f.result().ok:
            failures.append(f.result())

    # At most max_frames_per_connection of the request's frames in the server at once, as on a connection (the rest
    # of the body waits: TCP flow control): one request of more frames than its model's queue holds filled it, and
    # was answered 503 "queue is full" by an idle server.
    limit = admission.config.max_frames_per_connection
    unanswered = 0
    room = asyncio.Event()

    def answered_one(f: asyncio.Future[Outcome]) -> None:
        nonlocal unanswered
        unanswered -= 1
        room.set()
        failed_one(f)

    futures = []
    try:
        for i in range(req.frames):
            while unanswered >= limit and not failures:
                room.clear()
                await room.wait()
            if failures:
                raise Refused(failures[0].status, failures[0].message)
            if req.data is not None:
                per = req.frame_nbytes // req.data.itemsize
                fill = _copy_from(req.data[i * per : (i + 1) * per].view(np.uint8))
            else:
                fill = _read_into(content)
            future = await receive_frame(admission, producer, req.header(spec, i), fill, stream, abandoned)
            if future.done():
                failed_one(future)  # (finished at submit: a callback would come only after the next frame's read)
            else:
                unanswered += 1
                future.add_done_callback(answered_one)
            futures.append(future)
        outcomes: list[Outcome] = [await f for f in futures]
    except BaseException:
        given_up = True
        raise
    failed = next((o for o in outcomes if not o.ok), None)
    if failed is not None:
        raise Refused(failed.status, failed.message)
    results = [o.result for o in outcomes]
    assert all(r is not None for r in results)
    if len({r.shape for r in results}) > 1:  # type: ignore[union-attr]
        raise HttpError(
            503, f"model {spec.name!r} was swapped while this request's frames ran, for a version returning another"
            " output shape: its results make no one tensor; send it again"
        )  # fmt: skip
    out = np.stack(results) if req.batched else results[0]  # type: ignore[arg-type]
    assert out is not None
    now = request.app[SERVER_KEY].served(spec.name)
    if now is not None and str(now[1]) == version:  # no load since: its frames ran on it
        _output_shapes(request.app)[spec.name] = version, tuple(out.shape[1:] if req.batched else out.shape)
    return _response(spec, version, req, out, outcomes)


def _header_length(request: web.Request) -> int | None:
    raw = request.headers.get(HEADER_LENGTH)
    if raw is None:
        return None
    # Decimal digits only, as Content-Length: Python's int() would take "+5", "1_0", " 7" and other scripts' digits
    if not (raw.isascii() and raw.isdigit()):
        raise HttpError(400, f"{HEADER_LENGTH} must be an integer of decimal digits (a byte count), got {raw!r}")
    # (thousands of digits are more than the allowance, not int()'s digit-limit error, a 500; its limit counts zeros)
    digits = raw.lstrip("0") or "0"
    if len(digits) > len(str(HEADER_ALLOWANCE)) or (value := int(digits)) > HEADER_ALLOWANCE:
        shown = raw if len(raw) <= 40 else f"of {len(raw)} digits"
        raise HttpError(413, f"{HEADER_LENGTH} {shown} exceeds {HEADER_ALLOWANCE}")
    return value


async def _read_exactly(content: Any, n: int, admission: Admission, what: str) -> bytes:
    try:
        async with asyncio.timeout(admission.payload_budget_s(n)):
            return bytes(await content.readexactly(n))
    except asyncio.IncompleteReadError as exc:
        raise HttpError(400, f"body ends after {len(exc.partial)} of the {what}'s {n} bytes") from None
    except TimeoutError:
        raise HttpError(408, f"the {what} ({n} bytes) did not arrive in time") from None


def _read_into(content: Any) -> Any:
    async def fill(view: memoryview) -> None:
        filled, n = 0, len(view)
        while filled < n:
            chunk = await content.read(n - filled)  # at most what this frame still needs
            if not chunk:
                raise HttpError(400, f"body ends {n - filled} bytes before the end of the binary input")
            view[filled : filled + len(chunk)] = chunk
            filled += len(chunk)

    return fill


def _copy_from(data: np.ndarray) -> Any:
    async def fill(view: memoryview) -> None:
        view[:] = data.data

    return fill


def _response(spec: ModelSpec, version: str, req: _Request, out: np.ndarray, outcomes: list[Outcome]) -> web.Response:
    out = np.ascontiguousarray(out, dtype=out.dtype.newbyteorder("<"))
    datatype = DATATYPE_OF.get(out.dtype)
    if datatype is None:
        out, datatype = out.astype("<f4"), "FP32"
    if not req.binary_output and out.size > JSON_OUTPUT_LIMIT:
        raise HttpError(
            400, f"the output's {out.size} values are more than a JSON reply carries ({JSON_OUTPUT_LIMIT}: writing"
            " them holds the server): ask for binary data (parameters.binary_data_output, or the output's"
            " parameters.binary_data)"
        )  # fmt: skip
    timings = outcomes[-1].timings
    doc: dict[str, Any] = {"model_name": spec.name, "model_version": version}
    if req.id is not None:
        doc["id"] = req.id
    doc["parameters"] = {"queue_us": timings.queue_us, "compute_us": timings.compute_us,
                         "total_us": timings.total_us, "batch_size": timings.batch_size}  # fmt: skip
    tensor: dict[str, Any] = {"name": OUTPUT_NAME, "datatype": datatype, "shape": list(out.shape)}
    if not req.binary_output:
        tensor["data"] = [x if math.isfinite(x) else None for x in out.reshape(-1).tolist()] if out.dtype.kind == "f" \
            else out.reshape(-1).tolist()  # fmt: skip
        doc["outputs"] = [tensor]
        return web.json_response(doc)
    tensor["parameters"] = {"binary_data_size": out.nbytes}
    doc["outputs"] = [tensor]
    head = json.dumps(doc).encode()
    return web.Response(
        body=head + out.tobytes(),
        content_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(head))},
    )


@web.middleware
async def _errors_as_json(request: web.Request, handler: Any) -> web.StreamResponse:
    """aiohttp's own errors for paths under /v1 and /v2 (404, 405, 413, a GET /v1/stream that asks no
    upgrade) answered as the protocol's ``{"error": ...}``, with aiohttp's reason when it gave one; a request
    body it cannot decode, or one its client left in the middle of, a 400 (either raised out of the handler
    reading it, of any route: a 500 and a logged traceback)."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status >= 400 and ("/v2" in request.path or "/v1/" in request.path):
            default = f"{exc.status}: {exc.reason}"  # aiohttp's text when it says nothing more
            return error_response(exc.status, exc.text.strip() if exc.text and exc.text != default else exc.reason)
        raise
    except web.RequestPayloadError as exc:  # a body aiohttp cannot decode (Content-Encoding) or parse (its chunks)
        reason = getattr(exc.__cause__, "message", "") or str(exc)
        response = error_response(400, f"the request body cannot be decoded: {reason}")
        # Its parser takes nothing more on this connection: closed after the reply. The body marked ended, or
        # aiohttp's read of the rest after the reply would raise this again (an "Unhandled exception" logged)
        response.force_close()
        request.content.feed_eof()
        return response
    except ConnectionResetError:  # the client left mid-body (its slots are back): no server error to log
        return error_response(400, "the connection closed before the whole body arrived")


def add_routes(app: web.Application) -> None:
    """Mount the Open Inference Protocol routes on ``app`` (paths relative to its prefix)."""
    app[_OUTPUT_SHAPES] = {}
    app.middlewares.append(_errors_as_json)
    r = app.router
    r.add_get("/v2", server_metadata)
    r.add_get("/v2/health/live", live)
    r.add_get("/v2/health/ready", ready)
    r.add_get("/v2/models/stats", model_stats)  # (before {name}: Triton's route for every model)
    for base in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        r.add_get(base, _model_document(_metadata))
        r.add_get(base + "/ready", model_ready)
        r.add_get(base + "/config", _model_document(_config))
        r.add_get(base + "/stats", model_stats)
        r.add_post(base + "/infer", infer)
