"""Frame sources: seeded synthetic tensors, image files or a video file.

A source is a list of ready numpy frames that the generator cycles through,
so no frame is built on the hot path. Image and video sources are an optional
extra (``pip install streamgpu[video]``): Pillow and imageio are imported only
when used.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from streamgpu.loadgen.errors import UsageError
from streamgpu.protocol import wire

#: Upper bound on the memory a synthetic pool takes (it keeps at least one frame).
POOL_BYTES = 256 * 1024 * 1024


def parse_shape(text: str) -> tuple[int, ...]:
    """Parse ``224x224x3`` or ``3,224,224`` into a shape of positive ints."""
    parts = [p for p in re.split(r"[x,\s]+", text.strip().lower()) if p]
    if not parts:
        raise ValueError(f"empty shape {text!r}")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(f"bad shape {text!r}: expected integers like 224x224x3") from None
    if any(d <= 0 for d in shape):
        raise ValueError(f"bad shape {text!r}: every dimension must be positive")
    if len(shape) > wire.MAX_NDIM:
        raise ValueError(f"bad shape {text!r}: at most {wire.MAX_NDIM} dimensions")
    return shape


def parse_dtype(text: str) -> np.dtype:
    """Parse a numpy dtype name that the wire format carries (uint8, float16, ...)."""
    try:
        dt = np.dtype(text)
    except TypeError:
        raise ValueError(f"unknown dtype {text!r}") from None
    try:
        wire.dtype_code(dt)
    except ValueError:
        names = ", ".join(d.name for d in wire.DTYPES.values())
        raise ValueError(f"dtype {text!r} is not carried by the wire format; use one of {names}") from None
    return dt.newbyteorder("<") if dt.itemsize > 1 else dt


def synthetic(shape: Sequence[int], dtype: np.dtype, *, seed: int = 0, count: int = 8) -> list[np.ndarray]:
    """``count`` distinct random frames (fewer if they would exceed POOL_BYTES), reproducible by seed."""
    rng = np.random.default_rng(seed)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    count = max(1, min(count, POOL_BYTES // max(nbytes, 1)))
    frames = []
    for _ in range(count):
        if dtype.kind in "ui":
            info = np.iinfo(dtype)
            frames.append(rng.integers(info.min, info.max, size=tuple(shape), dtype=dtype, endpoint=True))
        else:
            frames.append(rng.standard_normal(size=tuple(shape)).astype(dtype))
    return frames


def _image_layout(shape: Sequence[int]) -> tuple[int, int, int, bool]:
    """(height, width, channels, channels_first) of an image-like shape; leading 1s are allowed."""
    dims = list(shape)
    while len(dims) > 3 and dims[0] == 1:
        dims.pop(0)
    if len(dims) == 2:
        return dims[0], dims[1], 0, False
    if len(dims) == 3:
        if dims[2] in (1, 3, 4):
            return dims[0], dims[1], dims[2], False
        if dims[0] in (1, 3, 4):
            return dims[1], dims[2], dims[0], True
    raise UsageError(
        f"shape {'x'.join(map(str, shape))} is not an image shape: use HxW, HxWxC or CxHxW with C in 1, 3, 4"
    )


def _import(module: str, extra: str) -> Any:
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise UsageError(f"this frame source needs {module.split('.')[0]}: pip install 'streamgpu[{extra}]'") from None


def _fit(image: Any, shape: Sequence[int], dtype: np.dtype) -> np.ndarray:
    """Centre-crop a PIL image to the target aspect ratio, resize it and lay it out as ``shape``."""
    pil = _import("PIL.Image", "video")
    h, w, c, channels_first = _image_layout(shape)
    image = image.convert({0: "L", 1: "L", 3: "RGB", 4: "RGBA"}[c])
    src_w, src_h = image.size
    scale = min(src_w / w, src_h / h)
    crop_w, crop_h = round(w * scale), round(h * scale)
    left, top = (src_w - crop_w) // 2, (src_h - crop_h) // 2
    image = image.resize((w, h), pil.Resampling.BILINEAR, box=(left, top, left + crop_w, top + crop_h))
    arr = np.asarray(image)
    if c == 1:
        arr = arr[:, :, None]
    if channels_first:
        arr = arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr.reshape(shape).astype(dtype))


def from_images(paths: Iterable[str | Path], shape: Sequence[int], dtype: np.dtype) -> list[np.ndarray]:
    """One frame per image file (any format Pillow reads), fitted to ``shape``."""
    pil = _import("PIL.Image", "video")
    frames = []
    for path in paths:
        try:
            with pil.open(path) as image:
                frames.append(_fit(image, shape, dtype))
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot read image {path}: {exc}") from None
    if not frames:
        raise UsageError("no image files given")
    return frames


def from_video(path: str | Path, shape: Sequence[int], dtype: np.dtype, *, max_frames: int = 300) -> list[np.ndarray]:
    """Up to ``max_frames`` frames of a video (or animated image) file, fitted to ``shape``."""
    iio = _import("imageio.v3", "video")
    pil = _import("PIL.Image", "video")
    frames = []
    try:
        for raw in iio.imiter(path):
            frames.append(_fit(pil.fromarray(np.asarray(raw)), shape, dtype))
            if len(frames) >= max_frames:
                break
    except (OSError, ValueError, RuntimeError) as exc:
        raise UsageError(f"cannot read video {path}: {exc}") from None
    if not frames:
        raise UsageError(f"video {path} has no frames")
    return frames
