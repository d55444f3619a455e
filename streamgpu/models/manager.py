"""Models while the server runs: load, swap (a new version under a name) and unload.

The heavy part of a load (reading the file, placing the weights on the
device, warm-up at every bucket, CUDA graph capture) runs in the server's
one loader thread while every model keeps serving; only the switch happens
on the loop, between two batches (``Scheduler.swap_model``). A swapped-out
version is freed once its last batch has completed. A new version that only
brings new weights takes the serving one's place by them (``weights``): they
are read by a process of their own, staged on the device by the loader thread
and copied in between two batches.
Operations on one name run one at a time, in the order they were asked for.

Admission reads ``ModelManager.specs``: a model is in it (frames accepted)
from the moment its first version serves until an unload begins.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import math
import sys
import threading
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any

from streamgpu.errors import ModelLoadError, ModelNotFoundError
from streamgpu.gpu.backend import Backend, DeviceModel, StagedWeights
from streamgpu.models.loader import load_module
from streamgpu.models.spec import ModelSpec
from streamgpu.models.weights import WeightsLayout, WeightsReader, in_place_problem, takes_weights_in_place
from streamgpu.scheduler.scheduler import Scheduler

LOADING_SWITCH_INTERVAL_S = 0.0002  # the GIL hand-over interval while a model loads (see LoadingSwitchInterval)
# While a model loads next to frames being served, the loader thread runs LOADING_RUN_S, then sleeps with the
# GIL left to the loop so as to take the config's loader_share of the time (see _yielding).
LOADING_RUN_S = 0.001


def loading_pause_s(share: float) -> float:
    """The loader's pause after each ``LOADING_RUN_S`` of running, for it to take ``share`` of the time."""
    return LOADING_RUN_S * (1 / share - 1)


log = logging.getLogger("streamgpu")


class LoadingSwitchInterval:
    """While any model is built in the process (seconds of Python in a loader thread: warm-up, graph capture), a loop
    thread waits at most ``LOADING_SWITCH_INTERVAL_S`` for the GIL instead of Python's 5 ms default, which would
    otherwise show up in the p99 of every model serving meanwhile. The interval is the process's: loads are counted
    over every server of it, so the last one to end puts back what was there before the first began."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # (servers embedded side by side may run on loops of their own threads)
        self._loading = 0
        self._before = 0.0

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            if self._loading == 0:
                self._before = sys.getswitchinterval()
                sys.setswitchinterval(min(self._before, LOADING_SWITCH_INTERVAL_S))
            self._loading += 1
        try:
            yield
        finally:
            with self._lock:
                self._loading -= 1
                if self._loading == 0:
                    sys.setswitchinterval(self._before)


loading_switch_interval = LoadingSwitchInterval()

READY, LOADING, UNLOADING, UNAVAILABLE = "READY", "LOADING", "UNLOADING", "UNAVAILABLE"


@dataclass
class ModelState:
    """One model name: its serving version (``models``, its instances on each device; None when not serving),
    state and last error.

    ``version`` counts the versions loaded under this name since the server started (1 = first); ``since``:
    the one that began its current time serving (its first load, or a load after an unload: a swap keeps it).
    ``spec``: the settings it was last loaded with (None: never loaded; listed so only while loading, or as a
    folder of the model repository that was refused).
    """

    name: str
    spec: ModelSpec | None
    version: int = 0
    since: int = 0
    state: str = LOADING
    reason: str = ""
    models: list[DeviceModel] | None = None

    def index_entry(self) -> dict[str, Any]:
        """The entry of Triton's repository index: name, version, state, reason."""
        return {"name": self.name, "version": str(self.version), "state": self.state, "reason": self.reason}


