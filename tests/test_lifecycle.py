"""Models while serving (CPU backend, real server on loopback): load, swap and unload under a streaming
producer, load-time checks, several outputs and top-k end to end, the model repository poll."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import errno
import gc
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import weakref
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_asyncio
import torch
from torch import nn
from yarl import URL

from streamgpu import client
from streamgpu.config import Config, ListenerSpec
from streamgpu.errors import ModelLoadError, ModelNotFoundError
from streamgpu.gpu.backend import StagedWeights
from streamgpu.gpu.cpu import CpuModel
from streamgpu.models import manager, weights
from streamgpu.models.builtin import SmallConvNet, build_builtin
from streamgpu.models.manager import ModelManager
from streamgpu.models.outputs import BatchOutputs
from streamgpu.models.preprocess import preprocess_torch
from streamgpu.models.spec import ModelSpec
from streamgpu.models.weights import HostWeights, WeightsReader
from streamgpu.protocol.wire import Status
from streamgpu.server import Server
from tests.test_isolation import cheap, run_queue_s
from tests.test_server import slow_batches

SHAPE = (16, 16, 3)
FEATURES = 6


def versioned(tmp: Path, value: float) -> str:
    """A ``state_dict:`` source of the small net whose every output is ``value``: versions tell apart."""
    module = SmallConvNet()
    with torch.no_grad():
        module.fc.weight.zero_()
        module.fc.bias.fill_(value)
    path = tmp / f"v{value:g}.pt"
    torch.save(module.state_dict(), path)
    return f"state_dict:{path}"


def spec(source: str, **kw: object) -> ModelSpec:
    base: dict[str, object] = dict(name="m", source=source, arch="small", input_shape=SHAPE, max_batch_size=4,
                                   batch_buckets=(1, 2, 4))  # fmt: skip
    base.update(kw)
    return ModelSpec(**base)  # type: ignore[arg-type]


def config(*models: ModelSpec, **kw: object) -> Config:
    base: dict[str, object] = dict(listeners=[ListenerSpec(port=0)], device="cpu", models=list(models),
                                   shutdown_timeout_s=20.0)  # fmt: skip
    base.update(kw)
    return Config(**base)  # type: ignore[arg-type]


@pytest_asyncio.fixture
async def served(tmp_path: Path) -> AsyncIterator[Server]:
    async with Server(config(spec(versioned(tmp_path, 1)))) as srv:
        yield srv
    assert srv.pool.slots_in_use == 0


def frames(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *SHAPE), dtype=np.uint8)


class Producer:
    """Streams frames on ``streams`` streams with ``window`` in flight until stopped; records every reply
    in the order it arrived, and the time each frame was sent."""

    def __init__(self, conn: client.Connection, model: str = "m", streams: int = 2, window: int = 8) -> None:
        self.conn, self.model, self.streams, self.window = conn, model, streams, window
        self.replies: dict[int, list[client.Reply]] = defaultdict(list)
        self.sent: dict[tuple[int, int], float] = {}
        self.running = True
        self._seq = 0

    async def run(self) -> None:
        data = frames(16)
        pending: set[asyncio.Future[client.Reply]] = set()
        while self.running or pending:
            while self.running and len(pending) < self.window:
                stream = self._seq % self.streams
                fut = self.conn.submit(data[self._seq % 16], model=self.model, stream_id=stream)
                self.sent[(stream, self._seq // self.streams)] = time.perf_counter()
                fut.add_done_callback(lambda f: self.replies[f.result().stream_id].append(f.result()))
                pending.add(fut)
                self._seq += 1
            _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)

    def check(self) -> list[client.Reply]:
        """Every frame answered, in order per stream; returns every reply."""
        total = sum(len(r) for r in self.replies.values())
        assert total == self._seq, (total, self._seq)
        for stream, replies in self.replies.items():
            first = replies[0].sequence
            assert [r.sequence for r in replies] == list(range(first, first + len(replies))), f"stream {stream}"
        return [r for replies in self.replies.values() for r in replies]


def value(reply: client.Reply) -> float:
    assert reply.ok and reply.result is not None, (reply.status, reply.message)
    return float(reply.result[0])


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
async def test_the_loop_gets_the_gil_quickly_while_a_model_loads(
    served: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A load runs seconds of Python in the loader thread; at Python's default 5 ms switch interval the
    # loop would wait that long for the GIL, in the p99 of every model serving meanwhile.
    during: list[float] = []

    def load_module(spec: ModelSpec) -> nn.Module:
        during.append(sys.getswitchinterval())
        return real_load_module(spec)

    real_load_module = manager.load_module
    monkeypatch.setattr(manager, "load_module", load_module)
    before = sys.getswitchinterval()
    await served.swap_model("m", spec(versioned(tmp_path, 2)))
    assert during and all(interval <= manager.LOADING_SWITCH_INTERVAL_S for interval in during)
    assert sys.getswitchinterval() == before


def recorded_at_read(monkeypatch: pytest.MonkeyPatch, value: Callable[[], Any]) -> list[Any]:
    """``value()`` in the thread that reads a new version's weights, at each read (``WeightsReader.read``)."""
    seen: list[Any] = []
    real_read = WeightsReader.read

    def read(*args: Any) -> HostWeights:
        seen.append(value())
        return real_read(*args)

    monkeypatch.setattr(WeightsReader, "read", read)
    return seen


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
async def test_a_swap_of_weights_in_place_keeps_the_processs_switch_interval(
    served: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its file is read by a process of its own and the loader thread runs little Python: the short interval only
    made the loop hand the GIL to its other threads more often (the p99 during ResNet-50 swaps 1.44-1.56x steady
    state with it, 1.10-1.26x without, H200)."""
    during = recorded_at_read(monkeypatch, sys.getswitchinterval)
    before = sys.getswitchinterval()
    await served.swap_model("m", spec(versioned(tmp_path, 2), weights_in_place=True))
    assert served.serving("m")[0].weights_version == 1  # type: ignore[index]
    assert during == [before] and before > manager.LOADING_SWITCH_INTERVAL_S


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
async def test_a_swap_of_weights_in_place_beside_frames_served_sets_no_profile_function(
    served: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A load is paced beside frames served by a profile function in the loader thread (``_yielding``), which on
    Python 3.12 and later runs every thread's code instrumented, the loop's 1.8x slower for as long as it is set;
    an in-place swap's loader thread mostly waits for the reader, so it is not paced."""
    profiles = recorded_at_read(monkeypatch, sys.getprofile)
    # (from Python 3.12 the pacing is a sys.monitoring watch of the thread, no profile function: ``_MonitoredCalls``)
    watched = recorded_at_read(monkeypatch, lambda: manager._CALLS is not None
                               and threading.get_ident() in manager._CALLS._watched)  # fmt: skip
    conn = await client.connect("127.0.0.1", served.port)
    producer = Producer(conn, window=4)
    streaming = asyncio.create_task(producer.run())
    await asyncio.sleep(0.1)
    assert manager.loading_pause_s(served.config.loader_share) > 0  # (a built-beside load would be paced)
    await served.swap_model("m", spec(versioned(tmp_path, 2), weights_in_place=True))
    producer.running = False
    await streaming
    assert all(r.ok for r in producer.check())
    await conn.close()
    assert served.serving("m")[0].weights_version == 1  # type: ignore[index]
    assert profiles == [None]
    assert watched == [False]


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
async def test_a_model_loaded_to_take_weights_in_place_starts_one_reader_for_all_its_swaps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reader process starts as the model loads (its start, an interpreter and torch's import, ~4 s of CPU
    beside the serving loop on an H200 host, was part of every swap), reads every swap's file, and ends with the
    server; the serving state's layout is made once."""
    pids = tmp_path / "readers"

    def module_command(module: str, *args: str) -> list[str]:  # the reader's, its pid written down as it starts
        return ["sh", "-c", f'echo $$ >> {pids}; exec "$0" "$@"', *real_module_command(module, *args)]

    real_module_command = weights.module_command
    monkeypatch.setattr(weights, "module_command", module_command)
    layouts: list[nn.Module] = []  # (a serving state's layout: ~8 ms of Python for a ResNet-50, once per instance)

    def layout_of(module: nn.Module) -> weights.WeightsLayout:
        layouts.append(module)
        return real_layout(module)

    real_layout = weights.WeightsLayout.of
    monkeypatch.setattr(weights.WeightsLayout, "of", layout_of)
    async with Server(config(spec(versioned(tmp_path, 1), weights_in_place=True))) as srv:
        ends = time.monotonic() + 10
        while not pids.exists() and time.monotonic() < ends:
            await asyncio.sleep(0.01)
        assert pids.exists(), "no reader started as the model loaded"
        conn = await client.connect("127.0.0.1", srv.port)
        for version in (2, 3):
            await srv.swap_model("m", spec(versioned(tmp_path, version), weights_in_place=True))
            assert value(await conn.infer(frames(1)[0], model="m")) == float(version)
        await conn.close()
        (reader,) = map(int, pids.read_text().split())
        assert srv.serving("m")[0].weights_version == 2 and _running(reader)  # type: ignore[index]
        assert len(layouts) == 1
    assert not _running(reader)  # (killed and reaped)


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
async def test_a_model_loads_and_serves_where_its_weights_reader_cannot_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reader's start as the model loads is ahead of time only: where it cannot start (here its output file:
    a full or read-only temporary folder; out of descriptors alike), the OSError failed the load, its instances
    built and never freed. The model serves; the swap says why no reader runs."""
    real_file = tempfile.TemporaryFile

    def temporary_file(*args: Any, **kw: Any) -> Any:
        if str(kw.get("prefix", "")).startswith("streamgpu-weights-reader"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_file(*args, **kw)

    monkeypatch.setattr(tempfile, "TemporaryFile", temporary_file)
    async with Server(config(spec(versioned(tmp_path, 1), weights_in_place=True))) as srv:
        conn = await client.connect("127.0.0.1", srv.port)
        assert value(await conn.infer(frames(1)[0], model="m")) == 1.0
        await conn.close()
        with pytest.raises(ModelLoadError, match=r"could not start: .*No space left on device"):
            await srv.swap_model("m", spec(versioned(tmp_path, 2), weights_in_place=True))


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
async def test_a_model_of_no_builtin_architecture_starts_no_reader_whatever_its_weights_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A TorchScript model's new versions are built beside it (its architecture is its file's): a reader started
    as it loaded with ``weights_in_place = true`` was an interpreter with torch imported, for as long as the server
    ran, that no swap would ask."""
    started: list[str] = []

    def module_command(module: str, *args: str) -> list[str]:
        started.append(module)
        return ["false"]

    monkeypatch.setattr(weights, "module_command", module_command)
    async with Server(config(cheap("m", tmp_path, SHAPE, weights_in_place=True))) as srv:
        assert srv.serving("m") is not None
    assert started == []


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
async def test_overlapping_loads_of_two_servers_in_one_process_put_the_switch_interval_back(
    served: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The switch interval is the process's, but each server counted its own loads: server A's load ending while
    # B's ran put Python's 5 ms back under B's load, and B's ending then left the process at 200 us for good.
    started = {"m": threading.Event(), "b": threading.Event()}
    go = {"m": threading.Event(), "b": threading.Event()}

    def load_module(model: ModelSpec) -> nn.Module:
        if model.name in started and model.source.endswith("v2.pt"):  # (the loads under test, not the starts)
            started[model.name].set()
            go[model.name].wait(10)
        return real_load_module(model)

    real_load_module = manager.load_module
    monkeypatch.setattr(manager, "load_module", load_module)
    before = sys.getswitchinterval()
    async with Server(config(spec(versioned(tmp_path, 1), name="b"))) as other:
        loop = asyncio.get_running_loop()
        first = asyncio.ensure_future(served.swap_model("m", spec(versioned(tmp_path, 2))))
        await loop.run_in_executor(None, started["m"].wait, 10)
        second = asyncio.ensure_future(other.swap_model("b", spec(versioned(tmp_path, 2), name="b")))
        await loop.run_in_executor(None, started["b"].wait, 10)
        go["m"].set()
        await first
        assert sys.getswitchinterval() <= manager.LOADING_SWITCH_INTERVAL_S  # b still loads
        go["b"].set()
        await second
    assert sys.getswitchinterval() == before


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
async def test_a_load_beside_serving_models_leaves_the_loop_most_of_the_gil(
    served: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A thread running Python beside the loop slows it out of proportion: a load's Python must pause itself while
    # frames are served, to take loader_share (1/8) of the time. Here the load is 0.3 s of pure Python.
    shares: list[float] = []

    def busy() -> None:
        pass

    def load_module(spec: ModelSpec) -> nn.Module:
        # The share of the time it could run (not counting the time other processes held the CPU: on a busy
        # 2-core CI machine that alone took a flat-out thread to 50 %)
        wall, cpu, waited = time.perf_counter(), time.thread_time(), run_queue_s()
        while time.perf_counter() - wall < 0.3:
            busy()
        runnable = time.perf_counter() - wall - (run_queue_s() - waited)
        shares.append((time.thread_time() - cpu) / runnable)
        return real_load_module(spec)

    real_load_module = manager.load_module
    monkeypatch.setattr(manager, "load_module", load_module)
    # Nothing in flight: nobody to leave the GIL to, the load runs flat out.
    await served.swap_model("m", spec(versioned(tmp_path, 2), compile="off"))
    assert shares[0] > 0.7, f"with nothing served, the loader ran {shares[0]:.0%} of the time"
    conn = await client.connect("127.0.0.1", served.port)
    producer = Producer(conn, window=16)
    streaming = asyncio.create_task(producer.run())
    await asyncio.sleep(0.1)
    await served.swap_model("m", spec(versioned(tmp_path, 3), compile="off"))
    # (~0.10 measured; the former fixed 2 ms pause, a third of the time, ran 0.27-0.28: loader_share must count)
    assert shares[1] < 0.2, f"beside frames served, the loader ran {shares[1]:.0%} of the time"
    # A compiling load is paced too: unpaced, an architecture compiled under load took the p99 of the model
    # serving beside it to 10.5x steady state for the 29 s it took (H100, docs/BENCHMARKS.md).
    await served.swap_model("m", spec(versioned(tmp_path, 4), compile="auto"))
    assert shares[2] < 0.2, f"the compiling load ran {shares[2]:.0%} of the time beside frames served"
    producer.running = False
    await streaming
    assert all(r.ok for r in producer.check())
    await conn.close()
    assert sys.getprofile() is None


@pytest.mark.parametrize("in_place", [False, True], ids=["built beside", "weights in place"])
@pytest.mark.asyncio
async def test_swap_and_unload_while_a_producer_streams(served: Server, tmp_path: Path, in_place: bool) -> None:
    conn = await client.connect("127.0.0.1", served.port)
    producer = Producer(conn)
    task = asyncio.create_task(producer.run())
    await asyncio.sleep(0.2)
    for version in (2, 3):
        swap_started = time.perf_counter()
        state = await served.swap_model("m", spec(versioned(tmp_path, version), weights_in_place=in_place))
        assert state.version == version and state.state == "READY"
        swapped = time.perf_counter()
        await asyncio.sleep(0.2)
        # Frames sent after the swap returned ran on the new version; the old version had served before it.
        after = [(s, q) for (s, q), t in producer.sent.items() if t > swapped]
        before = [(s, q) for (s, q), t in producer.sent.items() if t < swap_started]
        assert after and before
    producer.running = False
    await task
    replies = producer.check()
    assert all(r.ok for r in replies), {r.status for r in replies}
    for stream_replies in producer.replies.values():  # in order per stream, versions never go back
        values = [value(r) for r in stream_replies]
        assert values == sorted(values) and set(values) == {1.0, 2.0, 3.0}, sorted(set(values))
        # each frame ran on one version's weights whole (a copy in the middle of its batch would mix them)
        assert all(len(set(r.result.tolist())) == 1 for r in stream_replies if r.result is not None)
    assert served.model_index() == [{"name": "m", "version": "3", "state": "READY", "reason": ""}]

    # Unload while streaming: queued frames finish, then UNKNOWN_MODEL; nothing is lost.
    producer = Producer(conn)
    task = asyncio.create_task(producer.run())
    await asyncio.sleep(0.1)
    await served.unload_model("m")
    await asyncio.sleep(0.05)
    producer.running = False
    await task
    producer.check()
    for stream_replies in producer.replies.values():  # per stream: results, then refusals
        statuses = [r.status for r in stream_replies]
        first_refused = statuses.index(Status.UNKNOWN_MODEL)
        assert first_refused > 0 and set(statuses[:first_refused]) == {Status.OK}
        assert set(statuses[first_refused:]) == {Status.UNKNOWN_MODEL}
    assert served.model_index()[0]["state"] == "UNAVAILABLE"
    with pytest.raises(ModelNotFoundError):
        await served.unload_model("m")
    with pytest.raises(ModelNotFoundError):
        await served.swap_model("m", spec(versioned(tmp_path, 4)))
    # Loaded again under the same name: version 4.
    assert (await served.load_model(spec(versioned(tmp_path, 4)))).version == 4
    assert value(await conn.infer(frames(1)[0], model="m")) == 4.0
    await conn.close()


@pytest.mark.parametrize(("swap_queued", "in_place"), [("new", False), ("received", False), ("new", True)])
@pytest.mark.asyncio
async def test_frames_queued_at_a_swap_run_on_the_version_configured_and_unload_drains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, swap_queued: str, in_place: bool
) -> None:
    original = CpuModel.run
    pause = 0.3 if in_place else 0.03

    def slow(self: CpuModel, batch: np.ndarray) -> BatchOutputs:
        # In the worker thread: frames stay queued while the new version loads (in place, its file is read by a
        # process of its own, started for it: seconds; once it is in, 0.03 s keeps the unload's frames queued)
        time.sleep(pause)
        return original(self, batch)

    monkeypatch.setattr(CpuModel, "run", slow)
    # The load unpaced (loader_share 1): paced, it could outlast the 0.36 s (in place 3.6 s) the queued frames take.
    async with Server(config(spec(versioned(tmp_path, 1)), loader_share=1.0)) as srv:
        conn = await client.connect("127.0.0.1", srv.port)
        futs = [conn.submit(f, model="m", stream_id=i % 3) for i, f in enumerate(frames(48))]
        while srv.metrics()["frames_in_flight"] < 48:
            await asyncio.sleep(0.005)
        new = spec(versioned(tmp_path, 2), swap_queued=swap_queued, weights_in_place=in_place)
        await srv.swap_model("m", new)
        pause = 0.03
        values = [value(await fut) for fut in futs]
        assert values[0] == 1.0  # in flight at the swap
        if swap_queued == "received":
            assert set(values) == {1.0}, values
        else:
            assert set(values) == {1.0, 2.0} and values == sorted(values), values
        assert value(await conn.infer(frames(1)[0], model="m")) == 2.0
        # Unload drains: every frame queued when it began runs; the next one is refused.
        futs = [conn.submit(f, model="m", stream_id=i % 3) for i, f in enumerate(frames(24))]
        while srv.metrics()["frames_in_flight"] < 24:
            await asyncio.sleep(0.005)
        assert srv.metrics()["models"]["m"]["queue_length"] > 8
        await srv.unload_model("m")
        assert [value(await fut) for fut in futs] == [2.0] * 24
        assert (await conn.infer(frames(1)[0], model="m")).status == Status.UNKNOWN_MODEL
        await conn.close()


@pytest.mark.parametrize("in_place", [False, True], ids=["built beside", "weights in place"])
@pytest.mark.asyncio
async def test_a_stop_during_a_swap_answers_the_frames_still_running_on_the_old_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, in_place: bool
) -> None:
    """The scheduler counted only the new version's batches as in flight: a stop right after the switch found
    it idle, closed the connections and the frame in the old version's batch was never answered. (In place, the
    copy waits behind that batch on the model's thread: the stop drains it, the copy runs, the swap returns.)"""
    # The first batch runs until released: past the switch (the new version loads meanwhile; in place, its file is
    # read by a process of its own, started for it), and past the time a stop that does not wait for it takes.
    released = threading.Event()
    original = CpuModel.run
    calls = 0

    def held(self: CpuModel, batch: np.ndarray) -> BatchOutputs:
        nonlocal calls
        calls += 1
        if calls == 1:
            released.wait(30)
        return original(self, batch)

    monkeypatch.setattr(CpuModel, "run", held)
    srv = Server(config(spec(versioned(tmp_path, 1)), watchdog_min_s=10.0))
    await srv.start()
    try:
        conn = await client.connect("127.0.0.1", srv.port)
        running = conn.submit(frames(1)[0], model="m")
        while srv.metrics()["frames_in_flight"] < 1:
            await asyncio.sleep(0.005)
        old = srv.serving("m")
        assert old is not None
        swap = asyncio.create_task(srv.swap_model("m", spec(versioned(tmp_path, 2), weights_in_place=in_place)))
        while srv.serving("m") is old and old[0].weights_version == 0:  # switched: the old version's batch runs on
            await asyncio.sleep(0.005)
        assert srv.metrics()["models"]["m"]["in_flight_batches"] == 1
        stop = asyncio.create_task(srv.stop())
        await asyncio.wait([stop], timeout=0.5)  # (one that finds the scheduler idle closes the connections at once)
    finally:
        released.set()
    await stop
    assert value(await running) == 1.0
    assert (await asyncio.wait_for(swap, 10)).version == 2
    await conn.close()


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
async def test_a_stop_while_a_swaps_weights_are_read_ends_their_reader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reader runs in a session of its own (a Ctrl-C is the server's): a server stopped while it read left
    it reading, its exit waiting in the loader thread for as long (forever for a reader that hung), and a
    server killed then left it behind."""
    started = tmp_path / "reader.pid"
    program = f"import os, time; open({str(started)!r}, 'x').write(str(os.getpid())); time.sleep(60)"
    monkeypatch.setattr(weights, "module_command", lambda *args: [sys.executable, "-c", program])
    srv = Server(config(spec(versioned(tmp_path, 1))))
    await srv.start()
    swap = asyncio.create_task(srv.swap_model("m", spec(versioned(tmp_path, 2), weights_in_place=True)))
    while not started.exists() or not started.read_text():
        await asyncio.sleep(0.01)
    reader = int(started.read_text())
    try:
        await srv.stop()
        with pytest.raises(ModelLoadError, match="the server stopped while it loaded"):
            await swap
        ends = time.monotonic() + 5.0
        while _running(reader) and time.monotonic() < ends:
            await asyncio.sleep(0.01)
        assert not _running(reader)  # (killed and reaped)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(reader, signal.SIGKILL)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def built_modules(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The sources of the modules the loader builds from now on."""
    built: list[str] = []
    real_load_module = manager.load_module

    def load_module(model: ModelSpec) -> nn.Module:
        built.append(model.source)
        return real_load_module(model)

    monkeypatch.setattr(manager, "load_module", load_module)
    return built


@pytest.mark.asyncio
async def test_a_version_that_only_brings_new_weights_takes_the_serving_models_place_by_them(
    served: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """No module is built, warmed or captured: the weights are read, checked, and copied into the serving
    instances between two batches; the index counts a version, and a stop-free swap frees nothing."""
    built = built_modules(monkeypatch)
    conn = await client.connect("127.0.0.1", served.port)
    before = served.serving("m")
    assert before is not None
    instances = list(before)
    new = spec(versioned(tmp_path, 2), weights_in_place=True)
    with caplog.at_level(logging.INFO, logger="streamgpu"):
        state = await served.swap_model("m", new)
    assert built == []
    assert served.serving("m") == instances and [m.weights_version for m in instances] == [1]
    assert instances[0].spec == new and served.served("m") == (new, 2) and state.version == 2
    assert "v2.pt" in instances[0].description
    assert any("its weights copied in place" in r.getMessage() for r in caplog.records)
    assert value(await conn.infer(frames(1)[0], model="m")) == 2.0
    assert served.model_index() == [{"name": "m", "version": "2", "state": "READY", "reason": ""}]
    # the serving version is the one compared with: a third version of other settings is built beside it
    await served.swap_model("m", spec(versioned(tmp_path, 3), max_queue_delay_ms=5.0, weights_in_place=True))
    assert built == [versioned(tmp_path, 3)] and served.serving("m") != instances
    assert value(await conn.infer(frames(1)[0], model="m")) == 3.0
    await conn.close()


@pytest.mark.parametrize(
    "settings",
    [
        {"weights_in_place": False},
        {"swap_queued": "received"},
        {"max_batch_size": 2, "batch_buckets": (1, 2)},
        {"arch": "resnet18"},
    ],
    ids=["off", "swap_queued received", "other settings", "another architecture"],
)
@pytest.mark.asyncio
async def test_a_version_that_differs_in_more_than_its_weights_is_built_beside_the_serving_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, settings: dict[str, object]
) -> None:
    async with Server(config(spec(versioned(tmp_path, 1), weights_in_place=True))) as srv:
        before = srv.serving("m")
        built = built_modules(monkeypatch)
        source = versioned(tmp_path, 2)
        if settings.get("arch") == "resnet18":  # (the small net's weights would not fit it)
            source = f"state_dict:{tmp_path / 'r18.pt'}"
            torch.save(build_builtin("resnet18").state_dict(), tmp_path / "r18.pt")
        await srv.swap_model("m", spec(source, **{"weights_in_place": True, **settings}))
        assert built == [source] and srv.serving("m") != before


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ("shape", "entry 'fc.weight' of the new weights has shape [10, 128], the serving model's [1000, 128]"),
        ("missing", "1 entries missing ['fc.bias'], 0 unexpected []"),
        ("dtype", "entry 'features.1.num_batches_tracked' of the new weights is torch.float32, the serving model's "
                  "torch.int64"),
        ("not a tensor", "entry 'fc.bias' of the new weights is a int, not a tensor"),
        ("not a file", "is not a regular file"),
        # (its copy failed at the swap, the entries before it copied: index READY, version 2, a mix of weights)
        ("sparse", "entry 'fc.bias' of the new weights is a torch.sparse_coo tensor on cpu"),
    ],
)  # fmt: skip
@pytest.mark.asyncio
async def test_new_weights_that_do_not_fit_are_refused_and_the_serving_version_serves_on(
    served: Server, tmp_path: Path, change: str, expected: str
) -> None:
    weights: dict[str, Any] = SmallConvNet().state_dict()
    if change == "shape":
        weights["fc.weight"] = torch.zeros(10, 128)
    elif change == "missing":
        del weights["fc.bias"]
    elif change == "dtype":
        weights["features.1.num_batches_tracked"] = torch.tensor(0.0)
    elif change == "not a tensor":
        weights["fc.bias"] = 7
    elif change == "sparse":
        weights["fc.bias"] = weights["fc.bias"].to_sparse()
    path = tmp_path / "bad.pt"
    if change == "not a file":
        os.mkfifo(path)
    else:
        torch.save(weights, path)
    with pytest.raises(ModelLoadError) as refused:
        await served.swap_model("m", spec(f"state_dict:{path}", weights_in_place=True))
    assert expected in str(refused.value)
    conn = await client.connect("127.0.0.1", served.port)
    assert value(await conn.infer(frames(1)[0], model="m")) == 1.0
    (entry,) = served.model_index()
    assert entry["version"] == "1" and entry["state"] == "READY" and expected in entry["reason"]
    await conn.close()


