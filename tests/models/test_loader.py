"""User models from files (TorchScript, torch.export, state dict), and clear errors for bad ones."""

from __future__ import annotations

import contextlib
import io
import json
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

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
        ("torchscript:{garbage}", "", "not a readable zip archive"),
        ("export:{garbage}", "", "not a readable zip archive"),
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


# --------------------------------------------------------------------------- untrusted archives
#
# Each crafted archive starts as a genuine torch.export archive of a tiny module and is then
# modified the way an attacker who read torch's loader (torch/export/pt2_archive/_package.py,
# torch/_export/serde/serialize.py) would. Its payload creates a marker file when it runs.
# test_crafted_archives_run_code_in_plain_torch shows that each one does run code under
# torch.export.load; the loader must refuse each one without running it.


class Tiny(nn.Module):
    """A weight, a bias, a buffer (data/weights/) and a tensor constant (data/constants/)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.register_buffer("buf", torch.ones(3))
        self.c = torch.full((3,), 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + self.buf * self.c


TINY_X = torch.rand(2, 4)


class RunsCode:
    """Unpickling this runs Python code: it creates the file ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Callable[..., object], tuple[str]]:
        return (exec, (f"open({str(self.path)!r}, 'w').close()",))


def torch_pickle(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def tiny() -> Tiny:
    """Always the same weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Tiny().eval()


def export_tiny(path: Path, dynamic_batch: bool = False) -> Path:
    dynamic = {"x": {0: torch.export.Dim("batch", min=1, max=64)}} if dynamic_batch else None
    torch.export.save(torch.export.export(tiny(), (TINY_X,), dynamic_shapes=dynamic), str(path))
    return path


Members = dict[str, bytes]  # archive members by name below the archive's top-level folder


def rewrite(src: Path, dst: Path, edit: Callable[[Members], None]) -> Path:
    """``src`` with its members edited, as a new zip ``dst`` (same top-level folder)."""
    with zipfile.ZipFile(src) as z:
        root = z.namelist()[0].split("/")[0]
        members = {name.split("/", 1)[1]: z.read(name) for name in z.namelist()}
    edit(members)
    with zipfile.ZipFile(dst, "w") as z:
        for rel, data in members.items():
            z.writestr(f"{root}/{rel}", data)
    return dst


def edit_json(members: Members, rel: str, edit: Callable[[Any], None]) -> None:
    doc = json.loads(members[rel])
    edit(doc)
    members[rel] = json.dumps(doc).encode()


WEIGHTS_CONFIG = "data/weights/model_weights_config.json"
CONSTANTS_CONFIG = "data/constants/model_constants_config.json"
PROGRAM = "models/model.json"


def weight_marked_use_pickle(members: Members, marker: Path) -> None:
    """A weight entry marked use_pickle: torch.load(weights_only=False) of its payload."""

    def mark(config: Any) -> None:
        entry = config["config"]["lin.weight"]
        entry["use_pickle"] = True
        members["data/weights/" + entry["path_name"]] = torch_pickle(RunsCode(marker))

    edit_json(members, WEIGHTS_CONFIG, mark)


def constant_marked_use_pickle(members: Members, marker: Path) -> None:
    """A tensor constant marked use_pickle: torch.load(weights_only=False) of its payload."""

    def mark(config: Any) -> None:
        entry = config["config"]["c"]
        entry["use_pickle"] = True
        members["data/constants/" + entry["path_name"]] = torch_pickle(RunsCode(marker))

    edit_json(members, CONSTANTS_CONFIG, mark)


def opaque_constant_not_marked(members: Members, marker: Path) -> None:
    """An opaque_obj_* constant: torch picks pickle.loads by the name, whatever use_pickle says.

    Not marked use_pickle, it passes as a raw float32 tensor too (pickle ignores the padding).
    """

    def add(config: Any) -> None:
        tensor = config["config"]["c"]
        config["config"]["extra"] = {**tensor, "path_name": "opaque_obj_0", "use_pickle": False}

    edit_json(members, CONSTANTS_CONFIG, add)
    payload = pickle.dumps(RunsCode(marker))
    members["data/constants/opaque_obj_0"] = payload + b"\0" * (-len(payload) % 4)


def sample_inputs_pickle(members: Members, marker: Path) -> None:
    """Example inputs: weights_only=True fails, torch retries with weights_only=False."""
    members["data/sample_inputs/model.pt"] = torch_pickle(((RunsCode(marker),), {}))


def legacy_weights_file(members: Members, marker: Path) -> None:
    """data/weights/model.pt: torch prefers it to the config and unpickles it like the example inputs."""
    members["data/weights/model.pt"] = torch_pickle({"lin.weight": RunsCode(marker)})


def symbolic_shape_code(members: Members, marker: Path) -> None:
    """A symbolic size: torch parses it with sympy.sympify, which is eval."""

    def add(program: Any) -> None:
        code = f"open({str(marker)!r}, 'w').close()"
        sizes = program["graph_module"]["graph"]["tensor_values"]["x"]["sizes"]
        sizes[0] = {"as_expr": {"expr_str": f"exec({code!r}) or 2", "hint": {"as_int": 2}}}

    edit_json(members, PROGRAM, add)


CRAFTED = {
    "weight marked use_pickle": (weight_marked_use_pickle, "'lin.weight' is marked use_pickle"),
    "constant marked use_pickle": (constant_marked_use_pickle, "'c' is marked use_pickle"),
    "opaque constant": (opaque_constant_not_marked, "opaque_obj_0.*pickle.loads"),
    "sample inputs": (sample_inputs_pickle, "sample_inputs/model.pt.*example inputs pickle names 'builtins.exec'"),
    "legacy weights file": (legacy_weights_file, "weights/model.pt.*legacy pickled state dict"),
    "symbolic shape": (symbolic_shape_code, "models/model.json.*symbolic expression .* names 'exec'"),
}


@pytest.fixture
def genuine(tmp_path: Path) -> Path:
    return export_tiny(tmp_path / "genuine.pt2")


@pytest.mark.parametrize("case", CRAFTED)
def test_crafted_archives_run_code_in_plain_torch(tmp_path: Path, genuine: Path, case: str) -> None:
    """The crafted archives are live: plain torch.export.load runs their payload (if this fails, torch changed)."""
    craft, _ = CRAFTED[case]
    marker = tmp_path / "marker"
    path = rewrite(genuine, tmp_path / "crafted.pt2", lambda members: craft(members, marker))
    with contextlib.suppress(Exception):
        torch.export.load(str(path))
    assert marker.exists()


@pytest.mark.parametrize("case", CRAFTED)
def test_crafted_archives_are_refused_without_running_code(tmp_path: Path, genuine: Path, case: str) -> None:
    craft, message = CRAFTED[case]
    marker = tmp_path / "marker"
    path = rewrite(genuine, tmp_path / "crafted.pt2", lambda members: craft(members, marker))
    with pytest.raises(ModelLoadError, match=f"model 'cam': refusing member .*{message}") as info:
        load_module(ModelSpec(name="cam", source=f"export:{path}"))
    assert "re-export" in str(info.value)
    assert not marker.exists()


def test_genuine_export_archive_with_weights_buffers_and_constants(genuine: Path) -> None:
    module = load_module(ModelSpec(source=f"export:{genuine}"))
    with torch.inference_mode():
        torch.testing.assert_close(module(TINY_X), tiny()(TINY_X))


def test_dynamic_batch_export_runs_at_other_batch_sizes(tmp_path: Path) -> None:
    path = export_tiny(tmp_path / "dynamic.pt2", dynamic_batch=True)
    module = load_module(ModelSpec(source=f"export:{path}"))
    x = torch.rand(7, 4)
    with torch.inference_mode():
        torch.testing.assert_close(module(x), tiny()(x))