class ModelManager:
    """Loads, swaps and unloads the models of one server (every method on the loop thread)."""

    def __init__(
        self,
        backend: Backend,
        scheduler: Scheduler,
        loader: concurrent.futures.Executor,
        problems: Callable[[ModelSpec], list[str]],
        loader_share: float = 1.0,
        serving_frames: Callable[[], bool] = lambda: True,
    ) -> None:
        """``problems``: why the server cannot serve a spec, whatever its file (``Config.model_problems``).
        ``loader_share``: the share of the time a load's Python may take while ``serving_frames()`` (called from
        the loader thread: it must only read) says frames are in the server (``Config.loader_share``)."""
        self._backend = backend
        self._loader_share = loader_share
        self._serving_frames = serving_frames
        self._problems = problems
        self._scheduler = scheduler
        self._loader = loader
        self.specs: dict[str, ModelSpec] = {}  # the models taking frames now (admission reads it)
        # Awaited right after ``specs`` changed (a model started or stopped taking frames), by the load or
        # unload: for those who keep their own copy of it (ingest worker processes, reply counters)
        self.specs_changed: list[Callable[[], Awaitable[None]]] = []
        self.states: dict[str, ModelState] = {}
        # Whether the model repository holds a folder of a name (the server sets its poller's answer, which asks
        # no file system): a name that never loaded is listed, UNAVAILABLE, only then (``drop_unlisted``)
        self.in_repository: Callable[[str], bool] = lambda name: False
        self._locks: dict[str, _NameLock] = {}
        self.serving = False  # frames are being taken (the server sets it once its listeners run)
        # Loads and unloads in progress (run to their end whoever waits: ``_to_its_end``); ``close`` ends them
        self._running: set[asyncio.Task[ModelState]] = set()
        self._closed = False  # the server stopped: its loader thread and backend are gone
        self._reader = WeightsReader()  # reads the files of new versions swapped in by their weights (``_stage``)
        # The layout of each serving instance's state, known from its first in-place swap on: the same at each (the
        # swap keeps its tensors)
        self._layouts: weakref.WeakKeyDictionary[DeviceModel, WeightsLayout] = weakref.WeakKeyDictionary()

    def _build(self, spec: ModelSpec, paced: bool) -> list[DeviceModel]:
        """``spec.instances`` instances per device (each from a fresh module: a load may move it in place);
        ``paced``: the loader thread pauses for the loop as it goes (``_yielding``)."""
        models: list[DeviceModel] = []
        with self._paced(paced):
            try:
                for device in range(len(self._backend.devices)):
                    for _ in range(spec.instances):
                        models.append(self._backend.load(spec, load_module(spec), device))
            except BaseException:
                self._free(models)
                raise
        if takes_weights_in_place(spec) and self._backend.swaps_weights_in_place:
            # Its next versions' weights are read by the reader process: started now, its start (an interpreter,
            # torch's import: seconds of CPU) is not part of the first swap
            with contextlib.suppress(ModelLoadError):  # (the swap will say why it cannot start)
                self._reader.start()
        return models

    def _stage(self, spec: ModelSpec, serving: list[DeviceModel]) -> list[StagedWeights]:
        """``spec``'s weights read and checked by the reader process against the serving module's layout, then
        staged beside each serving instance (``weights``). Not paced (``_yielding``): this thread mostly waits for
        the reader and the copies."""
        layout = self._layouts.get(serving[0])
        if layout is None:  # (a ResNet-50's state dict: ~8 ms of Python, the loop waiting for the GIL, at every swap)
            layout = self._layouts[serving[0]] = WeightsLayout.of(serving[0].module)
        with self._reader.read(spec, layout, lambda: self._closed) as weights:
            return [self._backend.stage_weights(model, weights) for model in serving]

    def _paced(self, paced: bool) -> contextlib.AbstractContextManager[None]:
        """In the loader thread: ``paced``, it pauses for the loop as it goes (``_yielding``)."""
        pause_s = loading_pause_s(self._loader_share)
        if paced and pause_s > 0:
            return _yielding(LOADING_RUN_S, pause_s, self._serving_frames)
        return contextlib.nullcontext()

    def _free(self, models: list[DeviceModel]) -> None:
        """Unload every instance; one that fails (its GPU's context lost) does not keep the others held."""
        failed: BaseException | None = None
        for model in models:
            try:
                self._backend.unload(model)
            except BaseException as exc:
                failed = failed or exc
        if failed is not None:
            raise failed

    async def load(self, spec: ModelSpec, swap: bool = False) -> ModelState:
        """Load ``spec``; under a name already served this is a new version, swapped in between two
        batches once it is loaded and warmed, the old one freed after its last batch.

        Returns once the new version serves and the old one is freed. Raises ``ModelLoadError``
        (the current version, if any, keeps serving); ``swap``: ``ModelNotFoundError`` when the name is not
        served once the operations asked before on it have run. A load runs to its end even when its caller
        stops waiting (cancelled: a timeout, an HTTP client that left): stopped halfway, it left the
        model LOADING for good and its instances, built in the loader thread, never freed.
        """
        if self._closed:
            raise ModelLoadError(f"model {spec.name!r}: the server has stopped")
        stopped = ModelLoadError(f"model {spec.name!r}: the server stopped while it loaded")
        return await self._to_its_end(self._load(spec, swap), f"model {spec.name}: a load", stopped)

    async def _load(self, spec: ModelSpec, swap: bool) -> ModelState:
        loop = asyncio.get_running_loop()
        async with self._lock(spec.name):
            state = self.states.get(spec.name)
            serving = state.models if state is not None else None
            if swap and serving is None:  # (unloaded by an operation asked before this one, or never served)
                raise ModelNotFoundError(f"no model named {spec.name!r} is being served (load it instead)")
            if state is None:  # (its spec is set once it loads: a version refused was never loaded with it)
                state = self.states[spec.name] = ModelState(spec.name, None)
            if serving is None:
                state.state, state.reason = LOADING, ""
            try:  # every refusal below is listed in the index (the reason), the version serving kept
                if problems := self._problems(spec):
                    raise ModelLoadError("; ".join(problems))
                old_spec = serving[0].spec if serving is not None else spec
                if not old_spec.same_frames(spec):
                    raise ModelLoadError(
                        f"model {spec.name!r} takes {old_spec.input_dtype} {list(old_spec.input_shape)} frames; "
                        f"a new version must take the same frames, not {spec.input_dtype} {list(spec.input_shape)} "
                        "(unload it first, or load the new one under another name)"
                    )
                in_place = serving is not None and self._in_place(old_spec, spec)
                # Paced while frames are taken (not at start), a compiling load too: its hook slows dynamo's tracing
                # ~3x and the load ~6x, but unpaced, a new architecture's compile took the p99 of the model served
                # beside it to 10.5x steady state (docs/MODELS.md).
                if in_place:
                    assert serving is not None
                    # Without the short switch interval: the file is read in a process of its own and this
                    # process's loader thread runs little Python, so the interval only made the loop hand the GIL
                    # to its other threads more often (p99 during ResNet-50 swaps 1.44-1.56x steady with it,
                    # 1.10-1.26x without, H200: docs/BENCHMARKS.md)
                    staged = await loop.run_in_executor(self._loader, self._stage, spec, serving)
                else:
                    with loading_switch_interval():
                        models = await loop.run_in_executor(self._loader, self._build, spec, self.serving)
            except Exception as exc:
                error = exc if isinstance(exc, ModelLoadError) else ModelLoadError(
                    f"model {spec.name!r}: cannot load {spec.source!r}: {type(exc).__name__}: {exc}")  # fmt: skip
                self.refused(spec.name, str(error))
                raise error from exc
            state.version += 1
            self.specs[spec.name] = spec
            if in_place:
                assert serving is not None
                await self._swap_in_place(state, spec, serving, staged)
                return state
            state.spec, state.models, state.state, state.reason = spec, models, READY, ""
            for model in models:
                log.info("model %s, version %d", model.description, state.version)
            if serving is None:
                state.since = state.version
                self._scheduler.add_model(models)
                await self._announce()
                return state
            old = self._scheduler.swap_model(models)  # between two batches; nothing queued is refused
            await self._announce()  # its admission settings (default_deadline_ms...), where others admit
            await self._scheduler.released(old)
            await loop.run_in_executor(self._loader, self._free, old)
            return state

    def _in_place(self, serving: ModelSpec, spec: ModelSpec) -> bool:
        """Whether ``spec`` replaces ``serving`` by its weights alone (``weights``); logs why not where it asks to."""
        if not self._backend.swaps_weights_in_place:
            return False
        why = in_place_problem(serving, spec)
        if why is not None and spec.weights_in_place:
            log.info("model %s: the new version is built beside the serving one, not swapped in by its weights: %s",
                     spec.name, why)  # fmt: skip
        return why is None

    async def _swap_in_place(
        self, state: ModelState, spec: ModelSpec, serving: list[DeviceModel], staged: list[StagedWeights]
    ) -> None:
        """Copy ``staged`` into every serving instance now, between two batches, and wait for the copies. A copy
        that fails (staging converted and checked every value: the device's fault) may have left an instance on a
        mix of both versions' weights: ``ModelLoadError``, and the index's reason says so until a version loads."""
        for model in serving:
            model.spec = spec
        self._scheduler.respec_model(spec)
        state.spec, state.state, state.reason = spec, READY, ""
        try:
            copies = [self._backend.swap_weights(model, weights)
                      for model, weights in zip(serving, staged, strict=True)]  # fmt: skip
            for model in serving:
                log.info("model %s, version %d (its weights copied in place)", model.description, state.version)
            await self._announce()
            # Every copy to its end (then ``staged`` goes: nothing reads it any more), the first failure raised
            for done in await asyncio.gather(*copies, return_exceptions=True):
                if isinstance(done, BaseException):  # (a copy cancelled never ran: the server stopped)
                    raise done
        except Exception as exc:
            state.reason = (
                f"version {state.version}'s weights failed to copy in place, its instances may run on "
                f"a mix of two versions' weights (load one again): {type(exc).__name__}: {exc}"
            )
            log.error("model %s: %s", spec.name, state.reason)
            raise ModelLoadError(f"model {spec.name!r}: {state.reason}") from exc

    def refused(self, name: str, reason: str) -> None:
        """A version of ``name`` was refused for ``reason`` (its file, or its settings before any load): the
        index says why, and that the current version (if any) serves on. A name that never loaded is listed
        only while the model repository holds a folder of it (``drop_unlisted``)."""
        state = self.states.setdefault(name, ModelState(name, None))
        if state.models is None:
            state.state, state.reason = UNAVAILABLE, reason
        else:
            state.reason = f"version {state.version + 1} failed to load ({state.version} serves): {reason}"
        self.drop_unlisted(name)

    def drop_unlisted(self, name: str) -> None:
        """Forget ``name`` if it never loaded (nor loads now) and the model repository holds no folder of it: as
        Triton's index lists the models of its repository, loaded or not, and those loaded, a failed load of a
        name that is neither leaves no entry behind (it stayed UNAVAILABLE for good, its refused settings taken
        for its last ones). One that loaded once stays: it can be loaded again with its last settings. So does one
        whose lock an operation holds or waits for (the last drops it: ``_lock``): the repository poller refuses and
        forgets names outside it, and a load asked meanwhile lost its entry, then served listed nowhere and could
        not be unloaded."""
        state = self.states.get(name)
        if (state is not None and state.version == 0 and state.state == UNAVAILABLE and name not in self._locks
                and not self.in_repository(name)):  # fmt: skip
            del self.states[name]

    async def unload(self, name: str) -> ModelState:
        """Stop taking frames for ``name`` (UNKNOWN_MODEL from now on), finish the queued ones, free it.

        Runs to its end even when its caller stops waiting: stopped while the queued frames run, it left
        the model UNLOADING, refusing frames with its memory held."""
        if self._closed:
            raise ModelNotFoundError(f"no model named {name!r} is being served: the server has stopped")
        stopped = ModelNotFoundError(f"no model named {name!r} is being served: the server stopped while it unloaded")
        return await self._to_its_end(self._unload(name), f"model {name}: an unload", stopped)

    async def _unload(self, name: str) -> ModelState:
        loop = asyncio.get_running_loop()
        async with self._lock(name):
            state = self.states.get(name)
            if state is None or state.models is None:
                raise ModelNotFoundError(f"no model named {name!r} is being served")
            self.specs.pop(name, None)  # (gone already after an unload cancelled while it was announced)
            await self._announce()
            state.state = UNLOADING
            models = await self._scheduler.remove_model(name)
            state.models, state.state, state.reason = None, UNAVAILABLE, "unloaded"
            await loop.run_in_executor(self._loader, self._free, models)
            log.info("model %s unloaded", name)
            return state

    async def _announce(self) -> None:
        for callback in self.specs_changed:
            try:
                await callback()
            except Exception:  # one watcher's bug must not fail the load or unload, nor keep others uninformed
                log.exception("telling of the models served now failed")

    def index(self) -> list[dict[str, Any]]:
        """Every model name the server knows (serving or not), as Triton's repository index lists them."""
        return [state.index_entry() for state in sorted(self.states.values(), key=lambda s: s.name)]

    async def _to_its_end(self, work: Coroutine[Any, Any, ModelState], what: str, stopped: Exception) -> ModelState:
        """``work``, run to its end even if the caller is cancelled (a timeout, an HTTP client gone): its
        failure then goes to the log, there being nobody else to hear of it. Ended by ``close``, it raises
        ``stopped`` to a caller still waiting."""
        task = asyncio.ensure_future(work)
        self._running.add(task)  # (the loop keeps only a weak reference to a task)
        task.add_done_callback(self._running.discard)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and self._closed and not (current is not None and current.cancelling()):
                raise stopped from None  # (not the caller's own cancellation: it would take it for one)
            if not task.done():
                task.add_done_callback(functools.partial(_log_unawaited, what))
            raise

    async def close(self) -> None:
        """End the loads and unloads still running (their callers gone): the server stops, and they would
        run on past it, onto its freed backend and shut loader thread; later ones are refused."""
        self._closed = True
        self._reader.close()  # (a read in the loader thread fails: the server stopped)
        running = list(self._running)
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)

    @contextlib.asynccontextmanager
    async def _lock(self, name: str) -> AsyncIterator[None]:
        """Operations on ``name`` one at a time, in the order asked. Its lock goes once nobody holds or waits for
        it: kept, every name ever asked of (a load that failed, an unload of a name never served) held one for
        good, and requests under made-up names grew the server's memory without bound. With the last, a name that
        never loaded goes too, unless the repository holds it (``drop_unlisted``)."""
        held = self._locks.setdefault(name, _NameLock())
        held.users += 1
        try:
            async with held.lock:
                yield
        finally:
            held.users -= 1
            if not held.users:
                del self._locks[name]
                self.drop_unlisted(name)