@pytest.mark.asyncio
async def test_a_copy_that_fails_at_the_swap_is_told_and_the_next_version_copies_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy into one of two instances fails halfway (a device error): the swap raised what failed, not a
    ModelLoadError, and the index said version 2 READY, no reason, over instances on a mix of weights."""
    real_copy = StagedWeights.copy
    copies = 0

    def copy(staged: StagedWeights) -> None:
        nonlocal copies
        copies += 1
        if copies == 2:
            live, values = staged.groups[0]
            torch._foreach_copy_(live[:4], values[:4])  # (some tensors copied)
            raise RuntimeError("device lost")
        real_copy(staged)

    monkeypatch.setattr(StagedWeights, "copy", copy)
    async with Server(config(spec(versioned(tmp_path, 1), instances=2))) as srv:
        with pytest.raises(ModelLoadError, match="version 2's weights failed to copy in place") as failed:
            await srv.swap_model("m", spec(versioned(tmp_path, 2), instances=2, weights_in_place=True))
        assert "mix of two versions' weights" in str(failed.value) and "RuntimeError: device lost" in str(failed.value)
        (entry,) = srv.model_index()
        assert entry["version"] == "2" and "failed to copy in place" in entry["reason"]
        state = await srv.swap_model("m", spec(versioned(tmp_path, 3), instances=2, weights_in_place=True))
        assert state.version == 3 and srv.model_index()[0]["reason"] == ""
        conn = await client.connect("127.0.0.1", srv.port)
        assert {value(r) for r in await asyncio.gather(*(conn.infer(f, model="m") for f in frames(8)))} == {3.0}
        await conn.close()


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
async def test_a_version_swapped_out_is_not_held_by_frames_pinned_to_it_that_left_the_queue(
    heap_owned_by_the_server: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Frames queued at a swap with swap_queued = "received" are pinned to the old version; those that left the
    queue otherwise (deadline passed, producer gone) stayed pinned, holding the old version's module (its
    weights) and the frames after the swap returned, until the model's next frame came, if ever."""
    slow_batches(monkeypatch, 1.0)
    one = {"max_batch_size": 1, "batch_buckets": (1,)}
    async with Server(config(spec(versioned(tmp_path, 1), **one), max_inflight_batches=1)) as srv:
        conn = await client.connect("127.0.0.1", srv.port)
        # Queued (pinned) at the swap, which takes well under 0.6 s; they pass their deadline behind the first
        futs = [conn.submit(f, model="m", deadline=0.6 if i else None) for i, f in enumerate(frames(4))]
        while srv.metrics()["frames_in_flight"] < 4:
            await asyncio.sleep(0.005)
        module = weakref.ref(srv.serving("m")[0].module)  # type: ignore[index]
        await srv.swap_model("m", spec(versioned(tmp_path, 2), swap_queued="received", **one))
        assert [(await f).status for f in futs] == [Status.OK] + [Status.DEADLINE_MISSED] * 3
        # The loader thread's work item of the free holds its arguments until that thread next runs: on a loaded
        # machine, a moment after the swap returned (a pinned frame held it until the model's next frame came)
        for _ in range(100):
            gc.collect()
            if module() is None:
                break
            await asyncio.sleep(0.02)
        assert module() is None
        await conn.close()


