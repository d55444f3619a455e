"""Build a model's torch module from its spec, without unpickling arbitrary objects.

Model files are untrusted input. ``torch.export.load`` and ``torch.jit.load``
are not safe loaders on their own (torch 2.13):

* ``torch.export.load`` unpickles archive members with full ``pickle``:
  weights and tensor constants marked ``use_pickle`` (``torch.load(...,
  weights_only=False)``), ``opaque_obj_*`` constants (``pickle.loads``, whatever
  their ``use_pickle`` flag says), ``custom_obj_*`` constants (TorchScript's
  unpickler), and the example inputs ``data/sample_inputs/<model>.pt``, the
  legacy ``data/weights/<model>.pt`` / ``data/constants/<model>.pt`` members
  and every member of the pre-2.7 layout through ``deserialize_torch_artifact``,
  which retries with ``weights_only=False`` when the safe load fails. It also
  ``dlopen``s AOTInductor libraries under ``data/aotinductor/``, evaluates the
  program's symbolic shape strings with ``sympy.sympify`` (that is, ``eval``),
  imports any module named by an ``__enum__`` or ``defaultdict`` entry of a
  pytree spec, and ``exec``s the program's ``guards_code`` when ``.module()``
  is built with example inputs.
* ``torch.jit.load`` unpickles with TorchScript's restricted C++ unpickler (it
  resolves only TorchScript classes, so a pickled Python callable is an
  error), but it compiles and runs the archive's TorchScript code: a class's
  ``__setstate__`` runs during the load, and TorchScript can call
  ``torch.save`` (writes any file) and ``torch.from_file`` (reads one).

So an archive is read once with :mod:`zipfile` and checked member by member;
only the members that pass are copied into a fresh archive in an anonymous
temporary file, and torch loads that copy, never the original (torch's zip
reader could otherwise disagree with :mod:`zipfile` about a malformed file).
A ``torch.export`` archive loses its example inputs (never unpickled; they
are only used to build input guards) and its ``guards_code`` on the way;
everything else that torch would unpickle, import, ``eval`` or ``dlopen`` is
refused with a :class:`ModelLoadError` that names the member. The loaded graph
may call only operators, not arbitrary Python functions, and no operator that
reads or writes files. State dicts load with ``torch.load(weights_only=True)``.

TorchScript is code: a TorchScript model runs its own TorchScript at
inference. Refused here: ``__setstate__`` (code at load time) and file access.
"""

from __future__ import annotations

import _compat_pickle
import ast
import builtins
import contextlib
import io
import json
import math
import operator
import os
import pickletools
import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Collection, Iterator
from functools import cache
from typing import IO, Any

import torch
from torch import nn

from streamgpu.errors import ModelLoadError, NotRegularFileError
from streamgpu.files import open_regular
from streamgpu.models.builtin import build_builtin, builtin_with_weights
from streamgpu.models.spec import ModelSpec

__all__ = ["ModelLoadError", "load_module", "read_state_dict"]


def load_module(spec: ModelSpec) -> nn.Module:
    """The spec's model on the CPU in fp32 eval mode. Blocking: call off the event loop.

    See the module docstring for what is checked before torch sees a file.
    """
    scheme, _, target = spec.source.partition(":")
    with load_errors(spec):
        if scheme == "builtin":
            return build_builtin(target)
        with _source_file(spec) as f:
            if scheme == "torchscript":
                module: nn.Module = _load_torchscript(_Refuser(spec.name, target), f)
            elif scheme == "export":
                module = _load_export(_Refuser(spec.name, target), f)
            elif scheme == "state_dict":
                module = builtin_with_weights(spec.arch, _state_dict(spec, f))
            else:
                raise ModelLoadError(f"model {spec.name!r}: unknown source scheme {scheme!r}")
    if scheme != "export":  # exported programs reject .eval(); they are traced in inference form
        module.eval()
    return module


def read_state_dict(spec: ModelSpec) -> dict[str, Any]:
    """The entries of a ``state_dict:`` source's file (``torch.load(weights_only=True)``), not built into a
    module: a serving model of its architecture takes them in place (``streamgpu.models.weights``, whose reader
    process calls this). Blocking."""
    with load_errors(spec), _source_file(spec) as f:
        # A zip archive (torch.save's format) mapped rather than read into memory: its values are then copied once,
        # where they go (a ResNet-50's in-place swap in 0.11 s instead of 0.17-0.18 s, H200; no second copy in
        # memory). Mapped by its descriptor: the file opened and checked is the one mapped. (Cut short while mapped,
        # it ends the reading process with SIGBUS: the server's swap fails saying so, and its next read starts
        # another.)
        by_descriptor = f"/proc/self/fd/{f.fileno()}"
        mapped = _mappable(f) and os.path.exists(by_descriptor)
        f.seek(0)
        return _state_dict(spec, by_descriptor if mapped else f, mmap=mapped)


