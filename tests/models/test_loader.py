"""User models from files (TorchScript, torch.export, state dict), and clear errors for bad ones."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from streamgpu import client
from streamgpu.config import Config, ListenerSpec
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


@pytest.mark.parametrize("contents", [b"", b"hello", b"not a model" * 10, b"PK\x03\x04junk"])
def test_a_state_dict_file_torch_cannot_read_is_refused_saying_why(tmp_path: Path, contents: bytes) -> None:
    """An empty file was refused as "cannot load 'state_dict:PATH': " (torch's EOFError says nothing), a text
    file as "...: 101" (a KeyError): nothing said what was wrong with the file."""
    path = tmp_path / "weights.pt"
    path.write_bytes(contents)
    with pytest.raises(ModelLoadError) as info:
        load_module(ModelSpec(name="cam", source=f"state_dict:{path}", arch="small"))
    assert f"cannot load 'state_dict:{path}': it is no file of tensors torch.load reads (empty, truncated" in str(
        info.value
    ), info.value


@pytest.mark.parametrize("scheme", ["torchscript", "export", "state_dict"])
def test_a_source_replaced_by_a_fifo_after_its_check_is_refused_not_waited_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scheme: str, call_beside_fifo: Callable[..., object]
) -> None:
    """source_file_problem looks at the name; a FIFO put in its place before the file was opened made the open
    wait for a writer for good: the loader thread, and every load after it, stuck."""
    fifo = tmp_path / "model"
    os.mkfifo(fifo)
    monkeypatch.setattr(ModelSpec, "source_file_problem", lambda self: None)  # (it looked before the swap)
    failed = call_beside_fifo(fifo, lambda: load_module(ModelSpec(name="cam", source=f"{scheme}:{fifo}", arch="small")))
    assert isinstance(failed, ModelLoadError), failed
    assert f"source file {str(fifo)!r} is not a regular file" in str(failed)


@pytest.mark.asyncio
async def test_server_serves_a_torchscript_model_from_the_config(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    torch.jit.save(torch.jit.trace(build_builtin("small"), X), str(path))
    spec = ModelSpec(name="traced", source=f"torchscript:{path}", input_shape=(32, 32, 3))
    frame = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    async with Server(Config(listeners=[ListenerSpec(port=0)], device="cpu", models=[spec])) as server:
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
# modified the way an attacker who has read torch's loader (torch/export/pt2_archive/_package.py,
# torch/_export/serde/serialize.py) and this one would. Its payload creates a marker file when it
# runs. test_crafted_archives_run_code_in_plain_torch shows that each one does run code under
# torch.export.load; the loader must refuse each one, saying which member and why, without running it.


class Tiny(nn.Module):
    """A weight, a bias, a buffer (data/weights/) and a tensor constant (data/constants/)."""

    buf: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.register_buffer("buf", torch.ones(3))
        self.c = torch.full((3,), 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + self.buf * self.c


TINY_X = torch.rand(2, 4)


def tiny() -> Tiny:
    """Always the same weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Tiny().eval()


def export_tiny(path: Path, dynamic_batch: bool = False) -> Path:
    dynamic = {"x": {0: torch.export.Dim("batch", min=1, max=64)}} if dynamic_batch else None
    torch.export.save(torch.export.export(tiny(), (TINY_X,), dynamic_shapes=dynamic), str(path))
    return path


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


Members = dict[str, bytes]  # archive members by name below the archive's top-level folder
WEIGHTS_CONFIG = "data/weights/model_weights_config.json"
CONSTANTS_CONFIG = "data/constants/model_constants_config.json"
PROGRAM = "models/model.json"


def members_of(path: Path) -> tuple[str, Members]:
    with zipfile.ZipFile(path) as z:
        root = z.namelist()[0].split("/")[0]
        return root, {name.split("/", 1)[1]: z.read(name) for name in z.namelist()}


def write_zip(path: Path, entries: list[tuple[str, bytes]]) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Duplicate name": on purpose
        with zipfile.ZipFile(path, "w") as z:
            for name, data in entries:
                z.writestr(name, data)
    return path


def rewrite(src: Path, dst: Path, edit: Callable[[Members], None]) -> Path:
    """``src`` with its members edited, as a new zip ``dst`` (same top-level folder)."""
    root, members = members_of(src)
    edit(members)
    return write_zip(dst, [(f"{root}/{rel}", data) for rel, data in members.items()])


def edit_json(members: Members, rel: str, edit: Callable[[Any], None]) -> None:
    doc = json.loads(members[rel])
    edit(doc)
    members[rel] = json.dumps(doc).encode()


# Crafts: (members of a genuine archive, marker path) -> None, editing the members in place.


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

    Not marked use_pickle, it also passes as a raw float32 tensor (pickle ignores the padding).
    """

    def add(config: Any) -> None:
        config["config"]["extra"] = {**config["config"]["c"], "path_name": "opaque_obj_0", "use_pickle": False}

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


def edited(craft: Callable[[Members, Path], None]) -> Callable[[Path, Path, Path], Path]:
    return lambda genuine, dst, marker: rewrite(genuine, dst, lambda members: craft(members, marker))


def pre_27_layout(genuine: Path, dst: Path, marker: Path) -> Path:
    """The layout torch.export.load falls back to: loose members, unpickled with weights_only=False on failure."""
    _, members = members_of(genuine)
    program = members[PROGRAM]
    version = json.loads(program)["schema_version"]
    return write_zip(
        dst,
        [
            ("version", f"{version['major']}.{version['minor']}".encode()),
            ("serialized_exported_program.json", program),
            ("serialized_state_dict.pt", torch_pickle({"lin.weight": RunsCode(marker)})),
            ("serialized_constants.pt", torch_pickle({})),
            ("serialized_example_inputs.pt", torch_pickle(((TINY_X,), {}))),
        ],
    )


CRAFTED: dict[str, tuple[Callable[[Path, Path, Path], Path], str]] = {
    "weight marked use_pickle": (edited(weight_marked_use_pickle), "weights_config.json.*'lin.weight' .*use_pickle"),
    "constant marked use_pickle": (edited(constant_marked_use_pickle), "constants_config.json.*'c' .*use_pickle"),
    "opaque constant": (edited(opaque_constant_not_marked), "constants_config.json.*opaque_obj_0.*pickle.loads"),
    "sample inputs": (edited(sample_inputs_pickle), "sample_inputs/model.pt.*names 'builtins.exec'"),
    "legacy weights file": (edited(legacy_weights_file), "weights/model.pt.*legacy pickled state dict"),
    "symbolic shape": (edited(symbolic_shape_code), "models/model.json.*symbolic expression .* names 'exec'"),
    "pre-2.7 layout": (pre_27_layout, "pre-2.7 torch.export layout"),
}


@pytest.fixture
def genuine(tmp_path: Path) -> Path:
    return export_tiny(tmp_path / "genuine.pt2")


@pytest.mark.parametrize("case", CRAFTED)
def test_crafted_archives_run_code_in_plain_torch(tmp_path: Path, genuine: Path, case: str) -> None:
    """The crafted archives are live: plain torch.export.load runs their payload (if this fails, torch changed)."""
    build, _ = CRAFTED[case]
    marker = tmp_path / "marker"
    path = build(genuine, tmp_path / "crafted.pt2", marker)
    with contextlib.suppress(Exception), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.export.load(str(path))
    assert marker.exists()


@pytest.mark.parametrize("case", CRAFTED)
def test_crafted_archives_are_refused_without_running_code(tmp_path: Path, genuine: Path, case: str) -> None:
    build, message = CRAFTED[case]
    marker = tmp_path / "marker"
    path = build(genuine, tmp_path / "crafted.pt2", marker)
    with pytest.raises(ModelLoadError, match=f"^model 'cam': refusing member .*{message}") as info:
        load_module(ModelSpec(name="cam", source=f"export:{path}"))
    assert "re-export" in str(info.value)
    assert not marker.exists()


def test_genuine_export_archive_with_weights_buffers_and_constants(genuine: Path) -> None:
    module = load_module(ModelSpec(source=f"export:{genuine}"))
    with torch.inference_mode():
        torch.testing.assert_close(module(TINY_X), tiny()(TINY_X))


def test_dynamic_batch_export_runs_at_other_batch_sizes(tmp_path: Path) -> None:
    """Symbolic sizes that torch.export.save writes (sympy srepr) pass the check on sympify's input."""
    path = export_tiny(tmp_path / "dynamic.pt2", dynamic_batch=True)
    module = load_module(ModelSpec(source=f"export:{path}"))
    x = torch.rand(7, 4)
    with torch.inference_mode():
        torch.testing.assert_close(module(x), tiny()(x))


def defaultdict_in_spec(members: Members) -> None:
    """A pytree defaultdict: treespec_loads imports the module it names and takes its factory."""

    def edit(program: Any) -> None:
        spec = {"type": "collections.defaultdict", "context": json.dumps({}), "children_spec": []}
        program["graph_module"]["module_call_graph"][0]["signature"]["out_spec"] = json.dumps([1, spec])

    edit_json(members, PROGRAM, edit)


def python_callable_in_graph(members: Members) -> None:
    """A node calling the wrap higher-order operator with os.system as its function."""

    def edit(program: Any) -> None:
        graph = program["graph_module"]["graph"]
        graph["tensor_values"]["evil"] = graph["tensor_values"]["x"]
        args = [{"as_operator": "torch.os.system"}, {"as_string": "true"}]
        graph["nodes"].insert(
            0,
            {
                "target": "torch._higher_order_ops.wrap.wrap",
                "inputs": [{"name": "", "arg": arg, "kind": 1} for arg in args],
                "outputs": [{"as_tensor": {"name": "evil"}}],
                "metadata": {},
                "name": "evil",
                "is_hop_single_tensor_return": True,
            },
        )

    edit_json(members, PROGRAM, edit)


def dunder_operator(members: Members) -> None:
    def edit(program: Any) -> None:
        program["graph_module"]["graph"]["nodes"][0]["target"] = "torch.__builtins__.exec"

    edit_json(members, PROGRAM, edit)


def pickled_weight_payload_name(members: Members) -> None:
    """A weight whose payload name reaches another member."""

    def edit(config: Any) -> None:
        config["config"]["lin.weight"]["path_name"] = "../sample_inputs/model.pt"

    edit_json(members, WEIGHTS_CONFIG, edit)


def use_pickle_string(members: Members) -> None:
    """use_pickle "false" is true to torch."""

    def edit(config: Any) -> None:
        config["config"]["lin.weight"]["use_pickle"] = "false"

    edit_json(members, WEIGHTS_CONFIG, edit)


def expression_as_list(members: Members) -> None:
    def edit(program: Any) -> None:
        program["graph_module"]["graph"]["tensor_values"]["x"]["sizes"][0] = {"as_expr": {"expr_str": ["2"]}}

    edit_json(members, PROGRAM, edit)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (defaultdict_in_spec, "tree spec holds type 'collections.defaultdict'"),
        (python_callable_in_graph, "higher-order operator 'wrap' is not allowed"),
        (dunder_operator, "operator name 'torch.__builtins__.exec' reaches Python internals"),
        (pickled_weight_payload_name, "invalid path_name '../sample_inputs/model.pt'"),
        (use_pickle_string, "'lin.weight' is marked use_pickle"),
        (expression_as_list, "list where a string belongs"),
        (lambda m: m.update({"data/aotinductor/model/model.so": b"\x7fELF"}), "AOTInductor package"),
        (lambda m: m.update({"data/constants/custom_obj_0": b""}), "custom_obj_0.*script-object constant"),
        (lambda m: m.update({"data/mtia/model.bin": b""}), "data/mtia/model.bin.*not a member"),
        (lambda m: m.pop(PROGRAM), "has no 'models/model.json'"),
    ],
)
def test_tampered_programs_are_refused(
    tmp_path: Path, genuine: Path, edit: Callable[[Members], None], message: str
) -> None:
    path = rewrite(genuine, tmp_path / "tampered.pt2", edit)
    with pytest.raises(ModelLoadError, match=message):
        load_module(ModelSpec(name="cam", source=f"export:{path}"))


