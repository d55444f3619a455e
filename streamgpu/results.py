"""Results as JSON lines: one schema for every frame's result, and where the lines go.

Producers without a reply channel (raw TCP streams from ffmpeg, GStreamer,
cameras) have their results published here; ``streamgpu send`` prints its
replies in the same schema. One line per frame (docs/PROTOCOL.md, "Raw
producers", is the normative description)::

    {"source": "raw", "stream": "raw:9000/3", "stream_id": 9000, "seq": 17, "model": "default",
     "status": "OK", "message": "", "timings": {"receive_us": 120, ...},
     "shape": [1000], "dtype": "float32", "top_k": [[412, 9.81], [7, 8.2], ...]}

``top_k`` (index into the flattened result, value; largest first) replaces the
full ``result`` list when ``top_k > 0``; an error status has neither.

``Results`` encodes a record once and hands the line to every ``Outlet``: a
file, the subscribers of a TCP port (an ``Outlet`` with ``write_line``). No
outlet may block the loop or grow without bound: a slow subscriber skips lines.
In a server it is one consumer of the server's result hub
(``streamgpu.ingest.hub``, ``Results.attach``): every result any front end
publishes becomes one line, so raw producers' results reach JSON-lines readers
and WebSocket subscribers by the same path. It taps the hub only while some
outlet takes lines (a file; a results port while a subscriber is connected), so
that the hub's ``watched`` is false, and no record nor ``Outcome`` is made for a
port nobody reads.

This module imports neither torch nor the server, so the client side
(``streamgpu send``) uses it too.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
import logging
import os
import typing
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from streamgpu.errors import BindError, ConfigError
from streamgpu.protocol.wire import Status, Timings

if TYPE_CHECKING:
    from streamgpu.frame import Outcome
    from streamgpu.ingest.hub import Origin, ResultHub, Subscription
    from streamgpu.protocol.wire import FrameHeader

log = logging.getLogger(__name__)

SUBSCRIBER_BUFFER = 1024 * 1024  # unsent bytes at which a results subscriber starts skipping lines
# Bytes a results subscriber may send (ignored: nc's typing, a newline): past them it is closed with an error,
# as reading what it sends without end would take the loop from every producer.
SUBSCRIBER_INPUT = 64 * 1024


def result_record(
    source: str,
    stream: str,
    seq: int,
    model: str,
    status: Status,
    message: str,
    timings: Timings,
    result: np.ndarray | None,
    top_k: int,
    stream_id: int | None = None,
) -> dict[str, Any]:
    """One frame's result as a JSON-ready dict (the schema in the module docstring)."""
    record: dict[str, Any] = {"source": source, "stream": stream}
    if stream_id is not None:
        record["stream_id"] = stream_id
    record.update({
        "seq": seq,
        "model": model,
        "status": status.name,
        "message": message,
        "timings": timings._asdict(),
    })  # fmt: skip
    if result is not None and status == Status.OK:
        record["shape"] = list(result.shape)
        record["dtype"] = result.dtype.name
        flat = result.reshape(-1)
        if top_k > 0:
            k = min(top_k, flat.size)
            index = np.argpartition(flat, flat.size - k)[flat.size - k :]  # the k largest, unordered
            index = index[np.argsort(flat[index])[::-1]]
            record["top_k"] = [[int(i), flat[i].item()] for i in index]
        else:
            record["result"] = flat.tolist()
    return record


def encode_line(record: dict[str, Any]) -> bytes:
    """One JSON line: compact UTF-8 and a newline (a non-finite result value is written ``NaN`` /
    ``Infinity``, as JavaScript and Python's json module read it)."""
    return json.dumps(record, separators=(",", ":")).encode() + b"\n"


class Outlet(abc.ABC):
    """Somewhere result lines go. ``write_line`` runs on the loop and must never block or wait."""

    _on_wanted: Callable[[], None] | None = None  # set by the Results this outlet is given to

    @abc.abstractmethod
    async def start(self) -> None:
        """Open files, bind sockets."""

    @abc.abstractmethod
    def write_line(self, line: bytes) -> None:
        """Take one encoded line (ends with a newline); drop it rather than wait."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Flush what can be flushed and release everything."""

    @property
    def wanted(self) -> bool:
        """Whether a line written now would go anywhere (records need not be made otherwise). An outlet
        whose answer changes calls ``wanted_changed()`` when it does."""
        return True

    def wanted_changed(self) -> None:
        """``wanted`` changed: the ``Results`` this outlet is given to taps the hub only while some outlet
        wants lines (the outlet owns the fact; the tap follows it)."""
        if self._on_wanted is not None:
            self._on_wanted()

    def stats(self) -> dict[str, Any]:
        return {}


