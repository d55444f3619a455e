"""Which new versions take a serving model's place by their weights alone, and how their tensors are paired."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from streamgpu.errors import ModelLoadError
from streamgpu.models.builtin import SmallConvNet
from streamgpu.models.spec import ModelSpec
from streamgpu.models.weights import architecture, in_place_problem, paired_weights

SERVING = ModelSpec(name="m", source="state_dict:/w/v1.pt", arch="small", weights_in_place=True)


@pytest.mark.parametrize(
    ("serving", "new", "problem"),
    [
        (SERVING, dataclasses.replace(SERVING, source="state_dict:/w/v2.pt"), None),
        (ModelSpec(name="m", source="builtin:small"), dataclasses.replace(SERVING, source="state_dict:/w/v2.pt"), None),
        (SERVING, ModelSpec(name="m", source="state_dict:/w/v2.pt", arch="small"), "weights_in_place = false"),
        (SERVING, dataclasses.replace(SERVING, weights_in_place=False), "weights_in_place = false"),
        (SERVING, ModelSpec(name="m", source="export:/w/m.pt2", weights_in_place=True),
         "its source is not a state_dict"),
        (ModelSpec(name="m", source="torchscript:/w/m.pt"), SERVING,
         "its architecture 'small' is not the serving one's (None)"),
        (SERVING, dataclasses.replace(SERVING, arch="resnet18"),
         "its architecture 'resnet18' is not the serving one's ('small')"),
        (SERVING, dataclasses.replace(SERVING, swap_queued="received"), 'swap_queued = "received"'),
        (SERVING, dataclasses.replace(SERVING, precision="fp32", max_queue=64),
         "its settings differ (precision, max_queue)"),
    ],
)  # fmt: skip
def test_only_a_state_dict_of_the_serving_architecture_and_settings_is_swapped_in_place(
    serving: ModelSpec, new: ModelSpec, problem: str | None
) -> None:
    assert in_place_problem(serving, new) == problem


def test_the_architecture_of_each_source() -> None:
    assert architecture(ModelSpec(source="builtin:resnet50")) == "resnet50"
    assert architecture(SERVING) == "small"
    assert architecture(ModelSpec(source="torchscript:/m.pt")) is None


def test_each_serving_tensor_is_paired_with_its_new_value_whatever_its_precision() -> None:
    serving = SmallConvNet().half()
    state = SmallConvNet().state_dict()  # fp32: takes the serving tensors' precision at the copy
    pairs = paired_weights("m", serving, state)
    live = serving.state_dict()
    assert [p[0].data_ptr() for p in pairs] == [t.data_ptr() for t in live.values()]  # the serving tensors themselves
    assert all(new is state[key] for (_, new), key in zip(pairs, live, strict=True))


def test_an_entry_of_another_architecture_is_named() -> None:
    state = SmallConvNet().state_dict()
    state["head.weight"] = torch.zeros(1)
    with pytest.raises(ModelLoadError, match=r"0 entries missing \[\], 1 unexpected \['head.weight'\]"):
        paired_weights("m", SmallConvNet(), state)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (torch.zeros(1000).to_sparse(), "entry 'fc.bias' of the new weights is a torch.sparse_coo tensor on cpu"),
        (torch.empty(1000, device="meta"), "entry 'fc.bias' of the new weights is a torch.strided tensor on meta"),
    ],
    ids=["sparse", "meta"],
)
def test_a_tensor_without_dense_values_is_refused(value: torch.Tensor, expected: str) -> None:
    """(Paired, its copy failed at the swap, after the tensors before it were copied: a mix of two versions.)"""
    state = SmallConvNet().state_dict()
    state["fc.bias"] = value
    with pytest.raises(ModelLoadError, match=re.escape(expected)):
        paired_weights("m", SmallConvNet(), state)


def test_batch_norm_counters_a_state_dict_predates_are_kept_as_load_state_dict_keeps_them() -> None:
    """A state dict saved before torch counted batch-norm batches (no ``_metadata``, or a version under 2) loads
    with ``load_state_dict``; the serving counters stay as they are. One of version 2 must have them."""
    saved = SmallConvNet().state_dict()
    old = {key: value for key, value in saved.items() if not key.endswith("num_batches_tracked")}  # a plain dict
    serving = SmallConvNet()
    SmallConvNet().load_state_dict(old)  # (torch takes it)
    pairs = paired_weights("m", serving, old)
    assert all(new is value for (_, new), value in zip(pairs, old.values(), strict=True))
    for key in [key for key in saved if key.endswith("num_batches_tracked")]:
        del saved[key]  # (its _metadata says version 2: torch refuses it, and so does the swap)
    with pytest.raises(ModelLoadError, match=r"4 entries missing \['features.1.num_batches_tracked'"):
        paired_weights("m", serving, saved)