@dataclass
class _NameLock:
    """A name's lock, and the operations holding or waiting for it."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


def _log_unawaited(what: str, task: asyncio.Task[ModelState]) -> None:
    """The end of a load or unload whose caller stopped waiting: nobody else hears of its failure."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.warning("%s whose caller stopped waiting failed: %s", what, exc)


@contextlib.contextmanager
def _yielding(run_s: float, pause_s: float, busy: Callable[[], bool]) -> Iterator[None]:
    """In the calling thread: after every ``run_s`` of running, sleep ``pause_s`` at its next Python call, if
    ``busy()`` (frames are being served; otherwise there is nobody to leave the GIL to: run on).

    A thread running Python beside the loop slows it out of proportion: uvloop takes the GIL back for every
    callback, and each take can wait for the other thread to let go (docs/BENCHMARKS.md: a third of the time
    took the p50 up by a quarter to three quarters). Sleeping leaves the loop the GIL whole for ``pause_s``
    out of every ``run_s + pause_s``; the load takes longer.
    """
    if sys.getprofile() is not None or sys.gettrace() is not None:  # a profiler or debugger has the thread
        yield
        return
    next_pause = time.perf_counter() + run_s

    def at_call() -> bool:
        """Pauses if it is time; returns whether the thread came more than ``run_s`` past its pause (it ran long
        without a Python call, or in a C call)."""
        nonlocal next_pause
        now = time.perf_counter()
        if now < next_pause:
            return False
        late = now - next_pause > run_s
        try:
            paused = busy()
        except BaseException:
            # A ``busy`` that raises (the embedder's) fails the block once: its own exit then runs unpaced, not
            # failing again at its every call and leaving the thread watched
            next_pause = math.inf
            raise
        if paused:
            time.sleep(pause_s)
        next_pause = time.perf_counter() + run_s
        return late

    if _CALLS is None:  # Python 3.11: a profile function is the thread's that sets it
        sys.setprofile(lambda frame, event, arg: at_call() if event == "call" else None)
        try:
            yield
        finally:
            sys.setprofile(None)
    else:
        with _CALLS.watching(at_call):
            yield


