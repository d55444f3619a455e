"""What a model returns, and the load-time check that it runs at every batch bucket.

A model may return one tensor, a tuple (or list) of tensors, or a dict of
tensors keyed by name (detection and segmentation models). ``ModelHead``
wraps the module so that every backend sees a flat list of tensors, each
with the batch dimension first, in a fixed order; ``OutputLayout`` remembers
the structure (one tensor, a tuple, or named outputs) so results can be
handed back in the same shape. The optional per-model ``postprocess`` step
runs on the device right after the model (inside the CUDA graph when there
is one), so replies stay small:

* ``topk:K``: a classifier's single ``[n, classes]`` output becomes two
  named outputs, ``indices`` (int32 ``[n, K]``, best first) and ``scores``
  (float32 ``[n, K]``, the model's output values at those indices, no
  softmax applied).

``warm_up`` runs the model at every bucket, ``max_batch_size`` included, and
turns a failure into a ``ModelLoadError`` that names the model and the
bucket, with a hint (a static batch dimension, an input shape that is not
the model's).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from streamgpu.errors import ModelLoadError
from streamgpu.models.spec import ModelSpec
from streamgpu.protocol import wire

# What a backend delivers for one batch (each array [n, ...]) and the runner splits per frame:
# one array for a single-output model, else a tuple or a dict of arrays (the model's structure).
BatchOutputs = np.ndarray | tuple[np.ndarray, ...] | dict[str, np.ndarray]


@dataclass(frozen=True)
class OutputLayout:
    """The structure of a model's outputs: ``kind`` is ``tensor``, ``tuple`` or ``dict`` (then ``names``)."""

    kind: str
    names: tuple[str, ...] = ()

    def assemble(self, arrays: Sequence[np.ndarray]) -> BatchOutputs:
        """Arrays in the flat order back in the model's structure."""
        if self.kind == "tensor":
            return arrays[0]
        if self.kind == "dict":
            return dict(zip(self.names, arrays, strict=True))
        return tuple(arrays)


def host_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype an output is returned in: floats as float32 (fp16/bf16 compute stays internal), bool as uint8."""
    if dtype.is_floating_point:
        return torch.float32
    if dtype == torch.bool:
        return torch.uint8
    return dtype


class ModelHead(nn.Module):
    """``module`` followed by the spec's postprocess step; ``forward`` returns a flat list of tensors.

    ``layout`` is known after the first ``record`` (the load's warm-up makes it).
    """

    def __init__(self, module: nn.Module, spec: ModelSpec) -> None:
        super().__init__()
        self.module = module
        self.name = spec.name
        self.topk = spec.top_k
        self.layout: OutputLayout | None = None

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self._outputs(self.module(x))[0]

    def record(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``forward``, noting the output structure in ``layout`` (the load's warm-up calls this)."""
        tensors, layout = self._outputs(self.module(x))
        if self.layout is None:
            self.layout = layout
        elif layout != self.layout:
            raise ModelLoadError(f"model {self.name!r}: its output structure changed between calls "
                                 f"({self.layout} then {layout})")  # fmt: skip
        return tensors

    def _outputs(self, out: Any) -> tuple[list[torch.Tensor], OutputLayout]:
        tensors, layout = self._flatten(out)
        if self.topk:
            tensors, layout = self._top_k(tensors, layout)
        return tensors, layout

    def _flatten(self, out: Any) -> tuple[list[torch.Tensor], OutputLayout]:
        if isinstance(out, torch.Tensor):
            return [out], OutputLayout("tensor")
        if isinstance(out, (tuple, list)) and out and all(isinstance(t, torch.Tensor) for t in out):
            return list(out), OutputLayout("tuple")
        if isinstance(out, dict) and out and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                 for k, v in out.items()):  # fmt: skip
            return list(out.values()), OutputLayout("dict", tuple(out))
        raise ModelLoadError(
            f"model {self.name!r} returns {_describe(out)}; a served model must return a tensor, "
            "a tuple or list of tensors, or a dict of tensors keyed by name"
        )

    def _top_k(self, tensors: list[torch.Tensor], layout: OutputLayout) -> tuple[list[torch.Tensor], OutputLayout]:
        if layout.kind != "tensor" or tensors[0].dim() != 2:
            raise ModelLoadError(
                f"model {self.name!r}: postprocess 'topk:{self.topk}' needs one [batch, classes] output, "
                f"the model returns {_describe(tensors if layout.kind != 'tensor' else tensors[0])}"
            )
        if self.topk > tensors[0].shape[1]:
            raise ModelLoadError(f"model {self.name!r}: postprocess 'topk:{self.topk}' asks for more than its "
                                 f"{tensors[0].shape[1]} classes")  # fmt: skip
        scores, indices = torch.topk(tensors[0].float(), self.topk, dim=1)
        return [indices.to(torch.int32), scores], OutputLayout("dict", ("indices", "scores"))


