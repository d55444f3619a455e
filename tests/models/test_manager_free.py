"""ModelManager frees every device's instance of a model even when one device's unload fails."""

from __future__ import annotations

from typing import Any

import pytest

from streamgpu.models.manager import ModelManager


class LostFirstDevice:
    """A backend whose device 0 lost its context: unloading there raises, as synchronizing its streams does."""

    def __init__(self) -> None:
        self.unloaded: list[Any] = []

    def unload(self, model: Any) -> None:
        if model == "on cuda:0":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        self.unloaded.append(model)


def test_a_failed_unload_on_one_gpu_still_frees_the_model_on_the_others() -> None:
    # devices = [0, 1], GPU 0 lost: unloading a model (or its old version after a swap) stopped at GPU 0,
    # so GPU 1, still serving, kept its memory and its SM share, refused to every other model.
    backend = LostFirstDevice()
    manager = ModelManager(backend, None, None, None)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="illegal memory access"):
        manager._free(["on cuda:0", "on cuda:1"])  # type: ignore[list-item]
    assert backend.unloaded == ["on cuda:1"]
