"""UDP through ingest workers, from a hostile review: a dead worker's counts, bad listener options,
addresses the workers' SO_REUSEPORT sockets would share, outcomes the workers give themselves."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import threading

import pytest

from streamgpu.config import ConfigError, ListenerSpec
from streamgpu.ingest.workers import WorkerListener
from streamgpu.server import Server
from tests.ingest.test_workers import config, frames, udp_config, udp_numbers, udp_producers_on_each_worker


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
async def test_udp_counts_never_go_back_while_a_dead_workers_range_is_still_read() -> None:
    """Regression: a dead worker's UDP counts left the sums (only live workers were summed) until nothing
    read its range any more, then came back: a Prometheus counter that falls is a reset to its readers.
    A frame of the worker held by a blocked backend keeps its range read while it is killed."""
    async with Server(udp_config()) as srv:
        listener = srv._listeners[0]
        assert isinstance(listener, WorkerListener)
        by_worker = await udp_producers_on_each_worker(srv, listener)
        sent = sum(len(conns) for conns in by_worker.values())  # one frame each, all answered
        before = await udp_numbers(srv, lambda s: s.get("frames") == sent)
        block = threading.Event()
        srv.backend._worker.submit(block.wait)  # type: ignore[attr-defined]  # the CPU backend's one thread
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
            cfg = config(listeners=[ListenerSpec("tcp", "127.0.0.1", 0), spec], ingest_workers=workers,
                         auth_token="secret")  # fmt: skip
            with pytest.raises(ConfigError, match=why):
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
