"""Device kernels of the GPU data path: batch gather from the pinned ring and fused pre-processing.

All kernels are CUDA C++ compiled at first use through cupy (NVRTC) and cached per device, and
launched through the driver (``streamgpu.gpu.driver``: the loop keeps the GIL). They work on torch
tensors (by ``data_ptr()``) and launch on the torch CUDA stream they are given, so they order with
the torch work around them. ``import cupy`` happens only on first launch: this module imports on
machines without cupy or a GPU.

Pinned host memory is read by the kernels in place (zero-copy): with unified addressing a
page-locked allocation has a device address (the same as its host address on 64-bit Linux),
which is looked up once per allocation with ``cudaPointerGetAttributes``.

Frame offsets reach the GPU inside the launch itself (a by-value kernel argument of up to
``MAX_FRAMES_PER_LAUNCH`` offsets), so no host-to-device copy and no shared buffer is involved.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from streamgpu.gpu import driver

__all__ = [
    "MAX_CHANNELS",
    "MAX_FRAMES_PER_LAUNCH",
    "enqueue_replay",
    "gather_frames",
    "gather_preprocess",
    "mapped_address",
    "preprocess_image",
    "preprocess_table",
]

#: Frames one launch takes; larger batches are split into several launches.
MAX_FRAMES_PER_LAUNCH = 256
MAX_CHANNELS = 4
_BLOCK = 256
_GATHER_UNROLL = 4  # must match GATHER_UNROLL in the source
_MAX_GRID_Y = 65535

_SOURCE = r"""
#define MAX_FRAMES 256
#define GATHER_UNROLL 4

// Slot offsets of one launch, in units of 256 bytes (slots are 256-byte aligned).
struct FrameOffsets { unsigned int v[MAX_FRAMES]; };
// y = x * scale[c] + bias[c], i.e. (x / 255 - mean[c]) / std[c].
struct Affine { float scale[4]; float bias[4]; };

// Copies frame blockIdx.y from the (host-mapped) ring to row blockIdx.y of out.
extern "C" __global__ void __launch_bounds__(256) gather_frames(
    const unsigned char* __restrict__ ring, unsigned char* __restrict__ out,
    const FrameOffsets offs, long long frame_nbytes)
{
    const unsigned char* src = ring + ((long long)offs.v[blockIdx.y] << 8);
    unsigned char* dst = out + (long long)blockIdx.y * frame_nbytes;
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if ((reinterpret_cast<size_t>(src) & 15) != 0) {
        for (long long t = first; t < frame_nbytes; t += stride) dst[t] = src[t];
        return;
    }
    const long long nvec = frame_nbytes >> 4;
    const uint4* s = reinterpret_cast<const uint4*>(src);
    const bool dst_aligned = (reinterpret_cast<size_t>(dst) & 15) == 0;
    for (long long i = first; i < nvec; i += GATHER_UNROLL * stride) {
        // All loads before any store: reads of host memory cross PCIe (~1 us each), so keep
        // several 16-byte requests in flight per thread.
        uint4 v[GATHER_UNROLL];
#pragma unroll
        for (int k = 0; k < GATHER_UNROLL; ++k)
            if (i + k * stride < nvec) v[k] = s[i + k * stride];
#pragma unroll
        for (int k = 0; k < GATHER_UNROLL; ++k) {
            const long long j = i + k * stride;
            if (j >= nvec) break;
            if (dst_aligned) {
                reinterpret_cast<uint4*>(dst)[j] = v[k];
            } else {  // row start not 16-aligned (odd frame size): wide reads, byte stores
                const unsigned char* b = reinterpret_cast<const unsigned char*>(&v[k]);
#pragma unroll
                for (int q = 0; q < 16; ++q) dst[j * 16 + q] = b[q];
            }
        }
    }
    if (blockIdx.x == 0)
        for (long long t = nvec * 16 + threadIdx.x; t < frame_nbytes; t += blockDim.x) dst[t] = src[t];
}

__device__ __forceinline__ unsigned short f2h(float x) {
    unsigned short r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(x));
    return r;
}
__device__ __forceinline__ void store1(float* p, float a) { *p = a; }
__device__ __forceinline__ void store1(unsigned short* p, float a) { *p = f2h(a); }
__device__ __forceinline__ void store4(float* p, float a, float b, float c, float d) {
    *reinterpret_cast<float4*>(p) = make_float4(a, b, c, d);
}
__device__ __forceinline__ void store4(unsigned short* p, float a, float b, float c, float d) {
    uint2 v;
    v.x = (unsigned int)f2h(a) | ((unsigned int)f2h(b) << 16);
    v.y = (unsigned int)f2h(c) | ((unsigned int)f2h(d) << 16);
    *reinterpret_cast<uint2*>(p) = v;
}

