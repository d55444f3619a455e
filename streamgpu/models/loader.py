"""Build a model's torch module from its spec, without unpickling arbitrary objects."""

from __future__ import annotations

import os

import torch
from torch import nn

from streamgpu.models.builtin import build_builtin
from streamgpu.models.spec import ModelSpec


class ModelLoadError(RuntimeError):
    """A configured model could not be loaded; the message says which and why."""


def load_module(spec: ModelSpec) -> nn.Module:
    """The spec's model on the CPU in fp32 eval mode. Blocking: call off the event loop.

    TorchScript and ``torch.export`` archives carry code, not pickles; state
    dicts load with ``weights_only=True``.
    """
    scheme, _, target = spec.source.partition(":")
    try:
        if scheme == "builtin":
            return build_builtin(target)
        if not os.path.isfile(target):
            raise ModelLoadError(f"model {spec.name!r}: file {target!r} does not exist")
        if scheme == "torchscript":
            module: nn.Module = torch.jit.load(target, map_location="cpu")
        elif scheme == "export":
            module = torch.export.load(target).module()
        elif scheme == "state_dict":
            module = build_builtin(spec.arch)
            state = torch.load(target, map_location="cpu", weights_only=True)
            if not isinstance(state, dict):
                raise ModelLoadError(
                    f"model {spec.name!r}: {target!r} holds a {type(state).__name__}, not a state dict"
                )
            module.load_state_dict(state)
        else:
            raise ModelLoadError(f"model {spec.name!r}: unknown source scheme {scheme!r}")
    except ModelLoadError:
        raise
    except Exception as exc:  # torch raises many types for a bad file; say which model and file
        raise ModelLoadError(f"model {spec.name!r}: cannot load {spec.source!r}: {exc}") from exc
    if scheme != "export":  # exported programs reject .eval(); they are traced in inference form
        module.eval()
    return module
