"""A model repository folder, polled: new or changed models load (a new version), removed ones unload.

Layout (docs/MODELS.md)::

    REPOSITORY/
      NAME/                 one folder per model; the folder name is the model name
        config.toml         optional: the model's settings, as a [[models]] table of the server
                            config takes them (no name; a relative source path is taken from here)
        model.pt2           the model file, when config.toml names no source:
                            model.pt2 = a torch.export archive, model.ts = TorchScript

Every ``repository_poll_s`` seconds the folder is scanned. A model folder whose
files (names, sizes, modification times) changed since it was loaded, and did
not change between the last two scans (so a file still being copied in is not
read half-written), is loaded: under a name already served that is a new
version, swapped in while the old one serves. A folder that disappeared unloads
its model (only models the repository loaded). A load that fails leaves the
version serving (if any) in place and is retried only when the files change again.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
from dataclasses import dataclass

from streamgpu.config import model_spec
from streamgpu.errors import ModelNotFoundError, NotRegularFileError, StreamgpuError
from streamgpu.files import read_toml
from streamgpu.models.manager import ModelManager
from streamgpu.models.spec import FILE_SCHEMES, ModelSpec

log = logging.getLogger("streamgpu")

MODEL_FILES = {"model.pt2": "export", "model.ts": "torchscript"}  # the model file when config.toml names none
CONFIG_FILE = "config.toml"

Signature = tuple[tuple[str, int, int], ...]  # (file name, size, mtime_ns) of every file of a model folder


def folder_signature(folder: str) -> Signature:
    """What identifies a version of a model folder's contents: its files' paths, sizes and modification times,
    subfolders' too (a relative source may name ``1/weights.pt``). Raises ``OSError`` if ``folder`` itself cannot
    be read; a file removed meanwhile is skipped, a subfolder reads as empty (a change: the next scans settle it)."""
    entries = []
    with os.scandir(folder) as it:
        top = list(it)
    folders = [entry.path for entry in top if entry.is_dir(follow_symlinks=False)]
    for entry in top:
        # A file listed, then gone before its stat (a temporary file renamed over the model's) is skipped: raised,
        # the scan took the whole folder for removed, and the poll unloaded its model
        with contextlib.suppress(OSError):
            if entry.is_file():
                st = entry.stat()
                entries.append((entry.name, st.st_size, st.st_mtime_ns))
    for sub in folders:
        for root, _dirs, files in os.walk(sub):  # (links to folders are not followed: no loop)
            for name in files:
                path = os.path.join(root, name)
                with contextlib.suppress(OSError):  # removed meanwhile
                    st = os.stat(path)
                    entries.append((os.path.relpath(path, folder), st.st_size, st.st_mtime_ns))
    return tuple(sorted(entries))


def folder_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a model of the repository (one folder of it), or None. Never one that reaches
    out of it (``..``, a ``/``), nor unprintable characters: names go into log lines, which control characters
    and line separators (NEL, U+2028 break lines too) would fake."""
    if name in (".", "..") or os.path.basename(name) != name or not name.isprintable():
        return f"model name {name!r} is not a plain folder name (no '/', unprintable characters, '.' or '..')"
    return None


def folder_spec(folder: str) -> ModelSpec:
    """The spec a model folder describes; ``ConfigError`` / ``ModelLoadError``-like ``StreamgpuError`` if none."""
    name = os.path.basename(folder.rstrip(os.sep))
    if (problem := folder_name_problem(name)) is not None:
        raise StreamgpuError(f"model repository folder {folder!r}: {problem}")
    settings: dict[str, object] = {}
    config_path = os.path.join(folder, CONFIG_FILE)
    where = f"model repository {config_path}"
    # Opened once and checked on the descriptor (a FIFO swapped in after a look at the name hung the open); one
    # that is not a regular file (a dangling link, a folder, a FIFO) is not skipped for the default settings
    try:
        settings = read_toml(config_path, where, regular=True)
    except FileNotFoundError:
        if os.path.lexists(config_path):
            raise StreamgpuError(f"{where}: not a regular file") from None
    except NotRegularFileError:
        raise StreamgpuError(f"{where}: not a regular file") from None
    except OSError as exc:
        raise StreamgpuError(f"{where}: cannot read it: {exc}") from None
    if "name" in settings:
        raise StreamgpuError(f"{where}: 'name' is the folder's name, not a setting")
    source = settings.pop("source", None)
    if source is None:
        found = [file for file in MODEL_FILES if os.path.isfile(os.path.join(folder, file))]
        # (a model file there that is no regular file, or two of them, said "put one of them there": one was)
        odd = [f for f in sorted(MODEL_FILES) if f not in found and os.path.lexists(os.path.join(folder, f))]
        if len(found) > 1:
            raise StreamgpuError(f"model repository folder {folder}: both {sorted(found)} are there: remove one, or "
                                 f"name the source in {CONFIG_FILE}")  # fmt: skip
        if not found and odd:
            raise StreamgpuError(f"model repository folder {folder}: {odd[0]} is not a regular file (a folder, a FIFO, "
                                 "a device or a dangling link): put the model file itself there")  # fmt: skip
        if not found:
            raise StreamgpuError(f"model repository folder {folder}: put one of {sorted(MODEL_FILES)} there, or "
                                 f"name the source in {CONFIG_FILE}")  # fmt: skip
        source = f"{MODEL_FILES[found[0]]}:{found[0]}"
    if not isinstance(source, str):
        raise StreamgpuError(f"{where}: source must be a string")
    return model_spec(settings, where, name=name, source=folder_source(folder, source))


