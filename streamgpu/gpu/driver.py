"""The CUDA driver (libcuda) called directly: the batch path's few calls, and green contexts.

Why not through torch or cupy on the batch path: both let go of the GIL around every CUDA call.
On the loop thread, a call of microseconds made while another thread has Python to run (the loader
building a model version) hands that thread the GIL, and the loop waits up to a switch interval to
get it back, several times per batch. During a swap that made the loop's CUDA calls 4-10x slower at
p99 and was most of the swap's p99 (docs/BENCHMARKS.md). The calls made here through ``held`` keep
the GIL (``ctypes.PyDLL``): each queues work on a stream or asks a question, and returns in
microseconds without waiting for the device (event records and queries, async copies between
page-locked and device memory, graph and kernel launches; a launch would only wait on a stream
thousands of launches deep, and the scheduler keeps a few batches in flight).

Set-up calls that can take long (green contexts, creating events) go through ``lib``, a
``ctypes.CDLL`` handle on the same library, which lets go of the GIL as any blocking call should.

Handles are plain ints: a runtime ``cudaStream_t``, ``cudaEvent_t`` or ``cudaGraphExec_t`` (from
torch or cupy) is the driver's ``CUstream``, ``CUevent`` or ``CUgraphExec``.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Iterable, Sequence

import numpy as np

from streamgpu.errors import DeviceUnavailableError

__all__ = ["CudaError", "Driver", "Event", "the_driver"]

_NOT_READY = 600  # CUDA_ERROR_NOT_READY: the event's work has not completed
_EVENT_DISABLE_TIMING = 0x2

_p, _u, _i = ctypes.c_void_p, ctypes.c_uint, ctypes.c_int
_pp, _pu, _pi = ctypes.POINTER(_p), ctypes.POINTER(_u), ctypes.POINTER(_i)
_SIGNATURES: dict[str, tuple[type, ...]] = {
    # The batch path (called through ``held``).
    "cuEventRecord": (_p, _p),
    "cuEventQuery": (_p,),
    "cuEventElapsedTime": (ctypes.POINTER(ctypes.c_float), _p, _p),
    "cuStreamWaitEvent": (_p, _p, _u),
    "cuMemcpyAsync": (ctypes.c_uint64, ctypes.c_uint64, ctypes.c_size_t, _p),
    "cuGraphLaunch": (_p, _p),
    "cuLaunchKernel": (_p, _u, _u, _u, _u, _u, _u, _u, _p, _pp, _pp),
    "cuCtxGetDevice": (_pi,),
    "cuCtxPushCurrent_v2": (_p,),
    "cuCtxPopCurrent_v2": (_pp,),
    # Set-up.
    "cuDeviceGet": (_pi, _i),
    "cuDevicePrimaryCtxRetain": (_pp, _i),
    "cuEventCreate": (_pp, _u),
    "cuEventDestroy_v2": (_p,),
    "cuGetErrorName": (_i, ctypes.POINTER(ctypes.c_char_p)),
    "cuGetErrorString": (_i, ctypes.POINTER(ctypes.c_char_p)),
    # Green contexts (CUDA 12.4 and later; see streamgpu.gpu.shares).
    "cuDeviceGetDevResource": (_i, _p, _i),
    "cuDevSmResourceSplitByCount": (_p, _pu, _p, _p, _u, _u),
    "cuDevResourceGenerateDesc": (_pp, _p, _u),
    "cuGreenCtxCreate": (_pp, _p, _i, _u),
    "cuCtxFromGreenCtx": (_pp, _p),
    "cuGreenCtxStreamCreate": (_pp, _p, _u, _i),
    "cuCtxGetStreamPriorityRange": (_pi, _pi),
}
# Drivers from CUDA 12.8 export the event timing call as _v2 too (CUDA 13's headers call only that one).
_NEWER_NAMES = {"cuEventElapsedTime": "cuEventElapsedTime_v2"}


class CudaError(RuntimeError):
    """A CUDA driver call of the batch path failed; ``code`` is its ``CUresult``."""

    def __init__(self, what: str, code: int) -> None:
        super().__init__(f"{what}: {the_driver().describe(code)}")
        self.code = code


class Driver:
    """libcuda, bound twice: ``held`` keeps the GIL (the batch path), ``lib`` lets it go (set-up)."""

    def __init__(self) -> None:
        try:
            self.lib = ctypes.CDLL("libcuda.so.1")
            self.held = ctypes.PyDLL("libcuda.so.1")
        except OSError as exc:
            raise DeviceUnavailableError(f"cannot load the CUDA driver library (libcuda.so.1): {exc}") from exc
        self.missing: set[str] = set()
        for name, args in _SIGNATURES.items():
            for handle in (self.lib, self.held):
                try:
                    fn = getattr(handle, _NEWER_NAMES.get(name, name))
                except AttributeError:
                    try:
                        fn = getattr(handle, name)
                    except AttributeError:  # an older driver: only what uses it fails (``require``)
                        self.missing.add(name)
                        continue
                fn.argtypes, fn.restype = args, ctypes.c_int
                setattr(handle, name, fn)
        self.require(("cuEventRecord", "cuEventQuery", "cuEventElapsedTime", "cuStreamWaitEvent", "cuMemcpyAsync",
                      "cuGraphLaunch", "cuLaunchKernel", "cuCtxGetDevice", "cuCtxPushCurrent_v2", "cuCtxPopCurrent_v2",
                      "cuDeviceGet", "cuDevicePrimaryCtxRetain", "cuEventCreate", "cuEventDestroy_v2",
                      "cuGetErrorName", "cuGetErrorString"), "streamgpu needs a CUDA 12 driver or later")  # fmt: skip
        self._devices: dict[int, int] = {}  # ordinal: CUdevice
        self._primaries: dict[int, int] = {}  # ordinal: its primary context
        self._setup_lock = threading.Lock()

    def require(self, names: Iterable[str], why: str) -> None:
        """Raise ``DeviceUnavailableError`` saying ``why`` if this driver lacks any of ``names``."""
        lacking = sorted(set(names) & self.missing)
        if lacking:
            raise DeviceUnavailableError(f"{why}: this CUDA driver lacks {', '.join(lacking)}")

    def describe(self, code: int) -> str:
        """A ``CUresult`` in words: "an illegal memory access was encountered (CUDA_ERROR_ILLEGAL_ADDRESS)"."""
        name, text = ctypes.c_char_p(), ctypes.c_char_p()
        self.held.cuGetErrorName(code, ctypes.byref(name))
        self.held.cuGetErrorString(code, ctypes.byref(text))
        if not name.value:
            return f"CUDA error {code}"
        return f"{(text.value or b'').decode()} ({name.value.decode()})"

    def check(self, result: int, what: str) -> None:
        """Set-up calls: raise ``DeviceUnavailableError`` naming ``what`` if ``result`` is an error."""
        if result:
            raise DeviceUnavailableError(f"{what}: {self.describe(result)}")

    def device(self, ordinal: int) -> int:
        """The ``CUdevice`` of device ``ordinal`` (as torch numbers them: after CUDA_VISIBLE_DEVICES)."""
        known = self._devices.get(ordinal)  # the batch path asks: no lock once known
        if known is not None:
            return known
        with self._setup_lock:
            if ordinal not in self._devices:
                handle = ctypes.c_int()
                self.check(self.lib.cuDeviceGet(ctypes.byref(handle), ordinal), f"cuda:{ordinal}")
                self._devices[ordinal] = handle.value
            return self._devices[ordinal]

    def primary_context(self, ordinal: int) -> int:
        """Device ``ordinal``'s primary context, the one torch and cupy use. Retained once and kept: the
        runtime keeps it for the life of the process anyway."""
        known = self._primaries.get(ordinal)
        if known is not None:
            return known
        device = self.device(ordinal)
        with self._setup_lock:
            if ordinal not in self._primaries:
                context = ctypes.c_void_p()
                self.check(self.lib.cuDevicePrimaryCtxRetain(ctypes.byref(context), device), f"cuda:{ordinal}")
                self._primaries[ordinal] = int(context.value or 0)
            return self._primaries[ordinal]

    def enter(self, ordinal: int) -> bool:
        """Make device ``ordinal`` current for the calls that follow, unless a context of it already is
        (its primary context, or a green context of it, whose streams and graphs launch inside it).
        Returns whether a context was pushed: then ``leave()`` after the calls."""
        current = ctypes.c_int()
        # No current context at all fails this call: then one is pushed, as for another device.
        if self.held.cuCtxGetDevice(ctypes.byref(current)) == 0 and current.value == self.device(ordinal):
            return False
        result = self.held.cuCtxPushCurrent_v2(self.primary_context(ordinal))
        if result:
            raise CudaError("cuCtxPushCurrent", result)
        return True

    def leave(self) -> None:
        """Pop the context ``enter`` pushed."""
        popped = ctypes.c_void_p()
        result = self.held.cuCtxPopCurrent_v2(ctypes.byref(popped))
        if result:
            raise CudaError("cuCtxPopCurrent", result)

    def on_device(self, ordinal: int) -> _OnDevice:
        """``with driver.on_device(n):`` the calls inside run with device ``n`` current (``enter``), and the
        thread's context is as it was after them."""
        return _OnDevice(self, ordinal)

    def wait_event(self, stream: int, event: Event) -> None:
        """Work queued on ``stream`` (of ``event``'s device) after this waits for ``event``'s last record."""
        with self.on_device(event.ordinal):  # as torch's calls make the stream's device current for it
            result = self.held.cuStreamWaitEvent(stream, event.handle, 0)
        if result:
            raise CudaError("cuStreamWaitEvent", result)

    def memcpy_async(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        """Copy on ``stream`` between addresses the device reaches: device memory, page-locked host memory
        (a pageable address would make the copy synchronous: never pass one)."""
        result = self.held.cuMemcpyAsync(dst, src, nbytes, stream)
        if result:
            raise CudaError("cuMemcpyAsync", result)

    def graph_launch(self, graph_exec: int, stream: int) -> None:
        """Launch the instantiated graph ``graph_exec`` on ``stream``."""
        result = self.held.cuGraphLaunch(graph_exec, stream)
        if result:
            raise CudaError("cuGraphLaunch", result)

    def launch_kernel(
        self, function: int, grid: tuple[int, int], block: int, args: Sequence[np.generic | np.ndarray], stream: int
    ) -> None:
        """Launch kernel ``function`` (a ``CUfunction``) on ``stream``, its parameters ``args`` in order,
        each as the bytes of a numpy scalar or of a one-element structured array (a struct by value)."""
        packed = b"".join(arg.tobytes() for arg in args)
        buffer = ctypes.create_string_buffer(packed, len(packed))  # the driver copies from it at the call
        base = ctypes.addressof(buffer)
        params = (_p * len(args))()
        offset = 0
        for k, arg in enumerate(args):
            params[k] = base + offset
            offset += arg.nbytes
        result = self.held.cuLaunchKernel(function, grid[0], grid[1], 1, block, 1, 1, 0, stream, params, None)
        if result:
            raise CudaError("cuLaunchKernel", result)


class _OnDevice:
    """``Driver.on_device``: a plain class, not a generator context manager (this is per call of a batch)."""

    __slots__ = ("_driver", "_ordinal", "_pushed")

    def __init__(self, driver: Driver, ordinal: int) -> None:
        self._driver, self._ordinal, self._pushed = driver, ordinal, False

    def __enter__(self) -> None:
        self._pushed = self._driver.enter(self._ordinal)

    def __exit__(self, *exc: object) -> None:
        if self._pushed:
            self._driver.leave()


_driver_lock = threading.Lock()
_driver: Driver | None = None


def the_driver() -> Driver:
    """The process's ``Driver``, loaded at first use."""
    global _driver
    if _driver is None:
        with _driver_lock:
            if _driver is None:
                _driver = Driver()
    return _driver


class Event:
    """A CUDA event of device ``ordinal``'s primary context, made once and recorded again and again:
    each batch's buffer set owns its events, so launching a batch creates none.

    ``timing`` events can be measured against each other (``elapsed_ms``); the others are cheaper
    to record. An event never recorded reads as complete.
    """

    __slots__ = ("_destroy", "_driver", "handle", "ordinal")

    def __init__(self, ordinal: int, *, timing: bool = False) -> None:
        drv = self._driver = the_driver()
        self.ordinal = ordinal
        handle = ctypes.c_void_p()
        context = drv.primary_context(ordinal)  # events of a green context could not be recorded elsewhere
        drv.check(drv.lib.cuCtxPushCurrent_v2(context), f"cuda:{ordinal}")
        try:
            drv.check(drv.lib.cuEventCreate(ctypes.byref(handle), 0 if timing else _EVENT_DISABLE_TIMING),
                      "creating a CUDA event")  # fmt: skip
        finally:
            drv.lib.cuCtxPopCurrent_v2(ctypes.byref(ctypes.c_void_p()))
        self.handle = int(handle.value or 0)
        self._destroy = drv.lib.cuEventDestroy_v2  # kept: at exit, module globals may go before this

    def record(self, stream: int) -> None:
        """Record on ``stream`` (a raw ``CUstream`` of the same device)."""
        drv = self._driver
        with drv.on_device(self.ordinal):  # as torch's record makes the device current (several GPUs)
            result = drv.held.cuEventRecord(self.handle, stream)
        if result:
            raise CudaError("cuEventRecord", result)

    def query(self) -> bool:
        """Whether the work before the last record has completed; never waits. A device error raises."""
        result = self._driver.held.cuEventQuery(self.handle)
        if result == 0:
            return True
        if result == _NOT_READY:
            return False
        raise CudaError("cuEventQuery", result)

    def elapsed_ms(self, end: Event) -> float:
        """Device milliseconds from this event to ``end``, both timing events and complete."""
        ms = ctypes.c_float()
        result = self._driver.held.cuEventElapsedTime(ctypes.byref(ms), self.handle, end.handle)
        if result:
            raise CudaError("cuEventElapsedTime", result)
        return ms.value

    def __del__(self) -> None:
        # Safe while work still records it: the driver frees it once that completes.
        if getattr(self, "handle", 0):
            self._destroy(self.handle)
