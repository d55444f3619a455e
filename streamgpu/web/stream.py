"""WebSocket streams: ``GET /v1/stream``, the TCP wire format over WebSocket messages (docs/HTTP.md).

* A producer sends binary messages, each one FRAME exactly as on TCP (``protocol.wire``: the
  48-byte header, model name, shape, then the payload; nothing before or after). It gets one
  binary message per frame, the REPLY exactly as a v2 TCP connection gets it, in sequence
  order per stream. There is no HELLO: the token, if the server needs one, is the
  ``Authorization: Bearer`` header or the ``token`` query parameter (browsers cannot set
  headers on a WebSocket), checked before the upgrade (401).
* A subscriber sends the text message ``{"subscribe": [7, 9]}`` (or one id) and then gets,
  as binary REPLY messages, every result published for those stream ids: frames of any
  producer on any front end (TCP, ingest workers, WebSocket, raw ports under their
  listener's stream id; all through ``admission.stream_results``), as each is made.
  ``{"unsubscribe": [7]}`` stops it. Each control message is answered with a text message:
  ``{"subscribed": [...all ids now...]}`` or ``{"error": "..."}``. A subscriber that reads
  slower than results come loses the oldest subscribed results (at most the config's
  ``ws_send_queue_bytes`` of them, and ``MAX_QUEUED`` messages, are kept; the newest is always
  kept; never a reply to a frame of its own), never slowing a producer.

A well-framed frame that is refused (bad shape, unknown model, ...) is answered with its status
like on TCP and costs only itself; a binary message that is not one whole frame closes the
socket with a connection REPLY (flags CONNECTION), as TCP does when framing is lost.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import time

from aiohttp import WSCloseCode, WSMsgType, web

from streamgpu.frame import Outcome
from streamgpu.ingest.admission import Admission, Producer, Refused
from streamgpu.ingest.hub import Origin, Subscription
from streamgpu.metrics import NO_MODEL
from streamgpu.protocol import wire
from streamgpu.protocol.ordering import ReplyOrder, Ticket
from streamgpu.protocol.wire import FrameHeader, ProtocolError, ReplyFlags, ReplyHeader, Status, Timings
from streamgpu.web.app import SERVER_KEY, LongIntegerError, give_place, parse_json, take_place
from streamgpu.web.frames import next_stream_key, receive_frame

PATH = "/v1/stream"
# Messages waiting to be sent to one socket (bytes: the config's ws_send_queue_bytes): past either bound its
# oldest subscribed results are dropped, and its own frames are not read until its own replies go out.
MAX_QUEUED = 1024
MAX_SUBSCRIPTIONS = 64  # stream ids one socket may watch
# A control message names at most MAX_SUBSCRIPTIONS ids: a longer one is refused unparsed (a text message
# may be as long as a frame, and parsing megabytes of JSON would hold the loop for seconds).
MAX_CONTROL_CHARS = 64 * 1024
# Control messages a socket may send: a burst of CONTROL_BURST, then CONTROL_PER_S a second (past it the socket is
# read no faster, its frames included): each costs a parse, up to MAX_SUBSCRIPTIONS subscriptions and an answer on
# the loop, and a peer that reads its answers could otherwise send them without end, taking the loop from producers.
CONTROL_BURST = 50
CONTROL_PER_S = 50
IDS_WANTED = "stream ids must be integers 0..4294967295 (one, or a list)"
# A close frame not sent within this is given up and the connection aborted: a peer that reads nothing
# would otherwise hold its handler, and the server's shutdown, up for good.
CLOSE_GRACE_S = 1.0


class StreamSocket:
    """One WebSocket: the frames it produces, the stream ids it watches, and its outgoing messages."""

    def __init__(
        self, ws: web.WebSocketResponse, transport: asyncio.Transport | None, admission: Admission, producer: Producer
    ) -> None:
        self.ws = ws
        self.transport = transport  # the connection under ``ws``: aborted when a close cannot be sent
        self.admission = admission
        self.producer = producer
        self.key = next_stream_key("ws")
        self.origin = Origin("ws", f"ws:{self.key[1]}")  # how its frames' outcomes are published
        self.order = ReplyOrder()  # this socket's frames, replied in sequence order per stream
        self.out: collections.deque[bytes | str] = collections.deque()  # str: a text (control) message
        self.out_bytes = 0  # of the messages in ``out`` (a text one counted by its length)
        # Subscribed results wait apart: past the bounds the oldest is dropped, never a reply of its own.
        self.results: collections.deque[bytes] = collections.deque()
        self.results_bytes = 0  # of the messages in ``results``
        self.max_bytes = admission.config.ws_send_queue_bytes
        self.wake = asyncio.Event()  # something to send
        self.replied = asyncio.Event()  # one of this socket's frames was answered, or a message sent
        self.sending = True  # the writer runs (it ends when a send fails: nothing queued is sent after)
        self.subscriptions: dict[int, Subscription] = {}
        self.dropped = 0  # subscribed results dropped because this socket read too slowly
        self.control_credit = float(CONTROL_BURST)  # control messages it may send now (``pace_control``)
        self.control_at = asyncio.get_running_loop().time()  # when control_credit was reckoned

    # -- sending: one writer task, so that callbacks never await --------------------------------

    def queue(self, message: bytes | str) -> None:
        if self.sending and not self.ws.closed:
            self.out.append(message)
            self.out_bytes += len(message)
            self.wake.set()

    async def writer(self) -> None:
        try:
            while True:
                await self.wake.wait()
                self.wake.clear()
                while self.out or self.results:
                    message: bytes | str
                    if self.out:
                        message = self.out.popleft()
                        self.out_bytes -= len(message)
                    else:
                        message = self.results.popleft()
                        self.results_bytes -= len(message)
                    if isinstance(message, str):
                        await self.ws.send_str(message)
                    else:
                        await self.ws.send_bytes(message)
                    self.replied.set()  # room in the queue: a producer held in wait_for_room goes on
        finally:
            self.sending = False
            self.out.clear()
            self.results.clear()
            self.out_bytes = self.results_bytes = 0
            self.replied.set()

    async def flush(self, writer: asyncio.Task[None]) -> None:
        """Send what is queued (for at most a second), then stop the writer."""
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                while (self.out or self.results) and not self.ws.closed:
                    await asyncio.sleep(0.001)
        writer.cancel()
        with contextlib.suppress(BaseException):
            await writer

    async def close_socket(self, code: int = WSCloseCode.OK, message: bytes = b"") -> None:
        """Close with a close frame, or abort the connection if that is not done within ``CLOSE_GRACE_S``."""
        if not self.ws.prepared:
            return  # the upgrade failed: no socket (its error response is still to be sent)
        try:
            async with asyncio.timeout(CLOSE_GRACE_S):
                await self.ws.close(code=code, message=message)
        except TimeoutError:  # the peer reads nothing: the close frame waits for room
            self._abort()
        except BaseException:  # cancelled (a shutdown): not left to a plain close either
            self._abort()
            raise
        if self.transport is not None and self.transport.get_write_buffer_size():
            # Closed (the peer's own close frame included) with bytes unsent: a plain close waits for them.
            asyncio.get_running_loop().call_later(CLOSE_GRACE_S, self._abort)

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()  # (a plain close would wait for the unsent bytes, for good)

    # -- producing ---------------------------------------------------------------------------------

    async def on_frame(self, data: bytes) -> None:
        """One binary message: one whole frame. ProtocolError (after queueing the connection reply) if not."""
        try:
            parsed = wire.decode_frame_header(data)
            if parsed is None:
                raise ProtocolError(Status.BAD_FRAME, f"message of {len(data)} bytes is shorter than its frame header")
            header, used = parsed
            if len(data) != used + header.payload_len:
                raise ProtocolError(
                    Status.BAD_FRAME, f"message has {len(data) - used} payload bytes; header says {header.payload_len}"
                )
        except ProtocolError as exc:
            self.admission.replied(NO_MODEL, exc.status)  # a connection reply, counted as TCP's
            reply = ReplyHeader(0, 0, exc.status, message=str(exc), flags=ReplyFlags.CONNECTION)
            self.queue(b"".join(wire.encode_reply(reply)))
            raise
        ticket = self.order.expect(header.stream_id)
        payload = memoryview(data)[used:]

        async def fill(view: memoryview) -> None:
            view[:] = payload  # the one copy: aiohttp hands over each message as bytes

        started = time.perf_counter_ns()
        try:
            future = await receive_frame(
                self.admission, self.producer, header, fill, (self.key, header.stream_id), lambda: self.ws.closed
            )
        except Refused as refused:
            timings = Timings(total_us=(time.perf_counter_ns() - started) // 1000)
            self.answer(ticket, header, Outcome(refused.status, refused.message, timings=timings))
            return

        def answered(done: asyncio.Future[Outcome]) -> None:
            if not done.cancelled():
                self.answer(ticket, header, done.result())

        future.add_done_callback(answered)

    def answer(self, ticket: Ticket, header: FrameHeader, outcome: Outcome) -> None:
        """Publish a frame's outcome and queue its REPLY, encoded once: the WebSocket subscribers of its stream id
        get the same bytes (each frame watched was encoded twice, once for this socket and once for them)."""
        reply = _encode(header, outcome)
        self.admission.stream_results.publish(header, outcome, self.origin, encoded=(_encode, reply))
        for ready in self.order.complete(ticket, [reply]):  # each part is one whole reply
            self.queue(bytes(ready))
        self.replied.set()

    async def wait_for_room(self) -> None:
        """Flow control, as on TCP: at most ``max_frames_per_connection`` frames of this socket unanswered,
        and no more frames read while ``MAX_QUEUED`` messages or ``ws_send_queue_bytes`` wait for a peer
        that does not read them (else its replies would pile up here without bound)."""
        limit = self.admission.config.max_frames_per_connection
        while len(self.order) >= limit or (
            self.sending and (len(self.out) >= MAX_QUEUED or self.out_bytes >= self.max_bytes)
        ):
            self.replied.clear()
            await self.replied.wait()

    # -- subscribing -------------------------------------------------------------------------------

    async def pace_control(self) -> None:
        """Before a control message is handled: wait while this socket is past CONTROL_BURST messages at
        CONTROL_PER_S a second (a token bucket; nothing of it is read meanwhile)."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        credit = min(float(CONTROL_BURST), self.control_credit + (now - self.control_at) * CONTROL_PER_S)
        if credit < 1:
            await asyncio.sleep((1 - credit) / CONTROL_PER_S)
            credit, now = 1.0, loop.time()
        self.control_credit, self.control_at = credit - 1, now

    def on_control(self, text: str) -> None:
        """A text message: subscribe or unsubscribe; answered with the ids now watched, or an error."""
        try:
            if len(text) > MAX_CONTROL_CHARS:
                raise ValueError(f"control message of {len(text)} characters is too long (at most {MAX_CONTROL_CHARS})")
            try:
                doc = parse_json(text)
            except LongIntegerError as exc:  # (the one integer a control message holds)
                raise ValueError(f"{IDS_WANTED}: {exc}") from None
            if not isinstance(doc, dict) or len(doc) != 1 or next(iter(doc)) not in ("subscribe", "unsubscribe"):
                raise ValueError('expected {"subscribe": IDS} or {"unsubscribe": IDS}')
            ((verb, ids),) = doc.items()
            ids = [ids] if isinstance(ids, int) and not isinstance(ids, bool) else ids
            if not isinstance(ids, list) or not all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i <= 0xFFFFFFFF for i in ids
            ):
                raise ValueError(IDS_WANTED)
            if verb == "subscribe":
                if len(self.subscriptions.keys() | set(ids)) > MAX_SUBSCRIPTIONS:
                    raise ValueError(f"at most {MAX_SUBSCRIPTIONS} stream ids per socket")
                for i in ids:
                    if i not in self.subscriptions:
                        self.subscriptions[i] = self.admission.stream_results.subscribe(i, self.on_result)
            else:
                for i in ids:
                    if (subscription := self.subscriptions.pop(i, None)) is not None:
                        subscription.cancel()
        except ValueError as exc:  # malformed or too deeply nested JSON included
            self.queue(json.dumps({"error": str(exc)}))
            return
        self.queue(json.dumps({"subscribed": sorted(self.subscriptions)}))

    def on_result(self, header: FrameHeader, outcome: Outcome) -> None:
        """A published result of a watched stream id: encoded (copied) now, once for every subscriber of it, and
        that one message sent by each one's writer."""
        if not self.sending or self.ws.closed:
            return
        message = self.admission.stream_results.encoded(_encode, header, outcome)
        self.results.append(message)
        self.results_bytes += len(message)
        # A slow reader loses its oldest, never slows the producer; held in bytes (a big result times a
        # message count could be gigabytes per socket), but the newest is kept even when it alone is more.
        while len(self.results) > 1 and (self.results_bytes > self.max_bytes or len(self.results) > MAX_QUEUED):
            self.results_bytes -= len(self.results.popleft())
            self.dropped += 1
        self.wake.set()

    def close(self) -> None:
        for subscription in self.subscriptions.values():
            subscription.cancel()
        self.subscriptions.clear()