@contextlib.contextmanager
def load_errors(spec: ModelSpec) -> Iterator[None]:
    """torch raises many types for a bad file: a ``ModelLoadError`` that says which model and file."""
    try:
        yield
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"model {spec.name!r}: cannot load {spec.source!r}: {exc}") from exc


def _source_file(spec: ModelSpec) -> IO[bytes]:
    """The source's file, opened once and checked to be a regular file on the descriptor."""
    if (why := spec.source_file_problem()) is not None:
        raise ModelLoadError(f"model {spec.name!r}: {why}")
    target = spec.source.partition(":")[2]
    try:
        return open_regular(target)
    except NotRegularFileError:  # (a FIFO swapped in after source_file_problem looked)
        raise ModelLoadError(f"model {spec.name!r}: source file {target!r} is not a regular file") from None


def _state_dict(spec: ModelSpec, f: IO[bytes] | str, mmap: bool = False) -> dict[str, Any]:
    try:
        state = torch.load(f, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # (an empty file said only "cannot load '...': ", a text file "cannot load '...': 101")
        raise ModelLoadError(
            f"model {spec.name!r}: cannot load {spec.source!r}: it is no file of tensors torch.load reads (empty, "
            f"truncated, of another format, or holding other objects: save a module's state_dict() with torch.save): "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(state, dict):
        raise ModelLoadError(f"model {spec.name!r}: {spec.source.partition(':')[2]!r} holds a "
                             f"{type(state).__name__}, not a state dict")  # fmt: skip
    return state


def _mappable(f: IO[bytes]) -> bool:
    """Whether torch may map ``f``'s values: a zip archive by torch's own test (its first bytes: a legacy file that
    ends in bytes that read as a zip's end is no zip to torch, which refuses to map it), whose members are all
    stored as they are, as torch.save writes them (torch maps a compressed member's compressed bytes as its values,
    without a word: an archive repacked with compression is read, and its members decompressed, as before)."""
    if f.read(4) != b"PK\x03\x04":
        return False
    try:
        with zipfile.ZipFile(f) as archive:
            return all(info.compress_type == zipfile.ZIP_STORED for info in archive.infolist())
    except (zipfile.BadZipFile, EOFError, OSError, ValueError):  # (torch's reader then says what is wrong)
        return False


class _Refuser:
    """Builds the errors for one model file: which model, which file, which member, why, what to do."""

    def __init__(self, model: str, path: str) -> None:
        self.model = model
        self.path = path

    def __call__(self, why: str, member: str | None = None, fix: str = "") -> ModelLoadError:
        where = f"member {member!r} of {self.path!r}" if member is not None else repr(self.path)
        fix = fix or PICKLE_FIX
        return ModelLoadError(f"model {self.model!r}: refusing {where}: {why}. {fix}")


PICKLE_FIX = (
    "Model files load without running anything they contain; re-export the model with plain "
    "tensors only (no tensor subclasses, script objects or opaque objects) using a current "
    "torch.export.save"
)
ARCHIVE_FIX = "Re-create the file with torch.export.save / torch.jit.save; it is not a usable model archive"
PROGRAM_FIX = (
    "The program is not as torch.export.save writes it: it would make torch run code while loading or "
    "call something other than a torch operator; re-export the model with torch.export.save"
)

# --------------------------------------------------------------------------- zip archives

MAX_MEMBERS = 200_000
MAX_JSON_BYTES = 512 * 1024 * 1024


class _Archive:
    """A zip file read once: every member name checked, one top-level folder, names relative to it."""

    def __init__(self, refuse: _Refuser, file: IO[bytes], legacy: Collection[str] = ()) -> None:
        """``legacy``: top-level member names of an older format, refused as such."""
        self.refuse = refuse
        try:
            self.zip = zipfile.ZipFile(file)
            infos = self.zip.infolist()
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError) as exc:
            why = f"it is not a readable zip archive (truncated or not a model file: {exc})"
            raise refuse(why, fix=ARCHIVE_FIX) from exc
        if len(infos) > MAX_MEMBERS:
            raise refuse(f"it has {len(infos)} members, more than {MAX_MEMBERS}", fix=ARCHIVE_FIX)
        self.members: dict[str, zipfile.ZipInfo] = {}
        roots = set()
        for info in infos:
            name = info.filename
            problem = _member_name_problem(name)
            if problem:
                raise refuse(f"unsafe member name ({problem})", name, fix=ARCHIVE_FIX)
            if info.flag_bits & 0x1:
                raise refuse("the member is encrypted", name, fix=ARCHIVE_FIX)
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise refuse(f"unsupported compression method {info.compress_type}", name, fix=ARCHIVE_FIX)
            root, _, rel = name.partition("/")
            roots.add(root)
            if name.endswith("/"):  # a folder entry: carries nothing
                continue
            if not rel and name in legacy:
                raise refuse(LEGACY_EXPORT_WHY, name)
            if not rel:
                raise refuse("a member outside the archive's top-level folder", name, fix=ARCHIVE_FIX)
            if rel in self.members:
                # zip readers disagree about which of two same-named members counts: refuse the ambiguity
                raise refuse("two members have this name", name, fix=ARCHIVE_FIX)
            self.members[rel] = info
        if len(roots) != 1:
            raise refuse(f"members lie under {len(roots)} top-level folders, not one", fix=ARCHIVE_FIX)
        self.root = roots.pop()

    def name(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def read(self, rel: str, limit: int = MAX_JSON_BYTES) -> bytes:
        info = self.members[rel]
        if info.file_size > limit:
            raise self.refuse(f"{info.file_size} bytes is too large for this kind of member", self.name(rel))
        try:
            return self.zip.read(info)
        except (zipfile.BadZipFile, EOFError, OSError, ValueError, RuntimeError) as exc:
            raise self.refuse(f"cannot read the member ({exc})", self.name(rel), fix=ARCHIVE_FIX) from exc

    def read_json(self, rel: str) -> Any:
        try:
            return json.loads(self.read(rel))
        except (ValueError, RecursionError) as exc:
            raise self.refuse(f"invalid JSON ({exc})", self.name(rel), fix=ARCHIVE_FIX) from exc

    def copy(self, rel: str, out: zipfile.ZipFile) -> None:
        info = self.members[rel]
        try:
            with self.zip.open(info) as src, out.open(f"archive/{rel}", "w", force_zip64=True) as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (zipfile.BadZipFile, EOFError, ValueError, RuntimeError) as exc:
            raise self.refuse(f"cannot read the member ({exc})", self.name(rel), fix=ARCHIVE_FIX) from exc


def _member_name_problem(name: str) -> str:
    if not name:
        return "empty"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        return "control character"
    if "\\" in name:
        return "backslash"
    if name.startswith("/") or ":" in name.partition("/")[0]:
        return "absolute path"
    parts = name.rstrip("/").split("/")
    if any(part in ("", ".", "..") for part in parts):
        return "empty, '.' or '..' path component"
    return ""


def _repacked(archive: _Archive, plan: dict[str, bytes | None]) -> IO[bytes]:
    """An anonymous temporary zip with the planned members under ``archive/``: bytes as given, None to copy."""
    tmp = tempfile.TemporaryFile()  # noqa: SIM115 - handed to the caller, who closes it
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as out:
            for rel, data in plan.items():
                if data is None:
                    archive.copy(rel, out)
                else:
                    out.writestr(f"archive/{rel}", data)
        tmp.seek(0)
    except BaseException:
        tmp.close()
        raise
    return tmp


# --------------------------------------------------------------------------- torch.export archives

# Archive layout of torch.export.save (torch/export/pt2_archive/constants.py), for the one program "model".
EXPORT_METADATA = ("archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id")
PROGRAM = "models/model.json"
WEIGHTS_CONFIG = "data/weights/model_weights_config.json"
CONSTANTS_CONFIG = "data/constants/model_constants_config.json"
SAMPLE_INPUTS = "data/sample_inputs/model.pt"
LEGACY_EXPORT_WHY = (
    "this is the pre-2.7 torch.export layout, whose state dict, constants and example inputs are pickles "
    "that torch unpickles with weights_only=False when the safe load fails"
)
LEGACY_EXPORT_MEMBERS = {
    "version",
    "serialized_exported_program.json",
    "serialized_state_dict.pt",
    "serialized_state_dict.json",
    "serialized_constants.pt",
    "serialized_constants.json",
    "serialized_example_inputs.pt",
}


def _load_export(refuse: _Refuser, f: IO[bytes]) -> nn.Module:
    archive = _Archive(refuse, f, LEGACY_EXPORT_MEMBERS)
    plan = _plan_export(archive)
    with _repacked(archive, plan) as clean:
        program = torch.export.load(clean)
    _check_graph_ops(refuse, archive.name(PROGRAM), program)
    return program.module()


def _plan_export(archive: _Archive) -> dict[str, bytes | None]:
    """Which members the clean copy gets (None: copied as is); raises for anything that would run."""
    refuse, members = archive.refuse, archive.members
    for rel in ("archive_format", PROGRAM, WEIGHTS_CONFIG, CONSTANTS_CONFIG):
        if rel not in members:
            raise refuse(f"the archive has no {rel!r}: not a torch.export archive", fix=ARCHIVE_FIX)
    if archive.read("archive_format", 64).strip() != b"pt2":
        raise refuse(
            "not a torch.export archive ('archive_format' is not 'pt2')",
            archive.name("archive_format"),
            fix=ARCHIVE_FIX,
        )

    plan: dict[str, bytes | None] = {rel: None for rel in EXPORT_METADATA if rel in members}
    plan[WEIGHTS_CONFIG] = _payload_config(archive, WEIGHTS_CONFIG, "data/weights/", "weight_", plan)
    plan[CONSTANTS_CONFIG] = _payload_config(archive, CONSTANTS_CONFIG, "data/constants/", "tensor_", plan)
    program = archive.read_json(PROGRAM)
    _check_program(archive, program)
    plan[PROGRAM] = json.dumps(program).encode()
    # torch.export.load reads this member unconditionally; empty means "no example inputs"
    plan[SAMPLE_INPUTS] = b""
    if SAMPLE_INPUTS in members:
        _check_sample_inputs(archive, SAMPLE_INPUTS)

    for rel in sorted(members):
        if rel in plan or rel.startswith("extra/"):  # extra files: plain text torch hands back; not needed
            continue
        if rel.startswith("data/aotinductor/"):
            raise refuse(
                "an AOTInductor package holds compiled native libraries that torch would load and run",
                archive.name(rel),
                fix="Serve the exported program (torch.export.save), not an AOTInductor package",
            )
        if rel.startswith(("data/weights/", "data/constants/")):
            raise refuse(_payload_problem(rel), archive.name(rel))
        raise refuse("not a member of a torch.export archive that this server loads", archive.name(rel))
    return plan


def _payload_problem(rel: str) -> str:
    base = rel.rpartition("/")[2]
    if base.startswith("opaque_obj_"):
        return "an opaque-object constant, which torch unpickles with pickle.loads"
    if base.startswith("custom_obj_"):
        return "a script-object constant, which torch unpickles with TorchScript's unpickler"
    if base.endswith(".pt"):
        return "a legacy pickled state dict or constants file, which torch unpickles"
    return "a payload that the weights/constants config does not declare as a plain tensor"


PAYLOAD_NAME = re.compile(r"[A-Za-z_]+[0-9]+")


def _payload_config(
    archive: _Archive, rel: str, folder: str, tensor_prefix: str, plan: dict[str, bytes | None]
) -> bytes:
    """Check a weights/constants config: every entry a plain tensor stored raw; plan its payloads."""
    refuse, name = archive.refuse, archive.name(rel)
    config = archive.read_json(rel)
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise refuse("no 'config' mapping", name, fix=ARCHIVE_FIX)
    for fqn, meta in entries.items():
        if not isinstance(meta, dict):
            raise refuse(f"entry {fqn!r} is not a mapping", name, fix=ARCHIVE_FIX)
        path_name = meta.get("path_name")
        if not isinstance(path_name, str) or not PAYLOAD_NAME.fullmatch(path_name):
            raise refuse(f"entry {fqn!r} has an invalid path_name {path_name!r}", name, fix=ARCHIVE_FIX)
        payload = folder + path_name
        if meta.get("use_pickle") is not False:
            raise refuse(
                f"entry {fqn!r} is marked use_pickle, so torch would unpickle {payload!r} with "
                "torch.load(weights_only=False) (torch.export.save pickles tensor subclasses)",
                name,
            )
        if not path_name.startswith(tensor_prefix):
            # torch picks the loader by prefix, not by use_pickle: opaque_obj_* goes to pickle.loads
            raise refuse(f"entry {fqn!r} points at {payload!r}: {_payload_problem(payload)}", name)
        if not isinstance(meta.get("tensor_meta"), dict):
            raise refuse(f"entry {fqn!r} has no tensor_meta", name, fix=ARCHIVE_FIX)
        if payload not in archive.members:
            raise refuse(f"entry {fqn!r} points at {payload!r}, which is missing", name, fix=ARCHIVE_FIX)
        plan[payload] = None
    _check_json_strings(archive, rel, config)
    return json.dumps(config).encode()


# Pickle globals an example-input pickle may name: those torch.load(weights_only=True) allows.
def _allowed_pickle_globals() -> set[str]:
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        return set(_get_allowed_globals())
    except Exception:  # private API moved: tensors only
        return {"torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_parameter", "collections.OrderedDict"}


STORAGE_GLOBAL = re.compile(r"torch\.(cuda\.)?[A-Za-z0-9]*Storage")


def _check_sample_inputs(archive: _Archive, rel: str) -> None:
    """The example inputs are never unpickled; refuse the file anyway when they name non-tensor callables.

    Only a tampered archive has such example inputs, so the file is not trusted for the rest.
    """
    refuse, name = archive.refuse, archive.name(rel)
    data = archive.read(rel)
    if not data:
        return
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as inner:
            pickles = [inner.read(n) for n in inner.namelist() if n.endswith(".pkl")]
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError, RuntimeError) as exc:
        raise refuse(f"the example inputs are not a torch.save archive ({exc})", name) from exc
    if not pickles:
        raise refuse("the example inputs hold no pickle", name, fix=ARCHIVE_FIX)
    allowed = _allowed_pickle_globals()
    try:
        found_globals = [found for blob in pickles for found in _pickle_globals(blob)]
    except ValueError as exc:
        raise refuse(f"the example inputs are not a readable pickle ({exc})", name) from exc
    for found in found_globals:
        if found not in allowed and not STORAGE_GLOBAL.fullmatch(found):
            raise refuse(
                f"the example inputs pickle names {found!r}, which runs code when unpickled "
                "(torch.export.load unpickles example inputs with weights_only=False when the safe load fails)",
                name,
            )


STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}