class Results:
    """Fan-out of result records to outlets (none: records are counted and dropped)."""

    def __init__(self, outlets: list[Outlet] | None = None) -> None:
        self.outlets: list[Outlet] = []
        self.published = 0  # records encoded for the outlets
        self._hub: ResultHub | None = None
        self._tap: Subscription | None = None
        self._top_k = 0
        for outlet in outlets or []:
            self.add_outlet(outlet)

    def add_outlet(self, outlet: Outlet) -> None:
        """Connect another outlet (e.g. an embedding application's own); it gets lines from now on."""
        self.outlets.append(outlet)
        outlet._on_wanted = self._retap
        self._retap()

    @property
    def wanted(self) -> bool:
        """Whether anyone takes lines now (records need not be built otherwise: a results port with
        no subscriber costs no frame a record)."""
        return any(outlet.wanted for outlet in self.outlets)

    def attach(self, hub: ResultHub, top_k: int) -> None:
        """Make a line of every result published on ``hub`` (``top_k``: as ``result_record``'s), while any
        outlet takes lines: the hub is tapped only then (``watched`` is false otherwise, so front ends
        build no outcome for lines nobody takes); ``detach`` ends it."""
        self._hub, self._top_k = hub, top_k
        self._retap()

    def detach(self) -> None:
        self._hub = None
        self._retap()

    def _retap(self) -> None:
        """Tap the hub while attached and some outlet wants lines, else not (an outlet's ``wanted_changed``)."""
        hub = self._hub if self.wanted else None
        if hub is not None and self._tap is None:
            self._tap = hub.tap(self._on_result)
        elif hub is None and self._tap is not None:
            self._tap.cancel()
            self._tap = None

    def _on_result(self, header: FrameHeader, outcome: Outcome, origin: Origin) -> None:
        stream = origin.stream or str(header.stream_id)
        self.publish(result_record(origin.source, stream, header.sequence, header.model, outcome.status,
                                   outcome.message, outcome.timings, outcome.result, self._top_k,
                                   header.stream_id))  # fmt: skip

    def publish(self, record: dict[str, Any]) -> None:
        """Encode ``record`` once and hand the line to every outlet."""
        if not self.outlets:
            return
        self.published += 1
        line = encode_line(record)
        for outlet in self.outlets:
            try:
                outlet.write_line(line)
            except Exception:  # one broken outlet must not stop the others, nor the frame's producer
                log.exception("results outlet %r failed", outlet)

    async def start(self) -> None:
        started: list[Outlet] = []
        try:
            for outlet in self.outlets:
                await outlet.start()
                started.append(outlet)
        except BaseException:
            for outlet in started:
                await outlet.close()
            raise

    async def close(self) -> None:
        self.detach()
        for outlet in self.outlets:
            await outlet.close()

    def stats(self) -> dict[str, Any]:
        return {"published": self.published, "outlets": [o.stats() for o in self.outlets]}


