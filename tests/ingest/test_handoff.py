"""Handing accepted TCP connections to ingest workers (``ingest_workers = N``): the scheduling process
accepts, a worker takes each descriptor off its ``SOCK_SEQPACKET`` pair. The paths where that goes
wrong: a worker out of descriptors, a worker too busy to take them for a moment, a worker that hung."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import socket
from collections.abc import Iterator

import pytest

from streamgpu import client
from streamgpu.ingest import channel, worker
from streamgpu.ingest.workers import HANDOFF_STALL_S
from streamgpu.memory import HostSegment
from streamgpu.server import Server
from tests.ingest.test_workers import config, listener_of


@contextlib.contextmanager
def out_of_descriptors() -> Iterator[None]:
    """This process can open no descriptor more (RLIMIT_NOFILE at its lowest free one) until the end."""
    lowest = os.dup(0)
    os.close(lowest)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def taken_counts(records: bytes) -> list[int]:
    """The ``taken`` count of each CONNECTIONS record among the worker's upward records."""
    return [channel.UP.unpack_from(records, i)[6] for i in range(0, len(records), channel.UP.size)
            if records[i] == channel.CONNECTIONS]  # fmt: skip


@pytest.mark.asyncio
async def test_a_worker_out_of_descriptors_loses_one_connection_and_goes_on_taking_them() -> None:
    """A connection handed over while the worker can open no descriptor arrives without it (the kernel
    closes it: MSG_CTRUNC). It is counted as taken, and the worker goes on taking connections once it has
    room again (it took the empty message for the parent's end closing and stopped reading for good:
    every connection handed to it after that hung without a WELCOME, counted against it forever)."""
    cfg = config(ingest_workers=0)
    segment = HostSegment.create(cfg.ring_bytes)
    loop = asyncio.get_running_loop()
    listen = socket.create_server(("127.0.0.1", 0))
    listen.setblocking(False)
    handoff, their_handoff = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    init = worker.WorkerInit(cfg, 0, their_handoff.detach(), (), os.dup(segment.fd), segment.nbytes, 0,
                             segment.nbytes, cfg.max_connections, tuple(enumerate(cfg.models)))  # fmt: skip
    serving = asyncio.ensure_future(worker.serve(theirs, init))
    up = b""
    async with asyncio.timeout(10):
        while channel.READY not in up[:: channel.UP.size]:
            up += await loop.sock_recv(ours, 4096)

    async def hand_over() -> None:  # as the parent does: accept, send the descriptor, close our copy
        accepted, _ = await loop.sock_accept(listen)
        with accepted:
            socket.send_fds(handoff, [b"c"], [accepted.fileno()])

    lost = socket.create_connection(listen.getsockname())
    accepted, _ = await loop.sock_accept(listen)
    with accepted:
        socket.send_fds(handoff, [b"c"], [accepted.fileno()])
        with out_of_descriptors():
            await asyncio.sleep(0.2)  # the worker receives it meanwhile, without its descriptor
    lost.settimeout(5)
    assert lost.recv(1) == b""  # the kernel closed the connection the worker could not take
    lost.close()

    handing = asyncio.ensure_future(hand_over())
    conn = await client.connect("127.0.0.1", listen.getsockname()[1], timeout=3)  # TimeoutError before the fix
    await handing
    await conn.close()
    async with asyncio.timeout(5):
        while True:
            with contextlib.suppress(BlockingIOError):
                up += ours.recv(1 << 16)
            counts = taken_counts(up[: len(up) - len(up) % channel.UP.size])
            if counts and counts[-1] == 2:  # the lost one counts as taken: the parent's count does not drift
                break
            await asyncio.sleep(0.01)
    await loop.sock_sendall(ours, channel.down(channel.CLOSE, 0))
    await asyncio.wait_for(serving, 10)
    for sock in (ours, handoff, listen):
        sock.close()
    segment.close()


def handoff_queue_length() -> int:
    """How many descriptors a fresh ``SOCK_SEQPACKET`` pair holds unread (the kernel's default buffer)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    n = 0
    with ours, theirs, contextlib.suppress(BlockingIOError):
        while n < 10_000:
            socket.send_fds(ours, [b"c"], [theirs.fileno()])
            n += 1
    return n


@pytest.mark.asyncio
async def test_a_burst_bigger_than_the_handoff_queue_waits_for_a_busy_worker() -> None:
    """One worker, busy (stopped) for a moment while producers connect: its handoff queue holds a few
    hundred descriptors (278 on a default Linux); 40 more connect, wait (in the backlog, as with no
    handoff) and every producer is served once the worker goes on. (Those 40 were closed: 'no ingest
    worker could take a connection'.)"""
    queue = handoff_queue_length()
    if queue > 1000:
        pytest.skip(f"the kernel queues {queue} descriptors per socket: too many connections to open here")
    async with Server(config(ingest_workers=1)) as srv:
        listener = listener_of(srv)
        (pid,) = listener.pids
        os.kill(pid, signal.SIGSTOP)
        try:
            connecting = [asyncio.ensure_future(client.connect("127.0.0.1", srv.port, timeout=20))
                          for _ in range(queue + 40)]  # fmt: skip
            async with asyncio.timeout(10):  # the parent handed over what the queue holds
                while listener.stats()["worker_open_connections"][0] < queue:
                    await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)  # (and met the full queue)
        finally:
            os.kill(pid, signal.SIGCONT)
        results = await asyncio.gather(*connecting, return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        assert not failed, f"{len(failed)} of {len(results)} failed, e.g. {failed[0]!r}; stats {listener.stats()}"
        assert listener.stats()["unhanded_connections"] == 0
        for conn in results:
            assert isinstance(conn, client.Connection)
            await conn.close()


@pytest.mark.asyncio
async def test_a_worker_that_stopped_taking_connections_gets_no_more_while_another_can() -> None:
    """Worker 0 stops (hung) with a connection handed to it and not taken: once that has waited longer
    than HANDOFF_STALL_S, new connections go to worker 1, though worker 0 holds fewer. (They went to the
    one holding the fewest, counting those it never took: half of them hung without a WELCOME until
    its queue was full.)"""
    async with Server(config()) as srv:
        listener = listener_of(srv)
        pids = listener.pids
        os.kill(pids[0], signal.SIGSTOP)
        try:
            stuck = asyncio.ensure_future(client.connect("127.0.0.1", srv.port, timeout=20))  # to worker 0: a tie
            async with asyncio.timeout(5):
                while listener.stats()["worker_open_connections"] != [1, 0]:
                    await asyncio.sleep(0.01)
            await asyncio.sleep(HANDOFF_STALL_S + 0.1)
            conns = await asyncio.gather(*(client.connect("127.0.0.1", srv.port, timeout=5) for _ in range(6)))
            assert listener.stats()["worker_open_connections"] == [1, 6]
        finally:
            os.kill(pids[0], signal.SIGCONT)
        conns.append(await stuck)  # served once it goes on
        for conn in conns:
            await conn.close()