def _pickle_globals(blob: bytes) -> Iterator[str]:
    """The globals a pickle names, read from its opcodes without running it; '?' when one is not a literal."""
    recent: list[str] = []
    try:
        for op, arg, _ in pickletools.genops(blob):
            if op.name in ("GLOBAL", "INST"):
                module, _, qualname = str(arg).partition(" ")
                yield _py3_global(module, qualname)
            elif op.name == "STACK_GLOBAL":
                yield _py3_global(*recent[-2:]) if len(recent) >= 2 else "?"
                recent.clear()
            elif op.name in STRING_OPS:
                recent.append(str(arg))
            elif op.name != "MEMOIZE":
                recent.clear()
            if op.name == "STOP":
                return
    except Exception as exc:  # malformed: nothing sane names its globals that way
        raise ValueError(f"unreadable pickle: {exc}") from exc


def _py3_global(module: str, qualname: str) -> str:
    """As pickle resolves it: protocol 2 writes Python 2 names (``__builtin__.exec``)."""
    module, qualname = _compat_pickle.NAME_MAPPING.get((module, qualname), (module, qualname))
    return f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{qualname}"


# Higher-order operators a served program may use: control flow and subgraph wrappers. Others
# (wrap, flat_apply, invoke_leaf_function, call_torchbind, aoti/executorch delegates, ...) call
# arbitrary callables, script objects or native code.
ALLOWED_HOPS = frozenset(
    {
        "cond",
        "while_loop",
        "while_loop_stack_output",
        "map_impl",
        "scan",
        "associative_scan",
        "invoke_subgraph",
        "wrap_with_set_grad_enabled",
        "wrap_with_autocast",
        "auto_functionalized",
        "auto_functionalized_v2",
        "with_effects",
        "out_dtype",
        "flex_attention",
        "hints_wrapper",
        "_export_tracepoint",
    }
)
BUILTIN_OPS = frozenset(
    {
        operator.getitem, operator.add, operator.mul, operator.sub, operator.truediv, operator.floordiv,
        operator.mod, operator.pow, operator.neg, operator.pos, operator.abs, operator.eq, operator.ne,
        operator.le, operator.ge, operator.lt, operator.gt, operator.and_, operator.or_, operator.not_,
        operator.lshift, operator.rshift, math.ceil, math.floor, math.trunc, round,
        torch.sym_not, torch.sym_int, torch.sym_float, torch.sym_ite, torch.sym_max, torch.sym_min, torch.sym_sqrt,
    }
)  # fmt: skip
FILE_OPS = frozenset({"aten::save", "aten::from_file", "debugprims::load_tensor"})
FILE_ARGUMENTS = frozenset({"filename", "file", "file_name", "filepath", "path", "dirname", "directory"})


