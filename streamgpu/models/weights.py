"""A new version that only brings new weights takes them in place (an in-place swap).

A new version of a serving model that is its builtin architecture with other weights (a ``state_dict:``
source, every other setting the same) need not be built, warmed and graph-captured beside it: its file is
read, its tensors checked against the serving module's one by one, staged on the device, and copied into
the serving module's own tensors between two batches (``Backend.swap_weights``). The CUDA graphs read
those tensors where they are, so from the next batch on they run the new weights.

The file is read in a child process kept for the next reads (``WeightsReader``), which writes every value, in
its serving tensor's dtype and memory layout, into one shared host buffer (``WeightsLayout``): reading a weights
file is milliseconds-long calls that hold the GIL (``torch.load``'s records, the dtype conversions), and in the
serving process each of them held the loop for as long (docs/BENCHMARKS.md). The serving process then copies
that buffer to the device whole, and at the swap copies it into the live tensors; on a GPU, into the one buffer
that holds them all (``pack_weights``), in one copy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import IO, Any

import numpy as np
import torch
from torch import Tensor, nn

from streamgpu.children import child_environment, exit_status, module_command
from streamgpu.errors import ModelLoadError
from streamgpu.loops import spare_cpus
from streamgpu.memory import HostSegment
from streamgpu.models.loader import load_errors, read_state_dict
from streamgpu.models.spec import ModelSpec

log = logging.getLogger("streamgpu")

# Settings a new version taking the serving one's place in place may have of its own: the weights it brings, and
# this choice itself
_THE_NEW_VERSIONS = ("source", "arch", "weights_in_place")
# Entries named in an error at most (a state dict of another architecture differs in hundreds)
_NAMED = 5
# Where each value starts in the shared buffer: a multiple of this many bytes (the device copies' vector loads)
_ALIGN = 256
# Lines of a failed reader's standard error quoted in the error, from at most this many bytes of its end
_STDERR_LINES = 5
_LOG_TAIL_BYTES = 8192
# How often the wait for a reader asks whether the server stopped (its exit waits for the loader thread)
_STOPPED_POLL_S = 0.25
# How long a reader whose socket closed is given to end, for its exit status
_ENDING_S = 5.0
# How long a reader killed is waited for (a stop waits on the loop's thread): one stuck in a system call that a kill
# cannot interrupt (a read from a hung network file system) is reaped by a thread of its own once it returns
_REAP_S = 1.0
_READER_HINT = (" (check that it can import streamgpu and torch in this environment, and that memory is not short; "
                "the version serving serves on)")  # fmt: skip
# Where the reader was killed by SIGBUS: the file it mapped (``read_state_dict``) was cut short under it
_CUT_SHORT_HINT = (" (was {!r} cut short as it was read? It is mapped: write a new version's file whole before it "
                   "loads; the version serving serves on)")  # fmt: skip
# The reader process's scheduling priority (nice), below the server's (or the server's, where that is lower)
READER_NICENESS = 10


def architecture(spec: ModelSpec) -> str | None:
    """The builtin architecture ``spec`` builds (``builtin:NAME``, or a state dict's ``arch``); None for a file
    that holds its own (TorchScript, ``torch.export``)."""
    scheme, _, target = spec.source.partition(":")
    if scheme == "builtin":
        return target
    return spec.arch if scheme == "state_dict" else None


def takes_weights_in_place(spec: ModelSpec) -> bool:
    """Whether a model loaded from ``spec`` may take its next versions' weights in place: it asks to, and is of a
    builtin architecture (a new version's ``arch``; a file holding its own has its new versions built beside it)."""
    return spec.weights_in_place and architecture(spec) is not None


def in_place_problem(serving: ModelSpec, new: ModelSpec) -> str | None:
    """Why ``new`` cannot replace ``serving`` by its weights alone (it is then built as a version of its own),
    or None: it can."""
    if not new.weights_in_place:
        return "weights_in_place = false"
    if not new.source.startswith("state_dict:"):
        return "its source is not a state_dict"
    if new.arch != architecture(serving):
        return f"its architecture {new.arch!r} is not the serving one's ({architecture(serving)!r})"
    if new.swap_queued == "received":  # the frames queued now would run on the weights copied in
        return 'swap_queued = "received"'
    changed = [f.name for f in dataclasses.fields(new)
               if f.name not in _THE_NEW_VERSIONS and getattr(new, f.name) != getattr(serving, f.name)]  # fmt: skip
    if changed:
        return f"its settings differ ({', '.join(changed)})"
    return None


@dataclasses.dataclass(frozen=True)
class LiveEntry:
    """One tensor of a serving module's state: its new value's place in the shared buffer, and how it is laid."""

    key: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]  # the live tensor's, its value written so: copied at the swap as it lies
    dtype: torch.dtype
    offset: int  # bytes into the buffer
    keepable: bool  # a batch norm's counter: load_state_dict keeps it where an old state dict lacks it (``_kept``)

    @property
    def nbytes(self) -> int:
        return self.dtype.itemsize * math.prod(self.shape)

    def view(self, buffer: Tensor) -> Tensor:
        """This entry's tensor in ``buffer`` (one-dimensional uint8, on any device)."""
        return buffer[self.offset : self.offset + self.nbytes].view(self.dtype).as_strided(self.shape, self.stride)


@dataclasses.dataclass(frozen=True)
class WeightsLayout:
    """A serving module's state (parameters and persistent buffers) as one buffer of its new values."""

    entries: tuple[LiveEntry, ...]
    nbytes: int

    @classmethod
    def of(cls, module: nn.Module) -> WeightsLayout:
        keepable = {f"{prefix}.num_batches_tracked" if prefix else "num_batches_tracked"
                    for prefix, sub in module.named_modules()
                    if isinstance(sub, nn.modules.batchnorm._BatchNorm) and sub.track_running_stats}  # fmt: skip
        entries, offset = [], 0
        for key, tensor in module.state_dict().items():
            # A value takes its live tensor's strides where that tensor is dense (so the copy at the swap moves it
            # flat), contiguous ones otherwise (a view with gaps: copied element by element)
            shape, stride = tuple(tensor.shape), tuple(tensor.stride())
            if not _dense(shape, stride):
                stride = _contiguous_strides(shape)
            entry = LiveEntry(key, shape, stride, tensor.dtype, offset, key in keepable)
            entries.append(entry)
            offset += -(-entry.nbytes // _ALIGN) * _ALIGN
        return cls(tuple(entries), offset)


@dataclasses.dataclass(frozen=True, eq=False)
class PackedWeights:
    """A module's state moved into one buffer (``pack_weights``): ``buffer`` (one-dimensional uint8, on the
    module's device) holds every entry of ``layout``, and each tensor of the module's state is a view of it."""

    layout: WeightsLayout
    buffer: Tensor


def pack_weights(module: nn.Module) -> PackedWeights | None:
    """Move every tensor of ``module``'s state (parameters and persistent buffers, the tensor objects kept) into
    views of one buffer laid out as ``WeightsLayout.of(module)`` lays their new values: a new version's values,
    staged in that layout, then go in by one copy of the whole buffer (``Backend.swap_weights``), where copying
    them tensor by tensor takes hundreds of small copies (tens of launches even grouped by dtype). Call it before
    graphs are captured or the module compiled: they keep the addresses they saw.

    None, the module left as it is, where its state is not one tensor per entry on one device (two entries
    sharing memory, tied weights or views of one tensor, would be moved apart; so would a buffer outside the
    state, a non-persistent one, that views an entry), or holds no values."""
    state = module.state_dict(keep_vars=True)
    tensors = [tensor for tensor in state.values() if tensor.numel()]
    entries = {id(tensor) for tensor in tensors}
    others = [buffer for buffer in module.buffers() if buffer.numel() and id(buffer) not in entries]
    storages = {tensor.untyped_storage().data_ptr() for tensor in tensors}
    if (not tensors or len(storages) < len(tensors) or len({tensor.device for tensor in tensors}) > 1
            or any(buffer.untyped_storage().data_ptr() in storages for buffer in others)):  # fmt: skip
        return None
    layout = WeightsLayout.of(module)
    buffer = torch.empty(layout.nbytes, dtype=torch.uint8, device=tensors[0].device)
    with torch.no_grad():
        for entry, tensor in zip(layout.entries, state.values(), strict=True):
            view = entry.view(buffer)
            view.copy_(tensor)
            tensor.data = view  # (the object stays: the module, its hooks and wrappers hold it)
    return PackedWeights(layout, buffer)


class HostWeights:
    """A new version's weights read by ``WeightsReader.read``: every value in ``buffer`` (one-dimensional uint8, in
    shared host memory: ``host``'s first bytes) in its serving tensor's dtype and layout, but those ``kept``. Close
    it (or use it as a context manager) once the values were copied out (``Backend.stage_weights``): the reader
    writes the next version's there."""

    def __init__(self, name: str, layout: WeightsLayout, kept: list[str], host: np.ndarray) -> None:
        self.name = name
        self.layout = layout
        self.kept = frozenset(kept)
        self.buffer = torch.from_numpy(host[: layout.nbytes])

    def pairs(self, module: nn.Module, buffer: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Each tensor of ``module``'s state that takes a new value, with that value in ``buffer`` (a copy of
        ``self.buffer``, on the module's device). ``module`` is one instance of the serving version: its state is
        laid out as the one the buffer was written for (``ModelLoadError`` otherwise)."""
        live = module.state_dict()
        laid = [(entry.key, entry.shape, entry.dtype) for entry in self.layout.entries]
        if laid != [(key, tuple(t.shape), t.dtype) for key, t in live.items()]:
            raise ModelLoadError(f"model {self.name!r}: an instance's weights are not laid out as the first's")
        return [(live[e.key], e.view(buffer)) for e in self.layout.entries if e.key not in self.kept]

    def keep(self, packed: PackedWeights, staged: Tensor) -> None:
        """Write the values of the entries kept (``kept``) from ``packed`` (a serving instance's, laid out as this
        buffer is) into ``staged`` (a copy of ``buffer`` on its device), so that copying ``staged`` over
        ``packed.buffer`` whole keeps them."""
        for entry in self.layout.entries:
            if entry.key in self.kept:
                entry.view(staged).copy_(entry.view(packed.buffer))

    def close(self) -> None:
        del self.buffer

    def __enter__(self) -> HostWeights:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class WeightsReader:
    """The process that reads new versions' weights files (this module run as a program), kept from one read to
    the next: its start is an interpreter and torch's import, ~4 s of CPU that ran beside the serving loop at
    every swap while it was started per read (docs/BENCHMARKS.md). It starts at the first ``read``, or earlier
    by ``start`` (the server does so as a model that ``takes_weights_in_place`` loads), runs one thread, niced below
    the server, off a pinned loop's CPU, in a session of its own (a Ctrl-C to the server's terminal is the
    server's to handle), and ends with the server (``close``) or when the server's end of its socket goes (a
    server killed). A reader that ends or fails is started again at the next read.

    Reads come one at a time (the models' loader thread asks)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # (``close`` comes from the loop's thread, reads from the loader's)
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._log: IO[bytes] | None = None  # its standard output and error: their last lines go into an error
        self._command: list[str] = []
        self._segment: HostSegment | None = None  # (``_segment_for``)
        self._asked = 0  # requests sent: each reply names the one it answers
        self._closed = False

    def start(self) -> None:
        """Start the reader process if it is not running (a read does so too): its start then overlaps what the
        server does meanwhile, not the next swap. ``ModelLoadError`` where it cannot start."""
        with self._lock:
            if self._closed:
                raise ModelLoadError("the server has stopped")
            if self._proc is not None:
                if (code := self._proc.poll()) is None:
                    return
                # It ended between reads (killed: the OOM killer, an operator): another, not a failed swap
                log.warning("the process that reads new weights ended between reads (%s); another starts",
                            exit_status(code))  # fmt: skip
                self._end()
            # One thread (torch's conversions would otherwise run on every core, its idle threads spinning a while
            # after each)
            env = {**child_environment(), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
            with contextlib.ExitStack() as undone:  # (what it took, given back where it cannot start)
                try:
                    output = undone.enter_context(tempfile.TemporaryFile(prefix="streamgpu-weights-reader-"))
                    ours, its = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                    undone.enter_context(ours)
                    with its:  # (the reader's end: its own once started)
                        self._command = module_command(__name__, str(its.fileno()))
                        proc = subprocess.Popen(self._command, stdin=subprocess.DEVNULL, stdout=output,
                                                stderr=output, pass_fds=(its.fileno(),), env=env,
                                                start_new_session=True)  # fmt: skip
                except OSError as exc:  # (a full or read-only temporary folder, descriptors or memory short)
                    raise ModelLoadError(f"the process that reads new weights could not start: {exc}") from exc
                undone.pop_all()
            # Its start and reads yield to the serving threads where they share a CPU, and keep off a pinned loop's.
            # Never niced less than it was born (the server's): a server run unprivileged above READER_NICENESS
            # may not raise its child's priority (PermissionError)
            with contextlib.suppress(ProcessLookupError):  # (ended already: the read hears how)
                niceness = max(READER_NICENESS, os.getpriority(os.PRIO_PROCESS, proc.pid))
                os.setpriority(os.PRIO_PROCESS, proc.pid, niceness)
                if (cpus := spare_cpus()) is not None:
                    os.sched_setaffinity(proc.pid, cpus)
            ours.settimeout(_STOPPED_POLL_S)
            self._proc, self._sock, self._log = proc, ours, output

    def read(self, spec: ModelSpec, layout: WeightsLayout, stopped: Callable[[], bool] = lambda: False) -> HostWeights:
        """``spec``'s file (a ``state_dict:`` source) read, checked against ``layout`` and written into shared
        memory as it lays the values out, by the reader process. Blocking: call it in the loader thread, which
        only waits meanwhile. ``ModelLoadError`` where the file or a value does not fit, or the reader fails, or
        ``stopped()`` (asked from the calling thread as it waits) said the server stopped: the reader is then
        ended."""
        self.start()
        with self._lock:  # what the read uses, taken at once: ``close`` (the loop's thread) may come at any point
            if self._closed:
                raise ModelLoadError("the server has stopped")
            assert self._sock is not None  # (started above; only ``close`` or a failed read, this thread's, end it)
            sock, segment = self._sock, self._segment_for(layout.nbytes)
            self._asked += 1
            host, request = segment.buffer, (self._asked, spec, layout, segment.nbytes, segment.fd)
        # (``host`` keeps the mapping past a close meanwhile: ``HostSegment.close``)
        return HostWeights(spec.name, layout, self._ask(sock, request, stopped), host)

    def close(self) -> None:
        """End the reader (a read waiting on it fails) and take no more reads."""
        with self._lock:
            self._closed = True
            self._end()
            if self._segment is not None:  # (a read's values still in use keep it mapped: ``HostSegment.close``)
                self._segment.close()
                self._segment = None

    def _segment_for(self, nbytes: int) -> HostSegment:
        """The shared memory the reader writes values into, kept from one read to the next (each read of a new one
        cost the server ~15 ms of unmapping, and both processes a page fault per page, for a ResNet-50), and
        replaced by a larger one for a larger layout (under ``_lock``)."""
        if self._segment is None or self._segment.nbytes < nbytes:
            if self._segment is not None:
                self._segment.close()
                self._segment = None
            self._segment = HostSegment.create(max(nbytes, 1), name="streamgpu-weights")
        return self._segment

    def _ask(
        self, sock: socket.socket, request: tuple[int, ModelSpec, WeightsLayout, int, int], stopped: Callable[[], bool]
    ) -> list[str]:
        """The entries kept (``HostWeights.kept``) of ``request``'s read: its number, spec, layout, and segment's size
        and descriptor."""
        asked, spec, layout, nbytes, segment_fd = request
        # The request (the spec and layout: a large module's past a socket's buffer) in a file, with the segment
        with os.fdopen(os.memfd_create("streamgpu-weights-request", os.MFD_CLOEXEC), "w+b") as file:
            pickle.dump((asked, spec, layout, nbytes), file)
            file.flush()
            file.seek(0)  # (the reader reads the same open file, from its offset)
            with contextlib.suppress(OSError):  # (it ended, or a close closed both: how, the reply's wait says)
                socket.send_fds(sock, [b"r"], [file.fileno(), segment_fd])
        try:
            reply = self._reply(spec, asked, sock, stopped)
        except BaseException:
            with self._lock:
                self._end()
            raise
        if "error" in reply:
            raise ModelLoadError(str(reply["error"]))
        return [str(key) for key in reply["kept"]]

    def _reply(self, spec: ModelSpec, asked: int, sock: socket.socket, stopped: Callable[[], bool]) -> dict[str, Any]:
        """The reader's reply to the request just sent (number ``asked``): one line of JSON."""
        stop = ModelLoadError(f"model {spec.name!r}: the server stopped while its weights were read")
        data = b""
        while not data.endswith(b"\n"):
            try:
                chunk = sock.recv(1 << 16)
            except TimeoutError:
                if stopped():
                    raise stop from None
                continue
            except OSError:  # (its end reset: it ended)
                chunk = b""
            if not chunk:
                if stopped():
                    raise stop
                said, code = self._said()
                hint = _CUT_SHORT_HINT.format(spec.source.partition(":")[2]) if code == -signal.SIGBUS else _READER_HINT
                raise ModelLoadError(f"model {spec.name!r}: the process reading its weights {said}{hint}")
            data += chunk
        try:
            reply = json.loads(data)
        except ValueError:
            reply = None
        if not isinstance(reply, dict) or not ("error" in reply or isinstance(reply.get("kept"), list)):
            raise ModelLoadError(f"model {spec.name!r}: the process reading its weights replied "
                                 f"{data[:80]!r}, not a reply of its own" + _READER_HINT)  # fmt: skip
        if reply.get("request") != asked:  # (out of step: this request's values may not be written yet)
            raise ModelLoadError(f"model {spec.name!r}: the process reading its weights replied to request "
                                 f"{reply.get('request')!r}, not {asked}: it is out of step"
                                 + _READER_HINT)  # fmt: skip
        return reply

    def _said(self) -> tuple[str, int | None]:
        """How the reader, whose socket closed, ended, and the last lines it wrote; its exit status (None: it has
        not ended, or was ended)."""
        with self._lock:
            proc, output, command = self._proc, self._log, self._command
            if proc is None or output is None:
                return "was ended", None
        # (Not under the lock: a close from the loop's thread meanwhile, the server's stop, does not wait on it)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(_ENDING_S)
        code = proc.returncode
        with self._lock:
            if self._log is not output:  # a close ended it meanwhile, its output with it
                return "was ended", None
            output.seek(0, os.SEEK_END)
            output.seek(max(0, output.tell() - _LOG_TAIL_BYTES))
            lines = output.read().decode(errors="replace").strip().splitlines()[-_STDERR_LINES:]
        how = "did not end after its socket closed" if code is None else f"ended ({exit_status(code)})"
        said = "; ".join(line.strip() for line in lines)
        return f"({' '.join(command[:3])}) {how}" + (f": {said}" if said else ""), code

    def _end(self) -> None:
        """Kill and reap the reader, if any (under ``_lock``): a later read starts another."""
        proc, sock, output = self._proc, self._sock, self._log
        self._proc = self._sock = self._log = None
        if proc is not None:
            proc.kill()
            try:
                proc.wait(_REAP_S)
            except subprocess.TimeoutExpired:
                log.warning("the process that reads new weights (pid %d) did not end %.0f s after it was killed "
                            "(stuck in the file system?); it is reaped when it ends", proc.pid, _REAP_S)  # fmt: skip
                threading.Thread(target=proc.wait, name="streamgpu-weights-reader-reaper", daemon=True).start()
        for resource in (sock, output):
            if resource is not None:
                resource.close()


def write_weights(name: str, layout: WeightsLayout, state: Mapping[str, object], buffer: Tensor) -> list[str]:
    """Each value of ``state`` (a state dict on the CPU) written into ``buffer`` where ``layout`` lays it, in its
    serving tensor's dtype; returns the entries left out, kept as they are as ``load_state_dict`` keeps them
    (``_kept``). ``ModelLoadError`` where ``state`` does not fit: entries missing or unexpected, a sparse or meta
    tensor, another shape, a floating value for an integer tensor or the reverse (what ``load_state_dict``
    refuses; floating values take the serving tensor's precision)."""
    kept = _kept(layout, state)
    live = [entry for entry in layout.entries if entry.key not in kept]
    keys = {entry.key for entry in live}
    missing = [entry.key for entry in live if entry.key not in state]
    unexpected = [key for key in state if key not in keys]
    if missing or unexpected:
        raise ModelLoadError(
            f"model {name!r}: the new weights do not fit the serving architecture: "
            f"{len(missing)} entries missing {missing[:_NAMED]}, {len(unexpected)} unexpected {unexpected[:_NAMED]}"
        )
    for entry in live:  # every value checked before any is written: a misfit refuses the file whole
        _check(name, entry, state[entry.key])
    with torch.no_grad():  # (a value saved as a Parameter would record the copy)
        for entry in live:
            entry.view(buffer).copy_(state[entry.key])  # type: ignore[arg-type]
    return kept


def _check(name: str, entry: LiveEntry, value: object) -> None:
    if not isinstance(value, Tensor):
        raise ModelLoadError(f"model {name!r}: entry {entry.key!r} of the new weights is a {type(value).__name__}, "
                             "not a tensor")  # fmt: skip
    if value.layout != torch.strided or value.is_meta:  # (no values to copy)
        raise ModelLoadError(f"model {name!r}: entry {entry.key!r} of the new weights is a {value.layout} tensor on "
                             f"{value.device}, not a dense one with its values")  # fmt: skip
    if tuple(value.shape) != entry.shape:
        raise ModelLoadError(f"model {name!r}: entry {entry.key!r} of the new weights has shape {list(value.shape)}, "
                             f"the serving model's {list(entry.shape)}")  # fmt: skip
    if value.is_floating_point() != entry.dtype.is_floating_point or value.is_complex() != entry.dtype.is_complex:
        raise ModelLoadError(f"model {name!r}: entry {entry.key!r} of the new weights is {value.dtype}, "
                             f"the serving model's {entry.dtype}")  # fmt: skip


def _kept(layout: WeightsLayout, state: Mapping[str, object]) -> list[str]:
    """The entries of ``layout`` that ``load_state_dict`` leaves as they are where ``state`` lacks them: a batch
    norm's ``num_batches_tracked`` in a state dict saved before torch counted batches (its version in ``state``'s
    ``_metadata`` under 2, or none: a plain dict). A ResNet's from torch < 0.4.1 loads so."""
    metadata: Mapping[str, Mapping[str, object]] = getattr(state, "_metadata", None) or {}
    kept = []
    for entry in layout.entries:
        version = metadata.get(entry.key.rpartition(".")[0], {}).get("version")
        if (entry.keepable and entry.key not in state
                and (version is None or (isinstance(version, int) and version < 2))):  # fmt: skip
            kept.append(entry.key)
    return kept


def _dense(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    """Whether a tensor of ``shape`` and ``stride`` covers its span of memory exactly once (in any order)."""
    span = 1
    for size, step in sorted(zip(shape, stride, strict=True), key=lambda dim: dim[1]):
        if size == 0:
            return True
        if size > 1:
            if step != span:
                return False
            span *= size
    return True


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def main() -> None:
    """The reader (``WeightsReader``): ``python -m streamgpu.models.weights SOCKET``. Each request on the socket
    (``SOCKET``, a file descriptor) is one byte with two descriptors: a file holding the pickled request's number,
    spec, layout and segment size, and the shared memory segment; the reader writes the values into the segment
    and replies with one line of JSON naming the request: ``{"request": N, "kept": [...]}``, or ``{"request": N,
    "error": "..."}`` for a file or value that does not fit. It ends when the server's end of the socket closes."""
    sock = socket.socket(fileno=int(sys.argv[1]))
    segment, mapped = None, None  # the server's segment, kept mapped while the server keeps it (its file's inode)
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(sock, 1, 2)
        except ConnectionError:
            return
        if not message:  # the server closed it, or ended
            return
        request_fd, segment_fd = fds
        with os.fdopen(request_fd, "rb") as request:
            asked, spec, layout, nbytes = pickle.load(request)  # (from the server that started it)
        try:
            which = (os.fstat(segment_fd).st_ino, nbytes)
            if segment is None or mapped != which:
                if segment is not None:
                    segment.close()
                segment, mapped = HostSegment.attach(segment_fd, nbytes), which
        finally:
            os.close(segment_fd)  # (the segment keeps a descriptor of its own)
        sock.sendall(json.dumps({"request": asked, **_read_into(spec, layout, segment)}).encode() + b"\n")


def _read_into(spec: ModelSpec, layout: WeightsLayout, segment: HostSegment) -> dict[str, object]:
    """A reply's body: ``spec``'s file read and written into ``segment`` as ``layout`` lays it out. The file's
    state dict goes as this returns: held while the reader waited for the next request, it was a second copy of
    the last version's weights in its memory for as long as the server ran."""
    try:
        # A value torch reads but cannot copy (a quantized or nested tensor) is the file's fault, said as a load in
        # the server says it, not as the reader's crash (its traceback)
        with load_errors(spec):
            state = read_state_dict(spec)
            return {"kept": write_weights(spec.name, layout, state, torch.from_numpy(segment.buffer[: layout.nbytes]))}
    except ModelLoadError as exc:
        return {"error": str(exc)}


if __name__ == "__main__":
    main()
