"""Models defined in the project. Their weights are random (seeded): nothing here
can download pretrained weights. Load real weights with a ``state_dict:`` source.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

BUILTIN_SEED = 0  # every process builds the same random weights, so results are reproducible


class SmallConvNet(nn.Module):
    """``small``: the default model, a light image classifier (random weights).

    Four stride-2 conv-BN-ReLU stages, global average pooling and a linear
    layer to ``num_classes`` logits. Cheap enough to serve on a CPU.
    """

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, width: int = 16) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for i in range(4):
            out = width * 2**i
            layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
            channels = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def _small() -> nn.Module:
    return SmallConvNet()


def _resnet18() -> nn.Module:
    from streamgpu.models.resnet import resnet18

    return resnet18()


def _resnet50() -> nn.Module:
    from streamgpu.models.resnet import resnet50

    return resnet50()


# (spec.BUILTIN_NAMES names these for the settings check, which runs without torch; a test keeps the two alike)
BUILTINS: dict[str, Callable[[], nn.Module]] = {"small": _small, "resnet18": _resnet18, "resnet50": _resnet50}


def build_builtin(name: str) -> nn.Module:
    """A fresh builtin model in eval mode, on the CPU, fp32, with seeded random weights."""
    factory = _factory(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(BUILTIN_SEED)
        module = factory()
    return module.eval()


def builtin_with_weights(name: str, state: dict[str, torch.Tensor]) -> nn.Module:
    """A builtin model in eval mode holding the tensors of ``state`` (a state dict, fp32 on the CPU).

    Built on the meta device and given ``state``'s tensors as they are: no random initialisation
    (about a second of CPU for ResNet-50, on every core, while a swap loads next to serving) and no
    copy. Where that cannot hold (a tensor of another dtype or layout, a view, two entries sharing
    memory, one the state dict lacks) the weights are copied into a built model instead. Raises what
    ``load_state_dict`` raises for missing, unexpected or misshapen entries.
    """
    with torch.device("meta"):
        module = _factory(name)()
    expected = module.state_dict()
    if all(k in expected and _takeable(v, expected[k]) for k, v in state.items()) and _unshared(state.values()):
        module.load_state_dict(state, assign=True)
        if not any(t.is_meta for t in (*module.parameters(), *module.buffers())):
            return module.eval()
    module = build_builtin(name)
    module.load_state_dict(state)
    return module


def _takeable(tensor: object, like: torch.Tensor) -> bool:
    """A dense, contiguous tensor of ``like``'s dtype that owns its whole storage (a view would keep
    a larger storage alive, and a later in-place step would write through it)."""
    return (
        isinstance(tensor, torch.Tensor)
        and tensor.dtype == like.dtype
        and tensor.layout == torch.strided
        and tensor.is_contiguous()
        and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    )


def _unshared(tensors: Iterable[torch.Tensor]) -> bool:
    """No two of ``tensors`` share memory."""
    pointers = [t.untyped_storage().data_ptr() for t in tensors]
    return len(set(pointers)) == len(pointers)


def _factory(name: str) -> Callable[[], nn.Module]:
    try:
        return BUILTINS[name]
    except KeyError:
        raise ValueError(f"unknown builtin model {name!r}; builtins are {sorted(BUILTINS)}") from None
