"""The CUDA backend's bookkeeping per batch on the host, with fake events and streams: runs without a GPU.

What it checks would not show on a GPU until something failed: which way a batch goes (the graph reads
the ring, or the frames are gathered first), that a refused launch gives its buffer set back, that a
failed batch's set is held (the device may still write it) and a finished one's is reused, and that the
model's count of batches in flight returns to zero on every path.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import types
from typing import Any

import numpy as np
import pytest
import torch

from streamgpu.gpu import cuda
from streamgpu.gpu.bridge import CompletionBridge
from streamgpu.gpu.cuda import BatchBuffers, CudaBackend
from streamgpu.memory import Slot

FRAME = 48  # bytes per frame
RING = 1 << 16


class FakeEvent:
    """Completes at once, or raises from ``query`` (a failed batch) while ``FakeEvent.fail`` is set."""

    fail: str | None = None

    def record(self, stream: int) -> None:
        pass

    def query(self) -> bool:
        if FakeEvent.fail:
            raise RuntimeError(FakeEvent.fail)
        return True

    def elapsed_ms(self, end: Any) -> float:
        return 1.0


class Pool:
    """BufferPool's interface over host-memory sets."""

    def __init__(self, count: int) -> None:
        self.sets = [self.make() for _ in range(count)]
        self.free = list(self.sets)
        self.held: list[BatchBuffers] = []

    @staticmethod
    def make() -> BatchBuffers:
        staged = torch.empty((8, FRAME), dtype=torch.uint8)
        rows = staged.data_ptr() + np.arange(8, dtype=np.int64) * FRAME
        events = (FakeEvent(), FakeEvent(), FakeEvent())
        host = [torch.zeros((8, 2), dtype=torch.float32)]
        return BatchBuffers(staged, host, torch.zeros(9, dtype=torch.int64), rows, *events)  # type: ignore[arg-type]

    def table(self, address: int) -> list[int]:
        """The address table that starts at ``address`` (what an upload copies)."""
        return next(b.addresses.tolist() for b in self.sets if b.addresses.data_ptr() == address)

    def take(self) -> BatchBuffers:
        return self.free.pop()

    def give_back(self, buffers: BatchBuffers) -> None:
        self.free.append(buffers)

    def hold(self, buffers: BatchBuffers) -> None:
        self.held.append(buffers)


def _backend(monkeypatch: pytest.MonkeyPatch) -> Any:
    """A CUDA backend without a device: only what a one-replay launch touches (call on the test's loop)."""
    FakeEvent.fail = None
    waits: list[tuple[int, Any]] = []  # a gathered batch's stream waits for its copy
    monkeypatch.setattr(cuda.driver, "the_driver", lambda: types.SimpleNamespace(wait_event=lambda *a: waits.append(a)))
    replays: list[tuple[Any, ...]] = []
    monkeypatch.setattr(cuda.kernels, "enqueue_replay", lambda *args: replays.append(args))
    loop = asyncio.get_running_loop()
    be = object.__new__(CudaBackend)
    be._loop, be._bridge, be.trace = loop, CompletionBridge(loop), None
    be._host, be._host_address, be.use_kernels = torch.zeros(RING, dtype=torch.uint8), 1 << 40, True
    staged: list[int] = []

    def stage(model: Any, slots: list[Slot], buffers: BatchBuffers, n: int) -> None:
        staged.append(len(slots))
        buffers.copied.record(model.streams.copy.cuda_stream)

    monkeypatch.setattr(be, "_stage", stage)
    be.replays, be.staged, be.waits = replays, staged, waits  # type: ignore[attr-defined]  # what the tests read
    return be


def _model(reads_ring: bool = True) -> Any:
    graph = types.SimpleNamespace(outputs=[(0x1000, 8)], exec_handle=0xABC)
    return types.SimpleNamespace(
        graph_for=[graph] * 9, buffers=Pool(3), stream=types.SimpleNamespace(cuda_stream=7), device=0,
        streams=types.SimpleNamespace(copy=types.SimpleNamespace(cuda_stream=9)), weights_version=0,
        addresses=torch.zeros(9, dtype=torch.int64), in_flight=0, reads_ring=reads_ring, gpu=torch.device("cuda", 0),
        spec=types.SimpleNamespace(frame_nbytes=FRAME), layout=types.SimpleNamespace(assemble=lambda arrays: arrays[0]),
    )  # fmt: skip


def _slots(*offsets: int) -> list[Slot]:
    return [Slot(None, offset, FRAME, 0) for offset in offsets]  # type: ignore[arg-type]


