"""Builtin models: seeded random weights, or a state dict's tensors without initialising first."""

from __future__ import annotations

import pytest
import torch

from streamgpu.models.builtin import build_builtin, builtin_with_weights

X = torch.rand(2, 3, 32, 32)


def perturbed(arch: str) -> dict[str, torch.Tensor]:
    """A state dict unlike the seeded weights, so the seeded ones cannot pass for it."""
    state = build_builtin(arch).state_dict()
    return {k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}


@pytest.mark.parametrize("arch", ["small", "resnet18"])
def test_the_state_dicts_tensors_are_the_models_as_they_are(arch: str) -> None:
    state = perturbed(arch)
    module = builtin_with_weights(arch, state)
    reference = build_builtin(arch)
    reference.load_state_dict(state)
    assert not module.training
    for name, tensor in module.state_dict().items():
        assert tensor.data_ptr() == state[name].data_ptr(), f"{name} was copied, not taken"
    with torch.inference_mode():
        torch.testing.assert_close(module(X), reference(X))


def test_a_state_dict_of_another_dtype_is_copied_into_fp32() -> None:
    state = {k: v.half() if v.is_floating_point() else v for k, v in perturbed("small").items()}
    module = builtin_with_weights("small", state)
    assert {p.dtype for p in module.parameters()} == {torch.float32}
    assert not module.training
    reference = build_builtin("small")
    reference.load_state_dict(state)
    with torch.inference_mode():
        torch.testing.assert_close(module(X), reference(X))


def test_a_state_dict_that_does_not_fit_is_refused() -> None:
    state = perturbed("small")
    with pytest.raises(RuntimeError, match="size mismatch"):
        builtin_with_weights("small", {**state, "fc.weight": torch.zeros(3, 3)})
    del state["fc.bias"]
    with pytest.raises(RuntimeError, match="Missing key"):
        builtin_with_weights("small", state)


def test_views_and_shared_memory_are_copied_not_taken() -> None:
    state = perturbed("small")
    big = torch.zeros(10_000)
    state["fc.bias"] = big[: state["fc.bias"].numel()]  # a view of a larger storage
    params = dict(builtin_with_weights("small", state).named_parameters())
    assert params["fc.bias"].untyped_storage().nbytes() == params["fc.bias"].numel() * 4
    state = perturbed("small")
    state["features.1.bias"] = state["features.1.weight"]  # two entries, one memory
    params = dict(builtin_with_weights("small", state).named_parameters())
    weight, bias = params["features.1.weight"], params["features.1.bias"]
    assert weight.data_ptr() != bias.data_ptr()
    with torch.no_grad():
        weight.add_(1)  # an in-place step at load must not write through to another
    torch.testing.assert_close(bias, state["features.1.weight"])
