"""A new version that only brings new weights takes them in place (an in-place swap).

A new version of a serving model that is its builtin architecture with other weights (a ``state_dict:``
source, every other setting the same) need not be built, warmed and graph-captured beside it: its file is
read, its tensors checked against the serving module's one by one, staged on the device, and copied into
the serving module's own tensors between two batches (``Backend.swap_weights``). The CUDA graphs read
those tensors where they are, so from the next batch on they run the new weights. The swap so costs the
serving process a file read and one device copy, where a rebuild costs seconds of Python in the loader
thread beside the loop, which raised the serving p99 while it ran (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from streamgpu.errors import ModelLoadError
from streamgpu.models.spec import ModelSpec

# Settings a new version taking the serving one's place in place may have of its own: the weights it brings, and
# this choice itself
_THE_NEW_VERSIONS = ("source", "arch", "weights_in_place")
# Entries named in an error at most (a state dict of another architecture differs in hundreds)
_NAMED = 5


def architecture(spec: ModelSpec) -> str | None:
    """The builtin architecture ``spec`` builds (``builtin:NAME``, or a state dict's ``arch``); None for a file
    that holds its own (TorchScript, ``torch.export``)."""
    scheme, _, target = spec.source.partition(":")
    if scheme == "builtin":
        return target
    return spec.arch if scheme == "state_dict" else None


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


def paired_weights(name: str, module: nn.Module, state: Mapping[str, object]) -> list[tuple[Tensor, Tensor]]:
    """Each tensor of ``module``'s state (parameters and persistent buffers, where they live) with its new value
    in ``state`` (a state dict on the CPU), but those ``load_state_dict`` keeps where ``state`` lacks them
    (``_kept``). ``ModelLoadError`` where ``state`` does not fit: entries missing or unexpected, a sparse or meta
    tensor, another shape, a floating value for an integer tensor or the reverse (what ``load_state_dict``
    refuses; floating values take the serving tensor's precision)."""
    live = module.state_dict()
    for key in _kept(module, state):  # (as load_state_dict keeps them)
        del live[key]
    missing = [key for key in live if key not in state]
    unexpected = [key for key in state if key not in live]
    if missing or unexpected:
        raise ModelLoadError(
            f"model {name!r}: the new weights do not fit the serving architecture: "
            f"{len(missing)} entries missing {missing[:_NAMED]}, {len(unexpected)} unexpected {unexpected[:_NAMED]}"
        )
    pairs = []
    for key, tensor in live.items():
        value = state[key]
        if not isinstance(value, Tensor):
            raise ModelLoadError(f"model {name!r}: entry {key!r} of the new weights is a {type(value).__name__}, "
                                 "not a tensor")  # fmt: skip
        if value.layout != torch.strided or value.is_meta:  # the copy at the swap would fail halfway through
            raise ModelLoadError(f"model {name!r}: entry {key!r} of the new weights is a {value.layout} tensor on "
                                 f"{value.device}, not a dense one with its values")  # fmt: skip
        if value.shape != tensor.shape:
            raise ModelLoadError(f"model {name!r}: entry {key!r} of the new weights has shape {list(value.shape)}, "
                                 f"the serving model's {list(tensor.shape)}")  # fmt: skip
        if value.is_floating_point() != tensor.is_floating_point() or value.is_complex() != tensor.is_complex():
            raise ModelLoadError(f"model {name!r}: entry {key!r} of the new weights is {value.dtype}, "
                                 f"the serving model's {tensor.dtype}")  # fmt: skip
        pairs.append((tensor, value))
    return pairs


def _kept(module: nn.Module, state: Mapping[str, object]) -> list[str]:
    """The entries of ``module``'s state that ``load_state_dict`` leaves as they are where ``state`` lacks them: a
    batch norm's ``num_batches_tracked`` in a state dict saved before torch counted batches (its version in
    ``state``'s ``_metadata`` under 2, or none: a plain dict). A ResNet's from torch < 0.4.1 loads so."""
    metadata: Mapping[str, Mapping[str, object]] = getattr(state, "_metadata", None) or {}
    kept = []
    for prefix, sub in module.named_modules():
        key = f"{prefix}.num_batches_tracked" if prefix else "num_batches_tracked"
        version = metadata.get(prefix, {}).get("version")
        if (isinstance(sub, nn.modules.batchnorm._BatchNorm) and sub.track_running_stats and key not in state
                and (version is None or (isinstance(version, int) and version < 2))):  # fmt: skip
            kept.append(key)
    return kept
