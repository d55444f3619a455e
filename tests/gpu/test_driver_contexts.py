"""The driver calls of a batch against a fake libcuda (no GPU): each runs with its device current, and the
thread's context is as it was afterwards, the call failing or not."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from streamgpu.gpu import driver, kernels

_INVALID_CONTEXT, _LAUNCH_FAILED = 201, 719


class FakeLibcuda:
    """The calls ``Driver`` makes on the batch path, over a per-thread stack of current contexts (device ``n``'s
    primary context is ``100 + n``). ``calls``: each copy or launch, with the context current at it."""

    def __init__(self) -> None:
        self.local = threading.local()
        self.calls: list[tuple[str, int | None]] = []
        self.fail: dict[str, int] = {}

    @property
    def stack(self) -> list[int]:
        if not hasattr(self.local, "stack"):
            self.local.stack = []
        return self.local.stack

    def _call(self, name: str) -> int:
        self.calls.append((name, self.stack[-1] if self.stack else None))
        return self.fail.get(name, 0)

    def cuCtxGetDevice(self, out: Any) -> int:
        if not self.stack:
            return _INVALID_CONTEXT
        out._obj.value = self.stack[-1] - 100
        return 0

    def cuCtxPushCurrent_v2(self, context: int) -> int:
        self.stack.append(context)
        return 0

    def cuCtxPopCurrent_v2(self, out: Any) -> int:
        out._obj.value = self.stack.pop()
        return 0

    def cuMemcpyAsync(self, dst: int, src: int, nbytes: int, stream: int) -> int:
        return self._call("cuMemcpyAsync")

    def cuGraphLaunch(self, graph_exec: int, stream: int) -> int:
        return self._call("cuGraphLaunch")

    def cuEventRecord(self, event: int, stream: int) -> int:
        return self._call("cuEventRecord")

    def cuStreamWaitEvent(self, stream: int, event: int, flags: int) -> int:
        return self._call("cuStreamWaitEvent")

    def cuGetErrorName(self, code: int, out: Any) -> int:
        out._obj.value = b"CUDA_ERROR_LAUNCH_FAILED"
        return 0

    def cuGetErrorString(self, code: int, out: Any) -> int:
        out._obj.value = b"unspecified launch failure"
        return 0


@pytest.fixture
def libcuda(monkeypatch: pytest.MonkeyPatch) -> FakeLibcuda:
    """``the_driver()`` over a fake libcuda with two devices; this thread has device 0 current."""
    fake = FakeLibcuda()
    drv = object.__new__(driver.Driver)
    drv.held = drv.lib = fake  # type: ignore[assignment]
    drv.missing = set()
    drv._devices, drv._primaries, drv._setup_lock = {0: 0, 1: 1}, {0: 100, 1: 101}, threading.Lock()
    monkeypatch.setattr(driver, "_driver", drv)
    fake.stack.append(100)
    return fake


def _event(ordinal: int) -> driver.Event:
    event = object.__new__(driver.Event)
    event._driver, event.ordinal, event.handle = driver.the_driver(), ordinal, 0xE0  # (no cuEventCreate)
    event._destroy = lambda handle: 0  # type: ignore[assignment]
    return event


def test_a_replay_on_another_device_runs_with_that_device_current_and_gives_the_context_back(
    libcuda: FakeLibcuda,
) -> None:
    kernels.enqueue_replay(1, 7, (1, 2, 8), 0xAB, [(3, 4, 16), (5, 6, 16)])
    assert libcuda.calls == [("cuMemcpyAsync", 101), ("cuGraphLaunch", 101), ("cuMemcpyAsync", 101),
                             ("cuMemcpyAsync", 101)]  # fmt: skip
    assert libcuda.stack == [100]
    libcuda.calls.clear()
    kernels.enqueue_replay(0, 7, (1, 2, 8), 0xAB, [])
    assert libcuda.calls == [("cuMemcpyAsync", 100), ("cuGraphLaunch", 100)] and libcuda.stack == [100]


def test_a_failed_call_names_itself_and_still_gives_the_context_back(libcuda: FakeLibcuda) -> None:
    libcuda.fail["cuGraphLaunch"] = _LAUNCH_FAILED
    with pytest.raises(
        driver.CudaError, match=r"cuGraphLaunch: unspecified launch failure \(CUDA_ERROR_LAUNCH_FAILED\)"
    ):
        kernels.enqueue_replay(1, 7, (1, 2, 8), 0xAB, [(3, 4, 16)])
    assert libcuda.stack == [100] and [name for name, _ in libcuda.calls] == ["cuMemcpyAsync", "cuGraphLaunch"]


def test_records_and_waits_run_on_the_events_device_from_any_thread(libcuda: FakeLibcuda) -> None:
    on_one, on_zero = _event(1), _event(0)
    on_one.record(7)
    driver.the_driver().wait_event(7, on_one)
    on_zero.record(7)
    assert libcuda.calls == [("cuEventRecord", 101), ("cuStreamWaitEvent", 101), ("cuEventRecord", 100)]
    assert libcuda.stack == [100]
    left: list[list[int]] = []

    def fresh_thread() -> None:  # nothing current on it
        on_zero.record(7)
        left.append(list(libcuda.stack))

    thread = threading.Thread(target=fresh_thread)
    thread.start()
    thread.join()
    assert left == [[]] and libcuda.calls[-1] == ("cuEventRecord", 100)
