"""Completion bridge: turns "this CUDA event has completed" into an asyncio future resolution.

Design (chosen by measurement, see docs/GPU_NOTES.md): the loop polls ``event.query()``
(~0.4 us, never blocks) once per loop iteration while some event is due, and schedules nothing
at all while none is pending, so an idle server costs no CPU. Two refinements keep the loop
quiet while long GPU work is in flight:

* ``expected_s``: a caller that knows roughly how long the work takes (e.g. the measured
  latency of a batch size) lets the bridge sleep with ``loop.call_at`` until shortly before
  that time, then poll;
* back-off: an event that has been polled for ``spin_s`` without completing is then polled
  only every ``slow_poll_s``;
* stream order: events recorded one after another on one stream complete in that order, so of
  the waiters given the same ``queue`` only those up to the first not complete are queried in a
  poll (with a few batches in flight, most queries were of events behind one not yet complete).

``wait`` resolves a future: whoever awaits it runs at the loop's next iteration. ``notify`` calls
a function from the poll itself, in the iteration that found the event complete: a chain of
futures from "the device is done" to "the batch's frames are answered" costs one loop iteration a
link, and under load an iteration is a whole round of reads (docs/BENCHMARKS.md, "A batch's
results taken in the poll that finds it done").

Host-function callbacks and blocking waiter threads were measured too; they lose on latency
and throughput (tools/bench_gpu.py keeps them for comparison).

The bridge only calls ``query()`` on the objects it is given, so it imports and runs without a
GPU (tests pass fake events).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable
from typing import Protocol

__all__ = ["CompletionBridge", "Queryable"]

# Timers fire with ~1 ms granularity (uvloop): a poll treats what is due within it as due now.
_TIMER_SLACK = 0.001


class Queryable(Protocol):
    """What the bridge needs of an event: ``streamgpu.gpu.driver.Event``, ``torch.cuda.Event`` or a fake."""

    def query(self) -> bool: ...


Done = Callable[[BaseException | None], None]  # what ``notify`` calls: None, or the error the query raised


class _Waiter:
    __slots__ = ("due", "event", "future", "queue", "then")

    def __init__(self, event: Queryable, future: asyncio.Future[None] | None, then: Done | None, due: float,
                 queue: Hashable | None) -> None:  # fmt: skip
        self.event = event
        self.future = future  # wait()'s (then is None), or None: notify()'s
        self.then = then
        self.due = due  # loop time from which the event is polled
        self.queue = queue


class CompletionBridge:
    """Resolves asyncio futures when CUDA events complete, from the loop thread, without blocking.

    Args:
        loop: the event loop that owns the futures; all methods must be called from its thread.
        margin_s: how long before an ``expected_s`` deadline polling starts (covers timer
            granularity, about 1 ms on uvloop, and estimate error).
        spin_s: how long an event is polled every loop iteration before backing off.
        slow_poll_s: polling period after the back-off.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        margin_s: float = 0.002,
        spin_s: float = 0.005,
        slow_poll_s: float = 0.001,
    ) -> None:
        if margin_s < 0 or spin_s < 0 or slow_poll_s <= 0:
            raise ValueError("margin_s and spin_s must be >= 0 and slow_poll_s > 0")
        self._loop = loop
        self._margin = margin_s
        self._spin = spin_s
        self._slow = slow_poll_s
        self._waiters: list[_Waiter] = []
        self._handle: asyncio.Handle | None = None
        self._handle_at = 0.0  # when the scheduled poll runs; -inf for call_soon
        self._closed = False

    @property
    def pending(self) -> int:
        """Number of waits (futures not yet resolved or cancelled) and notifications not yet made."""
        return sum(1 for w in self._waiters if w.future is None or not w.future.done())

    def wait(self, event: Queryable, expected_s: float = 0.0, *, queue: Hashable | None = None) -> asyncio.Future[None]:
        """Return a future resolved on the loop once ``event`` has completed.

        ``expected_s`` is an optional hint of how long until completion; if it is longer than
        ``margin_s`` the event is not polled before ``expected_s - margin_s`` from now.
        ``queue`` (a stream, say): the events of the waits given the same one complete in the order
        of these calls, each recorded on that stream before its call and after the previous one's.
        Cancelling the future (or resolving it: its owner may know sooner) stops the polling of its
        event. Never blocks.
        """
        fut: asyncio.Future[None] = self._loop.create_future()
        self._add(event, fut, None, expected_s, queue)
        return fut

    def notify(self, event: Queryable, then: Done, expected_s: float = 0.0, *, queue: Hashable | None = None) -> None:
        """Call ``then(None)`` from the poll that finds ``event`` complete, in that loop iteration (``wait``'s
        future would wake its awaiter an iteration later); ``then(error)`` if the query raised, and
        ``then(CancelledError())`` if the bridge is closed first. ``expected_s`` and ``queue`` as for
        ``wait``. ``then`` must not raise (what it raises goes to the loop's exception handler) and may
        call ``wait`` and ``notify``. Never blocks."""
        self._add(event, None, then, expected_s, queue)

    def _add(self, event: Queryable, future: asyncio.Future[None] | None, then: Done | None, expected_s: float,
             queue: Hashable | None) -> None:  # fmt: skip
        if self._closed:
            raise RuntimeError("CompletionBridge is closed")
        if expected_s < 0:
            raise ValueError(f"expected_s must be >= 0, got {expected_s}")
        # No query here: work recorded just before has practically never finished, and the first
        # poll comes within one loop iteration anyway.
        now = self._loop.time()
        due = now + expected_s - self._margin if expected_s > self._margin else now
        self._waiters.append(_Waiter(event, future, then, due, queue))
        self._schedule(due, now)

    def close(self) -> None:
        """Cancel every pending future and stop polling. The bridge cannot be used again."""
        self._closed = True
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if w.future is not None:
                w.future.cancel()
            else:
                self._call(w, asyncio.CancelledError())

    def _schedule(self, when: float, now: float) -> None:
        if self._handle is not None and self._handle_at <= when:
            return  # an earlier poll is already scheduled; it will reschedule as needed
        if self._handle is not None:
            self._handle.cancel()
        if when <= now:
            self._handle = self._loop.call_soon(self._poll)
            self._handle_at = float("-inf")
        else:
            self._handle = self._loop.call_at(when, self._poll)
            self._handle_at = when

    def _poll(self) -> None:
        # Hot path: runs every loop iteration while work is due; keep it to one query per waiter.
        self._handle = None
        now = self._loop.time()
        horizon = now + _TIMER_SLACK
        spin_from = now - self._spin
        keep: list[_Waiter] = []
        spin = False
        next_at = float("inf")
        behind: set[Hashable] = set()  # queues with an event found not complete in this poll
        fired: list[tuple[_Waiter, BaseException | None]] = []  # notify()'s, called once the waiters are settled
        for w in self._waiters:
            fut = w.future
            if fut is not None and fut.done():  # cancelled or resolved by its owner: drop it
                continue
            if w.due > horizon:  # hinted, not due yet
                keep.append(w)
                if w.due < next_at:
                    next_at = w.due
                continue
            if w.queue is not None and w.queue in behind:
                done = False  # an earlier event of its stream is not complete: neither is this one
            else:
                try:
                    done = w.event.query()
                except Exception as exc:  # a CUDA error belongs to this waiter, not to the loop
                    if fut is None:
                        fired.append((w, exc))
                    else:
                        fut.set_exception(exc)
                    continue
                if done:
                    if fut is None:
                        fired.append((w, None))
                    else:
                        fut.set_result(None)
                    continue
                if w.queue is not None:
                    behind.add(w.queue)
            keep.append(w)
            if w.due > spin_from:  # young: poll again next iteration
                spin = True
            elif now + self._slow < next_at:  # polled for spin_s already: back off
                next_at = now + self._slow
        self._waiters = keep
        if spin:
            self._handle = self._loop.call_soon(self._poll)
            self._handle_at = float("-inf")
        elif keep:
            self._schedule(next_at, now)
        for w, error in fired:  # last: a call may add waiters (a batch launched as another ends)
            self._call(w, error)

    def _call(self, w: _Waiter, error: BaseException | None) -> None:
        assert w.then is not None
        try:
            w.then(error)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:  # one caller's bug (a CancelledError too) must not cost the others their calls
            self._loop.call_exception_handler({"message": f"CompletionBridge: {w.then!r} raised", "exception": exc})