def _file_op(name: str, argument_names: list[str]) -> bool:
    return name in FILE_OPS or bool(FILE_ARGUMENTS.intersection(argument_names))


def _op_problem(target: object) -> str:
    """Why a graph may not call or hold this callable ('' when it may)."""
    if isinstance(target, torch._ops.OpOverload):
        schema = target._schema
        if _file_op(schema.name, [a.name for a in schema.arguments]):
            return f"operator {schema.name} reads or writes files"
        return ""
    if isinstance(target, torch._ops.HigherOrderOperator):
        return "" if target.name() in ALLOWED_HOPS else f"higher-order operator {target.name()!r} is not allowed"
    try:
        if target in BUILTIN_OPS:
            return ""
    except TypeError:  # unhashable
        pass
    return f"{target!r} is not an operator"


def _check_graph_ops(refuse: _Refuser, member: str, program: torch.export.ExportedProgram) -> None:
    """Every call in every (sub)graph goes to an operator, never to another Python callable."""
    for owner in program.graph_module.modules():
        if not isinstance(owner, torch.fx.GraphModule):
            continue
        for node in owner.graph.nodes:
            if node.op in ("placeholder", "output", "get_attr"):
                values: list[Any] = []
            elif node.op == "call_function":
                values = [node.target]
            else:
                why = f"graph node {node.name!r} is a {node.op}, which an exported program never has"
                raise refuse(why, member, fix=PROGRAM_FIX)
            values += [v for v in torch.utils._pytree.tree_leaves((node.args, node.kwargs)) if callable(v)]
            for value in values:
                if isinstance(value, torch.fx.Node):
                    continue
                problem = _op_problem(value)
                if problem:
                    raise refuse(f"graph node {node.name!r}: {problem}", member, fix=PROGRAM_FIX)


