"""Process logging for ``streamgpu serve``: text or JSON lines, one traceback per distinct failure,
a periodic stats line and a drain summary at shutdown.

A failure that repeats (the same exception type raised at the same place, logged by the same
call) prints its traceback once; its later occurrences are counted, and logged without a
traceback at the 10th, 100th, 1000th... time. ``repeats()`` gives the counts (the shutdown
summary prints them).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
import traceback
from typing import TYPE_CHECKING, Any

from streamgpu.config import Config

if TYPE_CHECKING:
    from streamgpu.server import Server

log = logging.getLogger("streamgpu")

# LogRecord attributes every record has: anything else was passed in ``extra`` and goes into JSON lines.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the record's extra fields, traceback."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        data.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
        if record.exc_info:
            data["traceback"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


class RepeatFilter(logging.Filter):
    """Keeps a failure's traceback to its first occurrence; counts the rest."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: dict[tuple[Any, ...], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.exc_info or record.exc_info[1] is None:
            return True
        exc = record.exc_info[1]
        frames = traceback.extract_tb(exc.__traceback__)
        where = (frames[-1].filename, frames[-1].lineno) if frames else ("?", 0)
        key = (record.name, record.msg, type(exc).__name__, *where)
        n = self._seen[key] = self._seen.get(key, 0) + 1
        if n == 1:
            return True
        if n not in (10, 100, 1_000, 10_000, 100_000) and n % 1_000_000:
            return False
        record.exc_info = None
        record.exc_text = None
        record.msg = f"{record.msg} [{type(exc).__name__}: {exc}; seen {n} times, traceback logged the first time]"
        return True

    def repeats(self) -> dict[str, int]:
        """``{"name: message (ExcType at file:line)": count}`` for failures seen more than once."""
        return {f"{k[0]}: {k[1]} ({k[2]} at {k[3]}:{k[4]})": n for k, n in self._seen.items() if n > 1}


_repeats = RepeatFilter()


def repeats() -> dict[str, int]:
    """Counts of failures seen more than once since logging was configured."""
    return _repeats.repeats()


def configure(config: Config) -> None:
    """Log to stderr at ``config.log_level`` in ``config.log_format`` (text or json)."""
    handler = logging.StreamHandler(sys.stderr)
    if config.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_repeats)
    # As logging.basicConfig: a program (or test harness) that set up logging already keeps its handlers.
    logging.basicConfig(level=config.log_level, handlers=[handler])
    logging.getLogger().setLevel(config.log_level)


def reply_totals(server: Server) -> dict[str, int]:
    """Replies so far by status name, over every model."""
    totals: dict[str, int] = {}
    for _, status, n in server.replies.items():
        totals[status.name] = totals.get(status.name, 0) + n
    return totals


class StatsLine:
    """Every ``interval`` seconds one line: frames/s answered OK, errors/s, queued frames, connections, ring use.

    Runs on the loop from a timer (nothing per frame); reads the counters their owners keep.
    """

    def __init__(self, server: Server, interval: float) -> None:
        self._server = server
        self._interval = interval
        self._last = (time.monotonic(), reply_totals(server))
        self._timer: asyncio.TimerHandle | None = None
        if interval > 0:
            self._timer = asyncio.get_running_loop().call_later(interval, self._tick)

    def _tick(self) -> None:
        self._timer = asyncio.get_running_loop().call_later(self._interval, self._tick)
        try:
            self.log()
        except Exception:  # a stats line must never stop the server, nor its next line
            log.exception("stats line failed")

    def log(self) -> None:
        server, (then, before) = self._server, self._last
        now, totals = time.monotonic(), reply_totals(server)
        self._last = (now, totals)
        elapsed = max(now - then, 1e-9)
        ok = totals.get("OK", 0) - before.get("OK", 0)
        errors = {k: n - before.get(k, 0) for k, n in totals.items() if k != "OK" and n > before.get(k, 0)}
        queued = sum(state.queue_length for state in server.model_states())
        log.info(
            "stats: %.1f frames/s OK, %.1f errors/s%s, %d queued, %d connections, ring %.0f%% used",
            ok / elapsed, sum(errors.values()) / elapsed, f" {errors}" if errors else "", queued,
            server.connections, 100 * server.ring_used_bytes / server.pool.capacity,
            extra={"event": "stats", "ok_per_s": round(ok / elapsed, 2), "errors": errors, "queued": queued,
                   "connections": server.connections},
        )  # fmt: skip

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def drain_summary(server: Server, in_flight: int, before: dict[str, int], seconds: float) -> None:
    """The shutdown's last word: what the frames in the server at the signal became, and repeated failures."""
    after = reply_totals(server)
    answered = {k: n - before.get(k, 0) for k, n in after.items() if n > before.get(k, 0)}
    log.info(
        "drained in %.2f s: %d frames were in the server; replies since the signal: %s; replies in all: %s",
        seconds, in_flight, answered or "none", after or "none",
        extra={"event": "drain", "in_flight": in_flight, "answered": answered, "totals": after},
    )  # fmt: skip
    for failure, count in repeats().items():
        log.info("failure seen %d times: %s", count, failure)
