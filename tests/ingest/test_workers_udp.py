"""UDP through ingest workers, the hard cases (most from a hostile review): a dead worker's counts, bad
listener options, addresses the workers' SO_REUSEPORT sockets would share, outcomes the workers give
themselves, a replacement worker that dies while starting. The ordinary cases: test_workers.py."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import socket
import threading

import numpy as np
import pytest

from streamgpu.config import ConfigError, ListenerSpec
from streamgpu.gpu.cpu import CpuModel
from streamgpu.protocol import udp
from streamgpu.protocol.wire import FrameFlags, FrameHeader, Status
from streamgpu.server import Server
from tests.ingest import test_udp as udp_test
from tests.ingest.test_workers import SPEC, config, frames, udp_config, udp_numbers, udp_producers_by_worker


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
async def test_udp_counts_never_go_back_while_a_dead_workers_range_is_still_read() -> None:
    """Regression: a dead worker's UDP counts left the sums (only live workers were summed) until nothing
    read its range any more, then came back: a Prometheus counter that falls is a reset to its readers.
    A frame of the worker held by a blocked backend keeps its range read while it is killed."""
    async with Server(udp_config()) as srv:
        listener, by_worker = await udp_producers_by_worker(srv)
        sent = sum(len(conns) for conns in by_worker.values())  # one frame each, all answered
        before = await udp_numbers(srv, lambda s: s.get("frames") == sent)
        block = threading.Event()
        (model,) = srv.serving(SPEC.name) or []
        assert isinstance(model, CpuModel)
        model.worker.submit(block.wait)  # the model's one thread on the CPU backend: no batch runs until set
        pending = asyncio.ensure_future(by_worker[0][0].submit(frames(1, 1)[0], stream_id=5))
        victim = listener._workers[0]
        try:
            async with asyncio.timeout(5):
                while not victim.held:  # its frame is here, its payload not copied yet
                    await asyncio.sleep(0.005)
            assert victim.proc is not None
            os.kill(victim.proc.pid, signal.SIGKILL)
            async with asyncio.timeout(5):
                while victim.alive:
                    await asyncio.sleep(0.005)
            assert victim.held and not victim.replaced  # its range is still read: not replaced yet
            during = await udp_numbers(srv)
            assert during["frames"] >= before["frames"], (before, during)
            assert during["datagrams"] >= before["datagrams"], (before, during)
        finally:
            block.set()
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pending
        after = await udp_numbers(srv, lambda s: listener.restarts == 1)
        assert after["frames"] >= before["frames"]
        for conns in by_worker.values():
            for conn in conns:
                await conn.close()


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
async def test_bad_udp_listener_options_are_a_config_error_with_workers_as_without() -> None:
    """Regression: with ingest workers the udp listener's options were first read in the worker processes,
    so a bad one was "RuntimeError: ingest worker 0 exited while starting (exit status -9)" and the
    workers' tracebacks, cut off by the kill, instead of the ConfigError naming the option."""
    bogus = ListenerSpec("udp", "127.0.0.1", 0, {"bogus": 1})
    public = ListenerSpec("udp", "0.0.0.0", 0)  # tokens cannot protect UDP: an allow list is required
    for spec, why in ((bogus, r"unknown options \['bogus'\]"), (public, "auth tokens cannot protect it")):
        for workers in (0, 2):
            with pytest.raises(ConfigError, match=why):  # now by the config itself (check-config too)
                cfg = config(listeners=[ListenerSpec("tcp", "127.0.0.1", 0), spec], ingest_workers=workers,
                             auth_token="secret")  # fmt: skip
                async with Server(cfg):
                    pass


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
async def test_two_udp_listeners_on_one_address_are_refused_with_workers_as_without() -> None:
    """Regression: the workers' sockets are SO_REUSEPORT, so two udp listeners of one config on one port
    (or a wildcard and a loopback address of it) both bound, each silently getting the datagrams of some
    source addresses under its own options; without workers the second bind fails."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for hosts in (("127.0.0.1", "127.0.0.1"), ("0.0.0.0", "127.0.0.1")):
        udp = [ListenerSpec("udp", host, port, {"allow": ["127.0.0.0/8"]}) for host in hosts]
        for workers in (0, 2):
            cfg = config(listeners=[ListenerSpec("tcp", "127.0.0.1", 0), *udp], ingest_workers=workers)
            with pytest.raises(OSError, match="in use"):
                async with Server(cfg):
                    pass


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
@pytest.mark.parametrize("workers", [0, 2])
async def test_udp_outcomes_a_worker_gives_itself_reach_the_subscribers(workers: int) -> None:
    """A frame flagged SUBSCRIBERS gets no reply datagram: its outcome reaches only the stream's
    subscribers (/v1/stream, the results sink). Those a worker gives itself (INCOMPLETE, a refusal) were
    published on the worker's own hub, so with ingest workers they reached nobody at all."""
    cfg = dataclasses.replace(udp_test.make_config(), ingest_workers=workers, max_payload_bytes=1 << 20)
    async with Server(cfg) as srv:
        got: list[tuple[int, Status]] = []
        srv.admission.stream_results.subscribe(7, lambda head, outcome: got.append((head.sequence, outcome.status)))
        raw = udp_test.Raw(udp_test.udp_port(srv))
        try:
            raw.send(*udp_test.grams(0, stream=7, flags=FrameFlags.SUBSCRIBERS)[:-1])  # never complete
            unknown = FrameHeader(7, 1, "nope", 1, udp_test.SHAPE, udp_test.NBYTES, flags=FrameFlags.SUBSCRIBERS)
            payload = np.zeros(udp_test.SHAPE, np.uint8).data.cast("B")
            raw.send(*[udp.join(parts) for parts in udp.frame_datagrams(unknown, payload, udp_test.GRAM)])
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    while len(got) < 2:
                        await asyncio.sleep(0.02)
            assert await raw.replies() == []  # SUBSCRIBERS: no reply datagram
        finally:
            raw.close()
        assert sorted(got) == [(0, Status.INCOMPLETE), (1, Status.UNKNOWN_MODEL)]


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
async def test_a_replacement_worker_that_dies_while_starting_is_started_again() -> None:
    """Regression: a replacement worker that died before READY was never started again; its UDP socket,
    still bound (this process keeps it), took its producers' datagrams for good and nobody read them."""
    async with Server(udp_config()) as srv:
        listener, by_worker = await udp_producers_by_worker(srv)
        first = listener._workers[0]
        assert first.proc is not None
        os.kill(first.proc.pid, signal.SIGKILL)
        async with asyncio.timeout(5):
            while listener._workers[0] is first or listener._workers[0].proc is None:
                await asyncio.sleep(0.001)
        replacement = listener._workers[0]
        assert replacement.proc is not None
        os.kill(replacement.proc.pid, signal.SIGKILL)  # (an interpreter takes far longer than this to say READY)
        async with asyncio.timeout(8):  # a third worker, started
            while listener._workers[0] in (first, replacement) or not listener._workers[0].started:
                await asyncio.sleep(0.02)
        for conn in by_worker[0]:  # the first worker's producers are served again, on the same socket
            assert (await conn.submit(frames(1, 3)[0], stream_id=2)).ok
        for conns in by_worker.values():
            for conn in conns:
                await conn.close()
    assert srv.pool.slots_in_use == 0


def test_a_producer_of_an_in_process_listener_beside_workers_holds_at_most_a_quarter_of_its_share() -> None:
    """Regression: beside ingest workers an http or raw listener receives into one share of the ring
    (ring_bytes / (N + 1)), but its producers' limit stayed a quarter of the whole ring: with 4 workers one
    producer could fill that share alone and make every other producer of those listeners wait."""
    listeners = [ListenerSpec("tcp", "127.0.0.1", 0), ListenerSpec("raw", "127.0.0.1", 0, {"model": "default"})]
    cfg = config(listeners=listeners, ingest_workers=4, max_payload_bytes=1 << 18)
    in_process = cfg.ring_bytes - 4 * cfg.worker_ring_bytes  # what the workers' ranges leave this process
    assert cfg.producer_ring_bytes <= in_process // 4, (cfg.producer_ring_bytes, in_process)
    explicit = config(listeners=listeners, ingest_workers=4, max_payload_bytes=1 << 18, max_producer_ring_bytes=1 << 21)
    assert explicit.producer_ring_bytes <= explicit.worker_ring_bytes  # as each worker's own limit is
    assert config(ingest_workers=0).producer_ring_bytes == (1 << 22) // 4  # one process: unchanged
