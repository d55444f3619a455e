"""Frames from awaitable front ends (HTTP requests, WebSocket messages) into the ring and the scheduler.

The TCP listener is callback-driven; aiohttp handlers are coroutines. Both go through the same
``Admission``: ``admit`` judges the header, ``Producer.reserve_wait`` waits (in arrival order)
for ring space within the producer's share, the payload is written straight into the slot,
and ``Admission.submit`` hands the frame to the scheduler. Whatever goes wrong before the
submit gives the slot back; after it, the frame's one ``Outcome`` resolves the returned future.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable, Hashable

from streamgpu.frame import Frame, Outcome
from streamgpu.ingest.admission import Admission, Producer, Refused
from streamgpu.protocol.wire import FrameHeader, Status

# Writes the frame's payload into the given view of its slot (exactly len(view) bytes).
Fill = Callable[[memoryview], Awaitable[None]]

_request_ids = itertools.count(1)


def next_stream_key(kind: str) -> tuple[str, int]:
    """A fresh key for the scheduler's per-stream order and LIVE superseding (one per request/socket)."""
    return (kind, next(_request_ids))


async def receive_frame(
    admission: Admission,
    producer: Producer,
    header: FrameHeader,
    fill: Fill,
    stream: Hashable,
    is_abandoned: Callable[[], bool] = lambda: False,
) -> asyncio.Future[Outcome]:
    """Admit one frame, receive its payload into a ring slot, submit it; a future for its ``Outcome``.

    Raises ``Refused`` (status, message) when the frame is not admitted, its deadline passes
    while it waits for ring space, its payload does not arrive within
    ``Admission.payload_budget_s`` (RECEIVE_TIMEOUT), or the server began shutting down (each
    counted in ``Admission.replies``, as TCP's refusals). Any exception of ``fill`` (the peer
    went away) propagates. No slot is held after an exception. The outcome's ``result`` is the
    front end's own copy.
    """
    try:
        return await _receive(admission, producer, header, fill, stream, is_abandoned)
    except Refused as refused:
        admission.replied(header.model, refused.status)
        raise


async def _receive(
    admission: Admission,
    producer: Producer,
    header: FrameHeader,
    fill: Fill,
    stream: Hashable,
    is_abandoned: Callable[[], bool],
) -> asyncio.Future[Outcome]:
    received_ns = time.perf_counter_ns()
    deadline_ns = admission.admit(producer, header, received_ns)
    nbytes = header.payload_len
    try:
        async with asyncio.timeout(None if not deadline_ns else (deadline_ns - received_ns) / 1e9):
            slot = await producer.reserve_wait(nbytes)
    except TimeoutError:
        raise Refused(Status.DEADLINE_MISSED, "deadline passed while waiting for receive buffer space") from None
    try:
        budget = admission.payload_budget_s(nbytes)
        try:
            async with asyncio.timeout(budget):
                await fill(admission.pool.view(slot))
        except TimeoutError:
            raise Refused(
                Status.RECEIVE_TIMEOUT, f"payload of {nbytes} bytes did not arrive within {budget:.3g} s"
            ) from None
        if not admission.accepting:  # the drain may already have found the scheduler idle
            raise Refused(Status.SHUTTING_DOWN, "server is shutting down")
    except BaseException:
        producer.release(slot)
        raise
    future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()

    def sink(_frame: Frame, outcome: Outcome) -> None:
        if future.done():  # the request was cancelled meanwhile
            return
        if outcome.result is not None:  # the result's buffer may be reused once we return
            outcome = outcome._replace(result=outcome.result.copy())
        future.set_result(outcome)

    admission.submit(
        Frame(
            header=header,
            slot=slot,
            producer=producer,
            stream=stream,
            received_ns=received_ns,
            complete_ns=time.perf_counter_ns(),
            deadline_ns=deadline_ns,
            sink=sink,
            is_abandoned=is_abandoned,
        )
    )
    return future
