"""A fake streamgpu server for load generator tests: wire protocol v1, known latency.

It answers HELLO with WELCOME and each frame, after an injected latency
(``loop.call_later``), with a reply whose status and timings the test chose.
It records what it saw (frames, headers, arrival times, most frames in flight).

Run it on its own (used to measure the generator's own rate in docs/LOADGEN.md)::

    python tests/loadgen/fakeserver.py --port 7878 --latency-ms 0
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

from streamgpu.loops import loop_factory
from streamgpu.protocol import wire

#: Timings every OK reply carries (microseconds), so tests can check the server-stage columns.
TIMINGS = wire.Timings(receive_us=11, queue_us=22, transfer_us=33, compute_us=44, total_us=150, batch_size=2)

#: ``(header, arrival index) -> status``; the default answers everything OK.
StatusFor = Callable[[wire.FrameHeader, int], wire.Status]
#: ``(header, arrival index) -> seconds`` before the reply.
LatencyFor = Callable[[wire.FrameHeader, int], float]


@dataclass
class Stats:
    """What the server observed."""

    frames: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    arrivals: list[float] = field(default_factory=list)  # time.monotonic() of each complete frame
    headers: list[wire.FrameHeader] = field(default_factory=list)
    connections: int = 0


class _Conn(asyncio.Protocol):
    def __init__(self, server: FakeServer) -> None:
        self.server = server
        self.buf = bytearray()
        self.welcomed = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio.Transport subclass
        self.server.stats.connections += 1
        self.server._conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server._conns.discard(self)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        pos = 0
        with memoryview(self.buf) as view:
            if not self.welcomed:
                hello = wire.decode_hello(view)
                if hello is None:
                    return
                pos = hello[1]
                self.welcomed = True
                assert self.transport is not None
                s = self.server
                welcome = wire.Welcome(s.welcome_status, s.max_payload, 1 << 26, version=hello[0].version)
                self.transport.write(wire.encode_welcome(welcome))
                if s.welcome_status != wire.Status.OK:
                    self.transport.close()
                    return
            while True:
                parsed = wire.decode_frame_header(view[pos:])
                if parsed is None:
                    break
                header, n = parsed
                if len(view) - pos - n < header.payload_len:
                    break
                pos += n + header.payload_len
                self.server._on_frame(self, header)
        del self.buf[:pos]

    def reply(self, header: wire.FrameHeader, status: wire.Status) -> None:
        self.server.stats.in_flight -= 1
        if self.transport is None or self.transport.is_closing():
            return
        timings = TIMINGS if status == wire.Status.OK else wire.Timings()
        h = header
        message = "" if status == wire.Status.OK else f"fake {status.name.lower()}"
        rh = wire.ReplyHeader(
            h.stream_id, h.sequence, status, timestamp_ns=h.timestamp_ns, timings=timings, message=message
        )
        self.transport.writelines(wire.encode_reply(rh))


class FakeServer:
    """The fake server; ``start()`` runs it on its own thread, ``start_on_loop()`` on the caller's loop."""

    def __init__(
        self,
        latency: float | LatencyFor = 0.005,
        *,
        status_for: StatusFor | None = None,
        welcome_status: wire.Status = wire.Status.OK,
        max_payload: int = 1 << 26,
        record: bool = True,
    ) -> None:
        self.latency = latency
        self.status_for = status_for
        self.welcome_status = welcome_status
        self.max_payload = max_payload
        self.record = record  # keep every header and arrival time (off for long benchmark runs)
        self.stats = Stats()
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[_Conn] = set()

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _on_frame(self, conn: _Conn, header: wire.FrameHeader) -> None:
        st = self.stats
        index = st.frames
        st.frames += 1
        if self.record:
            st.arrivals.append(time.monotonic())
            st.headers.append(header)
        st.in_flight += 1
        st.max_in_flight = max(st.max_in_flight, st.in_flight)
        status = self.status_for(header, index) if self.status_for else wire.Status.OK
        delay = self.latency(header, index) if callable(self.latency) else self.latency
        if delay <= 0:
            conn.reply(header, status)
        else:
            assert self._loop is not None
            self._loop.call_later(delay, conn.reply, header, status)

    async def start_on_loop(self, port: int = 0) -> None:
        """Listen on 127.0.0.1 from the running loop."""
        self._loop = asyncio.get_running_loop()
        self._server = await self._loop.create_server(lambda: _Conn(self), "127.0.0.1", port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop_on_loop(self) -> None:
        if self._server is not None:
            self._server.close()
            for conn in list(self._conns):
                if conn.transport is not None:
                    conn.transport.close()
            await self._server.wait_closed()

    def start(self) -> FakeServer:
        """Run on a background thread with its own loop; returns once it listens."""
        ready = threading.Event()

        def main() -> None:
            loop = asyncio.new_event_loop()
            loop.run_until_complete(self.start_on_loop())
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self.stop_on_loop())
            loop.close()

        self._thread = threading.Thread(target=main, name="fakeserver", daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def __enter__(self) -> FakeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=7878)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    args = parser.parse_args()
    server = FakeServer(args.latency_ms / 1e3, record=False)

    async def serve() -> None:
        await server.start_on_loop(args.port)
        print(f"fake server on {server.url}, latency {args.latency_ms} ms", flush=True)
        await asyncio.Event().wait()

    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        try:
            runner.run(serve())
        except KeyboardInterrupt:
            print(f"{server.stats.frames} frames", flush=True)


if __name__ == "__main__":
    _main()