def folder_source(folder: str, source: str) -> str:
    """``source`` with a relative file path taken from the model's ``folder``; any other source as it is (a
    source that names no file is refused as sent, not as a path of the folder)."""
    scheme, _, target = source.partition(":")
    if scheme in FILE_SCHEMES and target and not os.path.isabs(target):
        return f"{scheme}:{os.path.join(folder, target)}"
    return source


@dataclass
class _Seen:
    signature: Signature
    loaded: Signature | None = None  # the contents the serving (or last tried) version came from
    # The model's ``since`` once the repository's load of it succeeded (None: never): its folder's removal
    # unloads it only while it serves on from then (not the config's, nor one unloaded and loaded again since)
    since: int | None = None


class RepositoryPoller:
    """Scans ``directory`` every period and loads, swaps or unloads through ``models``."""

    def __init__(self, directory: str, models: ModelManager, executor: concurrent.futures.Executor) -> None:
        """``executor`` runs the file system calls (the server's loader thread), off the loop."""
        self.directory = directory
        self._models = models
        self._executor = executor
        self._seen: dict[str, _Seen] = {}
        self._task: asyncio.Task[None] | None = None

    def holds(self, name: str) -> bool:
        """Whether the last scan found a folder ``name`` (asks no file system: the loop calls it)."""
        return name in self._seen

    def start(self, period_s: float) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(period_s))

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self, period_s: float) -> None:
        while True:
            await asyncio.sleep(period_s)
            try:
                await self.poll()
            except Exception:  # a bad scan must not end polling
                log.exception("model repository %s: poll failed", self.directory)

    def _scan(self) -> dict[str, Signature]:
        found = {}
        try:
            names = os.listdir(self.directory)
        except OSError as exc:
            log.warning("model repository %s cannot be read: %s", self.directory, exc)
            return {name: seen.signature for name, seen in self._seen.items()}  # keep serving what we have
        for name in sorted(names):
            folder = os.path.join(self.directory, name)
            if os.path.isdir(folder) and not name.startswith("."):
                with contextlib.suppress(OSError):  # removed while scanning: gone at the next scan
                    found[name] = folder_signature(folder)
        return found

    async def poll(self, initial: bool = False) -> None:
        """One scan: load what is new or changed (and settled), unload what disappeared.

        ``initial``: the scan at start, which loads at once (no settling scan) and raises
        nothing (a model that fails is logged and listed UNAVAILABLE in the index).
        """
        loop = asyncio.get_running_loop()
        found = await loop.run_in_executor(self._executor, self._scan)
        for name in [n for n in self._seen if n not in found]:
            state = self._models.states.get(name)
            if state is not None and state.models is not None and state.since == self._seen[name].since:
                log.info("model repository: %s removed; unloading", name)
                try:
                    await self._models.unload(name)
                except ModelNotFoundError:  # unloaded meanwhile by an unload asked before (over HTTP)
                    pass
                except StreamgpuError as exc:  # still serving, still seen: the next scan tries again
                    log.error("model repository: %r not unloaded: %s", name, exc)
                    continue
            del self._seen[name]
            self._models.drop_unlisted(name)  # (one that never loaded: listed for its folder only)
        for name, signature in found.items():
            seen = self._seen.get(name)
            settled = initial or (seen is not None and seen.signature == signature)
            if seen is None:
                seen = self._seen[name] = _Seen(signature)
            seen.signature = signature
            if not settled or seen.loaded == signature:
                continue
            seen.loaded = signature
            try:
                spec = await loop.run_in_executor(self._executor, folder_spec, os.path.join(self.directory, name))
                log.info("model repository: loading %s from %s", name, spec.source)
                seen.since = (await self._models.load(spec)).since
            except StreamgpuError as exc:  # its settings, or the load (which listed it so already: the same words)
                log.error("model repository: %r not loaded: %s", name, exc)  # (%r: a folder name may fake a line)
                self._models.refused(name, str(exc))
