"""The driver calls of the batch path: they keep the GIL, and they report what happened (needs a CUDA device)."""

from __future__ import annotations

import ctypes
import importlib.util
import threading
from collections.abc import Callable
from typing import cast

import pytest
import torch

from streamgpu.gpu import driver

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


class _Steps:
    """A thread that counts as fast as it can while it holds the GIL."""

    def __init__(self) -> None:
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.count += 1

    def during(self, call: Callable[[], object]) -> int:
        before = self.count
        call()
        return self.count - before

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def test_a_call_through_held_keeps_the_gil_even_while_the_driver_waits() -> None:
    """The swap p99's cause (docs/BENCHMARKS.md): each CUDA call through torch or cupy lets go of the GIL, and
    a thread with Python to run takes it. A driver call made to wait (a stream synchronize behind 100 ms of GPU
    work; the batch path's calls can wait too, on the driver's locks or a pageable copy): through ``held`` no
    Python runs meanwhile; through ``lib`` (the control: the same call, letting go of the GIL as torch and cupy
    do) the other thread runs all along. (A pageable copy does not always wait: the driver may stage it.)"""
    stream = torch.cuda.Stream()
    drv = driver.the_driver()

    def synchronize(handle: ctypes.CDLL) -> Callable[[int], int]:
        call = handle.cuStreamSynchronize
        call.argtypes, call.restype = (ctypes.c_void_p,), ctypes.c_int
        return cast(Callable[[int], int], call)

    def behind_gpu_work(call: Callable[[int], int]) -> int:
        """The other thread's steps during ``call`` of the stream, queued behind 100 ms of GPU work."""
        with torch.cuda.stream(stream):
            torch.cuda._sleep(100_000_000)
        try:
            return steps.during(lambda: call(stream.cuda_stream))
        finally:
            stream.synchronize()

    steps = _Steps()
    try:
        control = behind_gpu_work(synchronize(drv.lib))
        held = behind_gpu_work(synchronize(drv.held))
    finally:
        steps.stop()
    assert control > 10_000, f"the control kept the GIL ({control} steps): the test proves nothing"
    # Not 0: the thread may have been due its switch interval (5 ms) just as the call was made.
    assert held < control / 4, (held, control)


class _Recorder:
    """Stands for one of ``Driver``'s handles: names the calls made through it, or refuses them all."""

    def __init__(self, target: object | None) -> None:
        self.target = target
        self.names: list[str] = []

    def __getattr__(self, name: str) -> object:
        if self.target is None:
            raise AssertionError(f"{name} called through the handle that lets go of the GIL")
        self.names.append(name)
        return getattr(self.target, name)


@pytest.mark.skipif(importlib.util.find_spec("cupy") is None, reason="needs cupy")
def test_every_call_of_a_batch_goes_through_held(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the loop calls per batch: the gather kernel, the replay (table up, graph, results down), the
    events' records, waits, queries and timing; none of it through ``lib``."""
    from streamgpu.gpu import kernels

    drv = driver.the_driver()
    stream = torch.cuda.Stream()
    raw = stream.cuda_stream
    started, copied, done = driver.Event(0, timing=True), driver.Event(0), driver.Event(0, timing=True)
    ring = torch.zeros(1 << 16, dtype=torch.uint8, pin_memory=True)
    staged = torch.empty((4, 1000), dtype=torch.uint8, device="cuda")
    table = torch.zeros(8, dtype=torch.int64, pin_memory=True)
    results = torch.empty(1000, dtype=torch.uint8, pin_memory=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        staged.add_(1)
    kernels.gather_frames(ring, [0], 1000, staged[:1], stream)  # compiled and loaded before
    stream.synchronize()

    held = _Recorder(drv.held)
    monkeypatch.setattr(drv, "held", held)
    monkeypatch.setattr(drv, "lib", _Recorder(None))
    kernels.gather_frames(ring, [0, 1024, 2048, 4096], 1000, staged, stream)
    copied.record(raw)
    started.record(raw)
    drv.wait_event(raw, copied)
    upload = (staged.data_ptr(), table.data_ptr(), table.nbytes)
    kernels.enqueue_replay(
        0, raw, upload, int(graph.raw_cuda_graph_exec()), [(results.data_ptr(), staged.data_ptr(), 1000)]
    )
    done.record(raw)
    while not done.query():
        pass
    assert started.elapsed_ms(done) >= 0
    assert {"cuLaunchKernel", "cuEventRecord", "cuStreamWaitEvent", "cuMemcpyAsync", "cuGraphLaunch", "cuEventQuery",
            "cuEventElapsedTime"} <= set(held.names)  # fmt: skip


def test_an_event_reads_not_ready_until_its_work_completes_and_times_it() -> None:
    stream = torch.cuda.Stream()
    started, done = driver.Event(0, timing=True), driver.Event(0, timing=True)
    assert done.query(), "an event never recorded reads as complete"
    started.record(stream.cuda_stream)
    with torch.cuda.stream(stream):
        torch.cuda._sleep(50_000_000)  # tens of milliseconds of GPU cycles
    done.record(stream.cuda_stream)
    assert not done.query()
    stream.synchronize()
    assert done.query() and started.query()
    assert started.elapsed_ms(done) > 1.0


def test_a_failed_call_says_which_and_why() -> None:
    untimed, timed = driver.Event(0), driver.Event(0, timing=True)
    stream = torch.cuda.Stream()
    untimed.record(stream.cuda_stream)
    timed.record(stream.cuda_stream)
    stream.synchronize()
    with pytest.raises(driver.CudaError, match=r"cuEventElapsedTime: .*\(CUDA_ERROR_INVALID_HANDLE\)") as caught:
        untimed.elapsed_ms(timed)  # an event made without timing cannot be timed
    assert caught.value.code == 400


def test_a_thread_without_a_context_gets_the_device_made_current_and_back() -> None:
    """Records and stream waits make the event's device current for the call (as torch's do: with several GPUs
    the loop's current device is one of them), and leave the thread as they found it."""
    drv = driver.the_driver()
    stream = torch.cuda.Stream()
    raw = stream.cuda_stream
    event = driver.Event(0)
    outcome: list[object] = []

    def fresh_thread() -> None:  # no CUDA call made on it yet: no current context
        try:
            event.record(raw)
            drv.wait_event(raw, event)
            pushed = drv.enter(0)  # nothing current still: pushes
            drv.leave()
            outcome.append(pushed)
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=fresh_thread)
    thread.start()
    thread.join()
    assert outcome == [True]
    stream.synchronize()
    assert event.query()
    assert not drv.enter(0), "the test's own thread (torch made the device current) pushed a context"