class _MonitoredCalls:
    """Python 3.12 and later: ``at_call()`` at each Python function a watched thread starts, by a ``sys.monitoring``
    tool of its own. A profile function did it, but from 3.12 one set in any thread runs every thread's code
    instrumented: the scheduling loop's per-frame path 1.6-1.8x slower for as long as a load ran
    (docs/BENCHMARKS.md). The tool's event turns itself off (``DISABLE``) where a thread not watched starts a
    function, so the loop pays one call of it per function it runs, then runs its code as before.

    ``DISABLE`` turns a function's event off for every thread, though, the watched one's pauses there with it: a
    function a watched thread has started stays watched (another thread pays a call of the tool at each of its
    starts), and where a watched thread comes late to its pause (its functions turned off by another thread that
    started them first) every event turned off is turned back on (``restart_events``, at most every
    ``_RESTART_S``). Without it, a load beside a model served eagerly (its module's functions, the load's warm-up's)
    ran 80 % of the time instead of its third."""

    _TOOLS = (3, 4)  # the ids PEP 669 leaves to others than debuggers, coverage, profilers and optimizers
    _NAME = "streamgpu load pacing"
    _RESTART_S = 0.1  # (each costs the loop one call of the tool per function it runs)

    def __init__(self) -> None:
        self._lock = threading.Lock()  # (servers embedded side by side load in threads of their own)
        self._watched: dict[int, Callable[[], bool]] = {}
        self._tool: int | None = None
        # The functions watched threads started, by the id of their code (a code object hashes its whole contents),
        # kept alive so that an id is not another's
        self._theirs: dict[int, object] = {}
        self._restart_at = 0.0
        self._said_unpaced = False  # (once a process)

    @contextlib.contextmanager
    def watching(self, at_call: Callable[[], bool]) -> Iterator[None]:
        """``at_call()`` at each Python function the calling thread starts, for the time of the block (not paced
        where every id of ``_TOOLS`` is taken; a block inside another's keeps the outer one's). ``at_call`` returns
        whether the thread came late to its pause."""
        monitoring, thread = sys.monitoring, threading.get_ident()  # type: ignore[attr-defined]  # (3.12+)
        with self._lock:
            nested = thread in self._watched
            if not nested:
                if not self._watched:
                    self._tool = next((i for i in self._TOOLS if monitoring.get_tool(i) is None), None)
                    if self._tool is not None:
                        monitoring.use_tool_id(self._tool, self._NAME)
                        monitoring.register_callback(self._tool, monitoring.events.PY_START, self._started)
                        monitoring.set_events(self._tool, monitoring.events.PY_START)
                    elif not self._said_unpaced:
                        self._said_unpaced = True
                        log.warning(
                            "loads run unpaced beside frames served (loader_share has no effect): sys.monitoring "
                            "tool ids %s are both taken by other tools (%s)",
                            self._TOOLS,
                            ", ".join(str(monitoring.get_tool(i)) for i in self._TOOLS),
                        )
                self._watched[thread] = at_call
        if nested:
            yield
            return
        try:
            yield
        finally:
            with self._lock:
                del self._watched[thread]
                if not self._watched and self._tool is not None:
                    owner = monitoring.get_tool(self._tool)
                    if owner is None:  # freed under us by another tool: our event and callback stay on till turned off
                        monitoring.use_tool_id(self._tool, self._NAME)
                    if owner in (None, self._NAME):  # (taken since by another tool: its settings are its own)
                        monitoring.set_events(self._tool, 0)
                        monitoring.register_callback(self._tool, monitoring.events.PY_START, None)
                        monitoring.free_tool_id(self._tool)
                    self._tool = None
                    self._theirs.clear()

    def _started(self, code: object, offset: int) -> object:
        at_call = self._watched.get(threading.get_ident())
        if at_call is None:  # another thread (the loop): this function's start is not watched again, unless theirs
            return None if id(code) in self._theirs else sys.monitoring.DISABLE  # type: ignore[attr-defined]
        self._theirs[id(code)] = code
        if at_call() and (now := time.perf_counter()) >= self._restart_at:
            self._restart_at = now + self._RESTART_S
            sys.monitoring.restart_events()  # type: ignore[attr-defined]  # (3.12+)
        return None


_CALLS = _MonitoredCalls() if sys.version_info >= (3, 12) else None
