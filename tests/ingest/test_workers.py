"""Ingest worker processes (``ingest_workers = N``): the descriptor channel, shared memory, and real
servers on loopback with 2 workers: results equal to one-process mode, a killed worker, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import numpy as np
import pytest
import pytest_asyncio

from streamgpu import cli, client
from streamgpu.config import Config, ConfigError, ListenerSpec, TokenSpec
from streamgpu.frame import Frame, Outcome, Outputs
from streamgpu.ingest import channel, worker, workers
from streamgpu.ingest.admission import Admission, Grant, Producer, Refused
from streamgpu.ingest.hub import Origin
from streamgpu.ingest.workers import WorkerFrame, WorkerListener, _Worker
from streamgpu.memory import HostSegment, Slot, SlotPool
from streamgpu.models.outputs import BatchOutputs
from streamgpu.models.spec import ModelSpec
from streamgpu.protocol import wire
from streamgpu.protocol.wire import FrameFlags, FrameHeader, Status, Timings
from streamgpu.server import Server

SPEC = ModelSpec(input_shape=(8, 8, 3), max_batch_size=16, batch_buckets=(1, 4, 16))
OTHER = ModelSpec(name="other", input_shape=(2, 3), input_dtype="float32", preprocess="none")


def config(**kw: Any) -> Config:
    base: dict[str, Any] = dict(
        listeners=[ListenerSpec(port=0)], device="cpu", models=[SPEC], ring_bytes=1 << 22,
        max_payload_bytes=1 << 20, ingest_workers=2, shutdown_timeout_s=20.0, log_level="WARNING",
    )  # fmt: skip
    base.update(kw)
    return Config(**base)


def frames(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *SPEC.input_shape), dtype=np.uint8)


def listener_of(server: Server) -> WorkerListener:
    (listener,) = server._listeners
    assert isinstance(listener, WorkerListener)
    return listener


# -- the worker process's imports ----------------------------------------------------------


def test_the_worker_module_imports_no_torch() -> None:
    code = (
        "import sys, streamgpu.ingest.worker\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'cupy', 'aiohttp'))\n"
        "assert not heavy, heavy\n"
    )
    root = str(Path(__file__).resolve().parents[2])
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": root})


# -- config ----------------------------------------------------------------------------------


def test_config_checks_ingest_workers(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match=r"ingest_workers must be 0\.\.64"):
        config(ingest_workers=-1)
    with pytest.raises(ConfigError, match="the workers serve one tcp listener"):
        config(listeners=[ListenerSpec(port=0), ListenerSpec(port=0)])
    with pytest.raises(ConfigError, match=r"max_payload_bytes .* one ingest worker's share"):
        config(ring_bytes=1 << 22, max_payload_bytes=(1 << 21) + 1)
    assert config(ingest_workers=4, max_payload_bytes=1 << 19).worker_ring_bytes == 1 << 20
    assert config(ingest_workers=0).worker_ring_bytes == 1 << 22
    env = {"STREAMGPU_INGEST_WORKERS": "3", "STREAMGPU_MAX_PAYLOAD_BYTES": "1000000"}
    assert Config.load(env=env).ingest_workers == 3
    assert Config.load(env=env, ingest_workers=2).ingest_workers == 2  # the CLI's --ingest-workers
    with pytest.raises(SystemExit):  # 64 MiB frames do not fit a quarter of 256 MiB less 256 bytes
        cli.main(["serve", "--ingest-workers", "4", "--port", "0"])
    assert "max_payload_bytes (67108864) must fit one ingest worker's share" in capsys.readouterr().err


# -- descriptors and shared memory, both directions, without processes --------------------------


class FakeTransport:
    def __init__(self) -> None:
        self.written = bytearray()

    def write(self, data: bytes) -> None:
        self.written += data

    def writelines(self, data: list[bytes | memoryview]) -> None:
        for part in data:
            self.written += part

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


@pytest.mark.asyncio
async def test_descriptors_and_shared_memory_round_trip() -> None:
    """A frame written through a second mapping of the segment (as a worker's), described by a FRAME
    record, is a Frame here reading the same bytes; its RELEASE and REPLY records free the worker's
    slot and deliver the outcome, result included; records split at every byte decode the same."""
    cfg = config(models=[SPEC, OTHER], tokens={"cam": TokenSpec("secret", max_priority=9)})
    segment = HostSegment.create(cfg.ring_bytes)
    theirs = HostSegment.attach(segment.fd, segment.nbytes)  # the worker's mapping of the same memory
    submitted: list[Frame] = []
    parent_pool = SlotPool(segment.buffer)
    admission = Admission(cfg, parent_pool, {m.name: m for m in cfg.models}, submitted.append)
    listener = WorkerListener(cfg.listeners[0], admission, segment, 2)
    lent = parent_pool.reserve(cfg.worker_ring_bytes)
    assert lent is not None
    parent = _Worker(listener, 0, lent)
    parent.connection_made(FakeTransport())  # type: ignore[arg-type]

    chan, up, pool, their_admission = worker_side(cfg, theirs, lent)
    grant = their_admission.authenticate("secret")
    assert grant is not None
    producer = their_admission.producer_for(grant, "peer")
    chan.named(42, Origin("tcp", "tcp:w0/42"))
    outcomes: list[tuple[Frame, Outcome]] = []
    sent = []
    for i, (spec, payload) in enumerate([(OTHER, np.arange(6, dtype=np.float32).tobytes()),
                                         (SPEC, bytes(range(192)))]):  # fmt: skip
        slot = producer.reserve(len(payload), lambda s: None)
        assert isinstance(slot, Slot)
        pool.view(slot)[:] = payload
        header = FrameHeader(7 + i, 100 + i, spec.name, spec.frame_dtype_code, spec.input_shape, len(payload),
                             timestamp_ns=123 + i, deadline_us=50, priority=9, flags=FrameFlags.LIVE)  # fmt: skip
        frame = Frame(header, slot, producer, (42, header.stream_id), 1000 + i, 2000 + i, 3000 + i,
                      lambda f, o: outcomes.append((f, o)))  # fmt: skip
        their_admission.submit(frame)
        sent.append((frame, payload))
    await asyncio.sleep(0)  # the channel flushes once per loop iteration: OPEN, its name, 2 FRAMEs in one write
    data = bytes(up.written)
    assert len(data) == 4 * channel.UP.size
    for cut in range(len(data) + 1):  # every split decodes the same
        submitted.clear()
        parent.conns.clear()
        parent.data_received(data[:cut])
        parent.data_received(data[cut:])
        assert len(submitted) == 2
    parent.held = parent.in_server = 2
    got = [f for f in submitted if isinstance(f, WorkerFrame)]
    assert [f.producer for f in got] == [parent.conns[42].producer] * 2
    assert parent.conns[42].origin == Origin("tcp", "tcp:w0/42")
    assert got[0].producer.identity == "cam" and got[0].producer.max_priority == 9
    for frame, (orig, payload) in zip(got, sent, strict=True):
        assert frame.header == orig.header._replace(version=frame.header.version)
        assert (frame.received_ns, frame.complete_ns, frame.deadline_ns) == (
            orig.received_ns, orig.complete_ns, orig.deadline_ns)  # fmt: skip
        assert frame.slot is not None
        assert segment.buffer[frame.slot.offset : frame.slot.offset + frame.slot.nbytes].tobytes() == payload

    # down: RELEASE of the first frame (copied), then REPLYs with and without a result
    down = FakeTransport()
    parent.connection_made(down)  # type: ignore[arg-type]
    got[0].release_slot()
    result = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    got[0].finish(Outcome(Status.OK, result=result, timings=Timings(1, 2, 3, 4, 5, 6)))
    got[1].finish(Outcome(Status.DEADLINE_MISSED, "too late", timings=Timings(total_us=9)))
    await asyncio.sleep(0)
    stream = bytes(down.written)
    assert stream[0] == channel.RELEASE and parent.held == 0 and parent.in_server == 0
    held = pool.used_bytes
    chan.data_received(stream[:1])  # partial record: nothing happens yet
    assert pool.used_bytes == held and not outcomes
    release_end = channel.DOWN.size + 4  # one fid
    chan.data_received(stream[1 : release_end - 1])
    assert pool.used_bytes == held and not outcomes
    chan.data_received(stream[release_end - 1 : release_end])
    assert pool.used_bytes < held and not outcomes  # released on RELEASE, before any reply
    for b in range(release_end, len(stream)):
        chan.data_received(stream[b : b + 1])  # one byte at a time
    assert [o.status for _, o in outcomes] == [Status.OK, Status.DEADLINE_MISSED]
    np.testing.assert_array_equal(outcomes[0][1].result, result)
    assert outcomes[0][1].timings == Timings(1, 2, 3, 4, 5, 6)
    assert outcomes[1][1].message == "too late" and outcomes[1][1].result is None
    assert pool.slots_in_use == 0 and producer.frames_in_server == 0
    segment.close()
    theirs.close()


@pytest.mark.parametrize(("dtype", "shape"), [
    (np.float32, (1000,)), (np.int64, ()), (np.float16, (2, 3)), (np.uint8, (4,)), (np.float32, (0,)),
])  # fmt: skip
def test_a_batchs_ok_results_travel_in_one_record_and_decode_as_sent(dtype: type, shape: tuple[int, ...]) -> None:
    """``channel.encode_ok`` makes one REPLIES record of a batch's results (a REPLY for one frame), its length
    what ``record_length`` reads; ``decode_ok`` gives back every fid, row and timing, also where the record
    sits after others in a read and is the read's last bytes."""
    rows: np.ndarray = (np.random.default_rng(1).random((7, *shape)) * 100).astype(dtype)
    timings = np.arange(7 * 6, dtype=np.int64).reshape(7, 6)
    fids = [3, 1, 4, 1_000_000, 5, 9, 0xFFFFFFFF]
    before = channel.release([8, 9])
    record = b"".join(channel.encode_ok(fids, rows, timings))
    buf = before + record
    assert buf[len(before)] == channel.REPLIES and channel.record_length(buf, len(before)) == len(record)
    got_fids, got_rows, got_timings = channel.decode_ok(buf, len(before))
    assert got_fids == fids and got_rows.shape == rows.shape and got_rows.dtype == rows.dtype
    np.testing.assert_array_equal(got_rows, rows)
    np.testing.assert_array_equal(got_timings, timings)
    # a lone frame: its REPLY, the bytes encode_reply makes
    one = b"".join(channel.encode_ok(fids[:1], rows[:1], timings[:1]))
    assert one == channel.encode_reply(3, Outcome(Status.OK, result=rows[0], timings=Timings(*timings[0].tolist())))


def test_a_batchs_ok_results_are_written_from_its_own_array_not_copied_into_records() -> None:
    """The REPLIES record's result bytes are the batch's array itself (a megabyte for 256 rows of 1,000
    logits: the scheduling loop's copy of them into records cost more than the rest of a batch's replies)."""
    rows = np.zeros((256, 1000), np.float32)
    parts = channel.encode_ok(list(range(256)), rows, np.zeros((256, 6), np.int64))
    rows[5, 7] = 1.5  # (a change after encoding shows in what is written: no copy was made)
    fids, got, _ = channel.decode_ok(b"".join(parts), 0)
    assert got[5, 7] == 1.5 and fids == list(range(256))


@pytest.mark.parametrize(("n", "shape"), [(2, (10,)), (256, (10,)), (3, (0,))])
def test_a_batchs_ok_record_parts_are_as_long_as_their_bytes(n: int, shape: tuple[int, ...]) -> None:
    """From Python 3.12 the selector transport's ``writelines`` keeps each part as a memoryview and counts what
    ``sendmsg`` wrote off them by ``len()``: the fids (u32) and timings (i64, n x 6) were typed memoryviews, whose
    ``len()`` is items (rows), not bytes, so the write came out long and the channel transport failed
    ("pop from an empty deque"): the worker's connections were lost at its first batch of two frames. An empty
    last part (zero-size results) is never written off: the loop spins on it until the next write."""
    parts = channel.encode_ok(list(range(n)), np.zeros((n, *shape), np.float32), np.zeros((n, 6), np.int64))
    assert [len(p) for p in parts] == [memoryview(p).nbytes for p in parts] and all(map(len, parts))
    assert sum(map(len, parts)) == channel.record_length(b"".join(parts), 0)


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
async def test_a_batchs_results_record_longer_than_a_read_costs_the_worker_its_size_not_its_square() -> None:
    """A REPLIES record holds a whole batch's results (tens of MB for image-sized outputs): the worker joined
    what it had of it with every read, copying the record's start again at each (1.6 s of its loop for a 38 MB
    record in 256 KiB reads, where REPLY records of one frame each had cost a few ms). Here 32 MB in 64 KiB
    reads cost about what one read of it does (a join of it)."""
    chan = worker._Channel(config())
    chan.connection_made(FakeTransport())  # type: ignore[arg-type]
    n, row = 128, 65_536  # 128 rows of 256 KiB
    record = b"".join(channel.encode_ok(range(1, n + 1), np.zeros((n, row), np.float32), np.zeros((n, 6), np.int64)))

    def fed(chunk: int) -> float:
        reads = [record[at : at + chunk] for at in range(0, len(record), chunk)]
        start = time.perf_counter()
        for read in reads:
            chan.data_received(read)
        assert not chan._rest
        return time.perf_counter() - start

    whole = min(fed(len(record)) for _ in range(3))
    split = fed(65_536)  # (one join of the record: ~20 ms; at every read, 0.6 s and more)
    assert split < 10 * whole + 0.25, f"{split * 1e3:.0f} ms in 64 KiB reads, {whole * 1e3:.1f} ms in one"


@pytest.mark.parametrize("outputs", [
    (np.arange(4, dtype=np.float32), np.array([7, 9], np.int32)),
    {"boxes": np.ones((2, 4), np.float16), "labels": np.array([3, 1], np.int64), "": np.zeros(0, np.uint8)},
])  # fmt: skip
def test_a_reply_with_several_outputs_carries_every_one(outputs: Outputs) -> None:
    """A REPLY of a model with several outputs brings them all down, in their structure (tuple or dict)."""
    first = outputs[0] if isinstance(outputs, tuple) else outputs["boxes"]
    record = channel.encode_reply(5, Outcome(Status.OK, "a note", first, Timings(1, 2, 3, 4, 5, 6), outputs))
    assert channel.record_length(record, 0) == len(record)
    fid, got = channel.decode_reply(record, 0)
    assert fid == 5 and got.status is Status.OK and got.message == "a note" and got.timings == Timings(1, 2, 3, 4, 5, 6)
    assert type(got.outputs) is type(outputs) and got.result is not None
    np.testing.assert_array_equal(got.result, first)
    pairs = outputs.items() if isinstance(outputs, dict) else enumerate(outputs)
    for key, array in pairs:
        assert got.outputs[key].dtype == array.dtype  # type: ignore[index]
        np.testing.assert_array_equal(got.outputs[key], array)  # type: ignore[index]


def parent_worker(
    cfg: Config, submit: Callable[[Frame], None] = lambda f: None
) -> tuple[_Worker, Admission, HostSegment]:
    """The scheduling process's side of worker 0 of 2, over a fresh segment (no process, no channel yet);
    frames it takes go to ``submit``."""
    segment = HostSegment.create(cfg.ring_bytes)
    admission = Admission(cfg, SlotPool(segment.buffer), {m.name: m for m in cfg.models}, submit)
    lent = admission.pool.reserve(cfg.worker_ring_bytes)
    assert lent is not None
    return _Worker(WorkerListener(cfg.listeners[0], admission, segment, 2), 0, lent), admission, segment


def worker_side(cfg: Config, segment: HostSegment, lent: Slot) -> tuple[worker._Channel, FakeTransport, SlotPool,
                                                                        Admission]:  # fmt: skip
    """A worker's channel (writing to the returned transport) and admission, over ``lent`` of ``segment``."""
    chan = worker._Channel(cfg)
    up = FakeTransport()
    chan.connection_made(up)  # type: ignore[arg-type]
    pool = SlotPool(segment.buffer, lent.offset, lent.offset + lent.nbytes)
    return chan, up, pool, Admission(cfg, pool, {m.name: m for m in cfg.models}, chan.submit)


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
async def test_outcomes_a_worker_gives_itself_are_published_by_the_scheduling_process() -> None:
    """A worker's own outcome (a refusal, INCOMPLETE) goes up as an ANSWERED record and its TEXT records
    (here a message of several records, an unknown model name, the origin), split at every byte: the
    parent publishes it once, whole; frames the parent answered are not sent back up."""
    cfg = config()
    parent, admission, segment = parent_worker(cfg)
    seen: list[tuple[FrameHeader, Outcome, Any]] = []
    admission.stream_results.tap(lambda header, outcome, origin: seen.append((header, outcome, origin)))

    chan = worker._Channel(cfg)
    up = FakeTransport()
    chan.connection_made(up)  # type: ignore[arg-type]
    hub = worker._ForwardingHub(chan)
    header = FrameHeader(7, 3, "nope", 1, (8, 8, 3), 192, timestamp_ns=55, deadline_us=9, flags=FrameFlags.SUBSCRIBERS)
    message = "unknown model 'nope'; served: " + ", ".join(f"model{i}" for i in range(40))
    hub.publish(header, Outcome(Status.UNKNOWN_MODEL, message, timings=Timings(total_us=17)), Origin("udp", "udp:x"))
    chan.delivering = header  # an outcome the scheduling process gave (and published): not sent back up
    hub.publish(header, Outcome(Status.OK), Origin("udp", "udp:x"))
    chan.delivering = None
    await asyncio.sleep(0)
    data = bytes(up.written)
    assert len(data) % channel.UP.size == 0 and len(data) > 3 * channel.UP.size  # several TEXT records
    for byte in range(len(data)):
        parent.data_received(data[byte : byte + 1])
    ((got, outcome, origin),) = seen
    assert (got.stream_id, got.sequence, got.model, got.timestamp_ns, got.deadline_us, got.flags) == (
        7, 3, "nope", 55, 9, FrameFlags.SUBSCRIBERS)  # fmt: skip
    assert (outcome.status, outcome.message, outcome.timings.total_us) == (Status.UNKNOWN_MODEL, message, 17)
    assert origin == Origin("udp", "udp:x")
    segment.close()


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
async def test_frame_and_connection_numbers_past_32_bits_wrap_on_the_channel() -> None:
    """The channel's fid and conn fields are u32, the worker's counters are not: its 2**32nd frame
    (17 hours at 70,000 frames/s) or connection id failed to pack (struct.error), so the worker lost
    the frame and every frame after it. Numbers wrap, skipping 0 and fids still in flight."""
    cfg = config()
    submitted: list[Frame] = []
    parent, _, segment = parent_worker(cfg, submitted.append)
    lent = parent.lent
    parent.connection_made(FakeTransport())  # type: ignore[arg-type]
    chan, up, pool, their_admission = worker_side(cfg, segment, lent)
    producer = their_admission.producer_for(Grant(None, cfg.max_priority), "peer")
    chan.named((1 << 32) + 42, Origin("tcp", "tcp:w0/4294967338"))
    outcomes: dict[int, Outcome] = {}

    def submit(sequence: int) -> None:
        slot = producer.reserve(192, lambda s: None)
        assert isinstance(slot, Slot)
        header = FrameHeader(1, sequence, SPEC.name, SPEC.frame_dtype_code, SPEC.input_shape, 192)
        their_admission.submit(Frame(header, slot, producer, ((1 << 32) + 42, 1), 1, 2, 3,
                                     lambda f, o: outcomes.__setitem__(f.header.sequence, o)))  # fmt: skip

    submit(0)  # fid 1, still in flight when the counter wraps
    chan._fids = itertools.count((1 << 32) - 1)
    submit(1)
    submit(2)
    await asyncio.sleep(0)
    parent.data_received(bytes(up.written))
    assert list(parent.conns) == [42]
    got = {f.header.sequence: f for f in submitted if isinstance(f, WorkerFrame)}
    assert [got[i].fid for i in range(3)] == [1, (1 << 32) - 1, 2]
    down = FakeTransport()
    parent.connection_made(down)  # type: ignore[arg-type]
    for i in (2, 0, 1):
        got[i].finish(Outcome(Status.OK, message=f"frame {i}"))
    await asyncio.sleep(0)
    chan.data_received(bytes(down.written))
    assert {i: o.message for i, o in outcomes.items()} == {i: f"frame {i}" for i in range(3)}
    assert pool.slots_in_use == 0
    segment.close()


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
async def test_a_connection_whose_id_wraps_onto_an_open_ones_gets_a_channel_number_of_its_own() -> None:
    """Connection ids (every TCP connection and UDP source address) went up the channel modulo 2**32: a
    producer that burnt 2**32 ids (new UDP source addresses) got the number of a connection still open, its
    OPEN took that connection's place in the parent (its frames then counted as the newcomer's) and its
    close removed it, so that connection's next frame failed the parent's channel (KeyError)."""
    cfg = config()
    submitted: list[Frame] = []
    parent, _, segment = parent_worker(cfg, submitted.append)
    parent.connection_made(FakeTransport())  # type: ignore[arg-type]
    chan, up, _, their_admission = worker_side(cfg, segment, parent.lent)
    old, new = (their_admission.producer_for(Grant(None, cfg.max_priority), peer) for peer in ("old", "new"))

    def submit(producer: Producer, conn: int) -> None:
        chan.named(conn, Origin("tcp", f"tcp:w0/{conn}"))
        slot = producer.reserve(192, lambda s: None)
        assert isinstance(slot, Slot)
        header = FrameHeader(1, conn, SPEC.name, SPEC.frame_dtype_code, SPEC.input_shape, 192)
        their_admission.submit(Frame(header, slot, producer, (conn, 1), 1, 2, 3, lambda f, o: None))

    submit(old, 42)
    submit(new, (1 << 32) + 42)  # the same number modulo 2**32, while 42 is open
    chan.connection_closed((1 << 32) + 42, 1)
    submit(old, 42)
    await asyncio.sleep(0)
    parent.data_received(bytes(up.written))
    producers = [frame.producer.name for frame in submitted]
    assert producers == ["tcp:w0/42", "tcp:w0/4294967338", "tcp:w0/42"]
    assert list(parent.conns) == [42]
    segment.close()


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
async def test_the_answer_to_a_connection_gone_while_asking_is_not_taken_by_a_newcomer_with_its_number() -> None:
    """A capped token's connection that closes while it asks frees nothing on the channel until its ADMIT
    comes. Its number went free at its CLOSED: past 2**32 ids, a newcomer that got that number (here: the
    next id, the number below it held by a connection open since the start) and asked too took the ADMIT
    meant for the one gone. Admitted in its worker while the scheduling process had refused it, it was one
    connection over the token's cap, and its first frame failed the parent's channel (KeyError)."""
    cfg = config(tokens={"fleet": TokenSpec("fleet-key", max_connections=1)})
    parent, admission, segment = parent_worker(cfg)
    parent.connection_made(FakeTransport())  # type: ignore[arg-type]
    chan, up, _, their_admission = worker_side(cfg, segment, parent.lent)
    grant = Grant("fleet", cfg.max_priority)
    answers: dict[str, Refused | None] = {}

    def ask(name: str, conn: int) -> None:
        chan.named(conn, Origin("tcp", f"tcp:w0/{conn}"))
        chan.ask(conn, grant, lambda refused: answers.__setitem__(name, refused))

    chan.named(42, Origin("tcp", "tcp:w0/42"))  # open since the start (an anonymous producer's)
    chan._open(42, their_admission.producer_for(Grant(None, cfg.max_priority), "peer"))
    ask("gone", (1 << 32) + 42)  # number 43: 42 is taken
    chan.connection_closed((1 << 32) + 42, 0)  # gone while it asks
    ask("other", (1 << 32) + 50)  # another of the token's: admitted, the token's one place
    ask("newcomer", (1 << 32) + 43)  # number 43 again (before the fix)
    await asyncio.sleep(0)
    down = FakeTransport()
    parent.connection_made(down)  # type: ignore[arg-type]
    parent.data_received(bytes(up.written))  # OK (then CLOSED), OK, OVERLOADED
    await asyncio.sleep(0)
    chan.data_received(bytes(down.written))
    assert answers["other"] is None
    refused = answers["newcomer"]
    assert refused is not None and refused.status == Status.OVERLOADED, answers
    assert "gone" not in answers
    assert admission._named["fleet"].connections == 1
    segment.close()


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
async def test_a_stop_sent_while_a_worker_starts_is_not_lost() -> None:
    """Shutdown during a restart: a STOP the parent sends before the new worker's channel is connected
    reaches it once connected (it was dropped: the worker then kept accepting until CLOSE), and a worker
    that finds a STOP waiting when it starts confirms it and takes no connection."""
    cfg = config()
    parent, _, segment = parent_worker(cfg)
    parent.send(channel.down(channel.STOP))
    await asyncio.sleep(0)
    down = FakeTransport()
    parent.connection_made(down)  # type: ignore[arg-type]
    await asyncio.sleep(0)
    assert bytes(down.written) == channel.down(channel.STOP)

    # The worker's side, in this process: the STOP waits in the channel before serve() starts.
    listen = socket.create_server(("127.0.0.1", 0))
    listen.setblocking(False)
    handoff, their_handoff = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours, theirs = socket.socketpair()
    ours.sendall(channel.down(channel.STOP))
    lent = parent.lent
    init = worker.WorkerInit(dataclasses.replace(cfg, ingest_workers=0, ring_bytes=lent.nbytes), 0,
                             their_handoff.detach(), (), os.dup(segment.fd), segment.nbytes, lent.offset,
                             lent.offset + lent.nbytes, cfg.max_connections, tuple(enumerate(cfg.models)))  # fmt: skip
    serving = asyncio.ensure_future(worker.serve(theirs, init))
    ours.setblocking(False)
    loop = asyncio.get_running_loop()
    got = b""
    async with asyncio.timeout(10):
        while len(got) < 2 * channel.UP.size:  # STOPPED and READY, in either order
            got += await loop.sock_recv(ours, 4096)
    kinds = {got[i] for i in range(0, len(got), channel.UP.size)}
    assert {channel.STOPPED, channel.READY} <= kinds

    async def hand_over() -> None:  # as the parent does: accept, send the descriptor, close our copy
        accepted, _ = await loop.sock_accept(listen)
        with accepted:
            socket.send_fds(handoff, [b"c"], [accepted.fileno()])

    with pytest.raises((TimeoutError, client.ConnectionClosedError, ConnectionError)):
        async with asyncio.timeout(0.5):  # the worker takes no connection: no WELCOME comes
            handing = asyncio.ensure_future(hand_over())
            conn = await client.connect("127.0.0.1", listen.getsockname()[1])
            await conn.close()
    await handing
    await loop.sock_sendall(ours, channel.down(channel.CLOSE, 0))
    await asyncio.wait_for(serving, 10)
    ours.close()
    handoff.close()
    listen.close()
    segment.close()


# -- real servers ----------------------------------------------------------------------------


@pytest_asyncio.fixture
async def server() -> AsyncIterator[Server]:
    async with Server(config()) as srv:
        yield srv
    assert srv.pool.slots_in_use == 0


async def run_streams(port: int, data: np.ndarray, nconn: int) -> list[tuple[int, client.Reply]]:
    """Frame i goes to connection i % nconn, stream (i // nconn) % 2; all submitted at once."""
    conns = [await client.connect("127.0.0.1", port) for _ in range(nconn)]
    sent = [(i, conns[i % nconn].submit(data[i], stream_id=(i // nconn) % 2)) for i in range(len(data))]
    replies = [(i, await fut) for i, fut in sent]
    for conn in conns:
        await conn.close()
    return replies


@pytest.mark.asyncio
async def test_frames_through_two_workers_equal_one_process_mode(server: Server) -> None:
    data = frames(384, seed=3)
    replies = await run_streams(server.port, data, nconn=12)
    listener = listener_of(server)
    assert listener.stats()["frames"] == len(data) and listener.stats()["workers_alive"] == 2
    for pid in listener.pids:  # the worker processes never loaded torch
        with open(f"/proc/{pid}/maps") as maps:
            assert "torch" not in maps.read()
    async with Server(config(ingest_workers=0)) as single:
        expected = await run_streams(single.port, data, nconn=12)
    for (i, reply), (_, want) in zip(replies, expected, strict=True):
        assert reply.ok, reply.message
        np.testing.assert_allclose(reply.result, want.result, rtol=1e-5, atol=1e-5)  # type: ignore[arg-type]
        assert reply.sequence == i // 24 and reply.timings.total_us >= reply.timings.receive_us
    by_arrival = sorted(replies, key=lambda p: p[1].received_ns)
    for conn in range(12):
        for stream in (0, 1):
            seqs = [r.sequence for i, r in by_arrival if i % 12 == conn and r.stream_id == stream]
            assert seqs == sorted(seqs) and len(seqs) == 16


@pytest.mark.asyncio
async def test_a_model_with_several_outputs_answers_every_one_through_the_workers() -> None:
    """A ``topk`` model's replies hold its indices and scores with workers as in one-process mode (a v2
    connection; a v1 connection gets the first and a note), where a worker reply carried the first alone."""
    top = dataclasses.replace(SPEC, name="top", postprocess="topk:3")
    data = frames(6, seed=5)
    answers: dict[int, list[list[client.Reply]]] = {}
    for n in (0, 2):
        async with Server(config(models=[top], ingest_workers=n)) as srv:
            answers[n] = []
            for version in (2, 1):
                conn = await client.connect("127.0.0.1", srv.port, protocol_version=version)
                answers[n].append(list(await asyncio.gather(*(conn.submit(f, model="top") for f in data))))
                await conn.close()
    for one, through in zip(answers[0], answers[2], strict=True):
        for want, got in zip(one, through, strict=True):
            assert got.ok and got.message == want.message, got.message
            np.testing.assert_allclose(got.result, want.result, rtol=1e-5)  # type: ignore[arg-type]
            if want.outputs is None:  # v1
                assert got.outputs is None and "protocol v1 carries only the first" in got.message
            else:
                assert isinstance(got.outputs, dict) and set(got.outputs) == {"indices", "scores"}
                for name, array in want.outputs.items():  # type: ignore[union-attr]
                    assert got.outputs[name].dtype == array.dtype  # (batches differ: scores to float rounding)
                    np.testing.assert_allclose(got.outputs[name], array, rtol=1e-5)


@pytest.mark.asyncio
async def test_flag_bits_beyond_live_pass_through_the_workers(server: Server) -> None:
    """A TCP frame with the UDP-only SUBSCRIBERS bit (and reserved bits) set is served as any other."""
    conn = await client.connect("127.0.0.1", server.port)
    plain = conn._encode

    def flagged(header: FrameHeader, frame: np.ndarray) -> list[bytes | memoryview]:
        encoded = plain(header, frame)
        head = bytearray(encoded[0])
        head[8] |= 0xFE  # every flag bit but LIVE
        return [bytes(head), *encoded[1:]]

    conn._encode = flagged  # type: ignore[method-assign]
    try:
        replies = [await conn.submit(f) for f in frames(3, seed=9)]
        assert all(r.ok for r in replies), [r.message for r in replies]
    finally:
        await conn.close()


C = TypeVar("C", client.Connection, client.UdpConnection)


async def on_each_worker(connect: Callable[[], Awaitable[C]], listener: WorkerListener) -> dict[int, list[C]]:
    """Open connections (TCP, or UDP producers: a source port each) until both workers hold two; returns
    worker index -> its connections."""
    by_worker: dict[int, list[C]] = {0: [], 1: []}
    for _ in range(64):
        conn = await connect()
        before = listener.stats()["worker_connections"]
        assert (await conn.submit(frames(1, 0)[0], stream_id=99)).ok  # OPEN reaches the parent with the first frame
        after = listener.stats()["worker_connections"]
        (index,) = [i for i in (0, 1) if after[i] > before[i]]
        by_worker[index].append(conn)
        if all(len(c) >= 2 for c in by_worker.values()):
            return by_worker
    raise AssertionError(f"connections did not spread over both workers: {listener.stats()}")


@pytest.mark.asyncio
async def test_a_killed_worker_costs_only_its_connections_then_shutdown_drains(server: Server) -> None:
    listener = listener_of(server)
    by_worker = await on_each_worker(lambda: client.connect("127.0.0.1", server.port), listener)
    victim_pid = listener.pids[0]
    data = frames(40, seed=5)
    pending = {i: [c.submit(f, stream_id=1) for c in conns for f in data] for i, conns in by_worker.items()}
    await asyncio.sleep(0.01)
    os.kill(victim_pid, signal.SIGKILL)
    survivors = await asyncio.gather(*pending[1])  # every frame of the other worker's connections: answered
    assert all(r.ok for r in survivors), {r.status for r in survivors}
    lost = await asyncio.gather(*pending[0], return_exceptions=True)
    assert any(isinstance(r, client.ConnectionClosedError) for r in lost)  # its connections closed
    assert all(c.closed for c in by_worker[0]) and not any(c.closed for c in by_worker[1])
    meanwhile = [await client.connect("127.0.0.1", server.port) for _ in range(4)]  # handed to the live one
    assert all(r.ok for r in await asyncio.gather(*(c.submit(data[0], stream_id=3) for c in meanwhile)))
    for conn in meanwhile:
        await conn.close()
    for _ in range(500):  # its range is reclaimed once nothing reads it, then a new worker starts on it
        if listener.stats()["workers_alive"] == 2:
            break
        await asyncio.sleep(0.01)
    stats = listener.stats()
    assert stats["worker_restarts"] == 1 and stats["workers_alive"] == 2 and victim_pid not in listener.pids
    replies = await run_streams(server.port, frames(64, seed=6), nconn=8)  # the server keeps serving
    assert all(r.ok for _, r in replies)
    for conn in by_worker[1]:
        assert (await conn.submit(data[0], stream_id=2)).ok
        await conn.close()
    assert server.metrics()["frames_in_flight"] == 0
    await shutdown_answers_every_frame_received(server)


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
async def test_a_signal_reaching_a_worker_while_its_interpreter_starts_does_not_kill_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ctrl-C or systemd's stop reaches the whole process group, the workers too: one that came while a
    worker's interpreter started (before it ignored them) killed it, and the server's start failed with a
    traceback ("exited while starting", or "Broken pipe" sending it its init), or its replacement's did."""
    spawn = subprocess.Popen
    signalled = []

    def signalled_at_once(*args: Any, **kw: Any) -> subprocess.Popen[bytes]:
        proc = spawn(*args, **kw)  # returns once exec succeeded: its interpreter is just starting
        for sig in (signal.SIGINT, signal.SIGTERM):
            os.kill(proc.pid, sig)
        signalled.append(proc.pid)
        return proc

    monkeypatch.setattr(workers.subprocess, "Popen", signalled_at_once)
    async with Server(config(ingest_workers=1)) as srv:
        listener = listener_of(srv)
        async with await client.connect("127.0.0.1", srv.port) as conn:
            assert (await conn.submit(frames(1, 0)[0])).ok
        os.kill(signalled[0], signal.SIGKILL)  # its replacement starts as signalled
        async with asyncio.timeout(20):
            while len(signalled) < 2 or not (listener._workers[0].started and listener._workers[0].alive):
                await asyncio.sleep(0.01)
        async with await client.connect("127.0.0.1", srv.port) as conn:
            assert (await conn.submit(frames(1, 0)[0])).ok
        assert listener.stats()["worker_restarts"] == 1 and listener.pids == [signalled[1]]


@pytest.mark.asyncio
async def test_frames_a_worker_sent_up_as_shutdown_began_are_answered_within_the_shutdown_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Regression: stop() waited for an idle scheduler before the workers' STOPPED, so frames still on
    their way up the channel (the scheduling loop busy a moment) came after it and had only the
    listener's 1 s close to finish: a batch slower than that lost them, the producer seeing its
    connection closed with no reply, whatever shutdown_timeout_s said. Here the parent reads the
    channel only once stop() began, the frame's FRAME record waiting in it."""
    from streamgpu.gpu.cpu import CpuModel

    original = CpuModel.run

    def slow(self: CpuModel, batch: np.ndarray) -> BatchOutputs:
        time.sleep(1.5)  # in the backend's worker thread: longer than the listener's close gives
        return original(self, batch)

    async with Server(config(ingest_workers=1)) as srv:
        listener = listener_of(srv)
        conn = await client.connect("127.0.0.1", srv.port)
        data = frames(2, seed=8)
        assert (await conn.submit(data[0])).ok
        monkeypatch.setattr(CpuModel, "run", slow)
        (transport,) = [w._transport for w in listener._workers]
        assert transport is not None
        transport.pause_reading()
        reply = conn.submit(data[1])
        with socket.socket(fileno=os.dup(transport.get_extra_info("socket").fileno())) as chan:
            async with asyncio.timeout(10):  # until its FRAME record waits in the channel
                while True:
                    with contextlib.suppress(BlockingIOError):
                        if len(chan.recv(channel.UP.size, socket.MSG_PEEK | socket.MSG_DONTWAIT)) == channel.UP.size:
                            break
                    await asyncio.sleep(0.01)
        stopping = asyncio.ensure_future(srv.stop())
        await asyncio.sleep(0.1)
        transport.resume_reading()
        await stopping
        assert listener.stats()["frames"] == 2  # it went up: the server took it
        assert (await reply).ok
        await conn.close()


@pytest.mark.asyncio
async def test_connections_opened_at_once_are_spread_evenly_over_the_workers() -> None:
    """8 connections opened at once, 4 workers: 2 each. (With the workers accepting on one shared socket,
    the first to wake took every pending connection: all of a burst went to one worker.)"""
    async with Server(config(ingest_workers=4, ring_bytes=1 << 23)) as srv:
        listener = listener_of(srv)
        conns = await asyncio.gather(*(client.connect("127.0.0.1", srv.port) for _ in range(8)))
        data = frames(8, seed=21)
        replies = await asyncio.gather(*(c.submit(data[i], stream_id=i) for i, c in enumerate(conns)))
        assert all(r.ok for r in replies), {r.status for r in replies}
        assert listener.stats()["worker_connections"] == [2, 2, 2, 2]  # those that sent a frame, per worker
        for conn in conns:
            await conn.close()


@pytest.mark.asyncio
async def test_max_connections_holds_for_the_server_not_per_worker() -> None:
    """max_connections = 4 with 2 workers: 4 connections are served, the 5th is refused OVERLOADED, naming
    the setting's value (each worker serves its half; the emptiest takes each new one). Each worker
    used to take max_connections itself: 8 in all."""
    async with Server(config(max_connections=4)) as srv:
        conns = [await client.connect("127.0.0.1", srv.port) for _ in range(4)]
        with pytest.raises(client.HandshakeError) as refused:
            await client.connect("127.0.0.1", srv.port)
        assert refused.value.status == Status.OVERLOADED and "(4)" in refused.value.message
        await conns[0].close()
        async with asyncio.timeout(5):  # its place is free once its worker saw it close
            while sorted(listener_of(srv).stats()["worker_open_connections"]) != [1, 2]:
                await asyncio.sleep(0.01)
        again = await client.connect("127.0.0.1", srv.port)
        assert (await again.submit(frames(1, 3)[0], stream_id=1)).ok
        for conn in [*conns[1:], again]:
            await conn.close()


@pytest.mark.asyncio
async def test_producers_that_reset_at_once_leave_no_count_behind(server: Server) -> None:
    """Connections reset right after connecting (before or while they are handed over) cost nothing:
    every worker's count of open connections goes back to 0, so the next ones still spread evenly."""
    listener = listener_of(server)
    loop = asyncio.get_running_loop()
    for _ in range(40):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", server.port))
        sock.close()
    async with asyncio.timeout(10):
        while listener.stats()["worker_open_connections"] != [0, 0]:
            await asyncio.sleep(0.01)
    conns = await asyncio.gather(*(client.connect("127.0.0.1", server.port) for _ in range(4)))
    replies = await asyncio.gather(*(c.submit(frames(1, i)[0], stream_id=i) for i, c in enumerate(conns)))
    assert all(r.ok for r in replies)
    assert listener.stats()["worker_open_connections"] == [2, 2]
    for conn in conns:
        await conn.close()


async def shutdown_answers_every_frame_received(server: Server) -> None:
    """Stopped with frames in flight on 6 connections: every frame it took is answered."""
    listener = listener_of(server)
    conns = [await client.connect("127.0.0.1", server.port) for _ in range(6)]
    data = frames(80, seed=7)
    before = listener.stats()["frames"]
    pending = [[c.submit(f, stream_id=k % 3) for k, f in enumerate(data)] for c in conns]
    await asyncio.sleep(0.05)
    await server.stop()
    scheduled = listener.stats()["frames"] - before  # frames that reached the scheduling loop
    answered = replied = 0
    for futures in pending:
        replies = await asyncio.gather(*futures, return_exceptions=True)
        statuses = [r.status if isinstance(r, client.Reply) else type(r).__name__ for r in replies]
        assert set(statuses) <= {Status.OK, Status.SHUTTING_DOWN, "ConnectionClosedError"}, set(statuses)
        # A connection's frames reach the server in order: every one it took is answered (OK, or
        # SHUTTING_DOWN once it stopped); only the frames after those may find the connection closed.
        taken = len(statuses) - statuses.count("ConnectionClosedError")
        assert "ConnectionClosedError" not in statuses[:taken], statuses
        answered += statuses.count(Status.OK)
        replied += taken
    assert answered > 0 and replied >= scheduled > 0, (answered, replied, scheduled)
    assert server.pool.slots_in_use == 0
    for conn in conns:
        await conn.close()


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
async def test_worker_frames_results_reach_the_hub_and_the_results_file(tmp_path: Path) -> None:
    # Worker frames finish a batch at a time (a BatchSink, no Outcome per frame): the ones someone
    # watches are still published, so subscribers and the JSON-lines sink get them.
    out = tmp_path / "results.jsonl"
    async with Server(config(ingest_workers=1, results_file=str(out))) as srv:
        seen: list[tuple[int, Status]] = []
        hub = srv.admission.stream_results
        hub.subscribe(7, lambda header, outcome: seen.append((header.sequence, outcome.status)))
        conn = await client.connect("127.0.0.1", srv.port)
        data = frames(6, seed=1)
        replies = await asyncio.gather(*(conn.submit(f, stream_id=7 if i % 2 else 8) for i, f in enumerate(data)))
        await conn.close()
    assert all(r.ok for r in replies)
    assert sorted(seen) == [(0, Status.OK), (1, Status.OK), (2, Status.OK)]
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted((x["stream_id"], x["seq"], x["status"]) for x in lines) == [
        (7, 0, "OK"), (7, 1, "OK"), (7, 2, "OK"), (8, 0, "OK"), (8, 1, "OK"), (8, 2, "OK")]  # fmt: skip
    assert all(len(x["top_k"] if "top_k" in x else x["result"]) > 0 for x in lines)


@pytest.mark.asyncio
async def test_a_results_port_nobody_reads_costs_worker_batches_no_outcome(monkeypatch: pytest.MonkeyPatch) -> None:
    # Worker frames finish a batch at a time and build an Outcome only for a stream someone watches. A
    # results port with no subscriber connected watches nothing: no Outcome, no line. Once one connects,
    # lines flow; once it leaves, nothing is built again. (The sink used to tap the hub whether or not
    # anyone read the port, so watched() was always true and every frame built an Outcome for nothing.)
    import streamgpu.ingest.workers as workers

    built: list[Status] = []

    def counted(status: Status, *args: Any, **kw: Any) -> Outcome:
        built.append(status)
        return Outcome(status, *args, **kw)

    monkeypatch.setattr(workers, "Outcome", counted)
    async with Server(config(ingest_workers=1, results_port=0)) as srv:
        hub = srv.admission.stream_results
        assert srv.results_address is not None
        conn = await client.connect("127.0.0.1", srv.port)
        data = frames(6, seed=2)

        async def send(n: int) -> None:
            replies = await asyncio.gather(*(conn.submit(f, stream_id=7) for f in data[:n]))
            assert all(r.ok for r in replies)

        async def until(watched: bool) -> None:
            async with asyncio.timeout(5):
                while hub.watched(7) is not watched:
                    await asyncio.sleep(0.01)

        assert not hub.watched(7)
        await send(6)
        assert (built, srv.results.published) == ([], 0), "a results port nobody reads cost frames an Outcome"
        reader, writer = await asyncio.open_connection(*srv.results_address)
        await until(True)
        await send(3)
        lines = [json.loads(await asyncio.wait_for(reader.readline(), 5)) for _ in range(3)]
        assert sorted((x["stream_id"], x["status"]) for x in lines) == [(7, "OK")] * 3
        assert built == [Status.OK] * 3
        writer.close()
        await until(False)
        await send(6)
        assert built == [Status.OK] * 3 and srv.results.published == 3
        await conn.close()


# -- UDP through the workers -----------------------------------------------------------------


def udp_config(**kw: Any) -> Config:
    udp = ListenerSpec("udp", "127.0.0.1", 0, {"reassembly_timeout_s": 0.3})
    return config(listeners=[ListenerSpec("tcp", "127.0.0.1", 0), udp], **kw)


async def udp_numbers(srv: Server, until: Any = lambda stats: True) -> dict[str, Any]:
    """The UDP listener's stats as /metrics shows them, once ``until(stats)`` (workers report once per sweep)."""
    async with asyncio.timeout(10):
        while True:
            (stats,) = [s for s in srv.metrics()["listeners"] if s["kind"] == "udp"]
            if until(stats):
                return stats
            await asyncio.sleep(0.02)


async def udp_producers_by_worker(srv: Server) -> tuple[WorkerListener, dict[int, list[client.UdpConnection]]]:
    """``srv``'s workers' listener, and UDP producers opened until both workers hold two."""
    listener = srv._listeners[0]
    assert isinstance(listener, WorkerListener)
    port = srv.addresses[1][1]
    return listener, await on_each_worker(lambda: client.connect_udp("127.0.0.1", port, reply_timeout=5), listener)


@pytest.mark.asyncio
async def test_udp_frames_through_two_workers_equal_one_process_mode() -> None:
    """UDP producers spread over the workers' SO_REUSEPORT sockets: every frame answered with the result
    one-process mode gives, in order per stream, counted on the stand-in listener's stats."""
    data = frames(96, seed=11)

    async def run(srv: Server) -> list[client.Reply]:
        # 16 source ports: the kernel's hash puts them all on one of 2 sockets once in 2**15 runs (8: 2**7)
        conns = [await client.connect_udp("127.0.0.1", srv.addresses[1][1], datagram_bytes=1024, reply_timeout=10)
                 for _ in range(16)]  # fmt: skip
        sent = [conns[i % 16].submit(f, stream_id=(i // 16) % 2) for i, f in enumerate(data)]
        replies = list(await asyncio.gather(*sent))
        listener = srv._listeners[0]
        if isinstance(listener, WorkerListener):  # (counted before the producers leave)
            assert sum(1 for n in listener.stats()["worker_connections"] if n) == 2, "one worker took every producer"
        for conn in conns:
            await conn.close()
        return replies

    async with Server(udp_config()) as srv:
        replies = await run(srv)
        stats = await udp_numbers(srv, lambda s: s.get("frames") == len(data))
        assert stats["producers"] == 16 and stats["ingest_workers"] == 2 and stats["port"] == srv.addresses[1][1]
        assert stats["datagrams"] >= len(data)  # (a 192-byte frame is one datagram)
    assert srv.pool.slots_in_use == 0
    async with Server(udp_config(ingest_workers=0)) as single:
        expected = await run(single)
    for reply, want in zip(replies, expected, strict=True):
        assert reply.ok, reply.message
        np.testing.assert_allclose(reply.result, want.result, rtol=1e-5, atol=1e-5)  # type: ignore[arg-type]


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
async def test_udp_loss_through_the_workers_is_answered_and_counted() -> None:
    """With datagrams lost on the way, each frame is answered once, OK or INCOMPLETE, and the workers'
    counts reach /metrics; the workers' ranges hold nothing afterwards."""
    spec = ModelSpec(input_shape=(24, 24, 3), max_batch_size=16, batch_buckets=(1, 4, 16))  # 4 datagrams a frame
    data = np.random.default_rng(4).integers(0, 256, (60, 24, 24, 3), dtype=np.uint8)
    async with Server(udp_config(models=[spec])) as srv:
        conn = await client.connect_udp("127.0.0.1", srv.addresses[1][1], datagram_bytes=512, loss=0.1, seed=3,
                                        reply_timeout=10)  # fmt: skip
        replies = await asyncio.gather(*(conn.submit(f) for f in data))
        await conn.close()
        statuses = [r.status for r in replies]
        assert set(statuses) <= {Status.OK, Status.INCOMPLETE} and Status.INCOMPLETE in statuses, statuses
        incomplete = statuses.count(Status.INCOMPLETE)
        stats = await udp_numbers(srv, lambda s: s.get("incomplete") == incomplete)
        assert stats["frames"] == statuses.count(Status.OK) and stats["partial_frames"] == 0
        assert srv.metrics()["frames_in_flight"] == 0
    assert srv.pool.slots_in_use == 0


@pytest.mark.asyncio
async def test_a_killed_worker_costs_only_its_udp_producers_frames_then_its_socket_serves_again() -> None:
    """The scheduling process keeps each worker's UDP socket: a killed worker's producers lose what it held,
    the other worker's lose nothing, and the restarted worker reads the same socket, so those producers,
    unchanged (same source address, same kernel hash), are served again."""
    async with Server(udp_config()) as srv:
        listener, by_worker = await udp_producers_by_worker(srv)
        victim_pid = listener.pids[0]
        data = frames(20, seed=8)
        survivors = [c.submit(f, stream_id=1) for c in by_worker[1] for f in data]
        os.kill(victim_pid, signal.SIGKILL)
        assert all(r.ok for r in await asyncio.gather(*survivors))
        async with asyncio.timeout(10):  # its range is reclaimed once nothing reads it, then it restarts
            while listener.stats()["workers_alive"] < 2 or victim_pid in listener.pids:
                await asyncio.sleep(0.01)
        assert listener.stats()["worker_restarts"] == 1
        for conn in by_worker[0]:  # the same producers, through the new worker on the same socket
            replies = await asyncio.gather(*(conn.submit(f, stream_id=2) for f in data[:5]))
            assert all(r.ok for r in replies), [r.status for r in replies]
        for conns in by_worker.values():
            for conn in conns:
                await conn.close()
        assert srv.metrics()["frames_in_flight"] == 0
    assert srv.pool.slots_in_use == 0


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
async def test_an_http_listener_beside_the_workers_has_its_own_share_of_the_ring() -> None:
    """With ingest workers, an http listener (status, metrics, HTTP inference) is served by the scheduling
    process, out of one more share of the ring: TCP and UDP through the workers, HTTP here, all answered."""
    listeners = [ListenerSpec("tcp", "127.0.0.1", 0), ListenerSpec("udp", "127.0.0.1", 0),
                 ListenerSpec("http", "127.0.0.1", 0)]  # fmt: skip
    cfg = config(listeners=listeners)
    assert cfg.worker_ring_bytes == (1 << 22) // 3 & ~255  # two workers and this process
    assert config(listeners=listeners[:2]).worker_ring_bytes == 1 << 21  # only the workers
    async with Server(cfg) as srv:
        tcp, udp, http = (port for _, port in srv.addresses)
        data = frames(3, seed=12)
        async with await client.connect("127.0.0.1", tcp) as conn:
            want = [(await conn.infer(f)).unwrap() for f in data]
        udp_conn = await client.connect_udp("127.0.0.1", udp, reply_timeout=10)
        got = [(await udp_conn.infer(f)).unwrap() for f in data]
        await udp_conn.close()
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        head = {"inputs": [{"name": "input", "datatype": "UINT8", "shape": [1, *SPEC.input_shape],
                            "parameters": {"binary_data_size": SPEC.frame_nbytes}}]}  # fmt: skip
        header = json.dumps(head).encode()
        async with aiohttp.ClientSession() as session:
            async with session.post(f"http://127.0.0.1:{http}/v2/models/default/infer", data=header + data[0].tobytes(),
                                    headers={"Inference-Header-Content-Length": str(len(header))}) as resp:  # fmt: skip
                assert resp.status == 200, await resp.text()
            async with session.get(f"http://127.0.0.1:{http}/v1/status") as resp:
                status = await resp.json()
        assert status["udp_listeners"][0]["port"] == udp and status["models"][0]["completed"] == 7
    assert srv.pool.slots_in_use == 0


# -- outcomes a worker gives itself: a hostile review --------------------------------------------


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
@pytest.mark.parametrize("workers", [0, 1])
async def test_a_refusal_made_while_a_reply_is_delivered_is_published(workers: int) -> None:
    """Regression: a worker's REPLY that frees a place under max_frames_per_connection lets the headers
    waiting in the connection's buffer be parsed at once, inside the delivery; their refusals were taken
    for the delivered frame's outcome (published by the scheduling process) and reached no subscriber."""
    from tests.ingest.test_tcp import frame, hello

    async with Server(config(ingest_workers=workers, max_frames_per_connection=1)) as srv:
        got: list[tuple[int, Status]] = []
        srv.admission.stream_results.subscribe(7, lambda head, outcome: got.append((head.sequence, outcome.status)))
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        # One write: the refused frames' headers wait in the worker's buffer behind frame 0.
        writer.write(hello() + frame(SPEC, 0, 7) + b"".join(frame(SPEC, i, 7, model="nope") for i in (1, 2, 3)))
        buf, statuses = b"", list[Status]()
        async with asyncio.timeout(5):
            while (welcome := wire.decode_welcome(buf)) is None:
                buf += await reader.read(65536)
            buf = buf[welcome[1] :]
            while len(statuses) < 4:
                while (reply := wire.decode_reply(buf)) is None:
                    buf += await reader.read(65536)
                statuses.append(reply[0].status)
                buf = buf[reply[2] :]
        with contextlib.suppress(TimeoutError):  # (published at the latest as the replies went out)
            async with asyncio.timeout(1):
                while len(got) < 4:
                    await asyncio.sleep(0.01)
        writer.close()
        assert statuses == [Status.OK] + [Status.UNKNOWN_MODEL] * 3
        assert sorted(got) == [(0, Status.OK), (1, Status.UNKNOWN_MODEL), (2, Status.UNKNOWN_MODEL),
                               (3, Status.UNKNOWN_MODEL)]  # fmt: skip


def answered_records(header: FrameHeader, outcome: Outcome, origin: Origin) -> bytes:
    """What a worker sends up for an outcome it gave ``header``'s frame itself."""
    chan = worker._Channel(config())
    up = FakeTransport()
    chan.connection_made(up)  # type: ignore[arg-type]
    chan._out.append(channel.answered(header, outcome, origin.source, origin.stream))
    chan._flush()
    return bytes(up.written)


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
async def test_a_model_name_with_nul_bytes_is_published_whole() -> None:
    """Regression: a model name is any 1..255 UTF-8 bytes, NUL included; the ANSWERED text separated its
    fields by NUL, so a refused frame of model "x\\0y" was published as model "x" with "y\\0..." before
    its message."""
    async with Server(config(ingest_workers=1)) as srv:
        seen: list[tuple[str, str]] = []
        srv.admission.stream_results.subscribe(5, lambda head, outcome: seen.append((head.model, outcome.message)))
        async with await client.connect("127.0.0.1", srv.port) as conn:
            reply = await conn.submit(frames(1, seed=5)[0], stream_id=5, model="x\0y\0")
        assert reply.status == Status.UNKNOWN_MODEL
        async with asyncio.timeout(5):
            while not seen:
                await asyncio.sleep(0.01)
    assert seen == [("x\0y\0", reply.message)]
    # Every field whole, the longest model name (all NUL) and a message cut at the channel's limit included.
    parent, admission, segment = parent_worker(config())
    got: list[tuple[FrameHeader, Outcome, Origin]] = []
    admission.stream_results.tap(lambda head, outcome, origin: got.append((head, outcome, origin)))
    for model, message in (("\0" * 255, "no model named " + repr("\0" * 255)), ("m", "\0é" * 40000)):
        header = FrameHeader(9, 4, model, 1, (8, 8, 3), 192)
        data = answered_records(header, Outcome(Status.UNKNOWN_MODEL, message), Origin("udp", "udp:[::1]:5"))
        parent.data_received(data)
        head, outcome, origin = got.pop()
        assert (head.model, origin) == (model, Origin("udp", "udp:[::1]:5"))
        if len(message.encode()) < 65000:
            assert outcome.message == message
        else:  # cut at the channel's limit (where the reply itself is cut: wire.MAX_MESSAGE)
            assert message.startswith(outcome.message.rstrip("\ufffd")) and len(outcome.message.encode()) > 65000
    segment.close()


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
async def test_outcomes_a_worker_gives_itself_cost_the_parent_nothing_while_nobody_watches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Regression: every refusal a worker made was decoded into a header and an Outcome by the scheduling
    process whether or not anybody watched (15 to 70 us a refusal here against 1 us for its REPLIED
    record): a UDP producer sending refused datagrams, which needs to read nothing, loaded the scheduling
    loop more than its worker. Unwatched, an ANSWERED record and its TEXT records are skipped."""
    decoded: list[int] = []
    outcome_of = channel.Answer.outcome

    def counted(self: channel.Answer) -> tuple[FrameHeader, Outcome, str, str]:
        decoded.append(1)
        return outcome_of(self)

    monkeypatch.setattr(channel.Answer, "outcome", counted)
    parent, admission, segment = parent_worker(config())
    header = FrameHeader(9, 4, "\0" * 255, 1, (8, 8, 3), 192)
    refusal = Outcome(Status.UNKNOWN_MODEL, "no model named " + repr(header.model))
    data = answered_records(header, refusal, Origin("udp", "udp:h:1")) * 50
    parent.data_received(data)
    assert decoded == [] and admission.stream_results.published == 0
    seen: list[int] = []
    sub = admission.stream_results.subscribe(9, lambda head, outcome: seen.append(head.sequence))
    parent.data_received(data[: len(data) // 2 + 40])  # (its last record split across reads)
    parent.data_received(data[len(data) // 2 + 40 :])
    assert seen == [4] * 50
    sub.cancel()
    admission.stream_results.subscribe(10, lambda head, outcome: seen.append(head.sequence))  # another stream
    parent.data_received(data)
    assert len(decoded) == 50 and len(seen) == 50
    segment.close()


async def kill_with_no_replacement(srv: Server, monkeypatch: pytest.MonkeyPatch) -> WorkerListener:
    """Kill worker 0 while no process can be started (Popen failing: out of file descriptors): its
    replacement stands in, not alive. Returns the listener."""
    listener = listener_of(srv)
    first = listener._workers[0]
    assert first.proc is not None

    def no_process(*args: Any, **kw: Any) -> subprocess.Popen[bytes]:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(workers.subprocess, "Popen", no_process)
    os.kill(first.proc.pid, signal.SIGKILL)
    async with asyncio.timeout(5):
        while listener._workers[0] is first or listener._workers[0].alive:
            await asyncio.sleep(0.01)
    return listener


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
async def test_a_replacement_that_could_not_be_spawned_is_not_alive_and_does_not_hold_up_shutdown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Regression: a replacement worker whose process could not be started (Popen failing: out of file
    descriptors, of memory) stayed ``alive`` with no channel: /metrics counted it among the live workers,
    shutdown's STOP waited for it (records sent to a worker not yet connected now wait), and shutdown
    took its whole timeout waiting for a STOPPED that could never come."""
    async with Server(config(shutdown_timeout_s=3.0)) as srv:
        listener = await kill_with_no_replacement(srv, monkeypatch)
        assert listener.stats()["workers_alive"] == 1
        assert not listener._workers[0].alive
        loop = asyncio.get_running_loop()
        began = loop.time()
    assert loop.time() - began < 1.5


@pytest.mark.asyncio
async def test_models_loaded_and_unloaded_while_serving_are_the_ones_the_workers_take(server: Server) -> None:
    """The workers admit what the scheduling process serves now, not the config's list: a model loaded
    while serving is taken on every worker (and by one started after the load), an unloaded one is
    UNKNOWN_MODEL there, and a name loaded again with other frames takes those; replies are counted
    under the model's own name."""
    listener = listener_of(server)
    late = ModelSpec(name="late", input_shape=(4, 4, 3), max_batch_size=8, batch_buckets=(1, 8))
    late_frame = np.full(late.input_shape, 7, np.uint8)

    async def served(conns: list[client.Connection], spec: ModelSpec, frame: np.ndarray) -> set[Status]:
        replies = await asyncio.gather(*(c.submit(frame, model=spec.name, stream_id=5) for c in conns))
        return {r.status for r in replies}

    by_worker = await on_each_worker(lambda: client.connect("127.0.0.1", server.port), listener)
    conns = [c for cs in by_worker.values() for c in cs]
    assert await served(conns, late, late_frame) == {Status.UNKNOWN_MODEL}
    await server.load_model(late)
    assert await served(conns, late, late_frame) == {Status.OK}
    assert ("late", Status.OK, 2 * len(conns)) not in list(server.replies.items())  # one round was refused
    assert ("late", Status.OK, len(conns)) in list(server.replies.items())

    victim = listener.pids[0]
    os.kill(victim, signal.SIGKILL)  # its replacement starts after the load
    async with asyncio.timeout(20):  # until the replacement said READY (it takes connections from then on)
        while len(listener.pids) < 2 or victim in listener.pids or not all(w.started for w in listener._workers):
            await asyncio.sleep(0.01)
    fresh = await on_each_worker(lambda: client.connect("127.0.0.1", server.port), listener)
    assert await served(fresh[0] + fresh[1], late, late_frame) == {Status.OK}

    await server.unload_model("late")
    assert await served(fresh[0] + fresh[1], late, late_frame) == {Status.UNKNOWN_MODEL}
    wider = dataclasses.replace(late, input_shape=(6, 6, 3))
    await server.load_model(wider)
    assert await served(fresh[0] + fresh[1], wider, np.zeros(wider.input_shape, np.uint8)) == {Status.OK}
    assert await served(fresh[0] + fresh[1], late, late_frame) == {Status.BAD_FRAME}  # the old frames now
    assert await served(fresh[0] + fresh[1], SPEC, frames(1, 0)[0]) == {Status.OK}  # the config's model too
    for conn in [*by_worker[1], *fresh[0], *fresh[1]]:
        await conn.close()


@pytest.mark.asyncio
async def test_a_hung_worker_is_killed_and_replaced_and_costs_only_its_connections(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(workers, "WORKER_HANG_S", 1.5)
    listener = listener_of(server)
    by_worker = await on_each_worker(lambda: client.connect("127.0.0.1", server.port), listener)
    hung = listener.pids[0]
    os.kill(hung, signal.SIGSTOP)  # silent from now on, its connections open but unread
    try:
        stuck = by_worker[0][0].submit(frames(1, 1)[0], stream_id=4)
        async with asyncio.timeout(20):
            while len(listener.pids) < 2 or hung in listener.pids or not all(w.started for w in listener._workers):
                assert all(r.ok for r in await asyncio.gather(*(c.submit(frames(1, 2)[0]) for c in by_worker[1])))
                await asyncio.sleep(0.05)
        with pytest.raises(client.ConnectionClosedError):  # its connections closed with it
            await stuck
        assert listener.stats()["worker_restarts"] == 1
        fresh = await on_each_worker(lambda: client.connect("127.0.0.1", server.port), listener)
        for conn in [*by_worker[1], *fresh[0], *fresh[1]]:
            assert (await conn.submit(frames(1, 3)[0])).ok
            await conn.close()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(hung, signal.SIGCONT)


@pytest.mark.asyncio
@pytest.mark.parametrize("workers", [0, 1])
async def test_a_frame_arriving_across_an_unload_and_a_reload_with_other_frames_is_unknown_model(workers: int) -> None:
    """Regression: a frame admitted before its model was unloaded, whose payload ended after it (and after
    the name was loaded again taking larger frames), was sent up by the worker under the name's index of
    then (a KeyError there once unloaded: the connection failed, its slot held; the new model's index once
    reloaded: its 48 bytes run as a 108-byte frame). It is UNKNOWN_MODEL, and its connection serves on."""
    from tests.ingest.test_tcp import frame, hello

    late = ModelSpec(name="late", input_shape=(4, 4, 3), max_batch_size=8, batch_buckets=(1, 8))
    wider = dataclasses.replace(late, input_shape=(6, 6, 3))
    async with Server(config(ingest_workers=workers, shutdown_timeout_s=2.0)) as srv:
        await srv.load_model(late)
        conns = [await asyncio.open_connection("127.0.0.1", srv.port) for _ in range(2)]
        bufs = [b"", b""]

        async def reply(i: int) -> wire.ReplyHeader:
            reader = conns[i][0]
            while (got := wire.decode_reply(bufs[i])) is None:
                bufs[i] += await reader.read(65536)
            bufs[i] = bufs[i][got[2] :]
            return got[0]

        tails = []
        async with asyncio.timeout(20):
            for i, (reader, writer) in enumerate(conns):
                whole = frame(late, 1, stream=1)
                writer.write(hello() + frame(SPEC, 0) + whole[:-10])  # frame 1's header is taken with frame 0
                tails.append(whole[-10:])
                while (welcome := wire.decode_welcome(bufs[i])) is None:
                    bufs[i] += await reader.read(65536)
                bufs[i] = bufs[i][welcome[1] :]
                assert (await reply(i)).status == Status.OK
            await asyncio.sleep(0.2)  # (frame 1's header, behind frame 0's payload, is admitted by now)
            await srv.unload_model("late")
            conns[0][1].write(tails[0])
            assert (await reply(0)).status == Status.UNKNOWN_MODEL
            await srv.load_model(wider)
            conns[1][1].write(tails[1])
            assert (await reply(1)).status == Status.UNKNOWN_MODEL
            conns[0][1].write(frame(SPEC, 2))
            conns[1][1].write(frame(wider, 2, stream=1))
            assert [(await reply(i)).status for i in (0, 1)] == [Status.OK, Status.OK]
        for _, writer in conns:
            writer.close()
    assert srv.pool.slots_in_use == 0


@pytest.mark.asyncio
async def test_a_new_version_s_admission_settings_reach_the_workers(server: Server) -> None:
    """Regression: a new version (same frames) was not announced to the workers, which went on admitting
    by the old spec: its default_deadline_ms (set at admission) was the old one there, not in one-process
    mode."""
    conn = await client.connect("127.0.0.1", server.port)
    try:
        assert (await conn.submit(frames(1, 0)[0])).ok
        await server.swap_model(SPEC.name, dataclasses.replace(SPEC, default_deadline_ms=0.001))
        assert (await conn.submit(frames(1, 1)[0])).status == Status.DEADLINE_MISSED
    finally:
        await conn.close()


# -- what a producer sees is the same in both modes ------------------------------------------------


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
@pytest.mark.parametrize("workers", [0, 2])
async def test_a_long_non_ascii_message_is_cut_on_a_character_boundary_in_both_modes(
    workers: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scheduler message over wire.MAX_MESSAGE bytes (a model's exception: 4-byte characters) reaches the
    producer cut where one-process mode cuts it, on a character boundary; the REPLY record cut it inside a
    character, and the worker's reply ended in U+FFFD."""
    from streamgpu.gpu import cpu

    def fails(self: cpu.CpuModel, batch: np.ndarray) -> Any:
        raise RuntimeError("\U0001f600" * 20000)

    monkeypatch.setattr(cpu.CpuModel, "run", fails)
    async with Server(config(ingest_workers=workers)) as srv, await client.connect("127.0.0.1", srv.port) as conn:
        reply = await conn.submit(frames(1, seed=1)[0])
    full = "inference failed: RuntimeError: " + "\U0001f600" * 20000
    assert reply.status == Status.INTERNAL_ERROR
    assert reply.message == full.encode()[: wire.MAX_MESSAGE].decode(errors="ignore"), reply.message[-3:]


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
@pytest.mark.parametrize("workers", [0, 2])
async def test_a_frame_for_an_unloaded_model_is_counted_under_its_name_in_both_modes(workers: int) -> None:
    """/metrics counts the UNKNOWN_MODEL reply to a frame naming a model unloaded while serving under that
    model's name (its label is known: no made-up name grows the set), with workers as in one process; a
    worker said "no model" for it, and the count went under model=""."""
    late = ModelSpec(name="late", input_shape=(4, 4, 3), max_batch_size=4, batch_buckets=(1, 4))
    data = np.zeros((4, 4, 3), np.uint8)
    async with Server(config(ingest_workers=workers)) as srv:
        await srv.load_model(late)
        async with await client.connect("127.0.0.1", srv.port) as conn:
            assert (await conn.submit(data, model="late")).ok
            await srv.unload_model("late")
            assert (await conn.submit(data, model="late")).status == Status.UNKNOWN_MODEL
            assert (await conn.submit(data, model="never")).status == Status.UNKNOWN_MODEL

        def counts() -> set[tuple[str, Status, int]]:
            return {item for item in srv.replies.items() if item[1] == Status.UNKNOWN_MODEL}

        async with asyncio.timeout(5):  # (a worker's REPLIED records come up beside its replies)
            while sum(n for *_, n in counts()) < 2:
                await asyncio.sleep(0.01)
        assert counts() == {("late", Status.UNKNOWN_MODEL, 1), ("", Status.UNKNOWN_MODEL, 1)}


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
@pytest.mark.parametrize("workers", [0, 2])
async def test_a_producer_s_outcomes_are_published_under_one_stream_name_in_both_modes(workers: int) -> None:
    """Subscribers and the results sink see every outcome of one producer under one stream name: its refused
    frames (answered by a worker) under the name of the frames the scheduler answered. A UDP producer is
    named by its source address, a TCP connection "tcp:N" ("tcp:wW/N" in worker W). With workers, refusals
    went out under the worker's own names ("tcp:N", which another worker's connection also has) and the
    rest under "tcp:wW/N" and "udp:wW/N"."""
    async with Server(udp_config(ingest_workers=workers)) as srv:
        seen: list[tuple[int, Origin]] = []
        srv.admission.stream_results.tap(lambda head, _, origin: seen.append((head.stream_id, origin)))
        data = frames(1, seed=4)[0]
        udp = await client.connect_udp("127.0.0.1", srv.addresses[1][1], reply_timeout=5)
        udp_port = udp.socket.getsockname()[1]
        tcp = [await client.connect("127.0.0.1", srv.port) for _ in range(4)]
        for i, conn in enumerate([udp, *tcp]):
            replies = await asyncio.gather(conn.submit(data, stream_id=i, model="nope"), conn.submit(data, stream_id=i))
            assert [r.status for r in replies] == [Status.UNKNOWN_MODEL, Status.OK]
            await conn.close()
        async with asyncio.timeout(5):  # (a worker's refusals are published as its records come up)
            while len(seen) < 10:
                await asyncio.sleep(0.01)
    names: dict[int, set[Origin]] = {}
    for stream_id, origin in seen:
        names.setdefault(stream_id, set()).add(origin)
    assert all(len(origins) == 1 for origins in names.values()), names
    assert names.pop(0) == {Origin("udp", f"udp:127.0.0.1:{udp_port}")}
    tcp_names = [origin.stream for (origin,) in names.values()]
    assert len(set(tcp_names)) == 4, tcp_names
    pattern = r"tcp:w[01]/\d+" if workers else r"tcp:\d+"
    assert all(re.fullmatch(pattern, name) for name in tcp_names), tcp_names


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
@pytest.mark.parametrize("workers", [0, 2])
async def test_the_connections_gauge_counts_the_workers_connections_in_both_modes(workers: int) -> None:
    """streamgpu_connections (``Server.connections``, /v1/status) counts the producer connections open: TCP
    ones (one that sent nothing yet included) and UDP producers, with workers as in one process, where it
    said 0 with workers (their connections are counted in the workers' own admission)."""
    async with Server(udp_config(ingest_workers=workers)) as srv:
        udp = await client.connect_udp("127.0.0.1", srv.addresses[1][1], reply_timeout=5)
        tcp = [await client.connect("127.0.0.1", srv.port) for _ in range(4)]
        for conn in [udp, *tcp[:3]]:
            assert (await conn.submit(frames(1, seed=2)[0])).ok

        async def until(count: int) -> None:
            async with asyncio.timeout(5):  # (workers report their UDP producers once per sweep)
                while srv.connections != count:
                    await asyncio.sleep(0.02)
            assert srv.metrics()["connections"] == count

        await until(5)
        for conn in [udp, *tcp]:
            await conn.close()
        await until(1)  # a UDP producer is one until it has been idle for peer_idle_s


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
@pytest.mark.parametrize("workers", [0, 2])
async def test_a_tokens_max_connections_is_one_count_over_workers_and_front_ends_in_both_modes(workers: int) -> None:
    """A token's max_connections is one count, whichever worker a connection lands on and whether it is TCP or a
    WebSocket. Review: each worker admitted its share (2 workers, a cap of 2: one each), so a token whose second
    connection landed on the worker holding its first was refused below its cap, and TCP connections were not
    counted with the WebSockets (4 open at once for a cap of 2)."""
    tokens = {"fleet": TokenSpec("fleet-key", max_connections=2), "ops": TokenSpec("ops-key")}
    listeners = [ListenerSpec(port=0), ListenerSpec(kind="http", port=0)]
    async with Server(config(ingest_workers=workers, tokens=tokens, listeners=listeners)) as srv:
        ws_url = f"ws://127.0.0.1:{srv.addresses[1][1]}/v1/stream?token=fleet-key"
        # ops, fleet, ops: the second fleet connection goes to the worker holding the first (the emptiest)
        opened = [await client.connect("127.0.0.1", srv.port, token=token)
                  for token in ("ops-key", "fleet-key", "ops-key", "fleet-key")]  # fmt: skip
        for conn in opened:
            assert (await conn.submit(frames(1, seed=2)[0])).ok
        with pytest.raises(client.HandshakeError, match="OVERLOADED: too many connections of token 'fleet' "
                           r"\(its max_connections is 2\)"):  # fmt: skip
            await client.connect("127.0.0.1", srv.port, token="fleet-key")
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await session.ws_connect(ws_url)
            assert refused.value.status == 503
            await opened[1].close()  # a place for one: a WebSocket takes it, then TCP is refused again
            async with asyncio.timeout(5):
                while True:
                    try:
                        ws = await session.ws_connect(ws_url)
                        break
                    except aiohttp.WSServerHandshakeError:
                        await asyncio.sleep(0.02)
            with pytest.raises(client.HandshakeError, match="OVERLOADED"):
                await client.connect("127.0.0.1", srv.port, token="fleet-key")
            await ws.close()
        for conn in [opened[0], *opened[2:]]:
            await conn.close()


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
@pytest.mark.parametrize("workers", [0, 2])
async def test_connections_gone_while_their_hello_is_answered_leave_the_tokens_count_in_both_modes(
    workers: int,
) -> None:
    """A token's connections that close right after their HELLO (with workers: while it asks the scheduling
    process) hold none of the token's places afterwards."""
    tokens = {"fleet": TokenSpec("fleet-key", max_connections=1)}
    async with Server(config(ingest_workers=workers, tokens=tokens)) as srv:
        hello = wire.encode_hello(wire.Hello(token="fleet-key"))
        for _ in range(20):
            _, writer = await asyncio.open_connection("127.0.0.1", srv.port)
            writer.write(hello)
            writer.close()  # gone before (or as) the answer comes
        async with asyncio.timeout(5):  # the server sees them go
            while True:
                try:
                    conn = await client.connect("127.0.0.1", srv.port, token="fleet-key")
                    break
                except client.HandshakeError:
                    await asyncio.sleep(0.02)
        assert (await conn.submit(frames(1, seed=2)[0])).ok
        with pytest.raises(client.HandshakeError, match="OVERLOADED"):  # the one place is its
            await client.connect("127.0.0.1", srv.port, token="fleet-key")
        await conn.close()


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
@pytest.mark.parametrize("workers", [0, 2])
async def test_the_ring_gauge_counts_what_frames_hold_in_both_modes(workers: int) -> None:
    """streamgpu_ring_used_bytes (``metrics()["ring"]``, /v1/status) is what frames hold: a frame being
    received holds its slot, an idle server nothing, with workers as in one process, where it counted
    every worker's whole range (the ring, or all of it but an http listener's share) at all times."""
    from tests.ingest.test_tcp import frame, hello

    async with Server(config(ingest_workers=workers)) as srv:

        async def until(held: Callable[[int], bool]) -> None:
            async with asyncio.timeout(5):  # (workers report theirs once per sweep)
                while not held(used := srv.metrics()["ring"]["used_bytes"]):
                    await asyncio.sleep(0.02)
            assert srv.ring_used_bytes == used

        await until(lambda used: used == 0)
        _, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        writer.write(hello() + frame(SPEC, 0)[:-10])  # its slot is held until the rest comes
        await until(lambda used: used >= SPEC.frame_nbytes)
        writer.close()
        await until(lambda used: used == 0)


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
@pytest.mark.parametrize("workers", [0, 2])
async def test_frames_of_a_connection_closed_for_lost_framing_do_not_run_in_both_modes(
    workers: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection whose framing is lost is told so and closed; its frames still queued are dropped (their
    replies could go nowhere), with workers as in one process, where they all ran on the device while the
    worker's connection lingered (its producer still connected, reading), costing others their turn."""
    from streamgpu.gpu import cpu
    from tests.ingest.test_tcp import frame, hello

    plain = cpu.CpuModel.run

    def slow(self: cpu.CpuModel, batch: np.ndarray) -> Any:
        time.sleep(0.05)
        return plain(self, batch)

    monkeypatch.setattr(cpu.CpuModel, "run", slow)
    spec = dataclasses.replace(SPEC, max_batch_size=1, batch_buckets=(1,))
    async with Server(config(models=[spec], ingest_workers=workers)) as srv:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        writer.write(hello() + b"".join(frame(spec, i) for i in range(20)) + b"XXXX" + bytes(60))
        got = b""
        async with asyncio.timeout(5):
            while wire.decode_welcome(got) is None or srv.frames_in_flight or not srv.replies.total(Status.BAD_FRAME):
                got += await asyncio.wait_for(reader.read(65536), 5)
                await asyncio.sleep(0.01)
        writer.close()
    assert srv.replies.total(Status.OK) <= 5, sorted(srv.replies.items())
    assert srv.replies.total(Status.OK) + srv.replies.total(Status.SHUTTING_DOWN) == 20


@pytest.mark.asyncio
async def test_the_range_of_a_worker_that_could_not_be_replaced_is_not_counted_as_used(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """streamgpu_ring_used_bytes is what frames hold: a dead worker's range, once nothing of it is held, and
    a replacement that could not start hold nothing; they counted as wholly used (here half the ring, idle,
    for as long as the replacement could not start)."""
    async with Server(config()) as srv:
        await kill_with_no_replacement(srv, monkeypatch)
        assert srv.ring_used_bytes == 0 and srv.metrics()["ring"]["used_bytes"] == 0


@pytest.mark.asyncio
async def test_a_replacement_worker_s_connections_are_not_named_as_its_predecessor_s() -> None:
    """A connection's stream name (subscribers, the results sink) is its own for the server's life, as in one
    process: a replacement worker's connection ids start again at 1, and its first connection was published
    as "tcp:w0/1", the name of its predecessor's first connection."""
    async with Server(config(ingest_workers=1)) as srv:
        seen: list[str] = []
        srv.admission.stream_results.tap(lambda head, _, origin: seen.append(origin.stream))
        listener = listener_of(srv)
        for _ in range(2):
            async with await client.connect("127.0.0.1", srv.port) as conn:
                assert (await conn.submit(frames(1, seed=1)[0])).ok
            (pid,) = listener.pids
            os.kill(pid, signal.SIGKILL)
            async with asyncio.timeout(10):
                while not listener.pids or listener.pids == [pid]:
                    await asyncio.sleep(0.01)
    assert len(seen) == len(set(seen)) == 2, seen


# -- a worker that cannot start, and one that exits ------------------------------------------------------------------

POPEN = subprocess.Popen


class FailingSpawn:
    """``Popen`` for worker processes, the next ``failures`` of which fail as a bad environment makes them (the
    rest are real workers): "killed" dies before it takes its init (SIGKILL, as the OOM killer's), "exits" exits
    with status 3 once it has it (as an interpreter that cannot import streamgpu), "lingers" closes its channel
    once it has it and runs on (as one whose exit hangs). ``spawned``: every process."""

    def __init__(self, how: str, failures: int) -> None:
        self.how = how
        self.failures = failures
        self.spawned: list[subprocess.Popen[bytes]] = []

    def __call__(self, args: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        failing = self.failures > 0
        self.failures -= failing
        if failing and self.how == "exits":  # (args[-1]: its end of the channel)
            args = [sys.executable, "-c", "import os, sys; os.read(int(sys.argv[1]), 1); sys.exit(3)", args[-1]]
        if failing and self.how == "lingers":
            code = "import os, sys, time; os.read(int(sys.argv[1]), 1); os.close(int(sys.argv[1])); time.sleep(60)"
            args = [sys.executable, "-c", code, args[-1]]
        proc = POPEN(args, **kw)
        if failing and self.how == "killed":
            proc.kill()
            proc.wait()
        self.spawned.append(proc)
        return proc

    def failure(self, index: int) -> str:
        """What the error says of spawned process ``index`` that failed."""
        status = "exit status 3" if self.how == "exits" else "killed by SIGKILL"
        return f"ingest worker 0 (pid {self.spawned[index].pid}) exited while starting ({status}); its own error"


def says_what_to_check(message: str) -> bool:
    return f"'{sys.executable} -m streamgpu.ingest.worker' can import streamgpu" in message and (
        "--ingest-workers 0" in message
    )


@pytest.mark.parametrize("how", ["killed", "exits", "lingers"])
def test_a_worker_that_cannot_start_fails_serve_with_a_message_and_leaves_nothing_running(
    how: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker that died while starting (a bad environment, killed) failed 'streamgpu serve' with a
    RuntimeError traceback ("exited while starting"), or with 'cannot serve: [Errno 32] Broken pipe' when it
    was gone before its init was sent: now 'cannot serve: ...' names it, its exit status and what to check,
    and the other worker and the port are not left behind. One that closed its channel and ran on is killed
    (REAP_GRACE_S), and said so: its "killed by SIGKILL" read as another's doing (the OOM killer's)."""
    spawn = FailingSpawn(how, failures=1)
    monkeypatch.setattr(workers.subprocess, "Popen", spawn)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = ["serve", "--port", str(port), "--device", "cpu", "--model", "builtin:small", "--ingest-workers", "2"]
    assert cli.main(argv) == 1
    (record,) = [r for r in caplog.records if r.getMessage().startswith("cannot serve")]
    assert record.getMessage().startswith(f"cannot serve: {spawn.failure(0)}"), record.getMessage()
    assert says_what_to_check(record.getMessage()) and "Traceback" not in caplog.text
    killing = f"ingest worker 0 (pid {spawn.spawned[0].pid}) still ran 1 s after its channel closed: killing it"
    assert (killing in caplog.text) == (how == "lingers")
    assert spawn.spawned and all(p.returncode is not None for p in spawn.spawned)  # every worker ended and reaped
    socket.create_server(("127.0.0.1", port)).close()  # its port is free


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
@pytest.mark.parametrize("how", ["killed", "exits"])
async def test_a_replacement_that_cannot_start_says_why_while_the_other_worker_serves(
    how: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A replacement that died while starting was logged as "exited while starting (exit status ...); see its
    log", or as "[Errno 32] Broken pipe": now as clearly as at the server's start; meanwhile the other worker
    serves, and a later try that starts serves again."""
    async with Server(config()) as srv:
        listener = listener_of(srv)
        spawn = FailingSpawn(how, failures=1000)
        monkeypatch.setattr(workers.subprocess, "Popen", spawn)
        os.kill(listener.pids[0], signal.SIGKILL)
        async with asyncio.timeout(10):
            while not (failed := [m for r in caplog.records if "restarting ingest" in (m := r.getMessage())]):
                await asyncio.sleep(0.01)
        assert failed[0].startswith(f"restarting ingest worker 0 failed: {spawn.failure(0)}"), failed[0]
        assert says_what_to_check(failed[0]) and failed[0].endswith("; trying again in 0.4 s")
        assert listener.stats()["workers_alive"] == 1
        assert all(r.ok for _, r in await run_streams(srv.port, frames(16, seed=7), nconn=4))  # the other one serves
        spawn.failures = 0
        async with asyncio.timeout(10):
            while listener.stats()["workers_alive"] < 2:
                await asyncio.sleep(0.01)
        assert all(r.ok for _, r in await run_streams(srv.port, frames(16, seed=8), nconn=4))
        assert all(p.returncode is not None for p in spawn.spawned[:-1])  # the failed ones were reaped


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
async def test_a_worker_that_exited_is_logged_with_its_exit_status_before_it_was_reaped(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A dying process's descriptors close before it can be reaped: the warning, written as its channel
    closed, said "exited (status None)". Here it is not reaped yet whenever it is looked at."""
    async with Server(config(ingest_workers=1)) as srv:
        listener = listener_of(srv)
        proc = listener._workers[0].proc
        assert proc is not None
        monkeypatch.setattr(proc, "poll", lambda: None)
        os.kill(proc.pid, signal.SIGKILL)
        async with asyncio.timeout(10):
            while listener.pids in ([], [proc.pid]):
                await asyncio.sleep(0.01)
    exited = [r.getMessage() for r in caplog.records if " exited " in r.getMessage()]
    assert exited == [
        f"ingest worker 0 (pid {proc.pid}) exited (killed by SIGKILL); its connections closed; starting a new one"
    ]


@pytest.mark.asyncio
async def test_a_worker_reaped_as_the_server_stops_is_not_said_to_be_replaced(caplog: pytest.LogCaptureFixture) -> None:
    """Its exit is logged once it is reaped, off the loop: a worker that died just before the server began to
    stop was logged during the shutdown as "...; starting a new one", and none was started."""
    async with Server(config(ingest_workers=1)) as srv:
        listener = listener_of(srv)
        dead = listener._workers[0]
        assert dead.proc is not None
        os.kill(dead.proc.pid, signal.SIGKILL)
        async with asyncio.timeout(10):
            while dead.alive:  # its channel closed: it is being reaped as the server stops
                await asyncio.sleep(0)
    exited = [r.getMessage() for r in caplog.records if " exited " in r.getMessage()]
    assert exited == [f"ingest worker 0 (pid {dead.proc.pid}) exited (killed by SIGKILL); its connections closed"]
    assert listener.restarts == 0


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
async def test_workers_that_die_soon_after_starting_again_and_again_are_replaced_later_each_time(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A crash loop (each replacement dying right after it started: a bug a frame or the environment sets off)
    was answered with a new worker every ~0.2 s for good; from the second death in a row within CRASH_LOOP_S
    of starting, the replacement waits twice as long each time. The other worker serves throughout."""
    async with Server(config()) as srv:
        listener = listener_of(srv)
        dead_at: list[float] = []
        for _ in range(3):
            worker = listener._workers[0]
            assert worker.proc is not None and worker.started
            dead_at.append(time.monotonic())
            os.kill(worker.proc.pid, signal.SIGKILL)
            async with asyncio.timeout(10):
                while listener._workers[0] is worker or not listener._workers[0].started:
                    await asyncio.sleep(0.01)
            dead_at[-1] = time.monotonic() - dead_at[-1]
        assert all(r.ok for _, r in await run_streams(srv.port, frames(16, seed=9), nconn=4))
    exited = [m.partition("; its connections closed")[2] for r in caplog.records if " exited " in (m := r.getMessage())]
    assert exited == [
        "; starting a new one",
        "; its workers died 2 times in a row within 10 s of starting: starting a new one in 0.4 s",
        "; its workers died 3 times in a row within 10 s of starting: starting a new one in 0.8 s",
    ]
    assert dead_at[2] >= 0.8  # the third replacement waited its 0.8 s


def test_a_batch_may_fill_every_share_of_the_ring_but_no_more() -> None:
    """With ingest workers a batch's frames lie in several workers' ranges at once, each holding whole frames: a
    max_batch_size those ranges hold together is served (a worker's copy of the config, checked again as a
    server whose whole ring was its range, refused it at start), one past them is refused naming the most."""
    big = dataclasses.replace(SPEC, input_shape=(512, 512, 3), max_batch_size=4, batch_buckets=(1, 4))
    cfg = config(models=[big])  # frames of 786432 bytes: 2 to a worker's range of 2 MiB
    admission = Admission(cfg, SlotPool(HostSegment.create(cfg.ring_bytes).buffer), {"default": big}, print)
    listener = WorkerListener(cfg.listeners[0], admission, HostSegment.create(cfg.ring_bytes), 2)
    assert listener._worker_config.ring_bytes == 1 << 21
    with pytest.raises(ConfigError, match=r"max_batch_size \(5\) .* 2 shares .* set max_batch_size to at most 4 "):
        config(models=[dataclasses.replace(big, max_batch_size=5)])  # 5 fit 4 MiB, not 2 ranges of 2 MiB


# -- busy polling ----------------------------------------------------------------------------


def process_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


async def cpu_shares(pids: list[int], seconds: float) -> tuple[float, list[float]]:
    """The share of ``seconds`` this loop's thread (the embedded server's) and each of ``pids`` spent on a CPU."""
    wall, thread, procs = time.perf_counter(), time.thread_time(), [process_cpu_s(pid) for pid in pids]
    await asyncio.sleep(seconds)
    wall = time.perf_counter() - wall
    shares = [(process_cpu_s(pid) - cpu) / wall for pid, cpu in zip(pids, procs, strict=True)]
    return (time.thread_time() - thread) / wall, shares


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads /proc")
@pytest.mark.parametrize("ingest_workers", [0, 1])
@pytest.mark.asyncio
async def test_busy_poll_keeps_the_serving_processes_polling_after_a_reply_then_lets_them_sleep(
    ingest_workers: int,
) -> None:
    """``busy_poll_us``: after a frame is answered the scheduling loop (and the ingest worker that wrote the
    reply) stay on the CPU, polling for the producer's next frame, for that long; then they sleep again. Off
    (the default), they sleep as soon as the reply is out."""
    for busy_poll_us in (400_000, 0):
        async with Server(config(ingest_workers=ingest_workers, busy_poll_us=busy_poll_us)) as srv:
            pids = listener_of(srv).pids if ingest_workers else []
            conn = await client.connect("127.0.0.1", srv.port)
            assert (await conn.submit(frames(1, seed=5)[0])).ok
            loop_share, worker_shares = await cpu_shares(pids, 0.2)  # 0 to 200 ms after the reply
            if busy_poll_us:
                assert loop_share > 0.35 and all(share > 0.35 for share in worker_shares), (loop_share, worker_shares)
                await asyncio.sleep(0.3)
                loop_share, worker_shares = await cpu_shares(pids, 0.2)  # 500 to 700 ms: the window is over
            assert loop_share < 0.15 and all(share < 0.15 for share in worker_shares), (busy_poll_us, loop_share,
                                                                                       worker_shares)  # fmt: skip
            await conn.close()


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads /proc")
@pytest.mark.asyncio
async def test_busy_poll_leaves_idle_workers_asleep_whatever_they_send_up() -> None:
    """Only frames up (and replies down) start a poll: a worker's ALIVE at every sweep, and a connection that
    opens and closes without a frame (anyone may), leave it asleep. (Each poked the poll: a window as long as
    the sweep period kept every worker of an idle server polling for good.)"""
    async with Server(config(ingest_workers=1, busy_poll_us=1_000_000)) as srv:
        pids = listener_of(srv).pids
        for _ in range(6):  # a connection opened and closed every 200 ms, no byte sent; sweeps meanwhile
            _, writer = await asyncio.open_connection("127.0.0.1", srv.port)
            writer.close()
            await writer.wait_closed()
            await asyncio.sleep(0.2)
        loop_share, worker_shares = await cpu_shares(pids, 0.5)
        assert loop_share < 0.15 and all(share < 0.15 for share in worker_shares), (loop_share, worker_shares)
