"""Runs a whole sweep: in this process, or spread over several generator processes.

With ``processes > 1`` the parent starts spawned workers, tells each its
share of every level and a common start time, merges window k of all
workers (raw latencies concatenated, so percentiles are over everything) and
decides when a level is stable; it sends no frames itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import multiprocessing.connection
import time
from collections.abc import Callable
from multiprocessing.connection import Connection as Pipe
from multiprocessing.process import BaseProcess
from typing import Any, cast

from streamgpu import loops
from streamgpu.loadgen.config import RunConfig
from streamgpu.loadgen.engine import LoadRunner, open_connections
from streamgpu.loadgen.errors import LoadgenError, UsageError
from streamgpu.loadgen.measure import LevelResult, Window, WindowPolicy, merge, summarize
from streamgpu.loadgen.report import Progress, RunReport
from streamgpu.loadgen.transports import get_transport

#: Head start the parent gives workers between announcing a level and its start.
START_DELAY_S = 0.05


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """The event loop factory for ``--loop auto|asyncio|uvloop``."""
    try:
        return loops.loop_factory(name)
    except ValueError as exc:
        raise UsageError(f"--loop: {exc}") from None


def run(cfg: RunConfig, progress: Progress | None = None) -> RunReport:
    """Run every level of ``cfg`` against every endpoint and return the report.

    Raises UsageError (bad configuration, unreachable endpoint) or LoadgenError
    (the run failed).
    """
    cfg.validate()
    progress = progress or Progress(enabled=False)
    started = time.time()
    try:
        if cfg.processes == 1:
            with asyncio.Runner(loop_factory=loop_factory(cfg.loop)) as runner:
                results, warnings = runner.run(_run_local(cfg, progress))
        else:
            loop_factory(cfg.loop)  # fail here, not in every worker
            results, warnings = _run_processes(cfg, progress)
    finally:
        progress.close()
    return RunReport.build(cfg, results, warnings, started=started)


async def _setup(cfg: RunConfig, index: int) -> list[LoadRunner]:
    """Frames, connections and one LoadRunner per endpoint for generator process ``index``."""
    frames = cfg.frames()
    transport = get_transport(cfg.transport)
    transport.configure(loss=cfg.loss)
    streams = [k for k in range(cfg.total_streams) if k % cfg.processes == index]
    runners: list[LoadRunner] = []
    try:
        for endpoint in cfg.endpoints:
            conns = await open_connections(transport, endpoint, cfg)
            runners.append(LoadRunner(conns, frames, streams, cfg, seed=cfg.seed + index, process_index=index))
    except BaseException:
        await asyncio.gather(*(r.close() for r in runners), return_exceptions=True)
        raise
    return runners


def _policy(cfg: RunConfig) -> WindowPolicy:
    fixed = cfg.duration_s is not None or cfg.count is not None
    return WindowPolicy(cfg.stability_pct, cfg.max_windows, cfg.stable_windows, fixed=fixed)


class _LocalSink:
    """Receives the windows of an in-process level and stops it when the policy says so."""

    def __init__(self, policy: WindowPolicy, stop: asyncio.Event, progress: Progress, label: str) -> None:
        self.policy, self.stop, self.progress, self.label = policy, stop, progress, label

    async def __call__(self, window: Window) -> None:
        if self.policy.add(window):
            self.stop.set()
        self.progress.window(self.label, self.policy)


def _result(cfg: RunConfig, policy: WindowPolicy, level_index: int, endpoint_index: int) -> LevelResult:
    level = cfg.levels[level_index]
    return summarize(
        policy.result_window(),
        endpoint=str(cfg.endpoints[endpoint_index]),
        mode=level.mode,
        level=level.value,
        windows=len(policy.windows),
        stable=policy.stable,
        max_lag_s=cfg.max_lag_s,
    )


def _label(cfg: RunConfig, level_index: int, endpoint_index: int) -> str:
    level = cfg.levels[level_index]
    unit = "in flight" if level.mode == "concurrency" else "frames/s"
    return f"{cfg.endpoints[endpoint_index]} {level.value:g} {unit}"


async def _run_local(cfg: RunConfig, progress: Progress) -> tuple[list[LevelResult], list[str]]:
    runners = await _setup(cfg, 0)
    results: list[LevelResult] = []
    try:
        for li, level in enumerate(cfg.levels):
            for ei, runner in enumerate(runners):
                policy, stop, label = _policy(cfg), asyncio.Event(), _label(cfg, li, ei)
                progress.level(label, len(results), len(cfg.levels) * len(runners))
                await runner.run_level(level, time.monotonic(), _LocalSink(policy, stop, progress, label), stop)
                results.append(_result(cfg, policy, li, ei))
    finally:
        await asyncio.gather(*(r.close() for r in runners), return_exceptions=True)
    return results, [w for r in runners for w in r.warnings]


# --- several processes --------------------------------------------------------


def _worker_main(cfg: RunConfig, index: int, pipe: Pipe) -> None:
    """Entry point of a spawned generator process."""
    try:
        with asyncio.Runner(loop_factory=loop_factory(cfg.loop)) as runner:
            runner.run(_worker(cfg, index, pipe))
    except KeyboardInterrupt:
        pass


def _error_message(exc: LoadgenError) -> tuple[str, int, str]:
    return ("error", 2 if isinstance(exc, UsageError) else 1, str(exc))


async def _worker(cfg: RunConfig, index: int, pipe: Pipe) -> None:
    loop = asyncio.get_running_loop()
    try:
        runners = await _setup(cfg, index)
    except LoadgenError as exc:
        pipe.send(_error_message(exc))
        return
    pipe.send(("ready",))

    async def send_window(window: Window) -> None:
        # Pipe writes can block until the parent reads; keep them off the loop.
        await loop.run_in_executor(None, pipe.send, ("window", window))

    try:
        while True:
            msg = await loop.run_in_executor(None, pipe.recv)
            if msg[0] != "level":
                return
            _, li, ei, t_start = msg
            stop = asyncio.Event()
            stop_msg = loop.run_in_executor(None, pipe.recv)  # the parent's ("stop",)
            stop_msg.add_done_callback(lambda _f, s=stop: s.set())  # type: ignore[misc]
            runner = runners[ei]
            try:
                await runner.run_level(cfg.levels[li].share(index, cfg.processes), t_start, send_window, stop)
            except LoadgenError as exc:
                pipe.send(_error_message(exc))
                return
            await stop_msg
            pipe.send(("done", runner.warnings[:]))
            runner.warnings.clear()
    finally:
        await asyncio.gather(*(r.close() for r in runners), return_exceptions=True)


def _raise_error(msg: tuple[Any, ...], index: int) -> None:
    _, code, text = msg
    raise (UsageError if code == 2 else LoadgenError)(f"generator process {index}: {text}")


def _recv(workers: list[tuple[BaseProcess, Pipe]], timeout: float = 1.0) -> list[tuple[int, tuple[Any, ...]]]:
    """Messages ready from any worker; LoadgenError when a worker died."""
    pipes = [pipe for _, pipe in workers]
    ready = multiprocessing.connection.wait(pipes, timeout)
    out: list[tuple[int, tuple[Any, ...]]] = []
    for obj in ready:
        i = pipes.index(cast(Pipe, obj))
        try:
            out.append((i, pipes[i].recv()))
        except EOFError:
            raise LoadgenError(f"generator process {i} exited (code {workers[i][0].exitcode})") from None
    if not ready:
        for i, (proc, _) in enumerate(workers):
            if not proc.is_alive():
                raise LoadgenError(f"generator process {i} exited (code {proc.exitcode})")
    return out


def _run_processes(cfg: RunConfig, progress: Progress) -> tuple[list[LevelResult], list[str]]:
    ctx = multiprocessing.get_context("spawn")  # no fork of a parent that may hold threads or a loop
    n = cfg.processes
    workers: list[tuple[BaseProcess, Pipe]] = []
    results: list[LevelResult] = []
    warnings: list[str] = []
    try:
        for i in range(n):
            parent_end, child_end = ctx.Pipe()
            proc: BaseProcess = ctx.Process(
                target=_worker_main, args=(cfg, i, child_end), name=f"loadgen-{i}", daemon=True
            )
            proc.start()
            child_end.close()
            workers.append((proc, parent_end))
        ready = 0
        while ready < n:
            for i, msg in _recv(workers):
                if msg[0] == "error":
                    _raise_error(msg, i)
                ready += 1
        for li in range(len(cfg.levels)):
            for ei in range(len(cfg.endpoints)):
                label = _label(cfg, li, ei)
                progress.level(label, len(results), len(cfg.levels) * len(cfg.endpoints))
                policy = _policy(cfg)
                _run_level_processes(workers, li, ei, policy, progress, label, warnings)
                results.append(_result(cfg, policy, li, ei))
    finally:
        for _, pipe in workers:
            with contextlib.suppress(OSError):
                pipe.send(("exit",))
        for proc, pipe in workers:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
            pipe.close()
    return results, warnings


def _run_level_processes(
    workers: list[tuple[BaseProcess, Pipe]],
    level_index: int,
    endpoint_index: int,
    policy: WindowPolicy,
    progress: Progress,
    label: str,
    warnings: list[str],
) -> None:
    n = len(workers)
    t_start = time.monotonic() + START_DELAY_S
    for _, pipe in workers:
        pipe.send(("level", level_index, endpoint_index, t_start))
    received = [0] * n
    pending: dict[int, list[Window]] = {}
    stopped = False
    done = 0
    while done < n:
        for i, msg in _recv(workers):
            kind = msg[0]
            if kind == "error":
                _raise_error(msg, i)
            elif kind == "done":
                done += 1
                warnings.extend(msg[1])
            elif kind == "window" and not stopped:
                # Workers send windows in order, so window k completes after k-1 did.
                k = received[i]
                received[i] += 1
                pending.setdefault(k, []).append(msg[1])
                if len(pending[k]) == n:
                    stopped = policy.add(merge(pending.pop(k)))
                    progress.window(label, policy)
                    if stopped:
                        for _, pipe in workers:
                            pipe.send(("stop",))
