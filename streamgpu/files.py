"""Reading the files the server is told of, with errors that name the file and say what to fix. Pure: no torch."""

from __future__ import annotations

import os
import stat
import tomllib
from typing import IO, Any

from streamgpu.errors import ConfigError, NotRegularFileError

# Tables and arrays inside one another that a settings document may nest: none needs more than five
# ([[server.listeners]] options holding a list); far below Python's recursion limit, which the messages
# that show a setting's value (repr) would otherwise reach
MAX_SETTINGS_NESTING = 32
TOO_DEEP = f"tables or arrays nested more than {MAX_SETTINGS_NESTING} levels deep (no setting nests more than a few)"
# Bytes a settings file may hold: example.toml, every setting with its comment, is ~20 KB. tomllib reads the whole
# file before parsing it, so a file that never ends (/dev/zero, a pipe) took memory until MemoryError
MAX_SETTINGS_BYTES = 16 * 1024 * 1024


def _nesting_problem(doc: object) -> str | None:
    """Why settings ``doc`` (parsed TOML) nest too deeply to be read (``TOO_DEEP``), or None. Walked
    without recursion."""
    stack = [(doc, 0)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_SETTINGS_NESTING:
            return TOO_DEEP
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return None


def open_regular(path: str) -> IO[bytes]:
    """``path`` opened for reading, once the file opened is found a regular one (``NotRegularFileError`` if not):
    a FIFO put in the place of a file looked at before would make a plain open wait for a writer for good, and
    the thread reading it (the server's loader thread: every load after it) with it."""
    # (O_NONBLOCK: a FIFO's open returns at once; O_NOCTTY: a terminal's does not make it the server's, whose
    # hangup would end it)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFileError(f"{path!r} is not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_toml(path: str, where: str, regular: bool = False) -> dict[str, Any]:
    """The TOML document in file ``path``; ``ConfigError`` naming ``where`` (the file, as the caller names it:
    ``config file 'c.toml'``) for one that tomllib cannot read, that nests past ``MAX_SETTINGS_NESTING`` or is
    larger than ``MAX_SETTINGS_BYTES``, saying why. ``OSError`` as ``open`` raises it (the caller says what a
    missing file means); ``regular``: the file is opened by ``open_regular`` (a file the server finds, not one its
    operator names: that may be a pipe)."""
    with open_regular(path) if regular else open(path, "rb") as f:
        data = f.read(MAX_SETTINGS_BYTES + 1)
        if len(data) > MAX_SETTINGS_BYTES:
            raise ConfigError(f"{where} is larger than {MAX_SETTINGS_BYTES} bytes: not a settings file")
        try:
            doc = tomllib.loads(data.decode())
        # (TOML is UTF-8: UnicodeDecodeError; tomllib lets int()'s ValueError, past Python's digit limit, through)
        except ValueError as exc:
            raise ConfigError(f"{where} is not valid TOML: {exc}") from None
        except RecursionError:  # tomllib recurses for each array or inline table opened inside another
            problem: str | None = TOO_DEEP
        else:
            problem = _nesting_problem(doc)  # ([a.b.c...] headers nest tables without recursing)
    if problem is not None:
        raise ConfigError(f"{where}: {problem}: fix its brackets or table headers")
    return doc
