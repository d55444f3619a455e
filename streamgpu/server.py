"""One server's lifecycle: host memory + backend + models + scheduler + listeners, started and stopped.

``Server`` is the programmatic API (start and stop it from a running loop);
``streamgpu.serve.run`` is the process entry (signals), and ``streamgpu
serve`` a thin layer over that. Batches run in ``scheduler.runner``; frames
enter through ``ingest`` listeners and their shared ``Admission``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable
from typing import Any

from streamgpu.config import Config
from streamgpu.errors import ConfigError, ServerNotStartedError, ServerStartedError
from streamgpu.gpu.backend import Backend, DeviceModel, create_backend
from streamgpu.ingest import listener_class, make_listeners
from streamgpu.ingest.admission import Admission
from streamgpu.ingest.base import Listener
from streamgpu.loops import freeze_heap, helper_threads, pin_loop_thread, thaw_heap, unpin_loop_thread
from streamgpu.memory import HostSegment, SlotPool
from streamgpu.metrics import ReplyCounts
from streamgpu.models.manager import ModelManager, ModelState
from streamgpu.models.repository import RepositoryPoller
from streamgpu.models.spec import ModelSpec
from streamgpu.protocol.wire import Status
from streamgpu.results import Results, TcpOutlet, results_from
from streamgpu.scheduler.health import DeviceHealth
from streamgpu.scheduler.runner import BatchRunner
from streamgpu.scheduler.scheduler import QueueState, Scheduler

log = logging.getLogger("streamgpu")


class Server:
    """A streamgpu server inside the running event loop.

    ``await server.start()`` picks the backend, creates and pins the host
    memory, loads every model (in one helper thread, off the loop) and starts
    the listeners; ``await server.stop()`` stops accepting, answers every
    frame already received, then closes. Also an async context manager.
    """

    def __init__(self, config: Config | None = None) -> None:
        if config is not None and not isinstance(config, Config):  # (a path would fail later, on a missing attribute)
            raise TypeError(f"config must be a streamgpu Config (Config.load(PATH) reads a TOML file) or None, "
                            f"got {type(config).__name__} {config!r:.80}")  # fmt: skip
        self.config = config or Config()
        self.backend: Backend | None = None
        self._segment: HostSegment | None = None
        self._pool: SlotPool | None = None
        self._scheduler: Scheduler | None = None
        self._runner: BatchRunner | None = None
        self._admission: Admission | None = None
        self._models: ModelManager | None = None
        self._repository: RepositoryPoller | None = None
        self._listeners: list[Listener] = []
        # Set once start() has every listener up, or has failed: a model loaded before would be missed by the
        # listeners still starting (their ingest workers learn the models at their spawn)
        self._up: asyncio.Future[bool] | None = None  # (from start(): True once up, False once it failed)
        self._start_ended = asyncio.Event()  # start() returned or raised (then it released what it took)
        cfg = self.config
        self.results: Results = results_from(cfg.results_port, cfg.results_host, cfg.results_file, cfg.max_connections)
        self._sweeper: asyncio.TimerHandle | None = None
        self._loader = helper_threads("streamgpu-loader")
        self._heap_frozen = False  # this server holds the heap frozen (loops.freeze_heap) until it is released
        self._loop_pinned = False  # this server pinned the loop thread to loop_cpu (loops.pin_loop_thread)

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        if self._up is not None:  # a second start would build a second server over the first, then release both
            raise ServerStartedError("this Server was started already (a Server starts once): make a new Server to "
                                     "serve again, and give setup() a Config or a Server not yet started")  # fmt: skip
        up = self._up = asyncio.get_running_loop().create_future()
        try:
            await self._start()
            up.set_result(True)
        except BaseException:
            # Waiters hear it before the listeners close: an HTTP listener's close waits for their handlers
            up.set_result(False)
            await self._release()
            raise
        finally:
            self._start_ended.set()

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.config
        for listener_spec in cfg.listeners:  # a taken address fails now, not after minutes of model loading
            listener_class(listener_spec.kind).check_bind(listener_spec)
        await self.results.start()  # its port and file too
        self.backend = backend = create_backend(loop, cfg)
        log.info("data path: %s", backend.data_path)
        if cfg.loop_cpu >= 0:  # before the workers and helper threads start: they are placed beside it
            pin_loop_thread(cfg.loop_cpu)
            self._loop_pinned = True
            log.info("the scheduling loop runs on CPU %d alone (loop_cpu)", cfg.loop_cpu)
        freeze_heap()  # torch and the backend are in; models are not (they stay collectable)
        self._heap_frozen = True
        try:
            self._segment = segment = HostSegment.create(cfg.ring_bytes)
        except (OSError, OverflowError) as exc:  # (OverflowError: past the kernel's file size, 2**63 - 1 bytes)
            raise ConfigError(f"ring_bytes = {cfg.ring_bytes}: the receive ring cannot be allocated ({exc}); "
                              "lower ring_bytes") from None  # fmt: skip
        await loop.run_in_executor(self._loader, backend.attach_host, segment.buffer)
        self._pool = SlotPool(segment.buffer, defer=loop.call_soon)
        health = DeviceHealth(backend.devices)
        self._scheduler = scheduler = Scheduler(loop, self._run_batch, cfg.max_inflight_batches, health)
        self._runner = BatchRunner(backend, scheduler, cfg.watchdog_factor, cfg.watchdog_min_s)
        self._models = models = ModelManager(backend, scheduler, self._loader, cfg.model_problems, cfg.loader_share,
                                             self._frames_in_server)  # fmt: skip
        for spec in cfg.models:
            await models.load(spec)
            if spec.source.startswith("builtin:"):
                log.info("model %s: random weights (builtin: nothing is downloaded)", spec.name)
        if cfg.model_repository:
            self._repository = RepositoryPoller(cfg.model_repository, models, self._loader)
            models.in_repository = self._repository.holds
            await self._repository.poll(initial=True)
        self._admission = admission = Admission(
            cfg, self._pool, models.specs, scheduler.submit, scheduler.submit_many, scheduler.withdraw
        )
        models.specs_changed.append(self._models_changed)
        self.results.attach(admission.stream_results, cfg.results_top_k)  # every published result, as a line
        for listener in make_listeners(cfg.listeners, admission, segment):
            listener.server = self
            await listener.start()
            self._listeners.append(listener)
        self._sweep()
        if self._repository is not None:  # its loads are announced to the listeners up: every one is now
            self._repository.start(cfg.repository_poll_s)
        models.serving = True  # loads from now on pause for the loop (ModelManager._yielding)
        log.info(
            "streamgpu listening on %s, device %s, ring %d MiB",
            ", ".join(f"{h}:{p}" for h, p in self.addresses),
            backend.device_name,
            cfg.ring_bytes >> 20,
        )
        if self.results_address is not None:
            log.info("results (JSON lines) for subscribers on %s:%d", *self.results_address)
        if cfg.open_to_anyone:
            log.warning("listening beyond loopback without auth_token or tokens, or on a raw port (which takes "
                        "no token): anyone who can reach this machine can submit frames")  # fmt: skip

    def _frames_in_server(self) -> bool:
        """Whether frames are being served (a load then paces itself); read from the loader thread."""
        return self._admission is not None and self._admission.frames_in_flight > 0

    async def _models_changed(self) -> None:
        assert self._admission is not None
        self._admission.replies.add(self._manager.specs)
        await asyncio.gather(*(listener.models_changed() for listener in self._listeners))

    def _run_batch(self, model: DeviceModel, frames: list[Any], expected_s: float) -> Awaitable[float | None]:
        assert self._runner is not None
        return self._runner.run(model, frames, expected_s)

    def _sweep(self) -> None:
        """Enforce listeners' time limits (handshakes, payload budgets) about four times per shortest limit."""
        now = time.monotonic()
        for listener in self._listeners:
            try:
                listener.sweep(now)
            except Exception:  # one listener's bug must not end every time limit of every listener
                log.exception("sweeping %s listener failed", listener.kind)
        self._sweeper = asyncio.get_running_loop().call_later(self.config.sweep_period_s, self._sweep)

    async def stop(self, timeout: float | None = None) -> None:
        """Stop accepting, answer every received frame (or SHUTTING_DOWN after ``timeout``), close.

        Cancelled or failing midway, it still releases what ``start`` acquired (listeners, ring, backend,
        the process-wide collector settings). Asked while ``start`` runs, it stops the server once started."""
        if self._up is not None:  # (returning now, the server would serve on once start() ends)
            await self._start_ended.wait()
        if not self._listeners or self._admission is None:
            return  # not started, or stopped already
        timeout = self.config.shutdown_timeout_s if timeout is None else timeout
        try:
            if self._repository is not None:
                await self._repository.stop()
            self._admission.accepting = False
            for listener in self._listeners:
                listener.stop_accepting()
            assert self._scheduler is not None and self._runner is not None
            try:
                # Every submitted frame is queued, in a running batch, or finished: once every frame taken
                # is submitted (ingest workers' frames may still be on their way), an idle scheduler means
                # every frame the server took has its reply.
                await asyncio.wait_for(self._drain(), timeout)
            except TimeoutError:
                log.warning("shutdown: frames still running after %.1f s; answering them SHUTTING_DOWN", timeout)
                self._scheduler.reject_queued(Status.SHUTTING_DOWN, "server is shutting down")
                self._runner.fail_running(Status.SHUTTING_DOWN, "server is shutting down")
            if self._sweeper is not None:
                self._sweeper.cancel()
            for listener in self._listeners:
                await listener.close(timeout=1.0)  # a producer that does not read its replies cannot hold shutdown up
            self._listeners.clear()
            with contextlib.suppress(TimeoutError):  # batches finishing after a timed-out drain
                await asyncio.wait_for(self._scheduler.idle(), 1.0)
        finally:
            await self._release()
        log.info("streamgpu stopped")

    async def _drain(self) -> None:
        assert self._scheduler is not None
        for listener in self._listeners:
            await listener.submitted()
        await self._scheduler.idle()

    async def _release(self) -> None:
        """Free what ``start`` acquired (also after a failed start: listeners already bound close)."""
        try:
            if self._repository is not None:
                await self._repository.stop()
            for listener in self._listeners:
                listener.stop_accepting()
                await listener.close(timeout=0)
            self._listeners.clear()
            if self._sweeper is not None:
                self._sweeper.cancel()
            if self._models is not None:  # loads and unloads whose callers left (or a start cancelled mid-load)
                await self._models.close()
            await self.results.close()  # after the listeners: every frame's line is out
            if self._admission is not None:
                self._admission.busy_poll.close()  # (the loop may be the application's: it sleeps again)
            if self.backend is not None:
                self.backend.close()  # cancels what still runs
                self.backend = None
            if self._segment is not None:
                if self._pool is not None:  # its views of the ring: else the mapping lives as long as this object
                    self._pool.close()
                self._segment.close()
                self._segment = None
            self._loader.shutdown(wait=False)
        finally:  # process-wide: never left set by a release that failed
            try:
                if self._loop_pinned:
                    self._loop_pinned = False
                    unpin_loop_thread()
            finally:  # (nor by an unpin that failed)
                if self._heap_frozen:  # the server itself was frozen: its cycles are collectable only after this
                    self._heap_frozen = False
                    thaw_heap()

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- models while serving ---------------------------------------------------------

    async def load_model(self, spec: ModelSpec) -> ModelState:
        """Load a model while serving; under a name already served, a new version (see ``swap_model``).

        The file is read, placed on the device, warmed at every batch bucket and graph-captured in
        the loader thread while every model keeps serving. Raises ``ModelLoadError`` (the version
        serving under that name, if any, keeps serving).
        """
        return await (await self._manager_up()).load(spec)

    async def swap_model(self, name: str, spec: ModelSpec) -> ModelState:
        """Replace model ``name`` by a new version built from ``spec`` (its ``name`` is set to ``name``).

        The switch happens between two batches: nothing is refused; queued frames run on the new
        version (or, with ``swap_queued = "received"``, on the one that received them); the old
        version is freed after its last batch, before this returns. Raises ``ModelNotFoundError``
        when ``name`` is not served, ``ModelLoadError`` when the new version cannot be loaded.
        """
        return await (await self._manager_up()).load(dataclasses.replace(spec, name=name), swap=True)

    async def unload_model(self, name: str) -> ModelState:
        """Stop serving ``name``: new frames get UNKNOWN_MODEL, queued ones run first, then its memory is freed."""
        return await (await self._manager_up()).unload(name)

    def model_index(self) -> list[dict[str, Any]]:
        """Every model name known (serving or not): name, version, state (READY, LOADING, UNLOADING,
        UNAVAILABLE) and reason, as Triton's repository index lists them."""
        return self._manager.index()

    def known_spec(self, name: str) -> ModelSpec | None:
        """The settings model ``name`` was last loaded with (serving or unloaded since), or None."""
        state = self._manager.states.get(name)
        return state.spec if state is not None else None

    def serving(self, name: str) -> list[DeviceModel] | None:
        """The version of model ``name`` that new batches launch on, its instances on each device (None: not served)."""
        state = self._manager.states.get(name)
        return state.models if state is not None else None

    def served(self, name: str) -> tuple[ModelSpec, int] | None:
        """The settings and version of model ``name`` that new frames go to, or None when it takes none. The
        version is the repository index's: 1 for the first loaded under the name, one more for each load or
        swap since."""
        spec = self._manager.specs.get(name)
        state = self._manager.states.get(name)
        if spec is None or state is None or state.models is None:
            return None
        return spec, state.version

    @property
    def model_specs(self) -> dict[str, ModelSpec]:
        """The models taking frames now, by name."""
        return dict(self._manager.specs)

    @property
    def _manager(self) -> ModelManager:
        if self._models is None:
            raise ServerNotStartedError("the server is not started: call start() first (or use async with Server)")
        return self._models

    async def _manager_up(self) -> ModelManager:
        """The model manager, once start() is done: a load, swap or unload asked meanwhile (from the embedding
        API, or an HTTP listener already up) waits for the listeners still starting."""
        if self._up is not None and not await asyncio.shield(self._up):  # (a waiter cancelled leaves it be)
            raise ServerNotStartedError("the server failed to start (its log says why): it serves no model")
        return self._manager

    # -- state --------------------------------------------------------------------

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """(host, port) of every listening socket (port 0 in the config picks a free one)."""
        return [address for listener in self._listeners for address in listener.addresses]

    @property
    def results_address(self) -> tuple[str, int] | None:
        """(host, port) where results subscribers connect, if ``results_port`` is set and started."""
        for outlet in self.results.outlets:
            if isinstance(outlet, TcpOutlet):
                return outlet.address
        return None

    @property
    def port(self) -> int:
        return self.addresses[0][1]

    @property
    def admission(self) -> Admission:
        """The admission rules every front end calls (the HTTP and WebSocket routes included)."""
        assert self._admission is not None, "server not started"
        return self._admission

    @property
    def started(self) -> bool:
        """Started and not yet stopping: frames are accepted (what a readiness probe asks)."""
        return self._admission is not None and self._admission.accepting and bool(self._listeners)

    @property
    def pool(self) -> SlotPool:
        """The host memory slots frames are received into."""
        assert self._pool is not None, "server not started"
        return self._pool

    @property
    def initialized(self) -> bool:
        """Whether ``start`` has completed (state stays readable after ``stop``)."""
        return self._admission is not None

    @property
    def connections(self) -> int:
        """Producer connections open now, over every listener (ingest workers' included)."""
        if self._admission is None:
            return 0
        return self._admission.connections + sum(listener.connections_elsewhere for listener in self._listeners)

    @property
    def ring_used_bytes(self) -> int:
        """Bytes of the receive ring that frames hold now (ingest workers' as last reported)."""
        if self._pool is None:
            return 0
        return self._pool.used_bytes - sum(listener.ring_lent_free for listener in self._listeners)

    @property
    def frames_in_flight(self) -> int:
        """Frames received and submitted whose reply is not made yet."""
        return self._admission.frames_in_flight if self._admission is not None else 0

    @property
    def replies(self) -> ReplyCounts:
        """Every reply sent, by model and status (``NO_MODEL`` for handshakes and unknown models)."""
        assert self._admission is not None, "server not started"
        return self._admission.replies

    def model_states(self) -> list[QueueState]:
        """Each model's metrics object, queue length and batches in flight."""
        assert self._scheduler is not None, "server not started"
        return self._scheduler.states()

    def device_memory(self) -> dict[str, dict[str, int]]:
        """Per GPU: memory in bytes (``allocated``, ``reserved``, ``total``); empty on the CPU backend."""
        return self.backend.memory() if self.backend is not None else {}

    def metrics(self) -> dict[str, Any]:
        """Per-model scheduler metrics plus host memory, listener and admission state."""
        assert self._scheduler is not None and self._pool is not None and self._admission is not None
        pool = self._pool
        return {
            "models": self._scheduler.metrics(),
            "ring": {"capacity": pool.capacity, "used_bytes": self.ring_used_bytes, "slots_in_use": pool.slots_in_use,
                     "waiters": pool.waiters, "largest_free": pool.largest_free()},
            "listeners": [listener.stats() for listener in self._listeners],
            "devices": self._scheduler.health.snapshot(),
            "connections": self.connections,
            "frames_in_flight": self._admission.frames_in_flight,
            "results": self.results.stats(),
        }  # fmt: skip
