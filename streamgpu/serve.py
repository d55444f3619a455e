"""Running a server as a process: the loop, signals, graceful then forced shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal

from streamgpu.config import Config
from streamgpu.loops import new_event_loop
from streamgpu.server import Server

log = logging.getLogger("streamgpu")

EXIT_DEVICE_LOST = 3  # a GPU failed with a sticky error while serving: restart the process to use it again


def run(config: Config) -> int:
    """Serve until SIGINT/SIGTERM, then shut down gracefully. Returns the exit code."""
    loop = new_event_loop(config.loop)
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(_serve(config))
    finally:
        loop.close()


async def _serve(config: Config) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    server = Server(config)
    await server.start()
    log.info("event loop %s.%s", type(loop).__module__, type(loop).__name__)
    await stop.wait()
    log.info("signal received: stopping (answering in-flight frames; a second signal exits at once)")

    def force_exit() -> None:
        log.warning("second signal: exiting without finishing in-flight frames")
        os._exit(1)

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, force_exit)
    await server.stop()
    if lost := [d["name"] for d in server.metrics()["devices"] if d["error"]]:
        # torch frees CUDA memory at interpreter exit, and on a lost context that aborts the process.
        log.error("exiting at once (status %d): the CUDA context of %s was lost", EXIT_DEVICE_LOST, ", ".join(lost))
        logging.shutdown()
        os._exit(EXIT_DEVICE_LOST)
    return 0