def _describe(out: Any) -> str:
    if isinstance(out, torch.Tensor):
        return f"a tensor of shape {list(out.shape)}"
    if isinstance(out, (tuple, list)):
        return f"a {type(out).__name__} of [{', '.join(_describe(o) for o in out)}]"
    if isinstance(out, dict):
        return "a dict of {" + ", ".join(f"{k!r}: {_describe(v)}" for k, v in out.items()) + "}"
    return f"a {type(out).__name__}"


def model_input(spec: ModelSpec, dtype: torch.dtype) -> str:
    """What the model is fed for a batch of n frames, in words (for load errors)."""
    if spec.preprocess == "image":
        h, w, c = spec.input_shape
        return f"[n, {c}, {h}, {w}] {dtype} tensors"
    return f"[n, {', '.join(map(str, spec.input_shape))}] tensors"


def warm_up(spec: ModelSpec, run: Callable[[int], list[torch.Tensor]], model_input: str) -> list[torch.Tensor]:
    """Run the model at every bucket (``max_batch_size`` included); returns the outputs at the largest.

    ``run(n)`` runs a batch of ``n`` zero frames; ``model_input`` describes what the
    model is fed (for the hint). A failure is a ``ModelLoadError`` naming the model and
    the bucket: at the smallest bucket the input shape is the likely cause, at a larger
    one a static batch dimension (a torch.export file exported without a dynamic batch).
    """
    buckets = spec.buckets()
    outs: list[torch.Tensor] = []
    per_frame: list[tuple[list[int], torch.dtype]] = []  # each output's shape past the batch, and dtype
    for i, bucket in enumerate(buckets):
        try:
            outs = run(bucket)
        except ModelLoadError:
            raise
        except Exception as exc:
            raise ModelLoadError(_failure(spec, bucket, i, model_input, f"{type(exc).__name__}: {exc}")) from exc
        wrong = [list(t.shape) for t in outs if t.dim() == 0 or t.shape[0] != bucket]
        if wrong:
            why = f"its outputs have shapes {wrong}, not a batch of {bucket} first"
            raise ModelLoadError(_failure(spec, bucket, i, model_input, why))
        # A frame's result must not depend on how many frames share its batch (results come back into
        # buffers shaped once, per frame).
        these = [(list(t.shape[1:]), t.dtype) for t in outs]
        if i and these != per_frame:
            raise ModelLoadError(
                f"model {spec.name!r} ({spec.source}): its per-frame outputs (shape past the batch, dtype) change "
                f"with the batch size: {per_frame} at batch {buckets[0]}, {these} at batch {bucket}. Each frame's "
                "result must be the same shape whatever the batch (a model mixing frames, e.g. [n, n], cannot be "
                "served per frame)"
            )
        if not i:
            _check_wire_dtypes(spec, outs)
        per_frame = these
    return outs


def _check_wire_dtypes(spec: ModelSpec, outs: list[torch.Tensor]) -> None:
    """Every output is returned in a dtype and number of dimensions a reply can carry (else its frames could
    never be answered)."""
    for t in outs:
        if t.dim() - 1 > wire.MAX_NDIM:
            raise ModelLoadError(
                f"model {spec.name!r} ({spec.source}) returns an output of {t.dim() - 1} dimensions per frame (shape "
                f"{list(t.shape)}, the batch first); replies carry at most {wire.MAX_NDIM}: reshape it in the model"
            )
        try:
            wire.dtype_code(torch.empty(0, dtype=host_dtype(t.dtype)).numpy().dtype)
        except (TypeError, ValueError):
            carried = ", ".join(str(dtype) for dtype in wire.DTYPES.values())
            raise ModelLoadError(
                f"model {spec.name!r} ({spec.source}) returns a {t.dtype} output, which replies cannot carry "
                f"(they carry {carried}; floating point outputs come back as float32): convert it in the model"
            ) from None


def _failure(spec: ModelSpec, bucket: int, index: int, model_input: str, why: str) -> str:
    why = why.strip().splitlines()[0] if why.strip() else why  # torch's messages run to many lines
    where = f"model {spec.name!r} ({spec.source}) fails at batch size {bucket}"
    if index == 0 and "shape[0]" in why:  # torch.export's guard on a static batch dimension
        return (
            f"{where}: {why}. Its batch dimension is static (a torch.export file exported with a fixed batch): "
            f"export it with dynamic_shapes={{'x': {{0: torch.export.Dim('batch', max={spec.max_batch_size})}}}}"
        )
    if index == 0:
        return (
            f"{where}, the smallest bucket: {why}. It was fed {model_input} (input_shape "
            f"{list(spec.input_shape)}, preprocess {spec.preprocess!r}): check that input_shape matches "
            "the input the model expects (frames are [H, W, C]; preprocess 'image' feeds [n, C, H, W])"
        )
    return (
        f"{where} (buckets {list(spec.buckets())}, max_batch_size {spec.max_batch_size}) after running at "
        f"batch size {spec.buckets()[index - 1]}: {why}. Its batch dimension looks static (a torch.export file "
        "exported with a fixed batch): export it with dynamic_shapes={'x': {0: torch.export.Dim('batch', "
        f"max={spec.max_batch_size})}}}}, or serve it with max_batch_size = {spec.buckets()[index - 1]}"
    )
