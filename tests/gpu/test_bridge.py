"""CompletionBridge with fake events (no GPU): runs on asyncio and uvloop via tests/conftest.py."""

from __future__ import annotations

import asyncio

import pytest

from streamgpu.gpu.bridge import CompletionBridge


class FakeEvent:
    """query() is False until the test calls complete(); counts the queries."""

    def __init__(self) -> None:
        self.done = False
        self.queries = 0

    def query(self) -> bool:
        self.queries += 1
        return self.done

    def complete(self) -> None:
        self.done = True


class FailingEvent:
    def query(self) -> bool:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")


async def _spin(iterations: int = 5) -> None:
    for _ in range(iterations):
        await asyncio.sleep(0)


@pytest.mark.asyncio
async def test_resolves_after_completion_not_before() -> None:
    bridge = CompletionBridge(asyncio.get_running_loop())
    ev = FakeEvent()
    fut = bridge.wait(ev)
    await _spin(20)
    assert not fut.done()
    assert ev.queries > 1  # polled while pending
    assert bridge.pending == 1
    ev.complete()
    await asyncio.wait_for(fut, 1.0)
    assert bridge.pending == 0
    bridge.close()


@pytest.mark.asyncio
async def test_already_complete_event_resolves_on_next_poll() -> None:
    bridge = CompletionBridge(asyncio.get_running_loop())
    ev = FakeEvent()
    ev.complete()
    fut = bridge.wait(ev)
    assert ev.queries == 0  # wait() itself never calls into CUDA
    await _spin(2)
    assert fut.done() and fut.result() is None
    assert bridge.pending == 0


@pytest.mark.asyncio
async def test_many_waiters_resolve_in_any_order() -> None:
    bridge = CompletionBridge(asyncio.get_running_loop())
    events = [FakeEvent() for _ in range(200)]
    futures = [bridge.wait(ev) for ev in events]
    await _spin()
    for i in range(0, 200, 2):  # complete the even ones first
        events[i].complete()
    await _spin()
    assert all(f.done() == (i % 2 == 0) for i, f in enumerate(futures))
    assert bridge.pending == 100
    for ev in events[1::2]:
        ev.complete()
    await asyncio.wait_for(asyncio.gather(*futures), 1.0)
    assert bridge.pending == 0


@pytest.mark.asyncio
async def test_cancelled_futures_are_dropped() -> None:
    bridge = CompletionBridge(asyncio.get_running_loop())
    ev_cancel, ev_keep = FakeEvent(), FakeEvent()
    cancelled = bridge.wait(ev_cancel)
    kept = bridge.wait(ev_keep)
    cancelled.cancel()
    await _spin()
    before = ev_cancel.queries
    await _spin(20)
    assert ev_cancel.queries == before  # no longer polled
    assert bridge.pending == 1
    ev_keep.complete()
    await asyncio.wait_for(kept, 1.0)
    assert bridge.pending == 0


@pytest.mark.asyncio
async def test_close_cancels_pending_and_refuses_new_waits() -> None:
    bridge = CompletionBridge(asyncio.get_running_loop())
    futures = [bridge.wait(FakeEvent()) for _ in range(5)]
    bridge.close()
    assert all(f.cancelled() for f in futures)
    assert bridge.pending == 0
    with pytest.raises(RuntimeError):
        bridge.wait(FakeEvent())


@pytest.mark.asyncio
async def test_idle_bridge_schedules_nothing() -> None:
    bridge = CompletionBridge(asyncio.get_running_loop())
    ev = FakeEvent()
    fut = bridge.wait(ev)
    ev.complete()
    await asyncio.wait_for(fut, 1.0)
    calls = 0
    original = bridge._poll

    def counting_poll() -> None:
        nonlocal calls
        calls += 1
        original()

    bridge._poll = counting_poll  # type: ignore[method-assign]
    queries = ev.queries
    await asyncio.sleep(0.2)
    assert calls == 0
    assert ev.queries == queries
    bridge.close()


@pytest.mark.asyncio
async def test_expected_s_hint_delays_polling() -> None:
    loop = asyncio.get_running_loop()
    bridge = CompletionBridge(loop, margin_s=0.01)
    ev = FakeEvent()
    start = loop.time()
    fut = bridge.wait(ev, expected_s=0.1)
    await asyncio.sleep(0.05)
    assert ev.queries == 0  # sleeping, not polling
    ev.complete()
    await asyncio.wait_for(fut, 1.0)
    waited = loop.time() - start
    assert 0.085 <= waited < 0.5  # resolved near expected_s - margin_s, not at the flip (0.05 s)


@pytest.mark.asyncio
async def test_unhinted_long_wait_backs_off() -> None:
    bridge = CompletionBridge(asyncio.get_running_loop(), spin_s=0.01, slow_poll_s=0.01)
    ev = FakeEvent()
    fut = bridge.wait(ev)
    await asyncio.sleep(0.02)  # past spin_s
    queries = ev.queries
    await asyncio.sleep(0.1)
    assert ev.queries - queries <= 15  # about one query per slow_poll_s, not one per iteration
    ev.complete()
    await asyncio.wait_for(fut, 1.0)


@pytest.mark.asyncio
async def test_query_error_goes_to_its_future() -> None:
    bridge = CompletionBridge(asyncio.get_running_loop())
    ok = FakeEvent()
    ok_fut = bridge.wait(ok)
    bad_fut = bridge.wait(FailingEvent())
    await _spin()
    with pytest.raises(RuntimeError, match="illegal memory access"):
        await bad_fut
    ok.complete()
    await asyncio.wait_for(ok_fut, 1.0)