// Where image n starts, by source mode: 0, row n of the contiguous batch ``in``; 1, the ring ``in`` at
// the launch's offset n; 2, the address in table[1 + n] (table[0] is the image count, read on the device,
// so that one captured launch serves every batch size up to its grid).
#define SRC_ROWS 0
#define SRC_OFFSETS 1
#define SRC_TABLE 2
__device__ __forceinline__ const unsigned char* image_src(
    const unsigned char* in, long long image_nbytes, const FrameOffsets& offs, int mode,
    const long long* table, int n) {
    if (mode == SRC_TABLE) return reinterpret_cast<const unsigned char*>(table[1 + n]);
    return mode == SRC_OFFSETS ? in + ((long long)offs.v[n] << 8) : in + (long long)n * image_nbytes;
}

// uint8 HWC image blockIdx.y -> normalized NCHW (channels_last == 0) or NHWC memory order.
// One thread does 4 consecutive pixels: C 32-bit loads, C 4-wide stores. Needs hw % 4 == 0,
// a 4-byte aligned source and an output aligned for 4-wide stores.
template <typename T, int C>
__global__ void __launch_bounds__(256) preprocess_vec(
    const unsigned char* __restrict__ in, T* __restrict__ out, const FrameOffsets offs,
    const Affine p, int hw, int mode, int channels_last, const long long* __restrict__ table)
{
    const int n = blockIdx.y;
    const int g = blockIdx.x * blockDim.x + threadIdx.x;
    if (g >= (hw >> 2) || (mode == SRC_TABLE && n >= table[0])) return;
    const unsigned int* s = reinterpret_cast<const unsigned int*>(
        image_src(in, (long long)hw * C, offs, mode, table, n)) + (long long)g * C;
    unsigned int w[C];
#pragma unroll
    for (int k = 0; k < C; ++k) w[k] = s[k];
    float v[4 * C];
#pragma unroll
    for (int k = 0; k < 4 * C; ++k)
        v[k] = (float)((w[k >> 2] >> ((k & 3) * 8)) & 0xFFu) * p.scale[k % C] + p.bias[k % C];
    if (channels_last) {
        T* d = out + ((long long)n * hw + (long long)g * 4) * C;
#pragma unroll
        for (int j = 0; j < C; ++j) store4(d + 4 * j, v[4 * j], v[4 * j + 1], v[4 * j + 2], v[4 * j + 3]);
    } else {
        T* d = out + (long long)n * C * hw + (long long)g * 4;
#pragma unroll
        for (int c = 0; c < C; ++c) store4(d + (long long)c * hw, v[c], v[C + c], v[2 * C + c], v[3 * C + c]);
    }
}

