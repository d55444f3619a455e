"""One exception hierarchy for everything streamgpu raises on purpose.

Each class mixes in the built-in exception a caller would naturally catch
(``ValueError`` for bad settings, ``RuntimeError`` for a model or a device
that cannot be used), as asyncpg's ``exceptions/_base.py`` does, so code
that catches the built-in keeps working and code that wants only streamgpu's
errors catches ``StreamgpuError``. Pure: no torch, no asyncio.
"""

from __future__ import annotations


class StreamgpuError(Exception):
    """Base of every error streamgpu raises on purpose; the message says what to fix."""


class ConfigError(StreamgpuError, ValueError):
    """A setting is missing, unknown or out of range; the message names it and says how to fix it."""


class ModelLoadError(StreamgpuError, RuntimeError):
    """A configured model could not be loaded; the message says which, from where, and why."""


class NotRegularFileError(StreamgpuError, OSError):
    """A file the server reads (a model file, a repository folder's config.toml) is not a regular file (a FIFO,
    a device, a folder); the message names it."""


class DeviceUnavailableError(StreamgpuError, RuntimeError):
    """The configured device (e.g. ``cuda``) cannot be used on this machine."""


class ModelNotFoundError(StreamgpuError, LookupError):
    """An admin operation named a model the server does not serve."""


class BindError(StreamgpuError, OSError):
    """A listener's address cannot be bound (in use, not local, no permission); the message names it."""


class ServerNotStartedError(StreamgpuError, RuntimeError):
    """A ``Server`` method that needs it running was called before ``start()`` (or ``async with``)."""


class NotMainThreadError(StreamgpuError, RuntimeError):
    """``streamgpu.run`` (``streamgpu serve``) was called from a thread other than the main one, where it could
    never stop: only the main thread gets signals. The message points to ``Server``, which any thread can run."""


class LoopRunningError(StreamgpuError, RuntimeError):
    """``streamgpu.run`` (``streamgpu serve``) was called where an event loop runs already (in a coroutine, a
    notebook): it runs one of its own. The message points to ``Server``, which runs on the loop there."""


class WorkerStartError(StreamgpuError, RuntimeError):
    """An ingest worker process could not be started, or exited (or hung) while starting; the message names
    the worker and its exit status, and says what to check."""


class ServerStartedError(StreamgpuError, RuntimeError):
    """``start()`` was called on a ``Server`` that was started before (running, failed or stopped): a Server
    starts once; make a new one to serve again."""