# Operator names as torch.export serializes them; resolved by getattr on torch / operator / math.
IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
OPERATOR_NAME = re.compile(rf"(torch|_operator|math)(\.{IDENT})+")
DUNDER = re.compile(r"__\w*__")


def _operator_name_problem(target: str) -> str:
    if not OPERATOR_NAME.fullmatch(target):
        return f"operator name {target!r} is not a torch operator"
    parts = target.split(".")
    for i, part in enumerate(parts):
        # only an aten-style op name may be a dunder: torch.ops.aten.__and__.Tensor
        if DUNDER.fullmatch(part) and not (parts[:2] == ["torch", "ops"] and i == 3 and len(parts) == 5):
            return f"operator name {target!r} reaches Python internals"
    return ""


def _check_program(archive: _Archive, program: Any) -> None:
    if not isinstance(program, dict) or not isinstance(program.get("graph_module"), dict):
        raise archive.refuse("not a serialized exported program", archive.name(PROGRAM), fix=ARCHIVE_FIX)
    # Python source that .module() would exec (only with example inputs, which are dropped): drop it too
    program["guards_code"] = []
    _check_json_strings(archive, PROGRAM, program)


def _check_json_strings(archive: _Archive, rel: str, doc: Any) -> None:
    """Refuse the strings of a program/config JSON that torch would eval, import or resolve to callables."""
    refuse, name = archive.refuse, archive.name(rel)
    stack = [doc]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
            continue
        if not isinstance(item, dict):
            continue
        for key, value in item.items():
            checker = STRING_CHECKS.get(key)
            if key == "target" and "inputs" not in item:  # "target" is checked in graph nodes
                checker = None
            if checker is not None:
                problem = checker(value) if isinstance(value, str) else f"{type(value).__name__} where a string belongs"
                if problem:
                    raise refuse(f"{problem} (in {key!r})", name, fix=PROGRAM_FIX)
            elif isinstance(value, (dict, list)):
                stack.append(value)