def test_extra_files_are_dropped_not_refused(tmp_path: Path, genuine: Path) -> None:
    path = rewrite(genuine, tmp_path / "extra.pt2", lambda m: m.update({"extra/notes.txt": b"hello"}))
    module = load_module(ModelSpec(source=f"export:{path}"))
    with torch.inference_mode():
        torch.testing.assert_close(module(TINY_X), tiny()(TINY_X))


@pytest.mark.parametrize("scheme", ["export", "torchscript"])
@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda root, data: [("x", data[: len(data) // 2])], "not a readable zip archive"),
        (lambda root, data: [(f"{root}/../../escape", b"")], r"'[^']*/\.\./\.\./escape'.*unsafe member name"),
        (lambda root, data: [("/etc/cron.d/x", b"")], "unsafe member name .absolute path"),
        (lambda root, data: [(f"{root}/a\\b", b"")], "unsafe member name .backslash"),
        (lambda root, data: [(f"{root}/byteorder", b"big")], "two members have this name"),
        (lambda root, data: [("other/x", b"")], "2 top-level folders"),
    ],
)
def test_damaged_or_malicious_zips_are_refused(
    tmp_path: Path, genuine: Path, scheme: str, damage: Callable[[str, bytes], list[tuple[str, bytes]]], message: str
) -> None:
    if scheme == "torchscript":
        source = tmp_path / "m.pt"
        torch.jit.save(torch.jit.trace(tiny(), TINY_X), str(source))
    else:
        source = genuine
    root, members = members_of(source)
    entries = [(f"{root}/{rel}", data) for rel, data in members.items()]
    extra = damage(root, source.read_bytes())
    path = tmp_path / "damaged.bin"
    if extra[0][0] == "x":  # truncated: the damaged bytes are the file
        path.write_bytes(extra[0][1])
    else:
        write_zip(path, entries + extra)
    with pytest.raises(ModelLoadError, match=message):
        load_module(ModelSpec(name="cam", source=f"{scheme}:{path}"))


class WritesOnLoad(nn.Module):
    """TorchScript whose __setstate__, which torch.jit.load runs, writes a file with torch.save."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.w = torch.ones(3)
        self.path = path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.w

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, str, bool]:
        return (self.w, self.path, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, str, bool]) -> None:
        self.w, self.path, self.training = state
        torch.save(self.w, self.path)


class WritesOnCall(nn.Module):
    """TorchScript that writes a file (any path, e.g. a .pth file that Python runs at start-up) on every call."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch.save(x, self.path)
        return x


@pytest.mark.parametrize(("cls", "message"), [(WritesOnLoad, "defines __setstate__"), (WritesOnCall, "torch.save")])
def test_torchscript_that_runs_on_load_or_writes_files_is_refused(
    tmp_path: Path, cls: Callable[[str], nn.Module], message: str
) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "m.pt"
    torch.jit.save(torch.jit.script(cls(str(marker))), str(path))
    assert not marker.exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.load(str(path))(torch.ones(3))  # plain torch: the marker is written on load or on call
    assert marker.exists()
    marker.unlink()
    with pytest.raises(ModelLoadError, match=f"model 'cam': refusing member .*code/.*{message}"):
        load_module(ModelSpec(name="cam", source=f"torchscript:{path}"))
    assert not marker.exists()


def test_torchscript_pickles_cannot_name_python_callables(tmp_path: Path) -> None:
    """torch.jit.load's unpickler resolves TorchScript types only: a pickled callable is an error, not a call."""
    marker = tmp_path / "marker"
    path = tmp_path / "m.pt"
    torch.jit.save(torch.jit.trace(tiny(), TINY_X), str(path))
    evil = pickle.dumps(RunsCode(marker), 2)  # TorchScript archives use protocol 2
    crafted = rewrite(path, tmp_path / "crafted.pt", lambda m: m.update({"data.pkl": evil}))
    with pytest.raises(ModelLoadError, match=r"Unknown type name '__builtin__\.exec'"):
        load_module(ModelSpec(name="cam", source=f"torchscript:{crafted}"))
    assert not marker.exists()