class FileOutlet(Outlet):
    """Appends lines to a file; flushed once per loop iteration (page cache writes, no fsync).

    A file that cannot be written (a full disk, a file system gone read-only) drops lines, counted in
    ``dropped``; the failure is logged once (with the error, ``error`` in the stats) and again when lines
    go through once more. It costs no frame and no shutdown. A file removed or renamed away (``rm``, a
    rotation) is made again at its path: the path is looked at, at most every ``check_s``, after a flush."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._file: typing.BinaryIO | None = None
        self._flush_pending = False
        self.lines = 0
        self.dropped = 0  # lines the file did not take (a write failed)
        self.error = ""  # the failure that drops lines now ("" while lines go through)
        self.check_s = 1.0  # how often a flush looks whether the path still names the file open
        self._checked_at = 0.0
        self._identity: tuple[int, int] | None = None  # (device, inode) of the file open
        self._reopen_failed = False  # (logged once)

    async def start(self) -> None:
        try:
            self._file = open(self.path, "ab")  # noqa: SIM115 - held open until close()
        except OSError as exc:
            raise ConfigError(f"cannot open results_file {self.path!r}: {exc.strerror or exc}") from None
        self._identity = self._identity_of(self._file)
        self._checked_at = asyncio.get_running_loop().time()

    @staticmethod
    def _identity_of(file: typing.BinaryIO) -> tuple[int, int]:
        st = os.fstat(file.fileno())
        return st.st_dev, st.st_ino

    def write_line(self, line: bytes) -> None:
        if self._file is None:
            return
        try:
            self._file.write(line)  # (a line the buffer cannot take is not taken in part)
        except OSError as exc:
            self.dropped += 1
            self._failed(exc)
            return
        self.lines += 1
        if not self._flush_pending:  # one flush (system call) per loop iteration, not per line
            self._flush_pending = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_pending = False
        if self._file is None:
            return
        try:
            self._file.flush()  # what a failed flush did not write stays buffered for the next one
        except OSError as exc:
            self._failed(exc)
            return
        if self.error:
            log.warning("results_file %r is written again (%d lines were dropped)", self.path, self.dropped)
            self.error = ""
        self._follow_path()

    def _follow_path(self) -> None:
        """Reopen the path if it no longer names the file open (removed, or renamed by a rotation): lines
        written to a removed file reach nobody, and its disk space grows unseen until the server stops."""
        now = asyncio.get_running_loop().time()
        if now - self._checked_at < self.check_s or self._file is None:
            return
        self._checked_at = now
        try:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._identity:
                return
        except FileNotFoundError:
            pass
        except OSError:
            return  # (cannot tell: go on with the file open)
        try:
            new = open(self.path, "ab")  # noqa: SIM115 - held open until close()
        except OSError as exc:
            if not self._reopen_failed:
                self._reopen_failed = True
                log.warning("results_file %r was removed and cannot be made again: %s; lines go to the removed "
                            "file", self.path, exc.strerror or exc)  # fmt: skip
            return
        old, self._file, self._identity, self._reopen_failed = self._file, new, self._identity_of(new), False
        log.info("results_file %r was removed or renamed: made again", self.path)
        with contextlib.suppress(OSError):  # (flushed above)
            old.close()

    def _failed(self, exc: OSError) -> None:
        if not self.error:
            self.error = exc.strerror or str(exc)
            log.warning("results_file %r cannot be written: %s; lines are dropped until it can", self.path,
                        self.error)  # fmt: skip

    async def close(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            try:
                file.close()
            except OSError as exc:  # the last lines are lost; the server's release goes on
                log.warning("results_file %r: the last lines could not be written: %s", self.path,
                            exc.strerror or exc)  # fmt: skip

    def stats(self) -> dict[str, Any]:
        return {"kind": "file", "path": self.path, "lines": self.lines, "dropped": self.dropped, "error": self.error}


class _Subscriber(asyncio.Protocol):
    """One results subscriber: gets every line from its connection on, or skips while it lags."""

    def __init__(self, outlet: TcpOutlet) -> None:
        self._outlet = outlet
        self.transport: asyncio.Transport | None = None
        self.skipped = 0  # lines not sent since the last one that was
        self.received = 0  # bytes it sent (ignored)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        outlet = self._outlet
        if len(outlet.subscribers) >= outlet.max_subscribers:
            # Each subscriber costs a buffer and a write per result on the loop: a bounded number.
            outlet.refused += 1
            why = f"too many results subscribers ({outlet.max_subscribers}, the server's max_connections); try later"
            typing.cast(asyncio.Transport, transport).write(encode_line({"error": why}))
            transport.close()
            return
        self.transport = typing.cast(asyncio.Transport, transport)
        outlet.joined(self)

    def data_received(self, data: bytes) -> None:
        # Subscribers have nothing to say; what they send is dropped, up to SUBSCRIBER_INPUT bytes.
        self.received += len(data)
        transport = self.transport
        if self.received > SUBSCRIBER_INPUT and transport is not None and not transport.is_closing():
            self._outlet.left(self)  # no line more, nor its place
            self._outlet.closed_for_input += 1
            transport.pause_reading()
            why = f"results subscribers send nothing; closed after {self.received} bytes (at most {SUBSCRIBER_INPUT})"
            transport.write(encode_line({"error": why}))
            # Its end of output, not a close: closing a socket with unread input resets the connection, and the
            # peer's system would discard the error line. It goes after the lines already written; the connection
            # is aborted after a grace (one that reads nothing holds it no longer).
            transport.write_eof()
            asyncio.get_running_loop().call_later(self._outlet.grace_s, transport.abort)

    def connection_lost(self, exc: Exception | None) -> None:
        self._outlet.left(self)
        self.transport = None

    def send(self, line: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if transport.get_write_buffer_size() > self._outlet.buffer_bytes:
            self.skipped += 1  # it lags: skip rather than buffer without bound or wait
            self._outlet.skipped += 1
            return
        if self.skipped:
            transport.write(encode_line({"skipped": self.skipped}))
            self.skipped = 0
        transport.write(line)


class TcpOutlet(Outlet):
    """A TCP port where any number of subscribers read result lines (from when they connect).

    A subscriber whose unsent lines pass ``buffer_bytes`` skips lines until it
    catches up, then gets ``{"skipped": N}`` before the next line it is sent. At
    most ``max_subscribers`` at once: one more gets an ``{"error": ...}`` line and
    is closed.
    """

    def __init__(self, host: str, port: int, buffer_bytes: int = SUBSCRIBER_BUFFER,
                 max_subscribers: int = 64) -> None:  # fmt: skip
        self.host = host
        self.port = port
        self.buffer_bytes = buffer_bytes
        self.max_subscribers = max_subscribers
        self.subscribers: set[_Subscriber] = set()
        self.skipped = 0
        self.refused = 0
        self.closed_for_input = 0  # subscribers closed because they sent more than SUBSCRIBER_INPUT bytes
        self.grace_s = 1.0  # a subscriber closed holding unsent lines is aborted after this
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(lambda: _Subscriber(self), self.host, self.port)
        except OSError as exc:
            # asyncio's own message names the address but not the setting
            why = os.strerror(exc.errno) if exc.errno else exc
            raise BindError(f"cannot bind results_port to {self.host}:{self.port}: {why}") from None

    @property
    def address(self) -> tuple[str, int] | None:
        if self._server is None or not self._server.sockets:
            return None
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    @property
    def wanted(self) -> bool:
        return bool(self.subscribers)

    def joined(self, subscriber: _Subscriber) -> None:
        """A subscriber connected (and was let in): the first one makes this outlet wanted."""
        self.subscribers.add(subscriber)
        if len(self.subscribers) == 1:
            self.wanted_changed()

    def left(self, subscriber: _Subscriber) -> None:
        """A subscriber's connection ended: with the last one gone, no line is made for this port."""
        if subscriber in self.subscribers:
            self.subscribers.remove(subscriber)
            if not self.subscribers:
                self.wanted_changed()

    def write_line(self, line: bytes) -> None:
        for subscriber in list(self.subscribers):
            subscriber.send(line)

    async def close(self, grace_s: float = 1.0) -> None:
        """Stop accepting; close every subscriber after its lines are sent, or at once after ``grace_s``
        (one that reads nothing must not hold a shutdown up)."""
        if self._server is None:
            return
        self._server.close()
        for subscriber in list(self.subscribers):
            if subscriber.transport is not None:
                subscriber.transport.close()  # after the lines already written
        loop = asyncio.get_running_loop()
        give_up = loop.time() + grace_s
        while self.subscribers and loop.time() < give_up:
            await asyncio.sleep(0.01)
        for subscriber in list(self.subscribers):
            if subscriber.transport is not None:
                subscriber.transport.abort()
        await asyncio.sleep(0)  # their connection_lost runs on the next loop iteration
        await self._server.wait_closed()
        self._server = None

    def stats(self) -> dict[str, Any]:
        return {"kind": "tcp", "address": self.address, "subscribers": len(self.subscribers), "skipped": self.skipped,
                "refused": self.refused, "closed_for_input": self.closed_for_input}  # fmt: skip


def results_from(port: int, host: str, path: str, max_subscribers: int) -> Results:
    """The results fan-out a config asks for (``port`` < 0: no TCP port; ``path`` empty: no file); the TCP
    port takes at most ``max_subscribers`` at once."""
    outlets: list[Outlet] = []
    if port >= 0:
        outlets.append(TcpOutlet(host, port, max_subscribers=max_subscribers))
    if path:
        outlets.append(FileOutlet(path))
    return Results(outlets)