// Same function, one pixel per thread, any size or alignment.
template <typename T, int C>
__global__ void __launch_bounds__(256) preprocess_px(
    const unsigned char* __restrict__ in, T* __restrict__ out, const FrameOffsets offs,
    const Affine p, int hw, int mode, int channels_last, const long long* __restrict__ table)
{
    const int n = blockIdx.y;
    const int px = blockIdx.x * blockDim.x + threadIdx.x;
    if (px >= hw || (mode == SRC_TABLE && n >= table[0])) return;
    const unsigned char* s = image_src(in, (long long)hw * C, offs, mode, table, n) + (long long)px * C;
#pragma unroll
    for (int c = 0; c < C; ++c) {
        const float y = (float)s[c] * p.scale[c] + p.bias[c];
        if (channels_last) store1(out + ((long long)n * hw + px) * C + c, y);
        else store1(out + ((long long)n * C + c) * hw + px, y);
    }
}
"""

_OFFSETS_DTYPE = np.dtype([("v", np.uint32, (MAX_FRAMES_PER_LAUNCH,))])
_AFFINE_DTYPE = np.dtype([("scale", np.float32, (MAX_CHANNELS,)), ("bias", np.float32, (MAX_CHANNELS,))])
_NO_OFFSETS = np.zeros(1, dtype=_OFFSETS_DTYPE)  # read-only placeholder for non-gather launches
_C_TYPES = {torch.float32: "float", torch.float16: "unsigned short"}


@functools.cache
def _cupy() -> Any:
    try:
        import cupy
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise RuntimeError("streamgpu.gpu.kernels needs cupy (e.g. pip install cupy-cuda13x)") from exc
    return cupy


@functools.cache
def _function(name: str, device: int) -> tuple[Any, int]:
    """Compiles (once per device) the module holding kernel ``name``; returns the kernel (which keeps the
    module loaded) and its ``CUfunction``."""
    cp = _cupy()
    templated = "<" in name
    with cp.cuda.Device(device):
        module = cp.RawModule(code=_SOURCE, options=("--std=c++17",), name_expressions=(name,) if templated else None)
        kernel = module.get_function(name)
        return kernel, int(kernel.kernel.ptr)  # loaded now, in the device's primary context


@functools.lru_cache(maxsize=64)
def mapped_address(host_ptr: int) -> int:
    """Device address of page-locked host memory (the same address under unified addressing)."""
    rt = _cupy().cuda.runtime
    attrs = rt.pointerGetAttributes(host_ptr)
    if attrs.type != rt.memoryTypeHost or not attrs.devicePointer:
        raise ValueError("ring is not page-locked memory mapped into the device address space")
    return int(attrs.devicePointer)


def _launch(name: str, device: int, grid: tuple[int, int], args: tuple[Any, ...], stream: torch.cuda.Stream) -> None:
    # Through the driver, keeping the GIL (streamgpu.gpu.driver says why): the loop launches these per batch.
    drv = driver.the_driver()
    _, function = _function(name, device)
    with drv.on_device(device):  # a green context of the device (graph capture in a share) stays current
        drv.launch_kernel(function, grid, _BLOCK, args, stream.cuda_stream)


def _check_ring(ring: torch.Tensor) -> None:
    if not isinstance(ring, torch.Tensor) or ring.dtype != torch.uint8 or ring.device.type != "cpu":
        raise ValueError("ring must be a uint8 CPU tensor")
    if not ring.is_contiguous():
        raise ValueError("ring must be contiguous")
    if not ring.is_pinned():
        raise ValueError("ring must be pinned (page-locked) memory, e.g. torch.empty(..., pin_memory=True)")


def check_offsets(offsets: Sequence[int] | np.ndarray, frame_nbytes: int, ring_nbytes: int) -> list[int]:
    """Frames' byte offsets in the ring, checked (each 256-aligned, every frame inside the ring: a device read
    outside the page-locked ring is a sticky error), in units of 256 bytes. Plain Python: cheaper than numpy for
    batch-sized lists. Raises ValueError naming what is wrong."""
    offs = offsets.tolist() if isinstance(offsets, np.ndarray) else list(offsets)
    if not offs:
        raise ValueError("offsets must be a non-empty sequence of byte offsets")
    if min(offs) < 0 or any(o & 255 for o in offs):
        raise ValueError("every offset must be a non-negative multiple of 256")
    last = max(offs)
    if last + frame_nbytes > ring_nbytes:
        raise ValueError(f"a frame at offset {last} of {frame_nbytes} bytes overruns the ring ({ring_nbytes} B)")
    if last >> 8 > 0xFFFFFFFF:
        raise ValueError("offsets beyond 1 TiB are not supported")
    return [o >> 8 for o in offs]


def _resolve_stream(stream: torch.cuda.Stream | None, device: torch.device) -> torch.cuda.Stream:
    if stream is None:
        return torch.cuda.current_stream(device)
    if stream.device != device:
        raise ValueError(f"stream is on {stream.device} but the output is on {device}")
    return stream


def _pack_offsets(units: list[int]) -> np.ndarray:
    packed = np.zeros(MAX_FRAMES_PER_LAUNCH, dtype=np.uint32)
    packed[: len(units)] = units
    return packed.view(_OFFSETS_DTYPE)  # a size-1 numpy array: cupy passes it by value


def _affine(mean: Sequence[float], std: Sequence[float], channels: int) -> np.ndarray:
    return _affine_packed(tuple(float(x) for x in mean), tuple(float(x) for x in std), channels)


@functools.lru_cache(maxsize=64)
def _affine_packed(mean: tuple[float, ...], std: tuple[float, ...], channels: int) -> np.ndarray:
    """Cached: a server normalizes with the same few constants every batch (never mutated)."""
    m = np.asarray(mean, dtype=np.float64)
    s = np.asarray(std, dtype=np.float64)
    if m.size != channels or s.size != channels:
        raise ValueError(f"mean and std need {channels} values (one per channel), got {m.size} and {s.size}")
    if not np.all(np.isfinite(m)) or not np.all(np.isfinite(s)) or np.any(s == 0):
        raise ValueError("mean and std must be finite and std non-zero")
    packed = np.zeros(1, dtype=_AFFINE_DTYPE)
    packed["scale"][0, :channels] = 1.0 / (255.0 * s)
    packed["bias"][0, :channels] = -m / s
    return packed


def _output(
    out: torch.Tensor | None,
    shape: tuple[int, int, int, int],
    dtype: torch.dtype,
    channels_last: bool,
    device: torch.device,
) -> torch.Tensor:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device, memory_format=fmt)
    if tuple(out.shape) != shape or out.dtype != dtype or out.device != device:
        raise ValueError(
            f"out must be a {dtype} tensor of shape {shape} on {device}, "
            f"got {out.dtype} {tuple(out.shape)} on {out.device}"
        )
    _, c, h, w = shape
    want = (h * w * c, 1, w * c, c) if channels_last else (c * h * w, h * w, w, 1)
    if any(size > 1 and st != ws for size, st, ws in zip(shape, out.stride(), want, strict=True)):
        layout = "channels_last" if channels_last else "contiguous NCHW"
        raise ValueError(f"out must be {layout}, got strides {out.stride()}")
    return out


def _check_pre_args(dtype: torch.dtype, channels: int) -> None:
    if dtype not in _C_TYPES:
        raise ValueError(f"dtype must be torch.float16 or torch.float32, got {dtype}")
    if not 1 <= channels <= MAX_CHANNELS:
        raise ValueError(f"channels must be 1 to {MAX_CHANNELS}, got {channels}")


# Source modes of the pre-processing kernels (SRC_* in the source).
_SRC_ROWS, _SRC_OFFSETS, _SRC_TABLE = 0, 1, 2


def _launch_preprocess(
    src_ptr: int,
    src_aligned4: bool,
    out: torch.Tensor,
    offs: list[int] | None,
    n_images: int,
    hw: int,
    channels: int,
    affine: np.ndarray,
    channels_last: bool,
    stream: torch.cuda.Stream,
    table_ptr: int = 0,
) -> None:
    out_align = 16 if out.dtype == torch.float32 else 8
    vec = hw % 4 == 0 and src_aligned4 and out.data_ptr() % out_align == 0
    kind = "preprocess_vec" if vec else "preprocess_px"
    name = f"{kind}<{_C_TYPES[out.dtype]}, {channels}>"
    blocks = -(-(hw // 4 if vec else hw) // _BLOCK)
    mode = _SRC_TABLE if table_ptr else _SRC_OFFSETS if offs is not None else _SRC_ROWS
    per_launch = MAX_FRAMES_PER_LAUNCH if mode == _SRC_OFFSETS else _MAX_GRID_Y
    image_elems = channels * hw
    device = out.device.index or 0
    for start in range(0, n_images, per_launch):
        count = min(per_launch, n_images - start)
        if offs is not None:
            packed = _pack_offsets(offs[start : start + count])
            src = src_ptr
        else:
            packed = _NO_OFFSETS
            src = src_ptr + start * image_elems
        args = (
            np.uint64(src),
            np.uint64(out.data_ptr() + start * image_elems * out.element_size()),
            packed,
            affine,
            np.int32(hw),
            np.int32(mode),
            np.int32(channels_last),
            np.uint64(table_ptr),
        )
        _launch(name, device, (blocks, count), args, stream)


def gather_frames(
    ring: torch.Tensor,
    offsets: Sequence[int],
    frame_nbytes: int,
    out: torch.Tensor,
    stream: torch.cuda.Stream,
) -> None:
    """Copy ``len(offsets)`` frames from a pinned host ring into contiguous device memory.

    Args:
        ring: the pinned (page-locked) uint8 CPU tensor holding the slots.
        offsets: byte offset of each frame in ``ring``; each a multiple of 256.
        frame_nbytes: bytes per frame (any size).
        out: contiguous CUDA uint8 tensor with ``out.shape[0] == len(offsets)`` and
            ``len(offsets) * frame_nbytes`` elements; frame ``i`` lands in ``out[i]``.
        stream: the CUDA stream to launch on (usually a copy stream). The ring slots must not be
            reused until work recorded on this stream after the call has completed.

    One kernel launch per ``MAX_FRAMES_PER_LAUNCH`` frames reads the slots in place over PCIe
    with 16-byte loads; the offsets travel inside the launch arguments.
    """
    _check_ring(ring)
    if not isinstance(frame_nbytes, int) or frame_nbytes <= 0:
        raise ValueError(f"frame_nbytes must be a positive int, got {frame_nbytes!r}")
    offs = check_offsets(offsets, frame_nbytes, ring.numel())
    n = len(offs)
    if not isinstance(out, torch.Tensor) or out.device.type != "cuda" or out.dtype != torch.uint8:
        raise ValueError("out must be a CUDA uint8 tensor")
    if not out.is_contiguous() or out.dim() == 0 or out.shape[0] != n or out.numel() != n * frame_nbytes:
        raise ValueError(f"out must be contiguous with shape [{n}, {frame_nbytes}] (or [{n}, ...] of that many bytes)")
    stream = _resolve_stream(stream, out.device)
    ring_ptr = mapped_address(ring.data_ptr())
    nvec = frame_nbytes // 16
    blocks = max(1, -(-nvec // (_BLOCK * _GATHER_UNROLL)))
    if ring_ptr % 16:
        blocks = -(-frame_nbytes // (_BLOCK * _GATHER_UNROLL))
    device = out.device.index or 0
    for start in range(0, n, MAX_FRAMES_PER_LAUNCH):
        count = min(MAX_FRAMES_PER_LAUNCH, n - start)
        args = (
            np.uint64(ring_ptr),
            np.uint64(out.data_ptr() + start * frame_nbytes),
            _pack_offsets(offs[start : start + count]),
            np.int64(frame_nbytes),
        )
        _launch("gather_frames", device, (blocks, count), args, stream)


def preprocess_image(
    frames_u8: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    dtype: torch.dtype,
    channels_last: bool,
    out: torch.Tensor | None = None,
    stream: torch.cuda.Stream | None = None,
) -> torch.Tensor:
    """Normalize a uint8 NHWC batch on the GPU in one fused kernel: ``y = (x / 255 - mean) / std``.

    Args:
        frames_u8: contiguous CUDA uint8 tensor ``[N, H, W, C]``, ``1 <= C <= 4``.
        mean, std: one value per channel, in the 0..1 scale.
        dtype: ``torch.float16`` or ``torch.float32``.
        channels_last: write a channels_last-strided ``[N, C, H, W]`` tensor (NHWC in memory),
            else a contiguous NCHW one.
        out: optional preallocated output of that shape, dtype and layout.
        stream: CUDA stream to launch on (default: the current stream of the input's device).

    Returns:
        The ``[N, C, H, W]`` output tensor.
    """
    if not isinstance(frames_u8, torch.Tensor) or frames_u8.device.type != "cuda" or frames_u8.dtype != torch.uint8:
        raise ValueError("frames_u8 must be a CUDA uint8 tensor")
    if frames_u8.dim() != 4 or not frames_u8.is_contiguous():
        raise ValueError(f"frames_u8 must be a contiguous [N, H, W, C] tensor, got shape {tuple(frames_u8.shape)}")
    n, h, w, c = frames_u8.shape
    _check_pre_args(dtype, c)
    if n == 0 or h * w == 0:
        raise ValueError("frames_u8 must not be empty")
    affine = _affine(mean, std, c)
    out = _output(out, (n, c, h, w), dtype, channels_last, frames_u8.device)
    stream = _resolve_stream(stream, frames_u8.device)
    ptr = frames_u8.data_ptr()
    _launch_preprocess(ptr, ptr % 4 == 0, out, None, n, h * w, c, affine, channels_last, stream)
    return out


def gather_preprocess(
    ring: torch.Tensor,
    offsets: Sequence[int],
    H: int,
    W: int,
    C: int,
    mean: Sequence[float],
    std: Sequence[float],
    dtype: torch.dtype,
    channels_last: bool,
    out: torch.Tensor | None = None,
    stream: torch.cuda.Stream | None = None,
) -> torch.Tensor:
    """Gather uint8 HWC frames from pinned ring slots and normalize them in one launch.

    Equivalent to :func:`gather_frames` followed by :func:`preprocess_image`, without the
    intermediate uint8 batch: each frame (``H * W * C`` bytes at a 256-aligned byte offset of
    the pinned ``ring``) is read over PCIe and written normalized to ``out`` ``[N, C, H, W]``
    (channels_last-strided when ``channels_last``). ``out`` is allocated on the stream's device
    (default: the current device) when omitted. Ring slots must not be reused until work
    recorded on ``stream`` after the call has completed.
    """
    _check_ring(ring)
    for label, v in (("H", H), ("W", W), ("C", C)):
        if not isinstance(v, int) or v <= 0:
            raise ValueError(f"{label} must be a positive int, got {v!r}")
    _check_pre_args(dtype, C)
    offs = check_offsets(offsets, H * W * C, ring.numel())
    affine = _affine(mean, std, C)
    if out is not None:
        device = out.device
    elif stream is not None:
        device = stream.device
    else:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type != "cuda":
        raise ValueError("out must be a CUDA tensor")
    out = _output(out, (len(offs), C, H, W), dtype, channels_last, device)
    stream = _resolve_stream(stream, device)
    ring_ptr = mapped_address(ring.data_ptr())
    _launch_preprocess(ring_ptr, ring_ptr % 4 == 0, out, offs, len(offs), H * W, C, affine, channels_last, stream)
    return out


def preprocess_table(
    table: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    channels_last: bool,
    out: torch.Tensor,
    stream: torch.cuda.Stream,
) -> torch.Tensor:
    """Normalize the uint8 HWC images listed in a device-side table, like :func:`preprocess_image`.

    Made to be captured in a CUDA graph: the table is read on the device when the kernel runs, so
    one captured launch serves any batch; fill the table (an async copy on ``stream``) before each
    replay.

    Args:
        table: int64 CUDA tensor of at least ``1 + N`` entries: ``table[0]`` is the number of images
            ``n <= N``, ``table[1 + i]`` the address of image ``i`` (``H * W * C`` bytes in device
            memory or in page-locked host memory mapped for the device; 4-byte aligned when
            ``H * W % 4 == 0``).
        mean, std: one value per channel, in the 0..1 scale.
        channels_last: whether ``out`` is channels_last-strided (NHWC in memory).
        out: the ``[N, C, H, W]`` float16 or float32 output; rows ``n`` to ``N - 1`` are left as they are.
        stream: the CUDA stream to launch on.
    """
    if out.dim() != 4 or out.device.type != "cuda":
        raise ValueError("out must be a CUDA [N, C, H, W] tensor")
    n, c, h, w = out.shape
    _check_pre_args(out.dtype, c)
    out = _output(out, (n, c, h, w), out.dtype, channels_last, out.device)
    if n > _MAX_GRID_Y:
        raise ValueError(f"at most {_MAX_GRID_Y} images per table launch, got {n}")
    if table.dtype != torch.int64 or table.device != out.device or table.dim() != 1 or table.numel() < 1 + n:
        raise ValueError(f"table must be an int64 tensor of at least {1 + n} entries on {out.device}")
    if not table.is_contiguous():
        raise ValueError("table must be contiguous")
    stream = _resolve_stream(stream, out.device)
    affine = _affine(mean, std, c)
    _launch_preprocess(0, True, out, None, n, h * w, c, affine, channels_last, stream, table.data_ptr())
    return out


def enqueue_replay(
    device: int,
    stream: int,
    upload: tuple[int, int, int],
    graph_exec: int,
    downloads: Sequence[tuple[int, int, int]],
) -> None:
    """Enqueue on ``stream`` (a raw ``cudaStream_t``): one copy ``upload`` = ``(dst, src, nbytes)``,
    one launch of the instantiated CUDA graph ``graph_exec``, then the ``downloads`` copies.

    Raw driver calls, for the one-replay batch path: entering torch's device and stream contexts
    for the same work costs tens of microseconds of the loop's time per batch, and the GIL is kept
    (``streamgpu.gpu.driver``). Copies take any addresses the device can reach (device memory,
    page-locked host memory); ``device`` is made current for the calls if it is not.
    """
    drv = driver.the_driver()
    with drv.on_device(device):
        drv.memcpy_async(*upload, stream)
        drv.graph_launch(graph_exec, stream)
        for dst, src, nbytes in downloads:
            drv.memcpy_async(dst, src, nbytes, stream)
