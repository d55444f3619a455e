"""A model repository folder's settings (streamgpu.models.repository), read off the loop; the poll itself is
tested end to end in tests/test_lifecycle.py."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from streamgpu.config import Config, ListenerSpec
from streamgpu.errors import StreamgpuError
from streamgpu.models.repository import folder_signature, folder_spec
from streamgpu.models.spec import ModelSpec
from streamgpu.server import Server


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


def _file_removed_after_listing(monkeypatch: pytest.MonkeyPatch, folder: Path, victim: Path) -> None:
    """``os.scandir(folder)`` lists ``victim``, which is removed before its entry is looked at (a temporary file
    renamed over the model's, an editor's swap file): the moment a scan can meet any time."""
    scandir = os.scandir

    class Listed:
        def __init__(self, path: str) -> None:
            self._it = scandir(path)
            self._entries = list(self._it)
            if os.fspath(path) == str(folder) and victim.exists():
                victim.unlink()

        def __enter__(self) -> Listed:
            return self

        def __exit__(self, *exc: object) -> None:
            self._it.close()

        def __iter__(self) -> Iterator[os.DirEntry[str]]:
            return iter(self._entries)

    monkeypatch.setattr(os, "scandir", Listed)


def test_a_file_removed_while_its_folder_is_scanned_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file of a model folder listed, then gone before its stat (``model.ts.tmp`` renamed to ``model.ts``): the
    stat's FileNotFoundError escaped folder_signature, the scan took the folder for removed and the poll unloaded
    its model (a producer's frames answered UNKNOWN_MODEL till two scans later). It is skipped, as a file of a
    subfolder removed meanwhile was."""
    folder = tmp_path / "cam"
    folder.mkdir()
    (folder / "config.toml").write_text('source = "builtin:small"\ninput_shape = [16, 16, 3]\n')
    victim = folder / "model.ts.tmp"
    victim.write_bytes(b"x")
    _file_removed_after_listing(monkeypatch, folder, victim)
    signature = folder_signature(str(folder))
    assert [name for name, _size, _mtime in signature] == ["config.toml"]


@pytest.mark.asyncio(loop_factories=["asyncio"])  # loop-agnostic: one loop is enough
async def test_a_file_removed_while_the_repository_is_scanned_does_not_unload_its_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The poll itself: a model served from its folder keeps serving through a scan that meets a file of the folder
    removed halfway (it was unloaded: the folder was missing from that scan)."""
    repo = tmp_path / "repo"
    folder = repo / "cam"
    folder.mkdir(parents=True)
    (folder / "config.toml").write_text('source = "builtin:small"\ninput_shape = [16, 16, 3]\nmax_batch_size = 2\n')
    victim = folder / "model.ts.tmp"
    victim.write_bytes(b"x")
    cfg = Config(listeners=[ListenerSpec(port=0)], device="cpu", models=[], model_repository=str(repo),
                 repository_poll_s=60)  # fmt: skip
    async with Server(cfg) as srv:
        assert "cam" in srv.model_specs
        with monkeypatch.context() as patched:
            _file_removed_after_listing(patched, folder, victim)
            await srv._repository.poll()  # type: ignore[union-attr]
        assert "cam" in srv.model_specs, srv.model_index()


@pytest.mark.parametrize("kind", ["fifo", "folder", "dangling link", "device"])
def test_a_model_file_that_is_no_regular_file_is_named(tmp_path: Path, kind: str) -> None:
    """A folder's model.ts that is a FIFO, a folder, a link to nothing or to a device was refused with "put one of
    ['model.pt2', 'model.ts'] there": the operator, looking, sees one there. The refusal names it and says why."""
    folder = tmp_path / "cam"
    folder.mkdir()
    model = folder / "model.ts"
    if kind == "fifo":
        os.mkfifo(model)
    elif kind == "folder":
        model.mkdir()
    elif kind == "dangling link":
        model.symlink_to(tmp_path / "gone.ts")
    else:
        model.symlink_to("/dev/zero")
    with pytest.raises(StreamgpuError, match=r"model\.ts is not a regular file"):
        folder_spec(str(folder))


def test_a_folder_with_both_model_files_says_so(tmp_path: Path) -> None:
    """model.pt2 and model.ts both there were refused with "put one of them there" too."""
    folder = tmp_path / "cam"
    folder.mkdir()
    (folder / "model.pt2").write_bytes(b"x")
    (folder / "model.ts").write_bytes(b"x")
    with pytest.raises(StreamgpuError, match=r"both \['model\.pt2', 'model\.ts'\] are there: remove one"):
        folder_spec(str(folder))
    (folder / "model.pt2").unlink()  # one: its source
    (folder / "config.toml").write_text("input_shape = [16, 16, 3]\n")
    assert folder_spec(str(folder)).source == f"torchscript:{folder / 'model.ts'}"
