"""The awaitable frame intake the HTTP and WebSocket routes share: no slot outlives a cancelled waiter."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from streamgpu.config import Config
from streamgpu.ingest.admission import Admission
from streamgpu.memory import SlotPool
from streamgpu.models.spec import ModelSpec


def admission(ring_bytes: int) -> Admission:
    spec = ModelSpec(input_shape=(1024,), preprocess="none", max_batch_size=ring_bytes // 1024)  # (fits the ring)
    cfg = Config(ring_bytes=ring_bytes, max_payload_bytes=4096, max_producer_ring_bytes=ring_bytes, models=[spec])
    pool = SlotPool(np.zeros(ring_bytes, np.uint8), defer=asyncio.get_running_loop().call_soon)
    return Admission(cfg, pool, {spec.name: spec}, lambda frame: None)


@pytest.mark.asyncio
async def test_a_waiter_cancelled_after_its_slot_was_granted_gives_the_slot_back() -> None:
    """Regression: the grant lands (the future has its slot) but the waiting task is cancelled
    before it wakes, e.g. by a request's deadline or the client leaving. The slot was leaked."""
    adm = admission(8192)
    producer = adm.producer_for(adm.authenticate(""), "test")  # type: ignore[arg-type]
    first = await producer.reserve_wait(8192)  # the whole ring
    waiting = asyncio.ensure_future(producer.reserve_wait(4096))
    await asyncio.sleep(0)
    assert not waiting.done()
    producer.release(first)  # the pool grants the waiter on the next loop iteration
    await asyncio.sleep(0)  # the grant ran: the waiter's future holds the slot; the task has not woken
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert adm.pool.used_bytes == 0 and adm.pool.slots_in_use == 0 and producer.bytes_held == 0
