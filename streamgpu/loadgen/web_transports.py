"""The ``http`` and ``ws`` transports of the load generator (docs/HTTP.md).

``http`` POSTs each frame to ``/v2/models/{model}/infer`` with the Open
Inference Protocol's binary tensor data extension, one request per frame; the
HTTP outcome maps back to the closest wire :class:`Status`. ``ws`` sends each
frame as one FRAME message on ``/v1/stream`` and matches the REPLY messages by
``(stream_id, sequence)``. Both answer with :class:`streamgpu.client.Reply`
(``result`` left ``None``: the generator reads only status, latency, timings
and message). aiohttp is imported only when one of them connects.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from streamgpu.client import Reply, as_wire_array, deadline_to_us, no_answer, reply_contents
from streamgpu.loadgen.transports import Connection, ReplyLike, Transport
from streamgpu.protocol import wire
from streamgpu.protocol.oip import DATATYPE_OF, DATATYPES, HEADER_LENGTH, INPUT_NAME, OUTPUT_NAME
from streamgpu.protocol.wire import Status, Timings

if TYPE_CHECKING:
    import aiohttp

    from streamgpu.frame import Outputs


# The HTTP error statuses of docs/HTTP.md ("Errors"), back to the closest wire status. A refused frame's
# message starts with its wire status's name, which wins; 503 is OVERLOADED unless it says shutting down.
_FROM_HTTP: dict[int, Status] = {
    400: Status.BAD_FRAME,
    401: Status.UNAUTHORIZED,
    403: Status.UNAUTHORIZED,
    404: Status.UNKNOWN_MODEL,
    408: Status.RECEIVE_TIMEOUT,
    409: Status.SUPERSEDED,
    413: Status.TOO_LARGE,
    500: Status.INTERNAL_ERROR,
    503: Status.OVERLOADED,
    504: Status.DEADLINE_MISSED,
}


def status_of(http_status: int, message: str) -> Status:
    """The wire status an HTTP inference outcome stands for (200 is OK)."""
    if http_status == 200:
        return Status.OK
    name = message.split(":", 1)[0].strip()
    if name in Status.__members__:  # "DEADLINE_MISSED: ..." from a refused or failed frame
        return Status[name]
    if http_status == 503 and ("shutting down" in message.lower() or "starting" in message.lower()):
        return Status.SHUTTING_DOWN
    return _FROM_HTTP.get(http_status, Status.INTERNAL_ERROR)


_NO_TIMINGS = Timings()


def _reply(
    status: Status, message: str, sent_ns: int, timings: Timings = _NO_TIMINGS, stream_id: int = 0, sequence: int = 0,
    result: np.ndarray | None = None, outputs: Outputs | None = None,
) -> ReplyLike:  # fmt: skip
    return cast(
        ReplyLike,
        Reply(stream_id, sequence, status, result, timings, message, sent_ns, time.perf_counter_ns(), outputs),
    )


class _Tasks:
    """Requests in flight on one connection, kept referenced until done and cancelled on close."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[None]] = set()

    def start(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def cancel(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


class HttpConnection:
    """One ``aiohttp.ClientSession`` to ``http://HOST:PORT``; each frame is one inference request."""

    max_payload = 0  # no handshake announces it: the server answers 413 past its limit

    def __init__(self, session: aiohttp.ClientSession, base: str, headers: dict[str, str]) -> None:
        self._session = session
        self._base = base
        self._headers = headers
        self._tasks = _Tasks()

    def submit(
        self,
        frame: np.ndarray,
        *,
        stream_id: int = 0,
        model: str = "default",
        deadline: float | None = None,
        priority: int = 0,
        live: bool = False,
    ) -> asyncio.Future[ReplyLike]:
        """POST ``frame`` (shape ``[1, *frame.shape]``, binary) now; the future holds its reply.

        ``stream_id`` and ``live`` have no HTTP meaning and are ignored.
        """
        frame = as_wire_array(frame)
        datatype = DATATYPE_OF.get(frame.dtype)
        if datatype is None:
            raise ValueError(f"dtype {frame.dtype} has no Open Inference Protocol datatype")
        params: dict[str, int] = {"priority": priority}
        if timeout_us := deadline_to_us(deadline):
            params["timeout"] = timeout_us
        doc = {
            "inputs": [{
                "name": INPUT_NAME, "datatype": datatype, "shape": [1, *frame.shape],
                "parameters": {"binary_data_size": frame.nbytes},
            }],
            "outputs": [{"name": OUTPUT_NAME, "parameters": {"binary_data": True}}],
            "parameters": params,
        }  # fmt: skip
        head = json.dumps(doc, separators=(",", ":")).encode()
        body = head + frame.tobytes()
        headers = {**self._headers, HEADER_LENGTH: str(len(head)), "Content-Type": "application/octet-stream"}
        fut: asyncio.Future[ReplyLike] = asyncio.get_running_loop().create_future()
        self._tasks.start(self._post(f"{self._base}/v2/models/{model}/infer", body, headers, fut))
        return fut

    async def _post(self, url: str, body: bytes, headers: dict[str, str], fut: asyncio.Future[ReplyLike]) -> None:
        sent_ns = time.perf_counter_ns()
        try:
            async with self._session.post(url, data=body, headers=headers) as resp:
                raw = await resp.read()
                if resp.status == 200:
                    timings, result = _answer(raw, resp.headers.get(HEADER_LENGTH))
                    reply = _reply(Status.OK, "", sent_ns, timings, result=result)
                else:
                    message = _error_message(raw, resp.reason or "")
                    reply = _reply(status_of(resp.status, message), message, sent_ns)
        except asyncio.CancelledError:
            if not fut.done():
                fut.cancel()
            raise
        except Exception as exc:  # a transport failure: it ends the run, as a broken TCP connection does
            if not fut.done():
                fut.set_exception(ConnectionError(f"HTTP request failed: {exc or type(exc).__name__}"))
            return
        if not fut.done():
            fut.set_result(reply)

    async def close(self) -> None:
        await self._tasks.cancel()
        await self._session.close()


def _error_message(raw: bytes, reason: str) -> str:
    try:
        return str(json.loads(raw)["error"])
    except (ValueError, KeyError, TypeError):
        return raw.decode(errors="replace")[:200] or reason


def _answer(raw: bytes, header_len: str | None) -> tuple[Timings, np.ndarray | None]:
    """The server timings in a response's ``parameters`` (docs/HTTP.md; zero where absent) and the frame's result:
    its output without the batch dimension of one (None where the response holds none this client can read)."""
    try:
        head_len = int(header_len) if header_len is not None else len(raw)
        doc = json.loads(raw[:head_len])
        params = doc.get("parameters") or {}
        timings = Timings(
            queue_us=int(params.get("queue_us", 0)), compute_us=int(params.get("compute_us", 0)),
            total_us=int(params.get("total_us", 0)), batch_size=int(params.get("batch_size", 0)),
        )  # fmt: skip
    except (ValueError, TypeError, AttributeError):
        return _NO_TIMINGS, None
    try:
        (output,) = [o for o in doc.get("outputs") or [] if o.get("name") == OUTPUT_NAME]
        dtype, shape = DATATYPES[output["datatype"]], [int(d) for d in output["shape"]]
        size = (output.get("parameters") or {}).get("binary_data_size")
        if size is None:
            array = np.array([np.nan if x is None else x for x in output["data"]], dtype)
        else:
            array = np.frombuffer(raw, dtype, count=int(size) // dtype.itemsize, offset=head_len).copy()
        return timings, array.reshape(shape)[0] if shape[:1] == [1] else array.reshape(shape)
    except (ValueError, TypeError, KeyError, AttributeError):
        return timings, None


def _need_aiohttp(transport: str) -> None:
    """ConnectionError naming the package where aiohttp is not installed (the producer-side install has none)."""
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        raise ConnectionError(f"the {transport} transport needs aiohttp, which is not installed: pip install "
                              "aiohttp (or streamgpu[server])") from None  # fmt: skip


class HttpTransport(Transport):
    """Open Inference Protocol over HTTP/1.1 (``POST /v2/models/{model}/infer``, binary tensor data)."""

    name = "http"

    async def connect(self, host: str, port: int, *, token: str = "", timeout: float = 10.0) -> Connection:
        _need_aiohttp(self.name)
        import aiohttp

        base = f"http://{host}:{port}"
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        try:  # reach the server now, so a wrong address fails at connect, not as the first frame's error
            async with session.get(f"{base}/v2", timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                if resp.status != 200:
                    raise ConnectionError(f"GET {base}/v2 answered {resp.status} {resp.reason}: not a streamgpu server")
        except aiohttp.ClientError as exc:  # no HTTP there (the wire port: it hangs up); not all of these are OSErrors
            await session.close()
            raise ConnectionError(f"GET {base}/v2 failed: {exc or type(exc).__name__}") from None
        except TimeoutError:
            await session.close()
            raise no_answer(timeout) from None
        except BaseException:
            await session.close()
            raise
        return cast(Connection, HttpConnection(session, base, headers))


class WsConnection:
    """One WebSocket on ``/v1/stream``: each frame one binary FRAME message, each reply one REPLY message."""

    max_payload = 0  # no WELCOME on a WebSocket: the server answers TOO_LARGE past its limit

    def __init__(self, session: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._session = session
        self._ws = ws
        self._sequence = 0  # per connection: (stream_id, sequence) stays unique whatever the stream ids
        self._pending: dict[tuple[int, int], tuple[asyncio.Future[ReplyLike], int]] = {}
        self._error: ConnectionError | None = None
        self.unmatched_replies = 0  # REPLY messages for no frame waiting (as streamgpu.client.Connection's)
        self._tasks = _Tasks()
        self._tasks.start(self._read())

    def submit(
        self,
        frame: np.ndarray,
        *,
        stream_id: int = 0,
        model: str = "default",
        deadline: float | None = None,
        priority: int = 0,
        live: bool = False,
    ) -> asyncio.Future[ReplyLike]:
        """Send ``frame`` as one FRAME message now; the future holds its REPLY."""
        if self._error is not None:
            raise self._error
        frame = as_wire_array(frame)
        seq = self._sequence
        self._sequence += 1
        header = wire.FrameHeader(
            stream_id, seq, model, wire.dtype_code(frame.dtype), frame.shape, frame.nbytes, time.time_ns(),
            deadline_to_us(deadline), priority, wire.FrameFlags.LIVE if live else wire.FrameFlags.NONE,
        )  # fmt: skip
        message = wire.encode_frame_header(header) + frame.tobytes()  # one message: header and payload together
        fut: asyncio.Future[ReplyLike] = asyncio.get_running_loop().create_future()
        self._pending[(stream_id, seq)] = (fut, time.perf_counter_ns())
        self._tasks.start(self._send(message, (stream_id, seq)))
        return fut

    async def _send(self, message: bytes, key: tuple[int, int]) -> None:
        try:
            await self._ws.send_bytes(message)
        except Exception as exc:
            self._fail(ConnectionError(f"WebSocket send failed: {exc or type(exc).__name__}"))

    async def _read(self) -> None:
        import aiohttp

        reason = "the server closed the WebSocket"
        try:
            async for msg in self._ws:
                if msg.type == aiohttp.WSMsgType.BINARY:
                    got = wire.decode_reply(msg.data)
                    if got is None:
                        reason = "the server sent a truncated REPLY message"
                        break
                    header = got[0]
                    if header.flags & wire.ReplyFlags.CONNECTION:
                        reason = f"the server closed the stream: {header.status.name}: {header.message}"
                        break
                    entry = self._pending.pop((header.stream_id, header.sequence), None)
                    if entry is None or entry[0].done():
                        self.unmatched_replies += 1
                        continue
                    fut, sent_ns = entry
                    try:
                        result, outputs = reply_contents(header, got[1])
                    except wire.ProtocolError as exc:  # this frame's reply only: the stream is still framed
                        fut.set_exception(exc)
                        continue
                    fut.set_result(
                        _reply(header.status, header.message, sent_ns, header.timings, header.stream_id,
                               header.sequence, result, outputs)
                    )  # fmt: skip
                elif msg.type == aiohttp.WSMsgType.ERROR:
                    reason = f"WebSocket error: {self._ws.exception()}"
                    break
        except wire.ProtocolError as exc:
            reason = f"bad REPLY message: {exc}"
        self._fail(ConnectionError(reason))

    def _fail(self, error: ConnectionError) -> None:
        if self._error is None:
            self._error = error
        pending, self._pending = self._pending, {}
        for fut, _ in pending.values():
            if not fut.done():
                fut.set_exception(error)

    async def close(self) -> None:
        self._error = self._error or ConnectionError("connection closed by the client")
        await self._ws.close()
        await self._tasks.cancel()
        await self._session.close()
        self._fail(self._error)


class WsTransport(Transport):
    """Wire-format FRAME and REPLY messages over a WebSocket (``GET /v1/stream``, docs/HTTP.md)."""

    name = "ws"

    async def connect(self, host: str, port: int, *, token: str = "", timeout: float = 10.0) -> Connection:
        _need_aiohttp(self.name)
        import aiohttp

        headers = {"Authorization": f"Bearer {token}"} if token else {}
        session = aiohttp.ClientSession()
        try:
            ws = await asyncio.wait_for(
                session.ws_connect(f"ws://{host}:{port}/v1/stream", headers=headers, max_msg_size=0), timeout
            )
        except aiohttp.WSServerHandshakeError as exc:  # 401 and friends: a refused connection, not a crash
            await session.close()
            answered = exc.headers if isinstance(exc.headers, Mapping) else {}  # (the body is not read)
            reason = answered.get(wire.WS_REFUSAL_HEADER) or exc.message
            raise ConnectionError(f"WebSocket upgrade refused: {exc.status} {reason}") from None
        except aiohttp.ClientError as exc:  # no HTTP there (the wire port: it hangs up); not all of these are OSErrors
            await session.close()
            raise ConnectionError(f"WebSocket upgrade failed: {exc or type(exc).__name__}") from None
        except TimeoutError:
            await session.close()
            raise no_answer(timeout) from None
        except BaseException:
            await session.close()
            raise
        return cast(Connection, WsConnection(session, ws))
