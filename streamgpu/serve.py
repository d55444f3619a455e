"""Running a server as a process: the loop, signals, graceful then forced shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
import threading
import time

from streamgpu.cmdline import STOP_SIGNALS
from streamgpu.config import Config
from streamgpu.errors import LoopRunningError, NotMainThreadError
from streamgpu.logs import StatsLine, drain_summary, reply_totals
from streamgpu.loops import new_event_loop, tune_malloc
from streamgpu.server import Server

log = logging.getLogger("streamgpu")

EXIT_DEVICE_LOST = 3  # a GPU failed with a sticky error while serving: restart the process to use it again
# Descriptors a server needs beside its connections: listeners, ingest workers' channels, the ring, CUDA, logs
DESCRIPTOR_MARGIN = 512


def raise_descriptor_limit(config: Config) -> None:
    """Raise this process's soft limit on open files (RLIMIT_NOFILE) to what ``max_connections`` needs, as
    far as the hard limit allows; ingest workers inherit it. A common soft limit is 1024, the default
    ``max_connections``: past it accept() fails and producers hang in the backlog instead of being served
    or refused."""
    wanted = config.max_connections + DESCRIPTOR_MARGIN
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < wanted:
        log.warning("open files are limited to %d (hard limit), below max_connections (%d) + %d: connections past "
                    "it wait unserved; raise the limit (ulimit -n) or lower max_connections", target,
                    config.max_connections, DESCRIPTOR_MARGIN)  # fmt: skip


def run(config: Config) -> int:
    """Serve until SIGINT/SIGTERM, then shut down gracefully. Returns the exit code.

    Main thread only (Python runs signal handlers there), and not where an event loop runs already: it raises
    ``NotMainThreadError`` or ``LoopRunningError`` before anything starts. On return SIGINT and SIGTERM have the
    handlers they had (a program that calls it keeps its own), and the thread's current event loop is the one it
    had: its loop runs without being made current, as ``asyncio.Runner`` runs one from a ``loop_factory``."""
    if (thread := threading.current_thread()) is not threading.main_thread():
        raise NotMainThreadError(
            f"streamgpu serve stops on SIGINT/SIGTERM, which Python delivers to the main thread only, and this is "
            f"thread {thread.name!r}: call it from the main thread, or, in this thread, run a streamgpu.server.Server "
            "on an event loop of its own (async with Server(config): ...) and stop it with await server.stop() "
            "(README: Embedding in your own program)"
        )
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # (none: as it should be)
        pass
    else:  # (run_until_complete would fail, after it replaced this thread's event loop with its own)
        raise LoopRunningError(
            "streamgpu serve runs an event loop of its own, and one runs in this thread already (a coroutine, a "
            "notebook): on that loop, run a streamgpu.server.Server instead (async with Server(config): ...) and stop "
            "it with await server.stop() (README: Embedding in your own program)"
        )
    before = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    raise_descriptor_limit(config)
    tune_malloc()
    # Not set as this thread's event loop: closed on return, it was left there, and the caller's next
    # asyncio.get_event_loop() got it ("Event loop is closed"). Code on the loop gets it as the running loop.
    loop = new_event_loop(config.loop)
    try:
        return loop.run_until_complete(_serve(config))
    finally:
        loop.close()  # (it leaves SIGINT and SIGTERM at their defaults)
        for sig, handler in before.items():
            if handler is not None:  # (None: one set outside Python, which Python cannot put back)
                signal.signal(sig, handler)


async def _serve(config: Config) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    server = Server(config)

    def on_signal() -> None:
        # The first signal stops the server (once started, if it is still loading models); the second exits at
        # once, also while it starts: a model's load or compile can take a minute.
        if stop.is_set():
            log.warning("second signal: exiting without finishing in-flight frames")
            os._exit(1)
        stop.set()
        if not server.started:
            log.info("signal received while starting: stopping once started (a second signal exits at once)")

    for sig in STOP_SIGNALS:
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, on_signal)
    await server.start()
    log.info("event loop %s.%s", type(loop).__module__, type(loop).__name__)
    stats = StatsLine(server, config.stats_interval_s)
    await stop.wait()
    stats.cancel()
    in_flight, before, started = server.frames_in_flight, reply_totals(server), time.monotonic()
    log.info("signal received: stopping (answering %d in-flight frames; a second signal exits at once)", in_flight)
    await server.stop()
    drain_summary(server, in_flight, before, time.monotonic() - started)
    if lost := [d["name"] for d in server.metrics()["devices"] if d["error"]]:
        # torch frees CUDA memory at interpreter exit, and on a lost context that aborts the process.
        log.error("exiting at once (status %d): the CUDA context of %s was lost", EXIT_DEVICE_LOST, ", ".join(lost))
        logging.shutdown()
        os._exit(EXIT_DEVICE_LOST)
    return 0
