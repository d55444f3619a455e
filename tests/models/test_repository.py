"""A model repository folder's settings (streamgpu.models.repository), read off the loop; the poll itself is
tested end to end in tests/test_lifecycle.py."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from streamgpu.models.repository import folder_spec
from streamgpu.models.spec import ModelSpec


def test_a_config_toml_swapped_for_a_fifo_after_a_look_is_not_waited_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, call_beside_fifo: Callable[..., object]
) -> None:
    """config.toml was looked at (a regular file), then opened: a FIFO swapped in between made the open wait
    for a writer for good, and the loader thread that reads it (every load after it) with it. It is opened
    once now, and checked on the descriptor."""
    folder = tmp_path / "cam"
    folder.mkdir()
    config = folder / "config.toml"
    config.write_text('source = "builtin:small"\ninput_shape = [16, 16, 3]\n')
    looked = os.path.isfile

    def look_then_swap(path: str | os.PathLike[str]) -> bool:
        found = looked(path)
        if os.fspath(path) == str(config):  # the swap, right after a look at the name
            config.unlink()
            os.mkfifo(config)
        return found

    monkeypatch.setattr(os.path, "isfile", look_then_swap)
    done = call_beside_fifo(config, lambda: folder_spec(str(folder)))
    assert isinstance(done, ModelSpec), done
    assert done.input_shape == (16, 16, 3)
