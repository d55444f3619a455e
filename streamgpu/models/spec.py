"""What a served model is: its name, where it comes from, what frames it takes."""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import numpy as np

from streamgpu.protocol import wire

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PREPROCESS_KINDS = ("image", "none")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
BATCH_POLICIES = ("adaptive", "fixed")
SWAP_QUEUED = ("new", "received")  # which version runs the frames queued when a new version takes over
COMPILE_MODES = ("auto", "on", "off")
FILE_SCHEMES = ("torchscript", "export", "state_dict")  # the sources that name a file: SCHEME:PATH
# The builtin architectures (streamgpu.models.builtin.BUILTINS, which needs torch): builtin:NAME, arch = NAME
BUILTIN_NAMES = ("resnet18", "resnet50", "small")
MAX_INSTANCES = 8  # copies of one model per GPU: each holds its weights, graphs and buffers


@dataclass(frozen=True)
class ModelSpec:
    """One served model, as configured.

    ``source`` is ``builtin:NAME`` (see streamgpu.models.builtin), or
    ``torchscript:PATH``, ``export:PATH`` (a ``torch.export`` archive) or
    ``state_dict:PATH`` (weights for the builtin architecture named in
    ``arch``). ``input_shape``/``input_dtype`` describe one frame.
    ``preprocess="image"`` turns uint8 HWC frames into normalized float NCHW
    with ``mean``/``std`` on the device; ``"none"`` feeds the tensor as is
    (cast to the model's precision for floating inputs). ``postprocess``
    (``topk:K``) runs on the device after the model (streamgpu.models.outputs).
    ``swap_queued``: when a new version of this model takes over, frames
    already queued run on the ``new`` one (default) or on the version that
    ``received`` them. ``instances``: copies of the model on each GPU (Triton's
    instance count), each with its own streams and CUDA graphs, so that batches
    run side by side: at a few frames in flight a small batch leaves most of a
    large GPU idle, and the next one need not wait for it. ``weights_in_place``
    (a new version's setting): a new version that only brings new weights (a
    ``state_dict`` source of the serving architecture, every other setting the
    same) has them copied into the serving model between two batches
    (``streamgpu.models.weights``) rather than being built and captured beside
    it (off by default); a model loaded with it keeps its weights in one device
    buffer, so that a swap copies them in one copy.
    """

    name: str = "default"
    source: str = "builtin:small"
    arch: str = ""
    input_shape: tuple[int, ...] = (224, 224, 3)
    input_dtype: str = "uint8"
    preprocess: str = "image"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    precision: str = "auto"
    max_batch_size: int = 32
    max_queue_delay_ms: float = 2.0
    batch_policy: str = "adaptive"
    batch_buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    cuda_graphs: bool = True
    compile: str = "auto"
    sm_share: float = 0.0  # fraction of the GPU's SMs this model's kernels may use (0: all, no partition)
    max_queue: int = 1024
    default_deadline_ms: float = 0.0
    latency_target_ms: float = 0.0
    postprocess: str = ""
    swap_queued: str = "new"
    instances: int = 1
    weights_in_place: bool = False

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError(f"model {self.name!r}: " + "; ".join(problems))

    def problems(self) -> list[str]:
        """Every reason this spec is invalid (empty when valid)."""
        out: list[str] = []
        if not 1 <= len(self.name.encode()) <= wire.MAX_MODEL_NAME:
            out.append(f"name must be 1..{wire.MAX_MODEL_NAME} UTF-8 bytes")
        scheme, _, rest = self.source.partition(":")
        if scheme not in ("builtin", *FILE_SCHEMES) or not rest:
            out.append(f"source {self.source!r} must be builtin:NAME, torchscript:PATH, export:PATH or state_dict:PATH")
        if "\0" in self.source:  # no file path holds one (os calls raise ValueError on it)
            out.append(f"source {self.source!r} holds a NUL character")
        try:  # (a lone surrogate, as JSON's "\ud800" reads: os calls raise UnicodeEncodeError on it)
            os.fsencode(self.source)
        except UnicodeEncodeError:
            out.append(f"source {self.source!r} holds a character no file path can (a lone surrogate)")
        if scheme == "state_dict" and not self.arch:
            out.append("a state_dict source needs arch = a builtin architecture name")
        # (named now, not only when the model loads: check-config passed builtin:resnet5 and arch = "resnt18")
        if scheme == "builtin" and rest and rest not in BUILTIN_NAMES:
            out.append(f"source {self.source!r}: unknown builtin model {rest!r}; builtins are {list(BUILTIN_NAMES)}")
        if scheme == "state_dict" and self.arch and self.arch not in BUILTIN_NAMES:
            out.append(f"arch {self.arch!r}: unknown builtin architecture; builtins are {list(BUILTIN_NAMES)}")
        if not self.input_shape or any(d <= 0 for d in self.input_shape) or len(self.input_shape) > wire.MAX_NDIM:
            out.append(f"input_shape {list(self.input_shape)} must have 1..{wire.MAX_NDIM} positive dims")
        try:
            wire.dtype_code(self.input_dtype)
        except (TypeError, ValueError):
            out.append(f"input_dtype {self.input_dtype!r} is not a supported dtype")
        else:
            if self.frame_dtype.byteorder == ">":  # (the wire's code is the little-endian dtype's)
                out.append(f"input_dtype {self.input_dtype!r} is big-endian: frames are little-endian ('<' or none)")
        if self.preprocess not in PREPROCESS_KINDS:
            out.append(f"preprocess must be one of {PREPROCESS_KINDS}, got {self.preprocess!r}")
        if self.preprocess == "image":
            if self.input_dtype != "uint8" or len(self.input_shape) != 3:
                out.append("preprocess = 'image' needs uint8 frames of shape [H, W, C]")
            elif not len(self.mean) == len(self.std) == self.input_shape[2]:
                out.append(
                    f"mean and std need {self.input_shape[2] if self.input_shape else '?'} values (one per channel)"
                )
            elif not all(math.isfinite(v) for v in (*self.mean, *self.std)):  # (TOML reads nan and inf)
                out.append(f"mean and std must be finite numbers, got mean {list(self.mean)}, std {list(self.std)}")
            elif any(s == 0 for s in self.std):
                out.append("std values must be non-zero")
        if self.precision not in PRECISIONS:
            out.append(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.compile not in COMPILE_MODES:
            out.append(f"compile must be one of {COMPILE_MODES}, got {self.compile!r}")
        if not (math.isfinite(self.sm_share) and 0 <= self.sm_share <= 1):
            out.append(f"sm_share must be a fraction of the GPU's SMs in 0..1 (0: no partition), got {self.sm_share}")
        if not 1 <= self.instances <= MAX_INSTANCES:
            out.append(f"instances must be 1..{MAX_INSTANCES} copies of the model per GPU, got {self.instances}")
        elif self.instances > 1 and self.sm_share:
            out.append(f"instances = {self.instances} with sm_share = {self.sm_share:g}: a share holds one instance;"
                       " set instances = 1 to confine the model to a share, or sm_share = 0")  # fmt: skip
        if self.max_batch_size < 1:
            out.append("max_batch_size must be >= 1")
        if self.batch_policy not in BATCH_POLICIES:
            out.append(f"batch_policy must be one of {BATCH_POLICIES}, got {self.batch_policy!r}")
        if self.max_queue_delay_ms < 0:
            out.append("max_queue_delay_ms must be >= 0")
        if not self.batch_buckets or any(b < 1 for b in self.batch_buckets):
            out.append("batch_buckets must be positive batch sizes")
        if self.postprocess and not self.top_k:
            out.append(f"postprocess {self.postprocess!r} must be '' (none) or 'topk:K' with K >= 1")
        if self.swap_queued not in SWAP_QUEUED:
            out.append(f"swap_queued must be one of {SWAP_QUEUED}, got {self.swap_queued!r}")
        if self.max_queue < 1:
            out.append("max_queue must be >= 1")
        elif self.max_batch_size > self.max_queue:  # (a typo's batch of 100000 would be warmed up at load)
            out.append(f"max_batch_size ({self.max_batch_size}) must be at most max_queue ({self.max_queue}): a batch "
                       "is taken from the model's queue, which never holds more; raise max_queue or lower "
                       "max_batch_size")  # fmt: skip
        times = {"max_queue_delay_ms": self.max_queue_delay_ms, "default_deadline_ms": self.default_deadline_ms,
                 "latency_target_ms": self.latency_target_ms}  # fmt: skip
        for key, value in times.items():
            if not math.isfinite(value):
                out.append(f"{key} must be a finite number of milliseconds, got {value}")
        if self.default_deadline_ms < 0 or self.latency_target_ms < 0:
            out.append("default_deadline_ms and latency_target_ms must be >= 0")
        return out

    def source_file_problem(self) -> str | None:
        """Why the source's file cannot be read (missing, not a regular file, unreadable), or None: it can, or
        the source is builtin and needs none. Only the file system is asked: nothing is loaded."""
        scheme, _, path = self.source.partition(":")
        if scheme == "builtin":
            return None
        if not os.path.exists(path):
            return f"source file {path!r} does not exist"
        if not os.path.isfile(path):
            return f"source file {path!r} is not a regular file"
        if not os.access(path, os.R_OK):
            return f"source file {path!r} cannot be read (permission denied)"
        return None

    @property
    def top_k(self) -> int:
        """K of ``postprocess = "topk:K"``; 0 when there is no (valid) top-k step."""
        kind, _, arg = self.postprocess.partition(":")
        # (ASCII: str.isdigit takes '²', which int() refuses; 18 digits: past int64, and past what int() reads)
        readable = arg.isascii() and arg.isdigit() and len(arg) <= 18
        return int(arg) if kind == "topk" and readable and int(arg) >= 1 else 0

    def same_frames(self, other: ModelSpec) -> bool:
        """Whether ``other`` takes exactly the frames this spec takes (dtype and shape)."""
        return self.input_dtype == other.input_dtype and self.input_shape == other.input_shape

    @property
    def frame_dtype(self) -> np.dtype:
        return np.dtype(self.input_dtype)

    @functools.cached_property
    def frame_dtype_code(self) -> int:
        return wire.dtype_code(self.input_dtype)  # (cached: admission compares it for every frame)

    @functools.cached_property
    def frame_nbytes(self) -> int:
        # (cached: every batch's launch reads it; exact: np.prod of an int64 shape wraps, (65536,) * 4 -> 0)
        return math.prod(self.input_shape) * self.frame_dtype.itemsize

    def buckets(self) -> tuple[int, ...]:
        """Batch-size buckets up to max_batch_size, always ending with max_batch_size."""
        sizes = sorted({b for b in self.batch_buckets if b < self.max_batch_size} | {self.max_batch_size})
        return tuple(sizes)

    def check_frame(self, header: wire.FrameHeader) -> str | None:
        """Why this model cannot take the frame, or None if it can."""
        if header.dtype_code != self.frame_dtype_code or tuple(header.shape) != self.input_shape:
            got = wire.DTYPES[header.dtype_code].name if header.dtype_code in wire.DTYPES else "?"
            return (
                f"model {self.name!r} takes {self.input_dtype} {list(self.input_shape)} frames,"
                f" got {got} {list(header.shape)}"
            )
        return None