def _source_fn_stack_problem(value: str) -> str:
    """``"name,target;..."``: torch resolves targets under torch/_operator/math by getattr."""
    for entry in value.split(";"):
        target = entry.rpartition(",")[2]
        if target.startswith(("torch", "_operator", "math")):
            problem = _operator_name_problem(target)
            if problem:
                return problem
    return ""


# -- symbolic shapes: torch parses them with sympy.sympify, i.e. Python eval; allow sympy srepr only

SYMPY_CALLS = frozenset(
    {
        "Symbol", "Integer", "Float", "Rational", "Add", "Mul", "Pow", "Mod", "Max", "Min", "Abs",
        "floor", "ceiling", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "Equality", "Unequality", "StrictLessThan",
        "StrictGreaterThan", "LessThan", "GreaterThan", "And", "Or", "Not", "Piecewise", "ExprCondPair",
        "sqrt", "log", "exp", "sin", "cos", "tan", "asin", "acos", "atan", "sinh", "cosh", "tanh",
    }
)  # fmt: skip
SYMPY_CONSTANTS = frozenset({"oo", "zoo", "nan", "true", "false", "pi", "E"})
POW_CALLS = frozenset({"Pow", "PowByNatural", "FloatPow"})
SYMBOL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
FLOAT_LITERAL = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)(e[+-]?\d+)?|[+-]?inf|nan", re.IGNORECASE)
SYMPY_SYNTAX = (
    ast.Expression, ast.Call, ast.Name, ast.Load, ast.Constant, ast.keyword, ast.BinOp, ast.UnaryOp,
    ast.Compare, ast.BoolOp, ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow,
    ast.USub, ast.UAdd, ast.Not, ast.And, ast.Or, ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE,
)  # fmt: skip
MAX_EXPR_CHARS = 100_000
MAX_INT = 2**63
MAX_EXPONENT = 64