def _encode(header: FrameHeader, outcome: Outcome) -> bytes:
    """The frame's REPLY as a v2 TCP connection gets it, as one message (copied: the result may be reused)."""
    reply, payload = wire.reply_to(header, *outcome, version=wire.VERSION)
    return b"".join(wire.encode_reply(reply, payload))


_SOCKETS: web.AppKey[set[StreamSocket]] = web.AppKey("streamgpu.stream.sockets")


def _refuse(status: int, message: str) -> web.Response:
    """A refused upgrade: the reason in the JSON body and in ``wire.WS_REFUSAL_HEADER`` (printable ASCII: a
    token's name comes from the config, and a header cannot hold a line break)."""
    reason = "".join(c if " " <= c <= "~" else "?" for c in message)
    return web.json_response({"error": message}, status=status, headers={wire.WS_REFUSAL_HEADER: reason})


async def stream(request: web.Request) -> web.StreamResponse:
    """``GET /v1/stream``: upgrade, then frames in and replies out, subscriptions, until either side closes."""
    server = request.app[SERVER_KEY]
    if not server.started:
        return _refuse(503, "server is not ready (starting or shutting down)")
    admission = server.admission
    auth = request.headers.get("Authorization", "")
    token = auth[len("Bearer ") :] if auth.startswith("Bearer ") else request.query.get("token", "")
    grant = admission.authenticate(token)
    if grant is None:
        return _refuse(401, "bad or missing auth token")
    try:
        producer = admission.producer_for(grant, f"ws:{request.remote}")
    except Refused as refused:  # its token has its max_connections open
        admission.refused_handshake(f"ws:{request.remote}", refused.status, refused.message)  # (as TCP's)
        return _refuse(503, refused.message)
    if not take_place(request):
        admission.leave(producer, queued=False)
        return _refuse(503, f"too many connections ({admission.config.max_connections})")
    # No permessage-deflate: a peer that asked for it would have the server compress every message it gets.
    ws = web.WebSocketResponse(max_msg_size=admission.config.max_payload_bytes + 64 * 1024, compress=False)
    sock = StreamSocket(ws, request.transport, admission, producer)
    sockets = request.app[_SOCKETS]
    writer: asyncio.Task[None] | None = None
    try:
        await ws.prepare(request)
        sockets.add(sock)
        writer = asyncio.ensure_future(sock.writer())
        async for msg in ws:
            if msg.type is WSMsgType.BINARY:
                await sock.wait_for_room()
                try:
                    await sock.on_frame(msg.data)
                except ProtocolError:
                    break
            elif msg.type is WSMsgType.TEXT:
                await sock.wait_for_room()  # each is answered: a peer that never reads must not queue answers
                await sock.pace_control()
                sock.on_control(msg.data)
    finally:
        sockets.discard(sock)
        sock.close()
        try:  # (awaits: a shutdown may cancel this handler a second time here)
            if writer is not None:
                await sock.flush(writer)
            await sock.close_socket()
        finally:
            give_place(request)
            admission.leave(producer, queued=len(sock.order) > 0)  # (a ticket per frame not yet answered)
    return ws


async def _close_sockets(app: web.Application) -> None:
    """Application shutdown: close every stream socket (going away) instead of waiting for its peer."""
    going = [sock.close_socket(WSCloseCode.GOING_AWAY, b"server is shutting down") for sock in app[_SOCKETS]]
    await asyncio.gather(*going, return_exceptions=True)  # at once (each may take CLOSE_GRACE_S); none stops others


def add_routes(app: web.Application) -> None:
    """Mount ``GET /v1/stream`` (WebSocket) on ``app``."""
    app[_SOCKETS] = set()
    app.on_shutdown.append(_close_sockets)
    app.router.add_get(PATH, stream)