@pytest.mark.asyncio
async def test_rejects_negative_hint() -> None:
    bridge = CompletionBridge(asyncio.get_running_loop())
    with pytest.raises(ValueError):
        bridge.wait(FakeEvent(), expected_s=-1.0)


def test_rejects_bad_settings() -> None:
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(ValueError):
            CompletionBridge(loop, slow_poll_s=0)
    finally:
        loop.close()


@pytest.mark.asyncio
async def test_events_of_one_queue_behind_one_not_complete_are_not_queried() -> None:
    """Events recorded in order on one stream complete in that order: while the first is pending, the
    ones behind it are not asked (each query is a driver call on the loop); another queue is asked."""
    bridge = CompletionBridge(asyncio.get_running_loop())
    first, second, third, elsewhere = FakeEvent(), FakeEvent(), FakeEvent(), FakeEvent()
    futs = [bridge.wait(ev, queue="s1") for ev in (first, second, third)]
    other = bridge.wait(elsewhere, queue="s2")
    second.complete()  # (not yet seen: the first is still pending)
    await _spin(10)
    assert first.queries > 1 and second.queries == 0 and third.queries == 0
    assert elsewhere.queries == first.queries and not any(f.done() for f in futs)
    first.complete()
    await _spin(3)
    assert futs[0].done() and futs[1].done() and not futs[2].done()
    third.complete()
    elsewhere.complete()
    await asyncio.wait_for(asyncio.gather(futs[2], other), 1.0)
    unqueued = [FakeEvent() for _ in range(2)]  # without a queue each is asked
    pending = [bridge.wait(ev) for ev in unqueued]
    await _spin(3)
    assert all(ev.queries > 0 for ev in unqueued)
    for ev in unqueued:
        ev.complete()
    await asyncio.wait_for(asyncio.gather(*pending), 1.0)
    bridge.close()


@pytest.mark.asyncio
async def test_notify_calls_in_the_poll_that_finds_the_event_complete() -> None:
    """``wait``'s future wakes its awaiter an iteration after the poll; ``notify`` calls in that poll, and what
    it calls may add waits that later polls serve."""
    loop = asyncio.get_running_loop()
    bridge = CompletionBridge(loop)
    ev, later = FakeEvent(), FakeEvent()
    calls: list[str] = []
    woken = bridge.wait(ev)
    woken.add_done_callback(lambda f: calls.append("future's callback"))
    followed: list[asyncio.Future[None]] = []

    def then(error: BaseException | None) -> None:
        calls.append(f"notified ({error})")
        followed.append(bridge.wait(later))

    bridge.notify(ev, then)
    ev.complete()
    await _spin(1)  # one iteration: the poll
    assert calls == ["notified (None)"]
    await _spin(1)
    assert calls == ["notified (None)", "future's callback"]
    later.complete()
    await asyncio.wait_for(followed[0], 1.0)  # the wait added from the notification is polled
    assert bridge.pending == 0
    bridge.close()


@pytest.mark.asyncio
async def test_notify_passes_a_query_error_and_a_close_and_one_raising_call_spares_the_rest() -> None:
    loop = asyncio.get_running_loop()
    handled: list[str] = []
    loop.set_exception_handler(lambda _loop, context: handled.append(context["message"]))
    bridge = CompletionBridge(loop)
    got: dict[str, BaseException | None] = {}
    ev = FakeEvent()

    def raising(error: BaseException | None) -> None:
        raise ValueError("a bug in the caller")

    bridge.notify(FailingEvent(), lambda error: got.update(failing=error))
    bridge.notify(ev, raising)
    bridge.notify(ev, lambda error: got.update(ok=error))
    ev.complete()
    await _spin(2)
    assert isinstance(got["failing"], RuntimeError) and "illegal memory access" in str(got["failing"])
    assert got["ok"] is None  # called although the one before it raised
    assert len(handled) == 1 and "raised" in handled[0]
    bridge.notify(FakeEvent(), lambda error: got.update(closed=error))
    bridge.close()
    assert isinstance(got["closed"], asyncio.CancelledError)
    loop.set_exception_handler(None)


@pytest.mark.asyncio
async def test_a_notification_that_raises_cancelled_error_costs_the_others_of_its_poll_nothing() -> None:
    """``CancelledError`` is no ``Exception``: raised by one call, it left the poll with the calls after it never
    made (their batches never answered, their buffer sets never back), in a poll and in ``close``."""
    loop = asyncio.get_running_loop()
    handled: list[str] = []
    loop.set_exception_handler(lambda _loop, context: handled.append(context["message"]))
    bridge = CompletionBridge(loop)
    got: list[tuple[str, BaseException | None]] = []

    def cancelled(error: BaseException | None) -> None:
        raise asyncio.CancelledError  # e.g. ``future.result()`` of a cancelled future

    ev = FakeEvent()
    ev.complete()
    bridge.notify(ev, cancelled)
    bridge.notify(ev, lambda error: got.append(("polled", error)))
    await _spin(2)
    assert got == [("polled", None)], "a call after one that raised CancelledError was never made"
    bridge.notify(FakeEvent(), cancelled)
    bridge.notify(FakeEvent(), lambda error: got.append(("closed", error)))
    bridge.close()
    assert [what for what, _ in got] == ["polled", "closed"]
    assert len(handled) == 2 and all("raised" in message for message in handled)
    loop.set_exception_handler(None)
