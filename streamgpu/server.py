"""One server process: listeners + ring + scheduler + backend, wired together.

``Server`` is the programmatic API (start and stop it from a running loop);
``streamgpu serve`` is a thin layer over ``run``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import signal
import time
from typing import Any

import numpy as np

from streamgpu.config import Config
from streamgpu.frame import Frame
from streamgpu.gpu.backend import Backend, DeviceModel, create_backend
from streamgpu.loops import new_event_loop
from streamgpu.memory import PinnedRing
from streamgpu.models.loader import load_module
from streamgpu.models.spec import ModelSpec
from streamgpu.protocol import wire
from streamgpu.protocol.tcp import TcpIngest
from streamgpu.protocol.wire import ReplyHeader, Status, Timings
from streamgpu.scheduler.metrics import ModelMetrics
from streamgpu.scheduler.scheduler import Scheduler

log = logging.getLogger("streamgpu")


class Server:
    """A streamgpu server inside the running event loop.

    ``await server.start()`` picks the backend, allocates the ring, loads
    every model (in one helper thread, off the loop) and starts listening;
    ``await server.stop()`` stops accepting, answers every frame already
    received, then closes. Also an async context manager.
    """

    def __init__(self, config: Config | None = None) -> None:
        self.config = config or Config()
        self.accepting = False
        self.backend: Backend | None = None
        self._ring: PinnedRing | None = None
        self._scheduler: Scheduler | None = None
        self._specs: dict[str, ModelSpec] = {}
        self._listener: asyncio.Server | None = None
        self._connections: set[TcpIngest] = set()
        self._frames_in_flight = 0  # submitted to the scheduler, not yet answered
        self._running: dict[int, list[Frame]] = {}  # batches launched, by id of their frame list
        self._sweeper: asyncio.TimerHandle | None = None
        self._loader = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="streamgpu-loader")

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            if self.backend is not None:
                self.backend.close()
            self._loader.shutdown(wait=False)
            raise

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.config
        self.backend = backend = create_backend(cfg.device, loop, cfg.device_index, cfg.cuda_kernels)
        buffer = await loop.run_in_executor(self._loader, backend.allocate_host, cfg.ring_bytes)
        self._ring = PinnedRing(buffer, defer=loop.call_soon)
        self._scheduler = Scheduler(loop, self._run_batch, self._reject, cfg.max_inflight_batches)
        for spec in cfg.models:
            model = await loop.run_in_executor(self._loader, self._load, backend, spec)
            self._scheduler.add_model(model)
            self._specs[spec.name] = spec
            random = spec.source.startswith("builtin:")
            log.info("model %s%s", model.description, "; random weights (builtin: nothing is downloaded)" * random)
        self._listener = await loop.create_server(lambda: TcpIngest(self), cfg.host, cfg.port)  # type: ignore[arg-type]
        self.accepting = True
        self._sweep()
        log.info(
            "streamgpu listening on %s, device %s, ring %d MiB",
            ", ".join(f"{h}:{p}" for h, p in self.addresses),
            backend.device_name,
            cfg.ring_bytes >> 20,
        )

    @staticmethod
    def _load(backend: Backend, spec: ModelSpec) -> DeviceModel:
        return backend.load(spec, load_module(spec))

    def _sweep(self) -> None:
        """Drop connections whose frame payload stalled: their ring slot would block every producer."""
        timeout = self.config.receive_timeout_s
        now = time.monotonic()
        for conn in list(self._connections):
            if conn.stalled(now, timeout):
                conn.abort(f"frame payload made no progress for {timeout:g} s")
        self._sweeper = asyncio.get_running_loop().call_later(min(1.0, timeout / 2), self._sweep)

    async def stop(self, timeout: float | None = None) -> None:
        """Stop accepting, answer every received frame (or SHUTTING_DOWN after ``timeout``), close."""
        if self._listener is None:
            return
        timeout = self.config.shutdown_timeout_s if timeout is None else timeout
        self.accepting = False
        self._listener.close()
        for conn in list(self._connections):
            conn.stop_reading()
        assert self._scheduler is not None
        try:
            await asyncio.wait_for(self._drain(), timeout)
        except TimeoutError:
            log.warning("shutdown: frames still running after %.1f s; answering them SHUTTING_DOWN", timeout)
            self._scheduler.reject_queued(Status.SHUTTING_DOWN, "server is shutting down")
            for frames in list(self._running.values()):
                for frame in frames:
                    self._reject(frame, Status.SHUTTING_DOWN, "server is shutting down")
        if self._sweeper is not None:
            self._sweeper.cancel()
        for conn in list(self._connections):
            conn.close()  # flushes the replies first
        for _ in range(100):  # a producer that does not read its replies cannot hold shutdown up
            if not self._connections:
                break
            await asyncio.sleep(0.01)
        for conn in list(self._connections):
            conn.abort("server is shutting down")
        await self._listener.wait_closed()
        self._listener = None
        if self.backend is not None:
            self.backend.close()  # cancels what still runs; the batch tasks then end
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._scheduler.idle(), 1.0)
        self._loader.shutdown(wait=False)
        log.info("streamgpu stopped")

    async def _drain(self) -> None:
        # Every submitted frame is queued, in a running batch, or answered: an idle
        # scheduler means every frame the server took has its reply.
        assert self._scheduler is not None
        await self._scheduler.idle()

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def serve_forever(self) -> None:
        assert self._listener is not None
        await self._listener.serve_forever()

    # -- state --------------------------------------------------------------------

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """(host, port) of every listening socket (port 0 in the config picks a free one)."""
        if self._listener is None:
            return []
        return [s.getsockname()[:2] for s in self._listener.sockets]

    @property
    def port(self) -> int:
        return self.addresses[0][1]

    @property
    def ring(self) -> PinnedRing:
        assert self._ring is not None, "server not started"
        return self._ring

    def metrics(self) -> dict[str, Any]:
        """Per-model scheduler metrics plus ring and connection state."""
        assert self._scheduler is not None and self._ring is not None
        return {
            "models": self._scheduler.metrics(),
            "ring": {"capacity": self._ring.capacity, "used_bytes": self._ring.used_bytes,
                     "slots_in_use": self._ring.slots_in_use, "waiters": self._ring.waiters},
            "connections": len(self._connections),
            "frames_in_flight": self._frames_in_flight,
        }  # fmt: skip

    # -- Router (what TcpIngest calls) ------------------------------------------------

    @property
    def max_payload(self) -> int:
        return self.config.max_payload_bytes

    @property
    def token(self) -> str:
        return self.config.auth_token

    @property
    def max_frames_per_connection(self) -> int:
        return self.config.max_frames_per_connection

    def model_spec(self, name: str) -> ModelSpec | None:
        return self._specs.get(name)

    def submit(self, frame: Frame) -> None:
        assert self._scheduler is not None
        self._frames_in_flight += 1
        self._scheduler.submit(frame)

    def frame_done(self) -> None:
        self._frames_in_flight -= 1

    def connection_opened(self, conn: TcpIngest) -> None:
        self._connections.add(conn)
        if not self.accepting:
            conn.stop_reading()

    def connection_closed(self, conn: TcpIngest) -> None:
        self._connections.discard(conn)

    # -- batches --------------------------------------------------------------------

    def _release(self, frame: Frame) -> None:
        if frame.slot is not None:
            self.ring.release(frame.slot)
            frame.slot = None

    def _reject(self, frame: Frame, status: Status, message: str) -> None:
        self._release(frame)
        if frame.replied:  # answered SHUTTING_DOWN by a shutdown that timed out
            return
        h = frame.header
        frame.reply(
            ReplyHeader(
                stream_id=h.stream_id, sequence=h.sequence, status=status, timestamp_ns=h.timestamp_ns, message=message,
                timings=Timings(receive_us=(frame.complete_ns - frame.received_ns) // 1000,
                                total_us=(time.perf_counter_ns() - frame.received_ns) // 1000),
            )
        )  # fmt: skip

    async def _run_batch(self, model: DeviceModel, frames: list[Frame], expected_s: float) -> float | None:
        """Launch one batch, free its slots once copied, answer every frame; returns its device time."""
        assert self.backend is not None and self._scheduler is not None
        self._running[id(frames)] = frames
        try:
            return await self._run_launched(model, frames, expected_s)
        finally:
            del self._running[id(frames)]

    async def _run_launched(self, model: DeviceModel, frames: list[Frame], expected_s: float) -> float | None:
        assert self.backend is not None and self._scheduler is not None
        metrics = self._scheduler.metrics_for(model.spec.name)
        launch_ns = time.perf_counter_ns()
        try:
            run = self.backend.launch(model, self.ring, [f.slot for f in frames if f.slot is not None], expected_s)
        except Exception as exc:  # nothing was enqueued: nothing will read the slots
            log.exception("model %s: batch of %d failed to launch", model.spec.name, len(frames))
            self._fail_batch(frames, metrics, exc)
            return None
        try:
            await run.copied
        except Exception as exc:
            log.exception("model %s: copying a batch of %d failed", model.spec.name, len(frames))
            run.done.add_done_callback(_consume)  # its error is this one's consequence
            self._fail_batch(frames, metrics, exc)
            return None
        for frame in frames:
            self._release(frame)
        copied_ns = time.perf_counter_ns()
        try:
            results = await run.done
            if len(results) != len(frames):
                raise RuntimeError(f"model returned {len(results)} results for a batch of {len(frames)} frames")
            done_ns = time.perf_counter_ns()
            _reply_results(frames, results, launch_ns, copied_ns, done_ns)
        except Exception as exc:
            log.exception("model %s: batch of %d failed", model.spec.name, len(frames))
            self._fail_batch(frames, metrics, exc)
            return None
        metrics.completed += len(frames)
        metrics.transfer_us.append((copied_ns - launch_ns) / 1e3)
        metrics.compute_us.append((done_ns - copied_ns) / 1e3)
        return run.service_s

    def _fail_batch(self, frames: list[Frame], metrics: ModelMetrics, exc: BaseException) -> None:
        metrics.failed += len(frames)
        for frame in frames:
            self._reject(frame, Status.INTERNAL_ERROR, f"inference failed: {type(exc).__name__}: {exc}")


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _reply_results(frames: list[Frame], results: np.ndarray, launch_ns: int, copied_ns: int, done_ns: int) -> None:
    dtype_code = wire.dtype_code(results.dtype)
    shape = tuple(results.shape[1:])
    transfer_us, compute_us, n = (copied_ns - launch_ns) // 1000, (done_ns - copied_ns) // 1000, len(frames)
    now = time.perf_counter_ns()
    rows = results.reshape(n, -1)  # one contiguous row of bytes per frame, whatever the output rank
    for frame, row in zip(frames, rows, strict=True):
        if frame.replied:  # answered SHUTTING_DOWN by a shutdown that timed out
            continue
        h = frame.header
        timings = Timings(
            receive_us=(frame.complete_ns - frame.received_ns) // 1000,
            queue_us=(launch_ns - frame.complete_ns) // 1000,
            transfer_us=transfer_us,
            compute_us=compute_us,
            total_us=(now - frame.received_ns) // 1000,
            batch_size=n,
        )
        reply = ReplyHeader(h.stream_id, h.sequence, Status.OK, dtype_code, shape, row.nbytes, h.timestamp_ns, timings)
        frame.reply(reply, row.view(np.uint8).data)


# -- running a server as a process -------------------------------------------------------


def run(config: Config) -> int:
    """Serve until SIGINT/SIGTERM, then shut down gracefully. Returns the exit code."""
    loop = new_event_loop(config.loop)
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(_serve(config))
    finally:
        loop.close()


async def _serve(config: Config) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    server = Server(config)
    await server.start()
    log.info("event loop %s.%s", type(loop).__module__, type(loop).__name__)
    await stop.wait()
    log.info("signal received: stopping (answering in-flight frames; a second signal exits at once)")

    def force_exit() -> None:
        log.warning("second signal: exiting without finishing in-flight frames")
        os._exit(1)

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, force_exit)
    await server.stop()
    return 0
