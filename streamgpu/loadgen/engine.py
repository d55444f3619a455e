"""The load engine of one generator process against one endpoint.

Closed loop keeps N frames in flight by submitting the next frame from the
done-callback of the previous one (no task per request). Open loop sends from
one task on a precomputed schedule (constant or Poisson intervals), catching
up with several sends per wake-up when the loop woke late, and records how
late each send was.

Completions are attributed to the window in which they complete (as
perf_analyzer does); windows are aligned to a start time shared by all
processes of a run, so the parent can merge window k of every process.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import math
import time
from collections.abc import Awaitable, Callable

import numpy as np

from streamgpu.loadgen.config import CONCURRENCY, Endpoint, LoadLevel, RunConfig, split_int
from streamgpu.loadgen.errors import LoadgenError, UsageError
from streamgpu.loadgen.measure import ERROR, STAGES, Window
from streamgpu.loadgen.transports import Connection, ReplyLike, Transport
from streamgpu.protocol.wire import Status, Timings

_OK = int(Status.OK)
#: Shortest open-loop sleep: uvloop timers have 1 ms resolution and shorter sleeps spin the loop,
#: so at high rates the sender wakes each ms and catches up (sends lag by < ~1 ms).
MIN_SLEEP_S = 0.001

OnWindow = Callable[[Window], Awaitable[None]]


async def open_connections(transport: Transport, endpoint: Endpoint, cfg: RunConfig) -> list[Connection]:
    """Open ``cfg.connections`` connections; UsageError when the endpoint cannot be reached or used."""
    conns: list[Connection] = []
    try:
        for _ in range(cfg.connections):
            conns.append(
                await transport.connect(endpoint.host, endpoint.port, token=cfg.token, timeout=cfg.connect_timeout_s)
            )
    except (OSError, TimeoutError) as exc:  # ConnectionError and HandshakeError are OSErrors
        await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)
        reason = str(exc) or type(exc).__name__
        if isinstance(exc, TimeoutError):  # the transport's "no answer within S s"
            reason += " (--connect-timeout)"
        raise UsageError(f"cannot connect to {endpoint} over {transport.name}: {reason}") from None
    limit = conns[0].max_payload
    if limit and cfg.frame_bytes > limit:
        await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)
        raise UsageError(f"a frame is {cfg.frame_bytes} bytes but {endpoint} accepts at most {limit}")
    return conns


class LoadRunner:
    """Drives load levels through a set of connections and records raw results."""

    def __init__(
        self,
        conns: list[Connection],
        frames: list[np.ndarray],
        stream_ids: list[int],
        cfg: RunConfig,
        *,
        seed: int = 0,
        process_index: int = 0,
    ) -> None:
        if not conns or not frames or not stream_ids:
            raise ValueError("need at least one connection, frame and stream")
        self._cfg = cfg
        self._frames = frames
        # Stream k always travels on the same connection, so its frames stay in order.
        self._targets = [(conns[i % len(conns)], sid) for i, sid in enumerate(stream_ids)]
        self._conns = conns
        self._seed = seed
        self._index = process_index
        self.warnings: list[str] = []
        self._outstanding = 0
        self._idle = asyncio.Event()
        self._idle.set()
        # Per-level state, set by _reset_level; per-window state, set by _begin_window.
        self._closed = False
        self._remaining: int | None = None
        self._issuing = False
        self._recording = False
        self._fatal: BaseException | None = None
        self._stop = asyncio.Event()
        self._slot_waiter: asyncio.Event | None = None
        self._max_out = 1
        self._n = 0
        self._window_start = 0.0
        self._cpu_start = 0.0
        self._latencies: list[float] = []
        self._timings: list[Timings] = []
        self._other: dict[int | str, int] = {}
        self._messages: dict[int, str] = {}
        self._lags: list[float] = []
        self._sent = 0
        self._last_done = 0.0
        self._epoch = 0
        self._done: Callable[[asyncio.Future[ReplyLike]], None] = functools.partial(self._on_done, 0)
        self._reset_level(closed=False, remaining=None)

    # --- hot path -----------------------------------------------------------

    def _issue(self) -> None:
        """Submit the next frame to the next stream (round robin)."""
        n = self._n
        self._n = n + 1
        conn, sid = self._targets[n % len(self._targets)]
        frame = self._frames[n % len(self._frames)]
        cfg = self._cfg
        try:
            fut = conn.submit(
                frame, stream_id=sid, model=cfg.model, deadline=cfg.deadline_s, priority=cfg.priority, live=cfg.live
            )
        except Exception as exc:
            self._fail(exc)
            return
        self._outstanding += 1
        self._idle.clear()
        if self._recording:
            self._sent += 1
        if self._remaining is not None:
            self._remaining -= 1
            if self._remaining == 0:
                self._issuing = False
        fut.add_done_callback(self._done)

    def _on_done(self, epoch: int, fut: asyncio.Future[ReplyLike]) -> None:
        if epoch != self._epoch:  # a frame of the load before, answered past the drain timeout: not this load's
            if not fut.cancelled():
                fut.exception()  # (retrieved, so asyncio does not log it)
            return
        self._outstanding -= 1
        if fut.cancelled():
            self._fail(ConnectionError("a reply was cancelled"))
        elif (exc := fut.exception()) is not None:
            self._fail(exc)
        elif self._recording:
            reply = fut.result()
            status = reply.status
            if status == _OK:
                self._latencies.append(reply.latency_s)
                self._timings.append(reply.timings)
            elif status in self._other:
                self._other[status] += 1
            else:  # first of its status in this window: keep the server's reason
                self._other[status] = 1
                self._messages[status] = reply.message
            self._last_done = time.monotonic()
        if self._issuing and self._closed:
            self._issue()  # closed loop: one completion frees one slot
        elif self._outstanding == 0:
            self._idle.set()
        if self._slot_waiter is not None and self._outstanding < self._max_out:
            self._slot_waiter.set()

    async def _open_loop(self, t0: float, rate: float) -> None:
        """Send on the schedule t0, t0 + d1, ... with d constant or exponential (Poisson arrivals)."""
        poisson = self._cfg.distribution == "poisson"
        mean = 1.0 / rate
        intervals = iter(())  # Poisson intervals are drawn in blocks, not one numpy call per frame
        slot = asyncio.Event()
        next_t = t0
        while self._issuing:
            now = time.monotonic()
            while next_t <= now and self._issuing:
                if self._outstanding >= self._max_out:
                    self._slot_waiter = slot
                    slot.clear()
                    await slot.wait()
                    self._slot_waiter = None
                    now = time.monotonic()
                    if not self._issuing:
                        return
                if self._recording:
                    self._lags.append(now - next_t)
                self._issue()
                if poisson:
                    try:
                        next_t += next(intervals)
                    except StopIteration:
                        intervals = iter(self._rng.exponential(mean, 4096).tolist())
                        next_t += next(intervals)
                else:
                    next_t += mean
                now = time.monotonic()
            if self._issuing:
                await asyncio.sleep(max(next_t - now, MIN_SLEEP_S))

    # --- control --------------------------------------------------------------

    def _fail(self, exc: BaseException) -> None:
        if self._recording:
            self._other[ERROR] = self._other.get(ERROR, 0) + 1
        if self._fatal is None:
            self._fatal = exc
        self._issuing = False
        self._stop.set()
        if self._outstanding == 0:
            self._idle.set()

    def _forget_unanswered(self) -> None:
        """Disown the frames still unanswered past the drain timeout (already warned about): their late replies
        would count in the load that runs now, with the latency of the one before, and free slots it never took
        (closed loop: one frame more in flight than the level says)."""
        self._epoch += 1
        self._done = functools.partial(self._on_done, self._epoch)
        self._outstanding = 0
        self._idle.set()

    def _reset_level(self, *, closed: bool, remaining: int | None) -> None:
        self._forget_unanswered()
        self._closed = closed
        self._remaining = remaining
        # Every level (and both endpoints of --compare) replays the same Poisson schedule.
        self._rng = np.random.default_rng(self._seed)
        self._issuing = False
        self._recording = False
        self._fatal = None
        self._stop = asyncio.Event()
        self._slot_waiter = None
        # Open loop: the in-flight bound is shared by all processes; closed loop never reaches it.
        self._max_out = max(1, math.ceil(self._cfg.max_outstanding / self._cfg.processes))
        self._n = 0
        self._begin_window(time.monotonic())

    def _begin_window(self, now: float) -> None:
        self._window_start = now
        self._cpu_start = time.process_time()
        self._latencies = []
        self._timings = []
        self._other = {}
        self._messages = {}
        self._lags = []
        self._sent = 0
        self._last_done = now

    def _cut(self, end: float) -> Window:
        """Close the current window at ``end`` and start the next one."""
        statuses: dict[str, int] = {"OK": len(self._latencies)} if self._latencies else {}
        for status, n in self._other.items():
            statuses[status if isinstance(status, str) else Status(status).name] = n
        # fromiter over the chained tuples runs in C: ~5x faster than np.array(list of tuples), so the loop stalls
        # less at a cut (~30 ms per 100,000 replies).
        n = len(self._timings)
        stages = np.fromiter(itertools.chain.from_iterable(self._timings), np.uint32, n * len(STAGES))
        window = Window(
            start=self._window_start,
            end=end,
            latencies=np.array(self._latencies, dtype=np.float64),
            statuses=statuses,
            stages=stages.reshape(n, len(STAGES)),
            sent=self._sent,
            lags=np.array(self._lags, dtype=np.float64),
            cpu_s=time.process_time() - self._cpu_start,
            messages={Status(k).name: v for k, v in self._messages.items() if v},
        )
        self._begin_window(end)
        return window

    async def _sleep_until(self, t: float) -> None:
        """Sleep until monotonic time ``t`` or until the level is stopped."""
        delay = t - time.monotonic()
        if delay > 0 and not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)

    def _start_load(self, level: LoadLevel, t0: float) -> asyncio.Task[None] | None:
        self._issuing = True
        if self._closed:
            for _ in range(int(level.value)):
                if self._issuing:
                    self._issue()
            return None
        return asyncio.get_running_loop().create_task(self._open_loop(t0, level.value))

    async def _stop_load(self, sender: asyncio.Task[None] | None, at: float = 0.0) -> None:
        """Stop sending (at monotonic time ``at``, or now) and wait until every reply is in."""
        await self._sleep_until(at)
        self._issuing = False
        if self._slot_waiter is not None:
            self._slot_waiter.set()
        if sender is not None:
            sender.cancel()  # it may sleep until its next send, 1/rate away: minutes at a low rate
            await asyncio.gather(sender, return_exceptions=True)
        try:
            await asyncio.wait_for(self._idle.wait(), self._cfg.drain_timeout_s)
        except TimeoutError:
            self.warnings.append(
                f"{self._outstanding} frames were unanswered {self._cfg.drain_timeout_s:g} s after the load stopped"
            )

    async def run_level(self, level: LoadLevel, t_start: float, on_window: OnWindow, stop: asyncio.Event) -> None:
        """Run ``level`` from monotonic time ``t_start``: warm up, then hand windows to ``on_window``.

        Time windows follow one another until ``stop`` is set (the caller's
        policy decides); with ``cfg.count`` exactly that many frames (this
        process's share) are measured in one window after the warm-up.
        Raises LoadgenError when the transport fails.
        """
        cfg = self._cfg
        self._reset_level(closed=level.mode == CONCURRENCY, remaining=None)
        unmatched = self._unmatched_replies()
        watcher = asyncio.get_running_loop().create_task(self._watch(stop))
        sender = None
        try:
            await self._sleep_until(t_start)
            t = t_start + cfg.warmup_s
            if cfg.count is not None:
                if cfg.warmup_s > 0:
                    await self._stop_load(self._start_load(level, t_start), t)
                await self._measure_count(level, on_window)
            else:
                sender = self._start_load(level, t_start)
                await self._sleep_until(t)
                self._recording = True
                self._begin_window(t)
                length = cfg.duration_s or cfg.window_s
                while not self._stop.is_set():
                    t += length
                    await self._sleep_until(t)
                    if self._stop.is_set():
                        break
                    await on_window(self._cut(t))
                    # Yield even when the next cut is past due: with windows shorter than a cut (-p 0.001) the loop
                    # cut on and on, and the stop (a task, a pipe) and the replies never got it: it hung for good.
                    await asyncio.sleep(0)
            await self._stop.wait()
        finally:
            self._recording = False
            await self._stop_load(sender)
            watcher.cancel()
            if unmatched := self._unmatched_replies() - unmatched:
                self.warnings.append(
                    f"{unmatched} replies came for no frame waiting (duplicates, or a stream id or sequence number "
                    "never sent, or answers to frames given up): the server misbehaves; they were not counted"
                )
        if self._fatal is not None:
            raise LoadgenError(f"the run failed: {self._fatal!r}") from self._fatal

    async def _measure_count(self, level: LoadLevel, on_window: OnWindow) -> None:
        """Measure exactly this process's share of cfg.count frames (after the warm-up load was drained)."""
        cfg = self._cfg
        assert cfg.count is not None
        if self._stop.is_set():
            return
        self._forget_unanswered()  # of the warm-up
        self._remaining = split_int(cfg.count, self._index, cfg.processes)  # validated: count >= processes
        start = time.monotonic()
        self._recording = True
        self._begin_window(start)
        sender = self._start_load(level, start)
        send_s = None
        if sender is not None:
            await sender
            # its sends took this long (count frames on schedule take count/rate, the last one sent at its start)
            send_s = time.monotonic() - start + 1 / level.value
        try:
            await asyncio.wait_for(self._idle.wait(), cfg.drain_timeout_s + (cfg.deadline_s or 0))
        except TimeoutError:
            self.warnings.append(f"{self._outstanding} counted frames were never answered")
        if not self._stop.is_set():
            window = self._cut(max(self._last_done, start))
            window.send_s = send_s  # (the send rate over the window would count the last replies' wait)
            await on_window(window)

    def _unmatched_replies(self) -> int:
        # (a plug-in transport's connection may not count them)
        return sum(getattr(conn, "unmatched_replies", 0) for conn in self._conns)

    async def _watch(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self._stop.set()

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self._conns), return_exceptions=True)