@pytest.mark.asyncio
async def test_an_idle_model_reads_the_ring_and_a_busy_one_gathers_first(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = _backend(monkeypatch)
    model = _model()
    first = backend._launch_replay(model, _slots(0, 512, 256), 0.0)
    assert backend.staged == []
    _, _, upload, _, downloads = backend.replays[-1]
    table = model.buffers.table(upload[1])[:4]
    assert table == [3, 1 << 40, (1 << 40) + 512, (1 << 40) + 256]  # the count, then ring addresses
    assert upload[0] == model.addresses.data_ptr() and upload[2] == 4 * 8 and downloads[0][1:] == (0x1000, 3 * 8)
    second = backend._launch_replay(model, _slots(768), 0.0)
    assert backend.staged == [1], "a batch launched beside another was not gathered first"
    assert backend.waits == [(7, model.buffers.sets[1].copied)], "the replay does not wait for the gather"
    _, _, upload, _, _ = backend.replays[-1]
    assert model.buffers.table(upload[1])[:2] == [1, model.buffers.sets[1].staged.data_ptr()]  # its staged row
    assert model.in_flight == 2
    await first.done
    await second.done
    assert model.in_flight == 0 and len(model.buffers.free) == 3

    large = _model(reads_ring=False)  # frames the graph should not read from the ring: always gathered
    await backend._launch_replay(large, _slots(0), 0.0).done
    assert backend.staged == [1, 1]


@pytest.mark.asyncio
async def test_an_offset_outside_the_ring_is_refused_and_costs_no_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = _backend(monkeypatch)
    model = _model()
    for offsets in ((RING,), (0, RING - FRAME + 256), (100,), (-256,)):
        with pytest.raises(ValueError, match=r"multiple of 256|overruns the ring"):
            backend._launch_replay(model, _slots(*offsets), 0.0)
    assert backend.replays == [] and len(model.buffers.free) == 3 and model.in_flight == 0
    await backend._launch_replay(model, _slots(RING - 256 * 2), 0.0).done  # the last slot that fits


@pytest.mark.asyncio
async def test_a_failed_batch_holds_its_buffers_and_a_finished_one_gives_them_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    backend = _backend(monkeypatch)
    model = _model()
    FakeEvent.fail = "an illegal memory access (planted)"
    failed = backend._launch_replay(model, _slots(0), 0.0)
    with pytest.raises(RuntimeError, match="planted"):
        await failed.done
    assert len(model.buffers.held) == 1 and len(model.buffers.free) == 2 and model.in_flight == 0
    FakeEvent.fail = None
    await backend._launch_replay(model, _slots(0), 0.0).done
    assert len(model.buffers.free) == 2 and model.in_flight == 0  # taken and given back; the held one never


@pytest.mark.asyncio
async def test_a_batch_launched_before_tracing_began_completes_untraced(monkeypatch: pytest.MonkeyPatch) -> None:
    """``Backend.trace`` is set on a serving backend (the benchmarks set it after the server started): a batch
    launched before is not traced (there may be no epoch yet, or one recorded after it started), and it
    still succeeds."""
    backend = _backend(monkeypatch)
    monkeypatch.setattr(cuda.driver, "Event", lambda *args, **kwargs: FakeEvent())
    backend.gpus, backend._probes = [torch.device("cuda", 0)], [types.SimpleNamespace(cuda_stream=3)]
    backend._trace_epochs = {}
    model = _model()
    first = backend._launch_replay(model, _slots(0, 256), 0.0)
    backend.trace = []
    assert len(await first.done) == 2  # no traced launch yet: no epoch
    backend.trace = None
    untraced = backend._launch_replay(model, _slots(0, 256, 512), 0.0)
    backend.trace = []
    traced = backend._launch_replay(model, _slots(768), 0.0)  # the epoch is recorded now
    assert len(await untraced.done) == 3 and len(await traced.done) == 1
    assert [t.size for t in backend.trace] == [1]


class Gate(FakeEvent):
    """Pending from its record until the test completes it; ``completes_when_asked``: completes just after a
    query finds it pending (its work ended between two queries of one poll)."""

    def __init__(self) -> None:
        self.complete = True  # never recorded: reads as complete
        self.completes_when_asked = False

    def record(self, stream: int) -> None:
        self.complete = False

    def query(self) -> bool:
        complete = self.complete
        self.complete = complete or self.completes_when_asked
        return complete


@pytest.mark.asyncio
async def test_a_set_reused_at_once_does_not_hold_back_its_last_batch_copied(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two models gather on one copy stream. A poll finds A's copy pending (it ends just after), then B's batch
    done, and asks no further on the copy stream: B's ``copied`` waiter is left for the next poll. B's set
    goes back at delivery and its next batch records the set's ``copied`` again: B's first batch (done on the
    device) must not wait for that next copy."""
    backend = _backend(monkeypatch)
    backend._bridge = CompletionBridge(asyncio.get_running_loop(), spin_s=0, slow_poll_s=0.05)  # polls apart
    a_model, b_model = _model(reads_ring=False), _model(reads_ring=False)
    b_model.stream = types.SimpleNamespace(cuda_stream=8)  # its own compute stream; the copy stream is shared
    for buffers in a_model.buffers.sets + b_model.buffers.sets:
        buffers.copied, buffers.started, buffers.done = Gate(), Gate(), Gate()
    a = backend._launch_replay(a_model, _slots(0), 0.0)
    b = backend._launch_replay(b_model, _slots(256), 0.0)
    a_set, b_set = a_model.buffers.sets[-1], b_model.buffers.sets[-1]  # what each took
    a_set.copied.completes_when_asked = True
    b_set.copied.complete = b_set.started.complete = b_set.done.complete = True
    await asyncio.wait_for(b.done, 1.0)
    following = backend._launch_replay(b_model, _slots(512), 0.0)
    assert b_set not in b_model.buffers.free, "the next batch did not take the set given back"
    await asyncio.sleep(0.2)  # a few polls
    assert b.copied.done(), "a batch done on the device waits for the next batch's copy into its set"
    for buffers in a_model.buffers.sets + b_model.buffers.sets:
        buffers.copied.complete = buffers.started.complete = buffers.done.complete = True
    await asyncio.wait_for(asyncio.gather(a.copied, a.done, following.copied, following.done), 1.0)
    backend._bridge.close()


@pytest.mark.asyncio
async def test_a_launch_that_fails_once_something_is_queued_holds_its_set(monkeypatch: pytest.MonkeyPatch) -> None:
    """A launch that raised after its first record (the replay's launch, a stream wait) left its set neither
    given back nor held: each such failure cost a set allocated on the loop. Held now (the device may still
    write it); refused before anything was queued, it goes back."""
    backend = _backend(monkeypatch)
    model = _model()

    def failing_replay(*args: Any) -> None:
        raise RuntimeError("cuGraphLaunch: planted")

    monkeypatch.setattr(cuda.kernels, "enqueue_replay", failing_replay)
    with pytest.raises(RuntimeError, match="planted"):
        backend._launch_replay(model, _slots(0), 0.0)
    assert len(model.buffers.held) == 1 and len(model.buffers.free) == 2 and model.in_flight == 0
    with pytest.raises(ValueError, match="multiple of 256"):
        backend._launch_replay(model, _slots(100), 0.0)
    assert len(model.buffers.held) == 1 and len(model.buffers.free) == 2


@pytest.mark.asyncio
@pytest.mark.parametrize("busy", [False, True], ids=["reads the ring", "gathered"])
async def test_a_batch_found_done_has_its_results_in_that_loop_iteration(
    monkeypatch: pytest.MonkeyPatch, busy: bool
) -> None:
    """Under load a loop iteration is a whole round of reads: the results of a batch the bridge's poll finds done
    are set in that poll, not in a callback of the iteration after (which held a device's batch slot one
    iteration more: docs/BENCHMARKS.md, "A batch's results taken in the poll that finds it done")."""
    backend = _backend(monkeypatch)
    model = _model()
    if busy:
        model.in_flight = 1  # another batch of it on the device: this one is gathered first
    run = backend._launch_replay(model, _slots(0, 256), 0.0)
    await asyncio.sleep(0)  # one iteration: the poll (its events complete at once)
    assert run.copied.done() and run.done.done()
    assert run.done.result().shape == (2, 2) and model.in_flight == int(busy)


@pytest.mark.asyncio
async def test_an_eager_batch_whose_compute_fails_leaves_its_copy_to_its_own_event(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A model run eagerly (no captured graph) whose forward raised on the launcher thread while its copy was still
    on the device: ``copied`` took the forward's error, so the runner said the copy failed (and freed the slots
    under it). It resolves when the copy does, as it did before delivery moved into the poll."""
    backend = _backend(monkeypatch)
    backend._launcher = concurrent.futures.ThreadPoolExecutor(1)

    def forward_fails(model: Any, buffers: BatchBuffers, n: int) -> None:
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (planted)")

    monkeypatch.setattr(backend, "_enqueue_compute", forward_fails)
    model: Any = object.__new__(cuda.CudaModel)  # (``launch`` checks the type)
    vars(model).update(vars(_model()), addresses=None, graphs={})
    for buffers in model.buffers.sets:
        buffers.copied, buffers.started, buffers.done = Gate(), Gate(), Gate()
    try:
        run = backend.launch(model, _slots(0), 0.0)
        with pytest.raises(RuntimeError, match="planted"):
            await asyncio.wait_for(run.done, 1.0)
        assert not run.copied.done(), "the forward's error was given to the copy, which had not ended"
        assert model.in_flight == 0 and len(model.buffers.held) == 1
        model.buffers.held[0].copied.complete = True
        assert await asyncio.wait_for(run.copied, 1.0) is None
    finally:
        backend._bridge.close()
        backend._launcher.shutdown()
