"""The batch runner: the watchdog answers a batch that never completes, a sticky error retires its device."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable

import numpy as np
import pytest

from streamgpu.config import Config
from streamgpu.frame import Frame, Outcome
from streamgpu.gpu.backend import Backend, BatchRun, DeviceModel
from streamgpu.memory import Slot
from streamgpu.models.spec import ModelSpec
from streamgpu.protocol.wire import FrameHeader, Status
from streamgpu.scheduler import runner
from streamgpu.scheduler.health import DeviceHealth
from streamgpu.scheduler.metrics import ModelMetrics
from streamgpu.scheduler.runner import BatchRunner
from streamgpu.scheduler.scheduler import Scheduler

SPEC = ModelSpec(name="m", input_shape=(1,), preprocess="none", max_batch_size=4, max_queue_delay_ms=1)


class Model(DeviceModel):
    def __init__(self, device: int) -> None:
        self.spec = SPEC
        self.device = device

    @property
    def description(self) -> str:
        return f"m on {self.device}"


class Backend2(Backend):
    """Two devices. Device 0 never completes a batch (``hang``) or loses its context (``lost``)."""

    name = "fake"

    def __init__(self, loop: asyncio.AbstractEventLoop, config: Config) -> None:
        self.loop = loop
        self.devices = ["gpu0", "gpu1"]
        self.hang = False
        self.lost = ""
        self.hung: list[BatchRun] = []
        self.launched: list[int] = []

    def attach_host(self, buffer: np.ndarray) -> None:
        pass

    def load(self, spec: ModelSpec, module: object, device: int = 0) -> DeviceModel:
        return Model(device)

    def launch(self, model: DeviceModel, slots: list[Slot], expected_s: float = 0.0) -> BatchRun:
        self.launched.append(model.device)
        if model.device == 0 and self.lost:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        run = BatchRun(len(slots), self.loop.create_future(), self.loop.create_future())
        run.copied.set_result(None)
        if model.device == 0 and self.hang:
            self.hung.append(run)
        else:
            run.done.set_result(np.zeros((len(slots), 1), np.float32))
            run.service_s = 0.001
        return run

    def device_error(self, device: int) -> str | None:
        return self.lost if device == 0 else None

    def close(self) -> None:
        pass


class Producer:
    def release(self, slot: object) -> None:
        pass

    def frame_finished(self, model: str = "", status: int = 0) -> None:
        pass

    def frames_finished(self, model: str = "", status: int = 0, n: int = 1) -> None:
        pass


class Rig:
    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.backend = Backend2(loop, Config(device="cpu"))
        self.scheduler = Scheduler(loop, self._run, max_inflight_batches=1, health=DeviceHealth(self.backend.devices))
        self.runner = BatchRunner(self.backend, self.scheduler, watchdog_factor=1.0, watchdog_min_s=0.05)
        self.scheduler.add_model([Model(0), Model(1)])
        self.outcomes: dict[int, Outcome] = {}
        self.producer = Producer()

    def _run(self, model: DeviceModel, frames: list[Frame], expected_s: float) -> Awaitable[float | None]:
        return self.runner.run(model, frames, expected_s)  # (as the server passes it: launched when called)

    def submit(self, seq: int) -> None:
        now = time.perf_counter_ns()
        header = FrameHeader(0, seq, "m", 1, (1,), 1)
        slot = object()  # the runner hands slots to the backend; the fake only counts them
        frame = Frame(header, slot, self.producer, (0, seq), now, now, 0,  # type: ignore[arg-type]
                      lambda f, o: self.outcomes.__setitem__(f.header.sequence, o))  # fmt: skip
        self.scheduler.submit(frame)


@pytest.mark.asyncio
async def test_a_batch_is_launched_as_it_is_formed_not_at_the_loops_next_turn() -> None:
    # The launch ran in the batch's task, at the loop's next turn, after the rest of that turn's callbacks and
    # reads: at one frame in flight the queue stage was 113 us, 50 of them after the batch was formed (dev VM).
    rig = Rig()
    rig.submit(0)
    assert rig.backend.launched == [0]  # before any await
    await asyncio.sleep(0.01)
    assert rig.outcomes[0].ok


@pytest.mark.asyncio
async def test_a_batch_is_launched_before_the_schedulers_accounting_of_it() -> None:
    # The accounting (its frames' queue waits as a numpy array, two histograms: ~20 us a batch on the dev VM) ran
    # before the launch, the device waiting for it.
    rig = Rig()
    seen: list[int] = []
    launch = rig.backend.launch

    def launching(model: DeviceModel, slots: list[Slot], expected_s: float = 0.0) -> BatchRun:
        seen.append(rig.scheduler.metrics_for("m").batches)
        return launch(model, slots, expected_s)

    rig.backend.launch = launching  # type: ignore[method-assign]
    rig.submit(0)
    assert seen == [0] and rig.scheduler.metrics_for("m").batches == 1
    await asyncio.sleep(0.01)
    assert rig.outcomes[0].ok


@pytest.mark.asyncio
async def test_a_batch_that_never_completes_is_answered_and_its_device_skipped_until_it_ends() -> None:
    rig = Rig()
    rig.backend.hang = True
    rig.submit(0)  # device 0 (both idle, tie): hangs
    rig.submit(1)  # device 1
    await asyncio.sleep(0.2)  # past the 50 ms watchdog
    assert rig.outcomes[0].status == Status.INTERNAL_ERROR and "did not complete within" in rig.outcomes[0].message
    assert rig.outcomes[1].ok
    health = rig.scheduler.health.snapshot()
    assert health[0] == {"name": "gpu0", "healthy": False, "overdue_batches": 1, "error": ""}
    for seq in range(2, 8):
        rig.submit(seq)
        await asyncio.sleep(0.005)
    assert all(rig.outcomes[s].ok for s in range(2, 8))
    assert rig.backend.launched.count(0) == 1  # nothing more placed on the hung device
    assert rig.scheduler.metrics_for("m").failed == 1
    run = rig.backend.hung[0]  # the device comes back: its late result is dropped, the device used again
    run.done.set_result(np.zeros((1, 1), np.float32))
    await asyncio.sleep(0.01)
    assert rig.scheduler.health.snapshot()[0]["healthy"]
    assert rig.outcomes[0].status == Status.INTERNAL_ERROR  # answered once, not again
    rig.backend.hang = False
    rig.backend.launched.clear()
    for seq in range(10, 20):
        rig.submit(seq)
        await asyncio.sleep(0)
    await rig.scheduler.idle()
    assert 0 in rig.backend.launched


@pytest.mark.asyncio
async def test_a_sticky_error_retires_the_device_and_the_other_serves_on() -> None:
    rig = Rig()
    rig.backend.lost = "CUDA error: an illegal memory access was encountered"
    for seq in range(10):
        rig.submit(seq)
        await asyncio.sleep(0)
    await rig.scheduler.idle()
    failed = [s for s, o in rig.outcomes.items() if not o.ok]
    assert len(failed) == 1 and "illegal memory access" in rig.outcomes[failed[0]].message
    assert len(rig.outcomes) == 10  # every frame answered; all but the first on device 1
    assert rig.backend.launched.count(0) == 1
    assert rig.scheduler.health.snapshot()[0]["error"] == rig.backend.lost


def test_a_failed_batch_answers_every_frame_even_when_one_delivery_raises(caplog: pytest.LogCaptureFixture) -> None:
    answered: list[int] = []

    def sink(frame: Frame, outcome: Outcome) -> None:
        if frame.header.sequence == 1:
            raise ValueError("this producer's reply cannot be written")
        answered.append(frame.header.sequence)

    now = time.perf_counter_ns()
    frames = [Frame(FrameHeader(0, seq, "m", 1, (1,), 1), None, Producer(), (0, seq), now, now, 0, sink)  # type: ignore[arg-type]
              for seq in range(3)]  # fmt: skip
    runner._fail_batch(frames, ModelMetrics(), "inference failed")
    assert answered == [0, 2] and all(f.finished for f in frames)
    assert "answering frame 0/1 failed" in caplog.text
