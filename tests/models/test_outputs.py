"""What ``warm_up`` refuses at load: outputs no reply could carry."""

from __future__ import annotations

import pytest
import torch

from streamgpu.errors import ModelLoadError
from streamgpu.models.outputs import warm_up
from streamgpu.models.spec import ModelSpec
from streamgpu.protocol import wire

SPEC = ModelSpec(name="deep", input_shape=(2, 3), input_dtype="float32", preprocess="none", max_batch_size=4,
                 batch_buckets=(1, 4))  # fmt: skip


def test_an_output_of_more_dimensions_per_frame_than_a_reply_carries_is_refused_at_load() -> None:
    """A frame's result of 9 dimensions loaded, then no frame was ever answered: its reply could not be
    encoded (``wire.MAX_NDIM``), so the producer waited for good and its stream's later replies behind it."""
    with pytest.raises(ModelLoadError, match=r"'deep'.*9 dimensions per frame.*at most 8"):
        warm_up(SPEC, lambda n: [torch.zeros(n, 3), torch.zeros(n, *(1,) * 8, 6)], "[n, 2, 3] tensors")
    deepest = warm_up(SPEC, lambda n: [torch.zeros(n, *(1,) * (wire.MAX_NDIM - 1), 6)], "[n, 2, 3] tensors")
    assert deepest[0].dim() == 1 + wire.MAX_NDIM  # 8 per frame: served
