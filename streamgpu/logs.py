"""Process logging for ``streamgpu serve``: text or JSON lines, and one traceback per distinct failure.

A failure that repeats (the same exception type raised at the same place, logged by the same
call) prints its traceback once; its later occurrences are counted, and logged without a
traceback at the 10th, 100th, 1000th... time. ``repeats()`` gives the counts (the shutdown
summary prints them).
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from typing import Any

from streamgpu.config import Config

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