@pytest.mark.asyncio
async def test_bad_sources_are_refused_and_the_model_keeps_serving(served: Server, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pt2"
    garbage.write_bytes(b"not a model" * 10)
    conn = await client.connect("127.0.0.1", served.port)
    producer = Producer(conn)
    task = asyncio.create_task(producer.run())
    bad = [
        spec("export:" + str(tmp_path / "missing.pt2")),
        spec("export:" + str(garbage)),
        spec(versioned(tmp_path, 2), input_shape=(8, 8, 3)),  # a new version must take the same frames
    ]
    for source in bad:
        with pytest.raises(ModelLoadError, match="'m'") as refused:
            await served.swap_model("m", source)
        # the index says why (a refusal of other frames left the previous failure's reason there)
        entry = served.model_index()[0]
        assert entry["state"] == "READY" and entry["reason"].endswith(str(refused.value)), entry
        assert entry["reason"].startswith("version 2 failed to load (1 serves): ")
    with pytest.raises(ModelLoadError, match="'other'"):  # a new name that fails (no repository) is not listed
        await served.load_model(spec("export:" + str(garbage), name="other"))
    producer.running = False
    await task
    assert {value(r) for r in producer.check()} == {1.0}
    assert {e["name"]: e["state"] for e in served.model_index()} == {"m": "READY"}
    await conn.close()


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
async def test_a_load_is_checked_against_the_server_settings_as_the_config_models_are(served: Server) -> None:
    """The config refuses a model whose frames exceed max_payload_bytes (none could ever be taken: each is
    refused TOO_LARGE) or whose max_queue one connection could fill; a load while serving took both, warming
    up 200 MB frames at every bucket."""
    too_large = spec("builtin:small", name="big", arch="", input_shape=(8192, 8192, 3))
    with pytest.raises(ModelLoadError, match=r"model 'big' frames \(201326592 bytes\) exceed max_payload_bytes"):
        await served.load_model(too_large)
    with pytest.raises(ModelLoadError, match=r"max_frames_per_connection \(256\) must be below model 'm''s max_q"):
        await served.swap_model("m", spec("builtin:small", arch="", max_queue=8))
    assert {e["name"]: e["state"] for e in served.model_index()} == {"m": "READY"}  # (big never loaded)


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
async def test_a_load_whose_batch_cannot_fit_the_ring_is_refused_naming_the_setting(tmp_path: Path) -> None:
    """A batch's frames are in the ring together, so no batch of more frames than it holds can form; a load
    took any max_batch_size (a typo's 1000000, max_queue as large) and allocated its batch buffers for it,
    warming up a batch that size (or failing deep in torch, out of memory)."""
    async with Server(config(spec(versioned(tmp_path, 1)), ring_bytes=1 << 20, max_payload_bytes=1 << 16)) as srv:
        huge = spec("builtin:small", name="huge", arch="", max_batch_size=2048, max_queue=4096, batch_buckets=(1,))
        refused = r"max_batch_size \(2048\) frames of 768 bytes take 1572864 bytes .*\(1048576\).*at most 1365 or"
        with pytest.raises(ModelLoadError, match=refused):
            await srv.load_model(huge)
        assert srv.model_index() == [{"name": "m", "version": "1", "state": "READY", "reason": ""}]
        await srv.load_model(dataclasses.replace(huge, max_batch_size=1365))  # as the message says


class Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(FEATURES, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class Flattens(nn.Module):
    """Hard-codes a batch of 1 (a reshape to [1, -1]): what a model exported with a static batch does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(1, -1) * 2


class Affinity(nn.Module):
    """Each frame against every frame of its batch: a per-frame output of [n], n the batch size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ x.t()


class Spectrum(nn.Module):
    """A complex output, which no wire dtype carries."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fft.rfft(x)


class Detector(nn.Module):
    """Several outputs, as detection models return them."""

    def __init__(self, as_dict: bool) -> None:
        super().__init__()
        self.as_dict = as_dict

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | dict[str, torch.Tensor]:
        boxes = x[:, :4] * 2
        labels = (x[:, :2] > 0).to(torch.int64)
        return {"boxes": boxes, "labels": labels} if self.as_dict else (boxes, labels)


def export(module: nn.Module, path: Path) -> str:
    shapes = {"x": {0: torch.export.Dim("batch", min=1, max=64)}}
    torch.export.save(torch.export.export(module, (torch.zeros(2, FEATURES),), dynamic_shapes=shapes), str(path))
    return f"export:{path}"


def tensor_spec(source: str, name: str, **kw: object) -> ModelSpec:
    base: dict[str, object] = dict(name=name, source=source, input_shape=(FEATURES,), input_dtype="float32",
                                   preprocess="none", max_batch_size=4, batch_buckets=(1, 2, 4))  # fmt: skip
    return ModelSpec(**{**base, **kw})  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Model files, made once (torch.export is slow): the sources tests load."""
    tmp = tmp_path_factory.mktemp("models")
    static = tmp / "static.pt2"
    torch.export.save(torch.export.export(Linear(), (torch.zeros(1, FEATURES),)), str(static))  # batch fixed at 1
    flat = tmp / "flat.ts"
    torch.jit.save(torch.jit.script(Flattens()), str(flat))
    affinity = tmp / "affinity.ts"
    torch.jit.save(torch.jit.script(Affinity()), str(affinity))
    spectrum = tmp / "spectrum.ts"
    torch.jit.save(torch.jit.script(Spectrum()), str(spectrum))
    return {
        "static": f"export:{static}", "flat": f"torchscript:{flat}", "linear": export(Linear(), tmp / "lin.pt2"),
        "affinity": f"torchscript:{affinity}", "spectrum": f"torchscript:{spectrum}",
        "tuple": export(Detector(False), tmp / "t.pt2"), "dict": export(Detector(True), tmp / "d.pt2"),
    }  # fmt: skip


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
async def test_a_static_batch_export_and_a_wrong_input_shape_are_refused_at_load(
    served: Server, files: dict[str, str]
) -> None:
    with pytest.raises(ModelLoadError, match=r"'static'.*fails at batch size 2.*static.*max_batch_size = 1"):
        await served.load_model(tensor_spec(files["static"], "static"))
    with pytest.raises(ModelLoadError, match=r"'flat'.*fails at batch size 2.*not a batch of 2 first"):
        await served.load_model(tensor_spec(files["flat"], "flat"))
    with pytest.raises(
        ModelLoadError, match=r"'affinity'.*per-frame outputs.*change with the batch size.*\[1\].*\[2\]"
    ):
        await served.load_model(tensor_spec(files["affinity"], "affinity"))
    with pytest.raises(ModelLoadError, match=r"'spectrum'.*complex64.*replies cannot carry"):
        await served.load_model(tensor_spec(files["spectrum"], "spectrum"))
    wrong = tensor_spec(files["linear"], "wrong", input_shape=(FEATURES + 1,))
    with pytest.raises(ModelLoadError, match=r"'wrong'.*smallest bucket.*check that input_shape"):
        await served.load_model(wrong)
    assert "static" not in {e["name"] for e in served.model_index()}  # (never loaded, in no repository)
    await served.load_model(tensor_spec(files["static"], "static", max_batch_size=1))  # as the hint says


@pytest.mark.asyncio
async def test_tuple_and_dict_outputs_end_to_end(files: dict[str, str]) -> None:
    models = [tensor_spec(files["tuple"], "tuple"), tensor_spec(files["dict"], "dict")]
    x = np.random.default_rng(3).standard_normal((5, FEATURES)).astype(np.float32)
    boxes, labels = x[:, :4] * 2, (x[:, :2] > 0).astype(np.int64)
    async with Server(config(*models)) as srv:
        conn = await client.connect("127.0.0.1", srv.port)
        replies = await asyncio.gather(*(conn.submit(row, model="tuple") for row in x))
        for i, reply in enumerate(replies):
            assert isinstance(reply.outputs, tuple) and len(reply.outputs) == 2
            np.testing.assert_allclose(reply.outputs[0], boxes[i], rtol=1e-6)
            np.testing.assert_array_equal(reply.outputs[1], labels[i])
            assert reply.outputs[1].dtype == np.int64 and reply.result is not None
        replies = await asyncio.gather(*(conn.submit(row, model="dict") for row in x))
        for i, reply in enumerate(replies):
            assert isinstance(reply.outputs, dict) and list(reply.outputs) == ["boxes", "labels"]
            np.testing.assert_allclose(reply.outputs["boxes"], boxes[i], rtol=1e-6)
            np.testing.assert_array_equal(reply.outputs["labels"], labels[i])
        await conn.close()
        # Protocol v1 cannot carry several tensors: the first output, and a message saying so.
        v1 = await client.connect("127.0.0.1", srv.port, protocol_version=1)
        reply = await v1.infer(x[0], model="dict")
        assert reply.ok and reply.outputs is None and reply.result is not None
        np.testing.assert_allclose(reply.result, boxes[0], rtol=1e-6)
        assert "protocol v1 carries only the first ('boxes')" in reply.message
        await v1.close()


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
async def test_topk_postprocess_returns_indices_and_scores(files: dict[str, str]) -> None:
    full = spec("builtin:small", name="full", arch="")
    top = spec("builtin:small", name="top", arch="", postprocess="topk:5")
    data = frames(6, seed=4)
    with torch.inference_mode():
        logits = build_builtin("small")(preprocess_torch(torch.from_numpy(data), full, torch.float32)).numpy()
    async with Server(config(full, top)) as srv:
        conn = await client.connect("127.0.0.1", srv.port)
        replies = await asyncio.gather(*(conn.submit(f, model="top") for f in data))
        for row, reply in zip(logits, replies, strict=True):
            assert isinstance(reply.outputs, dict) and set(reply.outputs) == {"indices", "scores"}
            indices, scores = reply.outputs["indices"], reply.outputs["scores"]
            assert indices.dtype == np.int32 and indices.shape == (5,) and scores.shape == (5,)
            np.testing.assert_array_equal(indices, np.argsort(-row)[:5])
            np.testing.assert_allclose(scores, row[indices], rtol=1e-5, atol=1e-6)
        await conn.close()

    async with Server(config(full)) as srv:
        with pytest.raises(ModelLoadError, match=r"'bad'.*topk:5.*one \[batch, classes\] output"):
            await srv.load_model(tensor_spec(files["tuple"], "bad", postprocess="topk:5"))


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
@pytest.mark.parametrize("weights", ["weights.pt", "1/weights.pt"])
async def test_the_repository_poll_loads_swaps_and_unloads(tmp_path: Path, weights: str) -> None:
    """A model folder's new files load a new version, in a subfolder too (a relative source there was never seen
    to change: the signature held the folder's own files only)."""
    repo = tmp_path / "repo"
    (repo / "cam" / "1").mkdir(parents=True)
    shutil.copy(versioned(tmp_path, 1).partition(":")[2], repo / "cam" / weights)
    settings = f'source = "state_dict:{weights}"\narch = "small"\ninput_shape = [16, 16, 3]\nmax_batch_size = 2\n'
    (repo / "cam" / "config.toml").write_text(settings)
    cfg = config(spec("builtin:small", name="fixed", arch=""), model_repository=str(repo), repository_poll_s=0.05)
    async with Server(cfg) as srv:
        conn = await client.connect("127.0.0.1", srv.port)
        assert value(await conn.infer(frames(1)[0], model="cam")) == 1.0  # loaded at start
        (repo / "new").mkdir()
        (repo / "new" / "config.toml").write_text('source = "builtin:small"\ninput_shape = [16, 16, 3]\n')
        shutil.copy(versioned(tmp_path, 2).partition(":")[2], repo / "cam" / weights)  # a new version

        async def until(check: object) -> None:
            deadline = time.monotonic() + 10
            while not check():  # type: ignore[operator]
                assert time.monotonic() < deadline, srv.model_index()
                await asyncio.sleep(0.02)

        await until(lambda: {e["name"]: e["version"] for e in srv.model_index()}.get("cam") == "2")
        await until(lambda: "new" in srv.model_specs)
        assert value(await conn.infer(frames(1)[0], model="cam")) == 2.0
        assert (await conn.infer(frames(1)[0], model="new")).ok
        shutil.rmtree(repo / "new")
        await until(lambda: "new" not in srv.model_specs)
        assert (await conn.infer(frames(1)[0], model="new")).status == Status.UNKNOWN_MODEL
        assert "fixed" in srv.model_specs  # config models are the repository's to load, not to unload
        await conn.close()


async def answers_ok(srv: Server, model: str) -> None:
    """A frame to ``model`` over TCP gets an OK reply."""
    conn = await client.connect("127.0.0.1", srv.port)
    reply = await conn.infer(frames(1)[0], model=model)
    await conn.close()
    assert reply.ok, (reply.status, reply.message)


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
async def test_a_model_the_repository_loads_while_the_ingest_workers_start_is_theirs_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The poller ran from before the listeners started; a model it loaded after the ingest workers were spawned
    (with the models of then) and before their listener was up was announced to the listeners up, not to them:
    its frames through the workers were UNKNOWN_MODEL until some later load or unload."""
    from streamgpu.ingest.workers import WorkerListener

    repo = tmp_path / "repo"
    repo.mkdir()
    ready = WorkerListener._await_ready

    async def ready_then_a_model_appears(self: WorkerListener, worker: Any) -> None:
        await ready(self, worker)  # spawned, with the models served now
        (repo / "late").mkdir()
        (repo / "late" / "config.toml").write_text('source = "builtin:small"\ninput_shape = [16, 16, 3]\n')
        for _ in range(200):  # the poller's chance to load it, if it runs
            if "late" in self.admission.specs:
                break
            await asyncio.sleep(0.01)

    monkeypatch.setattr(WorkerListener, "_await_ready", ready_then_a_model_appears)
    cfg = config(spec(versioned(tmp_path, 1)), model_repository=str(repo), repository_poll_s=0.05, ingest_workers=1)
    async with Server(cfg) as srv:
        deadline = time.monotonic() + 10
        while "late" not in srv.model_specs:
            assert time.monotonic() < deadline, srv.model_index()
            await asyncio.sleep(0.02)
        await answers_ok(srv, "late")


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
async def test_a_model_loaded_through_the_api_while_the_server_starts_reaches_its_ingest_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A load asked while start() still starts the listeners (their ingest workers spawned with the models of
    then) waits for start() to end, so that every listener learns of it: it was announced to the listeners up
    then, and its frames through the workers were UNKNOWN_MODEL. Before start(), such a call says so."""
    from streamgpu.errors import ServerNotStartedError
    from streamgpu.ingest.workers import WorkerListener

    srv = Server(config(spec(versioned(tmp_path, 1)), ingest_workers=1))
    with pytest.raises(ServerNotStartedError, match="start"):
        await srv.load_model(spec("builtin:small", name="early"))
    ready = WorkerListener._await_ready
    loads: list[asyncio.Task[Any]] = []

    async def ready_then_a_load(self: WorkerListener, worker: Any) -> None:
        await ready(self, worker)  # spawned, with the models served now
        loads.append(asyncio.create_task(srv.load_model(spec("builtin:small", name="late"))))
        await asyncio.sleep(0.5)  # (time for a load not held back to run)

    monkeypatch.setattr(WorkerListener, "_await_ready", ready_then_a_load)
    async with srv:
        await loads[0]
        await answers_ok(srv, "late")


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
async def test_a_load_asked_over_http_while_the_server_fails_to_start_is_answered_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A load waiting for start() (the HTTP listener up, the next one starting) was woken only after the failed
    start had closed the listeners, whose close waited a grace second for that very handler, then cut it: the
    client got no reply (ServerDisconnectedError after 1.5 s). It gets a 400 saying the server failed to start."""
    import aiohttp

    from streamgpu.ingest.http import HttpListener
    from streamgpu.ingest.tcp import TcpListener

    srv = Server(config(spec(versioned(tmp_path, 1)), listeners=[ListenerSpec(kind="http", port=0), ListenerSpec()]))
    ports: list[int] = []
    http_start = HttpListener.start

    async def http_up(self: HttpListener) -> None:
        await http_start(self)
        ports.append(self.addresses[0][1])

    async def tcp_fails(self: TcpListener) -> None:
        await asyncio.sleep(0.3)
        raise OSError("no room")

    monkeypatch.setattr(HttpListener, "start", http_up)
    monkeypatch.setattr(TcpListener, "start", tcp_fails)
    starting = asyncio.create_task(srv.start())
    while not ports:
        await asyncio.sleep(0.005)
    stopping = asyncio.create_task(srv.stop())  # (returns once the failed start has released what it took)
    load = {"parameters": {"config": {"source": "builtin:small", "input_shape": [16, 16, 3]}}}
    async with aiohttp.ClientSession() as http:
        r = await http.post(f"http://127.0.0.1:{ports[0]}/v2/repository/models/x/load", json=load)
        assert r.status == 400 and "failed to start" in (await r.json())["error"]
    await stopping
    assert starting.done() and srv.backend is None
    with pytest.raises(OSError, match="no room"):
        await starting


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
async def test_a_stop_asked_while_the_server_starts_stops_it_once_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """stop() while start() still started the listeners returned at once and did nothing: start() then ended
    and the server served on, its port bound, after stop() had returned (and a load waiting for start() with
    it). It waits for start() to end, as a load does, then stops."""
    from streamgpu.ingest.tcp import TcpListener

    srv = Server(config(spec(versioned(tmp_path, 1))))
    ports: list[int] = []
    start = TcpListener.start

    async def slow_start(self: TcpListener) -> None:
        await start(self)
        ports.append(self.addresses[0][1])
        await asyncio.sleep(0.2)

    monkeypatch.setattr(TcpListener, "start", slow_start)
    starting = asyncio.create_task(srv.start())
    while not ports:
        await asyncio.sleep(0.005)
    waiting = asyncio.create_task(srv.load_model(spec("builtin:small", name="late")))
    await srv.stop()
    assert starting.done() and not srv.started
    with pytest.raises(ModelLoadError, match="stopped"):
        await waiting
    with pytest.raises(OSError):
        await client.connect("127.0.0.1", ports[0])
    await starting


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
async def test_a_repository_folder_whose_settings_are_refused_is_listed_with_why(tmp_path: Path) -> None:
    """MODELS.md: a model that fails to load is listed UNAVAILABLE with the reason (or its current version keeps
    serving). One whose config.toml was refused was only logged: absent from the index, or listed as serving
    with no word of the new version refused."""
    repo = tmp_path / "repo"
    for name in ("bad", "cam"):
        (repo / name).mkdir(parents=True)
    (repo / "bad" / "config.toml").write_text('source = "builtin:small"\nmax_batch_size = "x"\n')
    (repo / "cam" / "config.toml").write_text('source = "builtin:small"\ninput_shape = [16, 16, 3]\n')
    async with Server(config(model_repository=str(repo), repository_poll_s=0.05)) as srv:
        index = {e["name"]: e for e in srv.model_index()}
        assert index["bad"]["state"] == "UNAVAILABLE" and "max_batch_size must be an integer" in index["bad"]["reason"]
        assert index["cam"]["state"] == "READY"
        (repo / "cam" / "config.toml").write_text('source = "builtin:small"\ncolour = 1\n')
        deadline = time.monotonic() + 10
        while "colour" not in (cam := {e["name"]: e for e in srv.model_index()}["cam"])["reason"]:
            assert time.monotonic() < deadline, cam
            await asyncio.sleep(0.02)
        assert cam["state"] == "READY" and cam["reason"].startswith("version 2 failed to load (1 serves): "), cam
        assert "cam" in srv.model_specs


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
async def test_a_repository_folder_whose_name_would_fake_log_lines_is_not_served(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A model's name goes into log lines, so over HTTP one with a line break is refused; a repository folder
    so named was loaded and logged as is (a forged line in the server's log)."""
    repo = tmp_path / "repo"
    for name in ("cam\n2026-11-27 INFO streamgpu: forged", "cam\u2028x", "cam"):
        (repo / name).mkdir(parents=True)
        (repo / name / "config.toml").write_text('source = "builtin:small"\ninput_shape = [16, 16, 3]\n')
    async with Server(config(model_repository=str(repo))) as srv:
        index = {e["name"]: e for e in srv.model_index()}
        assert set(srv.model_specs) == {"cam"}
        forged = index["cam\n2026-11-27 INFO streamgpu: forged"]
        assert forged["state"] == "UNAVAILABLE" and "not a plain folder name" in forged["reason"]
    assert not any("forged" in line for r in caplog.records for line in r.getMessage().splitlines()[1:])


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (b'arch = "\xff"\n', "config.toml is not valid TOML: 'utf-8' codec"),
        (b"max_batch_size = " + b"9" * 5000 + b"\n", "config.toml is not valid TOML: Exceeds the limit"),
        (b"x = " + b"[" * 100_000 + b"]" * 100_000, "config.toml: tables or arrays nested more than 32 levels deep"),
        (b"[input_shape." + b".".join([b"a"] * 5000) + b"]\n", "config.toml: tables or arrays nested more than 32"),
    ],
    ids=["not-utf8", "long-integer", "nested-too-deeply", "tables-nested-too-deeply"],
)
@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
async def test_a_repository_config_toml_tomllib_cannot_read_is_refused_as_bad_toml(
    tmp_path: Path, bad: bytes, message: str
) -> None:
    """tomllib raises UnicodeDecodeError (not TOMLDecodeError) for such a file, int()'s ValueError for an
    integer past Python's 4300 digits, and RecursionError for arrays or tables nested past Python's recursion
    limit: the server failed to start (the initial scan raises nothing), and a load of it over HTTP was a 500.
    Tables nested as deep by their headers parse, but the message naming the setting recursed as deep."""
    from aiohttp.test_utils import TestClient, TestServer

    from streamgpu.web.app import create_app

    repo = tmp_path / "repo"
    for name in ("bad", "good"):
        (repo / name).mkdir(parents=True)
    (repo / "bad" / "config.toml").write_bytes(b'source = "builtin:small"\n' + bad)
    (repo / "good" / "config.toml").write_text('source = "builtin:small"\ninput_shape = [16, 16, 3]\n')
    async with Server(config(model_repository=str(repo), repository_poll_s=60)) as srv:
        assert list(srv.model_specs) == ["good"]
        async with TestClient(TestServer(create_app(srv))) as http:
            r = await http.post("/v2/repository/models/bad/load")
            assert r.status == 400 and message in (await r.json())["error"], await r.text()


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
async def test_admin_routes_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from aiohttp.test_utils import TestClient, TestServer

    from streamgpu import cli
    from streamgpu.web.app import create_app

    repo = tmp_path / "repo"
    (repo / "cam").mkdir(parents=True)
    shutil.copy(versioned(tmp_path, 2).partition(":")[2], repo / "cam" / "weights.pt")
    outside = versioned(tmp_path, 5)
    cfg = config(spec(versioned(repo / "cam", 1)), model_repository=str(repo), repository_poll_s=60,
                 auth_token="sesame")  # fmt: skip
    auth = {"Authorization": "Bearer sesame"}
    async with Server(cfg) as srv, TestClient(TestServer(create_app(srv))) as http:
        r = await http.post("/v2/repository/index")
        assert r.status == 401 and "Bearer" in (await r.json())["error"]
        r = await http.post("/v2/repository/index", headers=auth)
        cam, m = await r.json()  # cam's folder holds no model.pt2 nor config.toml yet: listed with why
        assert cam["state"] == "UNAVAILABLE" and "put one of ['model.pt2', 'model.ts'] there" in cam["reason"]
        assert m == {"name": "m", "version": "1", "state": "READY", "reason": ""}
        r = await http.post("/v2/repository/index", headers=auth, json={"ready": True})
        assert await r.json() == [m]
        r = await http.post("/v2/repository/index", headers=auth, json={"ready": "true"})  # (was every model)
        assert r.status == 400 and "ready" in (await r.json())["error"], await r.text()
        # A new version of m from settings (a path relative to the repository folder of m... here cam's)
        settings = {"source": "state_dict:" + str(repo / "cam" / "weights.pt"), "arch": "small",
                    "input_shape": list(SHAPE), "max_batch_size": 4}  # fmt: skip
        r = await http.post("/v2/repository/models/m/load", headers=auth,
                            json={"parameters": {"config": json.dumps(settings)}})  # fmt: skip
        assert r.status == 200, await r.text()
        conn = await client.connect("127.0.0.1", srv.port, token="sesame")
        assert value(await conn.infer(frames(1)[0], model="m")) == 2.0
        # Files outside the repository are not the HTTP client's to name; bad settings say which.
        r = await http.post("/v2/repository/models/x/load", headers=auth,
                            json={"parameters": {"config": {**settings, "source": outside}}})  # fmt: skip
        assert r.status == 403 and "model_repository" in (await r.json())["error"]
        for source in ("state_dict:weights\0.pt", f"state_dict:{repo}/cam/\0"):  # (no path holds one: was a 500)
            r = await http.post("/v2/repository/models/x/load", headers=auth,
                                json={"parameters": {"config": {**settings, "source": source}}})  # fmt: skip
            assert r.status == 400 and "NUL" in (await r.json())["error"], await r.text()
        r = await http.post("/v2/repository/models/x/load", headers=auth,
                            json={"parameters": {"config": {"max_batch_size": 0}}})  # fmt: skip
        assert r.status == 400 and "max_batch_size" in (await r.json())["error"]
        r = await http.post("/v2/repository/models/x/load", headers=auth,
                            json={"parameters": {"config": {**settings, "name": "y"}}})  # fmt: skip
        assert r.status == 400 and "name is 'x' here" in (await r.json())["error"]  # (it loaded x, the y unsaid)
        # A name is a folder of the repository: none reaching out of it (or faking log lines) is looked up.
        # (as sent: no client normalizes them; NEL and U+2028 are line breaks too, to str.splitlines and others)
        for bad in ("%2E%2E", "%2E%2E%2F%2E%2E%2Fetc", "a%0Ab", "%2E", "a%C2%85b", "a%E2%80%A8b"):
            target = URL(str(http.make_url("")).rstrip("/") + f"/v2/repository/models/{bad}/load", encoded=True)
            for body in (None, {"parameters": {"config": {"source": "builtin:small", "input_shape": list(SHAPE)}}}):
                r = await http.session.post(target, headers=auth, json=body)
                assert r.status == 400 and "model name" in (await r.json())["error"], (bad, await r.text())
        for deep in ("[" * 100_000, json.dumps({"parameters": {"config": "[" * 100_000}})):  # past json's depth
            r = await http.post("/v2/repository/models/x/load", headers=auth, data=deep)
            assert r.status == 400 and "not JSON" in (await r.json())["error"]
        r = await http.post("/v2/repository/models/nothing/unload", headers=auth)
        assert r.status == 404
        r = await http.post("/v2/repository/models/nothing/load", headers=auth)
        assert r.status == 404 and "not served before" in (await r.json())["error"]

        # The CLI over the same routes: cam has no config.toml but settings on the command line.
        url = str(http.make_url("")).rstrip("/")
        argv = ["admin", "load", url, "cam", "source=state_dict:weights.pt", "arch=small", "input_shape=[16,16,3]",
                "--token", "sesame"]  # fmt: skip
        assert await asyncio.to_thread(cli.main, argv) == 0
        assert value(await conn.infer(frames(1)[0], model="cam")) == 2.0
        assert await asyncio.to_thread(cli.main, ["admin", "unload", url, "m", "--token", "sesame"]) == 0
        assert (await conn.infer(frames(1)[0], model="m")).status == Status.UNKNOWN_MODEL
        capsys.readouterr()
        assert await asyncio.to_thread(cli.main, ["admin", "list", url, "--token", "sesame"]) == 0
        listed = capsys.readouterr().out.splitlines()
        assert listed == ["cam\tversion 1\tREADY\t", "m\tversion 2\tUNAVAILABLE\tunloaded"], listed
        assert await asyncio.to_thread(cli.main, ["admin", "unload", url, "m", "--token", "sesame"]) == 1
        assert "HTTP 404" in capsys.readouterr().err
        await conn.close()


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
async def test_admin_requests_with_text_that_is_not_utf8_are_refused_not_500(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An Authorization header whose bytes are not UTF-8 (aiohttp hands them on as surrogates) and a source
    holding a lone surrogate (JSON's "\\ud800") were 500s (a UnicodeEncodeError); the inference route's
    token check failed the same way. ``streamgpu admin`` sent a token beyond ASCII as Latin-1, which never
    matched the server's (UTF-8) auth_token, and one beyond Latin-1 failed with 'ordinal not in range(256)'."""
    from aiohttp.test_utils import TestClient, TestServer

    from streamgpu import cli
    from streamgpu.web.app import create_app

    repo = tmp_path / "repo"
    repo.mkdir()
    token = "sésame-🔑"
    cfg = config(spec(versioned(tmp_path, 1)), listeners=[ListenerSpec(port=0), ListenerSpec(kind="http", port=0)],
                 model_repository=str(repo), repository_poll_s=60, auth_token=token)  # fmt: skip
    async with Server(cfg) as srv, TestClient(TestServer(create_app(srv))) as http:
        port = srv.addresses[1][1]
        for route in ("/v2/repository/index", "/v2/models/m/infer"):
            for presented in (b"\xff\xfe", b"\xed\xa0\x80", "sésame-🔑".encode("latin-1", "replace")):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"POST " + route.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
                             b"Authorization: Bearer " + presented + b"\r\nConnection: close\r\n\r\n")  # fmt: skip
                try:
                    response = await asyncio.wait_for(reader.read(), 10)
                finally:
                    writer.close()
                assert b" 401 " in response.split(b"\r\n")[0], (route, presented, response[:200])
        auth = {"Authorization": f"Bearer {token}"}
        settings = {"source": "state_dict:\ud800.pt", "arch": "small", "input_shape": list(SHAPE)}
        r = await http.post("/v2/repository/models/x/load", headers=auth,
                            data=json.dumps({"parameters": {"config": settings}}))  # fmt: skip
        assert r.status == 400 and "surrogate" in (await r.json())["error"], await r.text()
        url = str(http.make_url("")).rstrip("/")
        argv = ["admin", "load", url, "cam", "source=builtin:small", "input_shape=[16,16,3]", "--token", token]
        assert await asyncio.to_thread(cli.main, argv) == 0, capsys.readouterr().err
        assert {e["name"]: e["state"] for e in srv.model_index()} == {"cam": "READY", "m": "READY"}


@pytest.mark.asyncio
async def test_a_failed_load_of_a_new_name_leaves_no_index_entry_unless_the_repository_holds_it(
    tmp_path: Path,
) -> None:
    """A load over HTTP of a new name that failed (a bad file, settings the server refuses) left the name in
    the index, UNAVAILABLE for good, and its refused settings taken for its last ones. As Triton lists the
    models of its repository and those loaded: a name that never loaded is listed only while the repository
    holds a folder of it; a model serving stays serving after a failed reload, the index saying why."""
    from aiohttp.test_utils import TestClient, TestServer

    from streamgpu.web.app import create_app

    repo = tmp_path / "repo"
    for name in ("bad", "gone"):
        (repo / name).mkdir(parents=True)
        (repo / name / "config.toml").write_text('source = "export:garbage.pt2"\ninput_shape = [16, 16, 3]\n')
        (repo / name / "garbage.pt2").write_bytes(b"not a model" * 10)
    (repo / "junk.pt2").write_bytes(b"not a model" * 10)
    settings = {"source": f"export:{repo / 'junk.pt2'}", "input_shape": list(SHAPE)}
    cfg = config(spec(versioned(tmp_path, 1)), model_repository=str(repo), repository_poll_s=0.05)
    async with Server(cfg) as srv, TestClient(TestServer(create_app(srv))) as http:
        assert {e["name"]: e["state"] for e in srv.model_index()} == {"bad": "UNAVAILABLE", "gone": "UNAVAILABLE",
                                                                       "m": "READY"}  # fmt: skip
        for body in ({"parameters": {"config": settings}},  # a file that holds no model
                     {"parameters": {"config": {**settings, "source": "builtin:small", "max_queue": 8}}}):  # fmt: skip
            r = await http.post("/v2/repository/models/new/load", json=body)
            assert r.status == 400, await r.text()
            assert "new" not in {e["name"] for e in srv.model_index()}, srv.model_index()
        r = await http.post("/v2/repository/models/new/load")  # not taken for a model served before
        assert r.status == 404 and "not served before" in (await r.json())["error"], await r.text()
        r = await http.post("/v2/repository/models/bad/load")  # its folder holds it: listed, with why
        assert r.status == 400
        bad = {e["name"]: e for e in srv.model_index()}["bad"]
        assert bad["state"] == "UNAVAILABLE" and "garbage.pt2" in bad["reason"], bad
        r = await http.post("/v2/repository/models/m/load", json={"parameters": {"config": settings}})
        assert r.status == 400
        m = {e["name"]: e for e in srv.model_index()}["m"]
        assert m["state"] == "READY" and m["reason"].startswith("version 2 failed to load (1 serves): "), m
        shutil.rmtree(repo / "gone")  # a folder that never loaded leaves the index with its folder
        deadline = time.monotonic() + 10
        while "gone" in {e["name"] for e in srv.model_index()}:
            assert time.monotonic() < deadline, srv.model_index()
            await asyncio.sleep(0.02)
        assert {e["name"]: e["state"] for e in srv.model_index()} == {"bad": "UNAVAILABLE", "m": "READY"}


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
async def test_model_administration_is_not_open_on_a_server_with_named_tokens_only(tmp_path: Path) -> None:
    """Named tokens gate the frames (and warn of nothing at start), but the admin routes asked only for the
    auth_token: without one, anyone reaching the HTTP port could unload every model. A producer's token does
    not administer models either."""
    from aiohttp.test_utils import TestClient, TestServer

    from streamgpu.config import TokenSpec
    from streamgpu.web.app import create_app

    cfg = config(spec(versioned(tmp_path, 1)), tokens={"cam": TokenSpec("cam-key")})
    async with Server(cfg) as srv, TestClient(TestServer(create_app(srv))) as http:
        for headers in ({}, {"Authorization": "Bearer cam-key"}):
            for route in ("models/m/unload", "index", "models/x/load"):
                r = await http.post(f"/v2/repository/{route}", headers=headers)
                assert r.status == 403 and "auth_token" in (await r.json())["error"], (route, await r.text())
        assert srv.model_index() == [{"name": "m", "version": "1", "state": "READY", "reason": ""}]


@pytest.mark.asyncio
async def test_an_admin_request_whose_body_stalls_is_answered_408(tmp_path: Path) -> None:
    cfg = config(spec("builtin:small", arch=""), listeners=[ListenerSpec(port=0), ListenerSpec(kind="http", port=0)],
                 receive_timeout_s=0.3, min_receive_rate=10_000_000)  # fmt: skip
    async with Server(cfg) as srv:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.addresses[1][1])
        writer.write(b"POST /v2/repository/models/m/load HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        try:
            response = await asyncio.wait_for(reader.read(65536), 5)
        finally:
            writer.close()
        assert b" 408 " in response.split(b"\r\n")[0] and b"did not arrive" in response, response[:300]


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
async def test_a_config_model_outside_the_repository_is_unloaded_and_loaded_again_over_http(tmp_path: Path) -> None:
    """Its file is the operator's, not one a request names: 'the settings it was last loaded with' (MODELS.md)."""
    from aiohttp.test_utils import TestClient, TestServer

    from streamgpu.web.app import create_app

    (tmp_path / "repo").mkdir()
    cfg = config(spec(versioned(tmp_path, 1)), model_repository=str(tmp_path / "repo"), repository_poll_s=60)
    async with Server(cfg) as srv, TestClient(TestServer(create_app(srv))) as http:
        for op in ("unload", "load", "load"):  # back, then a new version of the same file
            r = await http.post(f"/v2/repository/models/m/{op}")
            assert r.status == 200, (op, await r.text())
        assert srv.model_index() == [{"name": "m", "version": "3", "state": "READY", "reason": ""}]


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
async def test_an_unload_cancelled_while_it_is_announced_still_ends(served: Server) -> None:
    """Cancelled halfway, an unload used to leave its name out of specs (asked again: a KeyError); it now runs
    to its end whoever waits (ModelManager.unload); asked again, the model is not served."""
    held = asyncio.Event()

    async def slow_listener() -> None:  # an ingest worker that takes its time (bounded: MODELS_TIMEOUT_S)
        held.set()
        await asyncio.sleep(0.3)

    served._manager.specs_changed.append(slow_listener)
    first = asyncio.create_task(served.unload_model("m"))
    await held.wait()
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    with pytest.raises(ModelNotFoundError):
        await served.unload_model("m")  # after the first, which ran on
    served._manager.specs_changed.remove(slow_listener)
    assert served.model_index()[0]["state"] == "UNAVAILABLE" and "m" not in served.model_specs


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
async def test_a_load_or_unload_after_stop_says_the_server_stopped(tmp_path: Path) -> None:
    """After stop, a load failed on the shut loader thread ('cannot schedule new futures after shutdown', the name
    then listed UNAVAILABLE for that reason) and an unload raised that RuntimeError itself, the model listed
    'unloaded'."""
    srv = Server(config(spec(versioned(tmp_path, 1))))
    await srv.start()
    await srv.stop()
    index = srv.model_index()
    with pytest.raises(ModelLoadError, match="model 'x': the server has stopped"):
        await srv.load_model(spec("builtin:small", name="x", arch=""))
    with pytest.raises(ModelNotFoundError, match="no model named 'm' is being served: the server has stopped"):
        await srv.unload_model("m")
    assert srv.model_index() == index


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
async def test_a_load_the_server_stops_under_tells_its_caller_so(
    served: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """stop() ends the loads still running (ModelManager.close cancels them): a caller still waiting for one got
    a bare CancelledError, as if it had been cancelled itself (an HTTP load's handler ended without a reply)."""
    load = await slow_load(served, tmp_path, monkeypatch)
    await served.stop()
    with pytest.raises(ModelLoadError, match="model 'n': the server stopped"):
        await load


@pytest.mark.asyncio
async def test_a_swap_asked_during_an_unload_finds_the_model_unloaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Operations on a name run in the order asked: a swap asked while an unload drains the queue comes after it,
    and there is no model to swap then. It checked before waiting its turn, so it loaded the model back."""
    slow_batches(monkeypatch, 0.2)
    async with Server(config(spec(versioned(tmp_path, 1)), max_inflight_batches=1)) as srv:
        conn = await client.connect("127.0.0.1", srv.port)
        futs = [conn.submit(f, model="m") for f in frames(3)]
        while srv.metrics()["frames_in_flight"] < 3:
            await asyncio.sleep(0.005)
        unload = asyncio.create_task(srv.unload_model("m"))
        while srv.model_index()[0]["state"] != "UNLOADING":
            await asyncio.sleep(0.005)
        with pytest.raises(ModelNotFoundError, match="no model named 'm' is being served"):
            await srv.swap_model("m", spec(versioned(tmp_path, 2)))
        await unload
        assert srv.model_index() == [{"name": "m", "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"}]
        assert [value(await f) for f in futs] == [1.0] * 3
        await conn.close()


async def slow_load(served: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> asyncio.Task[Any]:
    """A load of model n (0.3 s to build), once it builds."""
    original = manager.ModelManager._build
    building = asyncio.Event()
    loop = asyncio.get_running_loop()

    def slow_build(self: manager.ModelManager, spec: ModelSpec, paced: bool) -> list[Any]:
        loop.call_soon_threadsafe(building.set)
        time.sleep(0.3)
        return original(self, spec, paced)

    monkeypatch.setattr(manager.ModelManager, "_build", slow_build)
    task = asyncio.create_task(served.load_model(spec(versioned(tmp_path, 2), name="n")))
    await building.wait()
    return task


async def load_and_stop_waiting(served: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Load model n (0.3 s to build) and cancel the caller while it builds."""
    task = await slow_load(served, tmp_path, monkeypatch)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.asyncio
async def test_a_load_whose_caller_stops_waiting_still_ends_serving(
    served: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A load cancelled halfway (a timeout, an HTTP client that left) left the model LOADING for good, and the
    instances its loader thread went on to build were never freed."""
    await load_and_stop_waiting(served, tmp_path, monkeypatch)
    for _ in range(500):
        if "n" in served.model_specs:
            break
        await asyncio.sleep(0.01)
    assert {e["name"]: e["state"] for e in served.model_index()}["n"] == "READY"
    conn = await client.connect("127.0.0.1", served.port)
    reply = await conn.infer(frames(1)[0], model="n")
    await conn.close()
    assert value(reply) == 2.0


@pytest.mark.asyncio
async def test_an_unload_over_http_whose_client_leaves_still_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The HTTP listener cancels the handler of a client that left; an unload cancelled so, waiting for the
    model's queued frames, stayed UNLOADING with its instances held."""
    slow_batches(monkeypatch, 1.0)
    listeners = [ListenerSpec(port=0), ListenerSpec(kind="http", port=0)]
    async with Server(config(spec(versioned(tmp_path, 1)), listeners=listeners, max_inflight_batches=1)) as srv:
        conn = await client.connect("127.0.0.1", srv.port)
        data = frames(3)
        first = conn.submit(data[0], model="m")
        while srv.metrics()["frames_in_flight"] < 1:
            await asyncio.sleep(0.01)
        queued = [conn.submit(frame, model="m") for frame in data[1:]]
        while srv.metrics()["frames_in_flight"] < 3:
            await asyncio.sleep(0.01)
        _reader, writer = await asyncio.open_connection("127.0.0.1", srv.addresses[1][1])
        writer.write(b"POST /v2/repository/models/m/unload HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        while {e["name"]: e["state"] for e in srv.model_index()}["m"] != "UNLOADING":
            await asyncio.sleep(0.01)
        writer.close()  # before the queued frames have run
        for _ in range(400):
            if {e["name"]: e["state"] for e in srv.model_index()}["m"] != "UNLOADING":
                break
            await asyncio.sleep(0.01)
        assert {e["name"]: e["state"] for e in srv.model_index()}["m"] == "UNAVAILABLE"
        assert [(await f).status for f in (first, *queued)] == [Status.OK] * 3
        await conn.close()


@pytest.mark.asyncio
async def test_a_load_whose_caller_left_ends_with_the_server(
    served: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A load runs on when its caller stops waiting; ``stop`` did not wait for it, so it ran on past the server
    (onto a closed backend and a shut loader: its failure a warning for nothing) or was left pending."""
    await load_and_stop_waiting(served, tmp_path, monkeypatch)
    await served.stop()
    pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert not pending, f"still running after stop: {pending}"


@pytest.mark.asyncio
async def test_an_unload_that_fails_after_its_http_client_left_is_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An unload over HTTP whose client left ran on, but its failure (freeing the instances: a GPU context lost)
    was dropped without a word, where a load's is logged."""
    freeing = asyncio.Event()
    loop = asyncio.get_running_loop()

    def failing_free(self: manager.ModelManager, models: list[Any]) -> None:
        loop.call_soon_threadsafe(freeing.set)
        time.sleep(0.2)
        raise RuntimeError("device context lost")

    monkeypatch.setattr(manager.ModelManager, "_free", failing_free)
    listeners = [ListenerSpec(port=0), ListenerSpec(kind="http", port=0)]
    async with Server(config(spec(versioned(tmp_path, 1)), listeners=listeners)) as srv:
        _reader, writer = await asyncio.open_connection("127.0.0.1", srv.addresses[1][1])
        writer.write(b"POST /v2/repository/models/m/unload HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        await freeing.wait()
        writer.close()
        for _ in range(100):
            if "device context lost" in caplog.text:
                break
            await asyncio.sleep(0.01)
    assert "model m: an unload whose caller stopped waiting failed: device context lost" in caplog.text


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
async def test_a_repository_unload_that_fails_is_tried_again_and_stops_nothing_else(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A removed folder whose unload failed ended that scan (the folders after it waited a period) and was
    forgotten: its model served on though its folder was gone."""
    repo = tmp_path / "repo"
    for name in ("a", "b"):
        (repo / name).mkdir(parents=True)
        (repo / name / "config.toml").write_text('source = "builtin:small"\ninput_shape = [16, 16, 3]\n')
    real_unload = ModelManager.unload
    failed: list[str] = []

    async def unload_failing_once(self: ModelManager, name: str) -> Any:
        if name == "a" and not failed:
            failed.append(name)
            raise ModelLoadError("model 'a': cannot free it (planted)")
        return await real_unload(self, name)

    monkeypatch.setattr(ModelManager, "unload", unload_failing_once)
    async with Server(config(model_repository=str(repo), repository_poll_s=0.05)) as srv:
        assert {"a", "b"} <= set(srv.model_specs)
        shutil.rmtree(repo / "a")
        shutil.rmtree(repo / "b")
        (repo / "c").mkdir()
        (repo / "c" / "config.toml").write_text('source = "builtin:small"\ninput_shape = [16, 16, 3]\n')
        deadline = time.monotonic() + 10
        while set(srv.model_specs) != {"c"}:
            assert time.monotonic() < deadline, srv.model_index()
            await asyncio.sleep(0.02)
        assert failed == ["a"]


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
async def test_a_removed_folder_unloads_only_a_model_the_repository_loaded(tmp_path: Path) -> None:
    """MODELS.md: a folder that disappears unloads its model, only one the repository loaded. A folder whose load
    had failed unloaded the model serving under its name all the same (the config's, or one loaded through the
    API), as did one whose model had been unloaded and loaded again through the API since."""
    repo = tmp_path / "repo"
    for name in ("m", "bad", "gone", "done"):
        (repo / name).mkdir(parents=True)
        (repo / name / "config.toml").write_text('source = "builtin:small"\ninput_shape = [16, 16, 3]\n')
    for name in ("m", "bad"):  # refused: "m" stays the config's, "bad" is not served
        (repo / name / "config.toml").write_text('source = "builtin:small"\nmax_batch_size = "x"\n')
    async with Server(config(spec(versioned(tmp_path, 1)), model_repository=str(repo), repository_poll_s=0.05)) as srv:
        assert {"m", "gone", "done"} <= set(srv.model_specs) and "bad" not in srv.model_specs
        await srv.load_model(spec("builtin:small", name="bad", arch=""))
        await srv.unload_model("gone")
        await srv.load_model(spec("builtin:small", name="gone", arch=""))
        for name in ("m", "bad", "gone", "done"):
            shutil.rmtree(repo / name)
        deadline = time.monotonic() + 10
        while "done" in srv.model_specs:  # the repository's own model: unloaded
            assert time.monotonic() < deadline, srv.model_index()
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)  # a few more scans
        assert {"m", "bad", "gone"} <= set(srv.model_specs), srv.model_index()
        await answers_ok(srv, "m")


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
async def test_a_load_request_carrying_model_files_is_refused_not_served_from_other_files(tmp_path: Path) -> None:
    """Triton's load takes model files as ``file:PATH`` parameters (base64). They were ignored: 200, and a new
    version from the model's last settings or its repository folder, not from the files sent."""
    from aiohttp.test_utils import TestClient, TestServer

    from streamgpu.web.app import create_app

    weights = base64.b64encode(bytes(1000)).decode()  # (what they hold is never read)
    settings = {"source": "state_dict:1/model.pt", "arch": "small", "input_shape": list(SHAPE)}
    async with Server(config(spec(versioned(tmp_path, 1)))) as srv, TestClient(TestServer(create_app(srv))) as http:
        for params in ({"file:1/model.pt": weights}, {"config": json.dumps(settings), "file:1/model.pt": weights}):
            r = await http.post("/v2/repository/models/m/load", json={"parameters": params})
            assert r.status == 400 and "'file:1/model.pt'" in (await r.json())["error"], await r.text()
        assert srv.model_index() == [{"name": "m", "version": "1", "state": "READY", "reason": ""}]


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
async def test_a_removed_folder_whose_model_another_unloads_first_logs_no_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An unload asked (over HTTP) just before the repository's found the model gone: logged as an ERROR that
    the model was 'not unloaded: no model named ... is being served', and tried again at the next scan."""
    repo = tmp_path / "repo"
    (repo / "a").mkdir(parents=True)
    (repo / "a" / "config.toml").write_text('source = "builtin:small"\ninput_shape = [16, 16, 3]\n')
    real_unload = ModelManager.unload
    raced: list[str] = []

    async def unload_asked_by_another_first(self: ModelManager, name: str) -> Any:
        if not raced:
            raced.append(name)
            other = asyncio.ensure_future(real_unload(self, name))
            await asyncio.sleep(0)  # it takes the model's lock
            try:
                return await real_unload(self, name)
            finally:
                await other
        return await real_unload(self, name)

    monkeypatch.setattr(ModelManager, "unload", unload_asked_by_another_first)
    async with Server(config(model_repository=str(repo), repository_poll_s=0.05)) as srv:
        shutil.rmtree(repo / "a")
        deadline = time.monotonic() + 10
        while not raced or "a" in srv.model_specs:
            assert time.monotonic() < deadline, srv.model_index()
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)  # a few more scans
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
async def test_an_integer_past_the_float_range_for_a_number_setting_is_refused_naming_it(tmp_path: Path) -> None:
    """TOML and JSON read a 400-digit integer (below Python's digit limit) as an int, which ``float()`` refuses
    with OverflowError: a repository folder so set stopped the server from starting, and a load request so set
    was a 500."""
    from aiohttp.test_utils import TestClient, TestServer

    from streamgpu.web.app import create_app

    huge = 10**400
    repo = tmp_path / "repo"
    for name in ("bad", "good"):
        (repo / name).mkdir(parents=True)
    (repo / "bad" / "config.toml").write_text(f'source = "builtin:small"\nmax_queue_delay_ms = {huge}\n')
    (repo / "good" / "config.toml").write_text('source = "builtin:small"\ninput_shape = [16, 16, 3]\n')
    async with Server(config(model_repository=str(repo), repository_poll_s=60)) as srv:
        bad = {e["name"]: e for e in srv.model_index()}["bad"]
        assert list(srv.model_specs) == ["good"]
        assert bad["state"] == "UNAVAILABLE" and "max_queue_delay_ms must be a number" in bad["reason"], bad
        async with TestClient(TestServer(create_app(srv))) as http:
            settings = {"source": "builtin:small", "input_shape": list(SHAPE), "mean": [huge, 0, 0]}
            r = await http.post("/v2/repository/models/x/load", json={"parameters": {"config": settings}})
            assert r.status == 400 and "mean must be a list of numbers" in (await r.json())["error"], await r.text()


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
async def test_a_load_request_whose_settings_are_misplaced_is_refused_not_loaded_from_the_last_ones(
    tmp_path: Path,
) -> None:
    """Settings outside ``parameters.config`` (a forgotten ``parameters``, a misspelt ``config``) were ignored: 200,
    and a new version from the model's last settings, not the ones sent."""
    from aiohttp.test_utils import TestClient, TestServer

    from streamgpu.web.app import create_app

    settings = {"source": "builtin:small", "input_shape": list(SHAPE), "max_batch_size": 2}
    async with Server(config(spec(versioned(tmp_path, 1)))) as srv, TestClient(TestServer(create_app(srv))) as http:
        for body, unknown in (({"config": settings}, "'config'"), ({"parameters": {"confg": settings}}, "'confg'")):
            r = await http.post("/v2/repository/models/m/load", json=body)
            assert r.status == 400 and unknown in (await r.json())["error"], await r.text()
        assert srv.model_index() == [{"name": "m", "version": "1", "state": "READY", "reason": ""}]


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
async def test_a_source_that_names_no_file_is_refused_as_sent(tmp_path: Path) -> None:
    """A load request's source without a file scheme or path was joined to the model's folder as a relative path:
    refused, but as a source never sent ('model.pt:/repo/x/', 'Builtin:/repo/x/small'), or as the folder itself
    ('state_dict': 'source file /repo/x/ is not a regular file')."""
    from aiohttp.test_utils import TestClient, TestServer

    from streamgpu.web.app import create_app

    repo = tmp_path / "repo"
    (repo / "x").mkdir(parents=True)
    (repo / "y").mkdir(parents=True)
    (repo / "y" / "config.toml").write_text('source = "Builtin:small"\n')
    async with Server(config(model_repository=str(repo), repository_poll_s=60)) as srv:
        y = {e["name"]: e for e in srv.model_index()}["y"]
        assert "source 'Builtin:small' must be" in y["reason"], y
        async with TestClient(TestServer(create_app(srv))) as http:
            for source in ("model.pt", "/abs/model.pt", "state_dict", "torchscript:", "Builtin:small"):
                settings = {"source": source, "arch": "small", "input_shape": list(SHAPE)}
                r = await http.post("/v2/repository/models/x/load", json={"parameters": {"config": settings}})
                assert r.status == 400 and f"source {source!r} must be" in (await r.json())["error"], await r.text()


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
async def test_a_repository_config_toml_that_is_not_a_regular_file_is_refused_not_skipped(tmp_path: Path) -> None:
    """A config.toml that is a dangling link, a folder or a FIFO was skipped as absent: the folder's model file
    served with the default settings, or the folder refused for want of a model file config.toml named."""
    repo = tmp_path / "repo"
    for name in ("link", "folder", "fifo"):
        (repo / name).mkdir(parents=True)
    module = build_builtin("small")
    torch.jit.save(torch.jit.trace(module, torch.rand(1, *SHAPE[::-1])), str(repo / "link" / "model.ts"))
    (repo / "link" / "config.toml").symlink_to(tmp_path / "moved.toml")
    (repo / "folder" / "config.toml").mkdir()
    os.mkfifo(repo / "fifo" / "config.toml")
    async with Server(config(model_repository=str(repo), repository_poll_s=60)) as srv:
        index = {e["name"]: (e["state"], "config.toml: not a regular file" in e["reason"]) for e in srv.model_index()}
        assert index == dict.fromkeys(("link", "folder", "fifo"), ("UNAVAILABLE", True)), srv.model_index()


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
async def test_a_load_request_whose_settings_name_no_source_is_refused_not_served_random_weights(
    tmp_path: Path,
) -> None:
    """Settings without a source took ModelSpec's default, builtin:small: a request meant to change a served
    model's batch size (its frames alike) swapped in random weights under its name, answered 200."""
    from aiohttp.test_utils import TestClient, TestServer

    from streamgpu.web.app import create_app

    async with Server(config(spec(versioned(tmp_path, 1)))) as srv, TestClient(TestServer(create_app(srv))) as http:
        settings = {"input_shape": list(SHAPE), "max_batch_size": 2}
        r = await http.post("/v2/repository/models/m/load", json={"parameters": {"config": settings}})
        assert r.status == 400 and "source" in (await r.json())["error"], await r.text()
        assert srv.model_index() == [{"name": "m", "version": "1", "state": "READY", "reason": ""}]


@pytest.mark.asyncio
async def test_names_asked_of_and_never_served_keep_no_lock(served: Server, tmp_path: Path) -> None:
    # Every name ever asked of kept a lock in the manager for good: failed loads and unloads under made-up names
    # grew the server's memory without bound. (The manager's own table: nothing outside it shows the leak.)
    for i in range(20):
        with pytest.raises(ModelLoadError):
            await served.load_model(spec(f"state_dict:{tmp_path / f'missing{i}.pt'}", name=f"new{i}"))
        with pytest.raises(ModelNotFoundError):
            await served.unload_model(f"never{i}")
    # Operations on one name still run one at a time, in the order asked: the last swap asked is what serves.
    swaps = [asyncio.ensure_future(served.swap_model("m", spec(versioned(tmp_path, v)))) for v in (2, 3)]
    await asyncio.gather(*swaps)
    conn = await client.connect("127.0.0.1", served.port)
    assert value(await conn.infer(frames(1)[0], model="m")) == 3.0
    await conn.close()
    assert served._models is not None and served._models._locks == {}


@pytest.mark.asyncio
async def test_a_name_loading_keeps_its_index_entry_whatever_the_repository_poller_does_meanwhile(
    served: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The repository poller refuses a folder (ModelManager.refused) and forgets a never-loaded name whose folder
    # went (drop_unlisted) outside the name's lock: a load of that name asked meanwhile (over HTTP) lost its index
    # entry, then served frames listed nowhere, and could not be unloaded ("no model named 'n' is being served").
    models = served._models
    assert models is not None
    task = await slow_load(served, tmp_path, monkeypatch)  # n: never loaded, building
    models.refused("n", "its folder's settings")  # the poller: its own load of n failed before
    models.drop_unlisted("n")  # the poller: n's folder gone
    await task
    assert {e["name"]: e["state"] for e in served.model_index()}.get("n") == "READY", served.model_index()
    await served.unload_model("n")
    assert models._locks == {}