@cache
def _sympy_namespace() -> frozenset[str]:
    import sympy

    return frozenset(getattr(sympy, "__all__", dir(sympy))) | frozenset(dir(builtins))


def _sympy_expr_problem(text: str) -> str:
    """'' when ``text`` is a sympy expression that sympify can evaluate without running anything else."""
    bad = f"symbolic expression {text[:80]!r}"
    if len(text) > MAX_EXPR_CHARS:
        return f"{bad} is too long"
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return f"{bad} is not an expression"
    namespace = _sympy_namespace()
    string_ok: set[int] = set()  # ids of the string constants allowed where they are
    for node in ast.walk(tree):
        if not isinstance(node, SYMPY_SYNTAX):
            return f"{bad} uses {type(node).__name__}, which is not sympy syntax"
        if isinstance(node, ast.Name):
            name = node.id
            # sympify resolves names in sympy's namespace and the builtins (eval, open, __import__, ...);
            # other names become plain symbols
            if name not in SYMPY_CALLS and name not in SYMPY_CONSTANTS and (name in namespace or "__" in name):
                return f"{bad} names {name!r}"
        elif isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name):
                return f"{bad} calls something other than a sympy function"
            func = node.func.id
            if func in ("Symbol", "Float") and node.args and isinstance(node.args[0], ast.Constant):
                literal = node.args[0].value
                pattern = SYMBOL_NAME if func == "Symbol" else FLOAT_LITERAL
                if isinstance(literal, str) and pattern.fullmatch(literal):
                    string_ok.add(id(node.args[0]))
            if any(k.arg is None or not isinstance(k.value, ast.Constant) for k in node.keywords):
                return f"{bad} passes computed keyword arguments"
            if func in POW_CALLS and len(node.args) == 2 and not _power_ok(node.args[0], node.args[1]):
                return f"{bad} raises a number to a large power"
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow) and not _power_ok(node.left, node.right):
            return f"{bad} raises a number to a large power"
        elif isinstance(node, ast.Constant):
            value = node.value
            if isinstance(value, str):
                # a string anywhere else goes through sympify again: eval
                if id(node) not in string_ok:
                    return f"{bad} holds a string where sympy would parse it"
            elif isinstance(value, bool) or value is None:
                pass
            elif isinstance(value, int):
                if abs(value) > MAX_INT:
                    return f"{bad} holds a huge integer"
            elif not isinstance(value, float):
                return f"{bad} holds a {type(value).__name__}"
    return ""


def _power_ok(base: ast.expr, exponent: ast.expr) -> bool:
    """sympy evaluates powers of numbers eagerly (``Pow(10, 10**9)`` hangs the load): keep those small."""
    if _has_symbol(exponent):
        return True
    return _small_numbers(exponent, MAX_EXPONENT) and (_has_symbol(base) or _small_numbers(base, 2**16, plain=True))


def _has_symbol(node: ast.expr) -> bool:
    return any(
        isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "Symbol" for n in ast.walk(node)
    )


def _small_numbers(node: ast.expr, limit: int, plain: bool = False) -> bool:
    """Only numeric literals of at most ``limit`` (``plain``: one literal, maybe wrapped in Integer/Float/-)."""
    for n in ast.walk(node):
        if isinstance(n, ast.Constant) and isinstance(n.value, (int, float)) and abs(n.value) > limit:
            return False
        if isinstance(n, ast.Constant) and isinstance(n.value, str):
            try:
                if abs(float(n.value)) > limit:
                    return False
            except ValueError:
                return False
        if (
            plain
            and isinstance(n, ast.Call)
            and not (isinstance(n.func, ast.Name) and n.func.id in ("Integer", "Float"))
        ):
            return False
    return True


# -- pytree specs: treespec_loads imports modules for enums and defaultdict factories

