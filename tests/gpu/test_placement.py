"""``on_device``: a torch.export program placed on a device entirely (runs on the CPU, on the meta device).

``Module.to`` leaves an exported program's lifted constants and the CPU device written into its graph
behind; served on a GPU it failed at load with "Tensor device mismatch! Expected: cpu, Got: cuda:0".
"""

from __future__ import annotations

import torch
from torch import nn

from streamgpu.gpu.cuda import on_device


class Exported(nn.Module):
    """A constant tensor, a dtype round trip (``_assert_tensor_metadata`` nodes) and a factory op."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.tensor([1.0, 2.0, 3.0])
        return x * scale + x.new_zeros(3).to(torch.float64).to(torch.float32) + torch.ones(3, device="cpu")


def exported() -> nn.Module:
    batch = {"x": {0: torch.export.Dim("batch", min=1, max=64)}}
    return torch.export.export(Exported(), (torch.zeros(2, 3),), dynamic_shapes=batch).module()


def test_an_exported_program_runs_where_it_was_placed() -> None:
    meta = torch.device("meta")
    module = on_device(exported(), meta, torch.float32)
    out = module(torch.zeros(4, 3, device=meta))
    assert out.device == meta and out.shape == (4, 3)
    assert all(t.device == meta for t in vars(module).values() if isinstance(t, torch.Tensor))


def test_placing_it_keeps_what_it_computes() -> None:
    x = torch.arange(12, dtype=torch.float32).view(4, 3)
    expected = exported()(x)
    torch.testing.assert_close(on_device(exported(), torch.device("cpu"), torch.float32)(x), expected)
