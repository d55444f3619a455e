"""User models from files (TorchScript, torch.export, state dict), and clear errors for bad ones."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from streamgpu import client
from streamgpu.config import Config
from streamgpu.models.builtin import build_builtin
from streamgpu.models.loader import ModelLoadError, load_module
from streamgpu.models.preprocess import preprocess_torch
from streamgpu.models.spec import ModelSpec
from streamgpu.server import Server

X = torch.rand(2, 3, 32, 32)


def reference() -> torch.Tensor:
    with torch.inference_mode():
        return build_builtin("small")(X)


def check(spec: ModelSpec) -> None:
    module = load_module(spec)
    with torch.inference_mode():
        torch.testing.assert_close(module(X), reference())


def test_torchscript_file(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    torch.jit.save(torch.jit.trace(build_builtin("small"), X), str(path))
    check(ModelSpec(source=f"torchscript:{path}"))


def test_torch_export_archive(tmp_path: Path) -> None:
    path = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(build_builtin("small"), (X,)), str(path))
    check(ModelSpec(source=f"export:{path}"))


def test_state_dict_for_a_builtin_architecture(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    torch.save(build_builtin("small").state_dict(), path)
    check(ModelSpec(source=f"state_dict:{path}", arch="small"))


class Payload:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("arbitrary code ran",))


def test_state_dict_with_arbitrary_objects_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"weight": Payload()}, f)
    with pytest.raises(ModelLoadError, match="cannot load"):
        load_module(ModelSpec(source=f"state_dict:{path}", arch="small"))


@pytest.mark.parametrize(
    ("source", "arch", "message"),
    [
        ("torchscript:/no/such/file.pt", "", "does not exist"),
        ("builtin:vgg99", "", "unknown builtin model 'vgg99'"),
        ("state_dict:{garbage}", "small", "cannot load"),
        ("torchscript:{garbage}", "", "cannot load"),
        ("export:{garbage}", "", "cannot load"),
    ],
)
def test_bad_model_sources_say_which_model_and_why(tmp_path: Path, source: str, arch: str, message: str) -> None:
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"not a model" * 10)
    spec = ModelSpec(name="cam", source=source.format(garbage=garbage), arch=arch)
    with pytest.raises((ModelLoadError, ValueError), match=message):
        load_module(spec)


@pytest.mark.asyncio
async def test_server_serves_a_torchscript_model_from_the_config(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    torch.jit.save(torch.jit.trace(build_builtin("small"), X), str(path))
    spec = ModelSpec(name="traced", source=f"torchscript:{path}", input_shape=(32, 32, 3))
    frame = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    async with Server(Config(port=0, device="cpu", models=[spec])) as server:
        conn = await client.connect("127.0.0.1", server.port)
        reply = await conn.infer(frame, model="traced")
        await conn.close()
    direct = direct_call(frame, spec)
    np.testing.assert_allclose(reply.unwrap(), direct, rtol=1e-4, atol=1e-4)


def direct_call(frame: np.ndarray, spec: ModelSpec) -> np.ndarray:
    with torch.inference_mode():
        x = preprocess_torch(torch.from_numpy(frame[None]), spec, torch.float32)
        return build_builtin("small")(x)[0].numpy()