TREESPEC_TYPES = frozenset(
    {
        None,
        "builtins.tuple",
        "builtins.list",
        "builtins.dict",
        "collections.OrderedDict",
        "collections.namedtuple",  # resolved in torch's registry of registered namedtuples, not imported
        "torch.fx.immutable_collections.immutable_list",
        "torch.fx.immutable_collections.immutable_dict",
    }
)


def _treespec_problem(text: str) -> str:
    def no_enums(obj: dict[str, Any]) -> dict[str, Any]:
        if "__enum__" in obj:
            raise ValueError(f"an enum ({obj.get('fqn')!r}), which torch would import")
        return obj

    try:
        stack = [json.loads(text, object_hook=no_enums)[1]]
        while stack:
            spec = stack.pop()
            if not isinstance(spec, dict):
                raise ValueError("not a tree spec")
            if spec.get("type") not in TREESPEC_TYPES:
                raise ValueError(f"type {spec.get('type')!r} is not a tuple, list or dict")
            context = spec.get("context")
            if isinstance(context, str):
                json.loads(context, object_hook=no_enums)
            children = spec.get("children_spec", [])
            if not isinstance(children, list):
                raise ValueError("not a tree spec")
            stack.extend(children)
    except (ValueError, TypeError, IndexError, KeyError, RecursionError) as exc:
        return f"input/output tree spec holds {exc}"
    return ""


# JSON keys whose string torch evaluates (sympify), imports from (treespec_loads) or resolves by getattr
STRING_CHECKS: dict[str, Callable[[str], str]] = {
    "expr_str": _sympy_expr_problem,
    "target": _operator_name_problem,
    "as_operator": _operator_name_problem,
    "in_spec": _treespec_problem,
    "out_spec": _treespec_problem,
    "source_fn_stack": _source_fn_stack_problem,
}


# --------------------------------------------------------------------------- TorchScript archives

TS_LOAD_CODE = re.compile(r"__setstate__")
TS_FILE_CALL = re.compile(r"(?:torch|ops\.[A-Za-z_]\w*)\.(?:save|from_file|load_tensor)\b")
TS_FIX = (
    "A TorchScript file is code; this server refuses TorchScript that runs while loading or touches files. "
    "Re-save without a custom __setstate__ and without file access, or serve a torch.export archive"
)


def _load_torchscript(refuse: _Refuser, f: IO[bytes]) -> nn.Module:
    archive = _Archive(refuse, f)
    if "model.json" in archive.members:
        raise refuse("the pre-1.4 TorchScript layout is not supported", archive.name("model.json"), fix=TS_FIX)
    for rel in archive.members:
        if rel.endswith(".py"):
            _check_torchscript_code(archive, rel)
    with _repacked(archive, dict.fromkeys(archive.members)) as clean:
        module = torch.jit.load(clean, map_location="cpu")
    _check_torchscript_graphs(refuse, module)
    return module


def _check_torchscript_code(archive: _Archive, rel: str) -> None:
    refuse, name = archive.refuse, archive.name(rel)
    try:
        text = archive.read(rel).decode("ascii")
    except UnicodeDecodeError:
        raise refuse("TorchScript code that is not ASCII", name, fix=TS_FIX) from None
    squeezed = re.sub(r"[\s\\]", "", text)  # no line continuation or spacing can hide a name
    if TS_LOAD_CODE.search(squeezed):
        raise refuse("it defines __setstate__, TorchScript that torch.jit.load runs while loading", name, fix=TS_FIX)
    found = TS_FILE_CALL.search(squeezed)
    if found:
        raise refuse(f"it calls {found.group()}, which reads or writes files", name, fix=TS_FIX)


def _check_torchscript_graphs(refuse: _Refuser, module: torch.jit.ScriptModule) -> None:
    """No method (with everything it calls inlined) uses an operator that reads or writes files."""
    schemas: dict[str, bool] = {}

    def touches_files(kind: str) -> bool:
        if kind not in schemas:
            try:
                found = torch._C._jit_get_schemas_for_operator(kind)
            except Exception:
                found = []
            schemas[kind] = _file_op(kind, [a.name for s in found for a in s.arguments])
        return schemas[kind]

    for sub_name, sub in module.named_modules():
        for method in sub._c._method_names():
            graph = sub._c._get_method(method).graph.copy()
            torch._C._jit_pass_inline(graph)
            blocks = [graph.block()]
            while blocks:
                for node in blocks.pop().nodes():
                    blocks.extend(node.blocks())
                    if touches_files(node.kind()):
                        where = f"{sub_name}.{method}" if sub_name else method
                        raise refuse(f"method {where} calls {node.kind()}, which reads or writes files", fix=TS_FIX)
