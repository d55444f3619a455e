"""Which new versions take a serving model's place by their weights alone, and how their values are checked, laid
out in the serving tensors' dtypes and layouts, and read in a process of their own."""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import pickle
import re
import signal
import subprocess
import sys
import threading
import time
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from streamgpu.errors import ModelLoadError
from streamgpu.models import weights
from streamgpu.models.builtin import SmallConvNet
from streamgpu.models.loader import read_state_dict
from streamgpu.models.spec import ModelSpec
from streamgpu.models.weights import (
    HostWeights,
    WeightsLayout,
    WeightsReader,
    architecture,
    in_place_problem,
    pack_weights,
    write_weights,
)

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


def written(serving: nn.Module, state: dict[str, object]) -> tuple[WeightsLayout, torch.Tensor, list[str]]:
    """``state`` written as ``serving``'s layout lays it out: the layout, the buffer, the entries kept."""
    layout = WeightsLayout.of(serving)
    buffer = torch.zeros(layout.nbytes, dtype=torch.uint8)
    return layout, buffer, write_weights("m", layout, state, buffer)


def test_each_value_is_written_in_its_serving_tensors_dtype_and_layout() -> None:
    serving = SmallConvNet().half().to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    state = SmallConvNet().state_dict()  # fp32, contiguous: takes the serving tensors' precision and strides
    state["fc.weight"] = state["fc.weight"].t().contiguous().t()  # its values transposed in memory
    layout, buffer, kept = written(serving, state)
    live = serving.state_dict()
    assert kept == [] and [entry.key for entry in layout.entries] == list(live)
    for entry in layout.entries:
        value = entry.view(buffer)
        assert (value.dtype, value.stride()) == (live[entry.key].dtype, live[entry.key].stride()), entry.key
        assert torch.equal(value, state[entry.key].to(value.dtype)), entry.key
        assert entry.offset % 256 == 0
    assert sum(not t.is_contiguous() for t in live.values()) == 4  # (the convolutions: channels last)


def test_a_serving_tensor_with_gaps_takes_its_value_contiguous() -> None:
    """A live tensor that is a view with gaps (every other element) cannot be copied flat: its value is laid out
    contiguous (the copy at the swap goes element by element)."""
    serving = nn.Linear(4, 3)
    serving.weight = nn.Parameter(torch.zeros(3, 8)[:, ::2])
    layout, buffer, _ = written(serving, {"weight": torch.ones(3, 4), "bias": torch.arange(3.0)})
    assert [(e.key, e.stride, e.nbytes) for e in layout.entries] == [("weight", (4, 1), 48), ("bias", (1,), 12)]
    assert torch.equal(layout.entries[1].view(buffer), torch.arange(3.0))


def test_an_entry_of_another_architecture_is_named() -> None:
    state = SmallConvNet().state_dict()
    state["head.weight"] = torch.zeros(1)
    with pytest.raises(ModelLoadError, match=r"0 entries missing \[\], 1 unexpected \['head.weight'\]"):
        written(SmallConvNet(), state)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (torch.zeros(1000).to_sparse(), "entry 'fc.bias' of the new weights is a torch.sparse_coo tensor on cpu"),
        (torch.empty(1000, device="meta"), "entry 'fc.bias' of the new weights is a torch.strided tensor on meta"),
        (torch.zeros(999), "entry 'fc.bias' of the new weights has shape [999], the serving model's [1000]"),
        (torch.zeros(1000, dtype=torch.int64), "entry 'fc.bias' of the new weights is torch.int64, "
                                               "the serving model's torch.float32"),
        (torch.zeros(1000, dtype=torch.complex64), "entry 'fc.bias' of the new weights is torch.complex64"),
        ([0.0] * 1000, "entry 'fc.bias' of the new weights is a list, not a tensor"),
    ],
    ids=["sparse", "meta", "shape", "int for float", "complex", "not a tensor"],
)  # fmt: skip
def test_a_value_that_does_not_fit_is_refused_before_any_is_written(value: object, expected: str) -> None:
    """(A sparse value was paired, and its copy failed at the swap after the tensors before it: a mix of two
    versions.) Nothing is written: the buffer stays as it was."""
    state: dict[str, object] = dict(SmallConvNet().state_dict())
    state["fc.bias"] = value
    layout = WeightsLayout.of(SmallConvNet())
    buffer = torch.zeros(layout.nbytes, dtype=torch.uint8)
    with pytest.raises(ModelLoadError, match=re.escape(expected)):
        write_weights("m", layout, state, buffer)
    assert not buffer.any()


def test_batch_norm_counters_a_state_dict_predates_are_kept_as_load_state_dict_keeps_them() -> None:
    """A state dict saved before torch counted batch-norm batches (no ``_metadata``, or a version under 2) loads
    with ``load_state_dict``; the serving counters stay as they are. One of version 2 must have them."""
    saved = SmallConvNet().state_dict()
    old = {key: value for key, value in saved.items() if not key.endswith("num_batches_tracked")}  # a plain dict
    serving = SmallConvNet()
    SmallConvNet().load_state_dict(old)  # (torch takes it)
    _, _, kept = written(serving, old)
    assert kept == [key for key in saved if key.endswith("num_batches_tracked")] and len(kept) == 4
    for key in kept:
        del saved[key]  # (its _metadata says version 2: torch refuses it, and so does the swap)
    with pytest.raises(ModelLoadError, match=r"4 entries missing \['features.1.num_batches_tracked'"):
        written(serving, saved)


def test_a_packed_module_keeps_its_tensors_values_and_layouts_in_views_of_one_buffer() -> None:
    """Packed, a new version's buffer staged in the same layout goes in by one copy; the tensor objects stay (the
    module's hooks and wrappers hold them), and so do their strides (channels-last convolutions) and outputs."""
    module = SmallConvNet().half().to(memory_format=torch.channels_last).eval()  # type: ignore[call-overload]
    x = torch.rand(2, 3, 32, 32).half().to(memory_format=torch.channels_last)
    with torch.inference_mode():
        expected = module(x)
        before = {key: (id(t), t.stride(), t.clone()) for key, t in module.state_dict(keep_vars=True).items()}
        packed = pack_weights(module)
        assert packed is not None and packed.layout == WeightsLayout.of(module)
        live = module.state_dict(keep_vars=True)
        for entry in packed.layout.entries:
            tensor = live[entry.key]
            assert (id(tensor), tensor.stride()) == before[entry.key][:2], entry.key
            assert torch.equal(tensor, before[entry.key][2]), entry.key
            assert tensor.data_ptr() == packed.buffer.data_ptr() + entry.offset, entry.key
        assert torch.equal(module(x), expected)
        # A new version's values copied over the buffer whole are what the module runs
        state = SmallConvNet().half().state_dict()
        _, staged, _ = written(module, state)
        packed.buffer.copy_(staged)
        assert all(torch.equal(live[key], value) for key, value in state.items())


def test_a_module_whose_entries_share_memory_is_not_packed() -> None:
    """Tied weights (one tensor under two names) or views of one tensor would be moved apart, and so would a
    buffer outside the state (non-persistent) that views an entry."""
    tied = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    tied[1].weight = tied[0].weight
    views = nn.Linear(4, 4)
    views.register_buffer("scale", views.weight.data[0])
    hidden = nn.Linear(4, 4)
    hidden.register_buffer("row", hidden.weight.data[1], persistent=False)
    for module in (tied, views, hidden, nn.ReLU()):
        pointers = [t.data_ptr() for t in module.state_dict().values()]
        assert pack_weights(module) is None
        assert [t.data_ptr() for t in module.state_dict().values()] == pointers  # left as it was


def test_entries_kept_take_the_serving_values_in_the_staged_buffer() -> None:
    """A state dict without batch-norm counters keeps the serving ones: staged for one copy over a packed
    module's buffer, their places hold the serving values, not the reader's untouched bytes."""
    serving = SmallConvNet()
    with torch.no_grad():
        for key, tensor in serving.state_dict().items():
            if key.endswith("num_batches_tracked"):
                tensor.fill_(7)
    packed = pack_weights(serving)
    assert packed is not None
    old = {key: value for key, value in SmallConvNet().state_dict().items() if not key.endswith("num_batches_tracked")}
    layout, buffer, kept = written(serving, old)
    with HostWeights("m", layout, kept, buffer.numpy()) as new:
        staged = buffer.clone()
        new.keep(packed, staged)
        packed.buffer.copy_(staged)
    live = serving.state_dict()
    assert len(kept) == 4 and all(live[key].item() == 7 for key in kept)
    assert all(torch.equal(live[key], value) for key, value in old.items())


def saved(tmp_path: Path, state: object, name: str = "v2.pt") -> ModelSpec:
    path = tmp_path / name
    torch.save(state, path)
    return dataclasses.replace(SERVING, source=f"state_dict:{path}")


@pytest.fixture
def reader() -> Iterator[WeightsReader]:
    kept = WeightsReader()
    yield kept
    kept.close()


def starts_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, also: str = "") -> Path:
    """A file each reader process (any interpreter started with this environment) appends its pid to as it starts:
    a ``sitecustomize`` first on the children's path, running ``also`` after."""
    pids = tmp_path / "starts"
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(f"import os\nwith open({str(pids)!r}, 'a') as f:\n"
                                           f"    f.write(f'{{os.getpid()}}\\n')\n{also}\n")  # fmt: skip
    monkeypatch.setenv("PYTHONPATH", f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    return pids


def started(pids: Path) -> list[int]:
    return [int(line) for line in pids.read_text().split()] if pids.exists() else []


def test_the_reader_process_lays_a_files_values_out_in_shared_memory_and_is_kept_for_the_next_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reader: WeightsReader
) -> None:
    """Its start (an interpreter, torch's import: ~4 s of CPU beside the serving loop on an H200 host) was paid at
    every swap while a reader was started per read. A library printing as the reader imports it (here: as it
    starts) leaves its replies alone."""
    pids = starts_recorded(tmp_path, monkeypatch, also="print('a library says hello')")
    small, large = SmallConvNet().half(), nn.Linear(1000, 1000)
    assert WeightsLayout.of(large).nbytes > WeightsLayout.of(small).nbytes
    places = []
    for seed, serving in enumerate((small, small, large, small)):  # each read's own values
        torch.manual_seed(seed)
        state = type(serving)(*((1000, 1000) if serving is large else ())).state_dict()
        with reader.read(saved(tmp_path, state, f"v{seed}.pt"), WeightsLayout.of(serving)) as new:
            pairs = new.pairs(serving, new.buffer.clone())
            assert new.kept == frozenset()
            live = serving.state_dict()
            assert [p[0].data_ptr() for p in pairs] == [t.data_ptr() for t in live.values()]  # the serving tensors
            assert all(torch.equal(value, state[key].to(value.dtype))
                       for (_, value), key in zip(pairs, live, strict=True))  # fmt: skip
            places.append(new.buffer.data_ptr())
    assert len(started(pids)) == 1
    # One shared buffer from read to read (replaced by a larger one for a larger layout, then kept for smaller ones)
    assert places[0] == places[1] and places[2] == places[3]


def test_a_reader_that_ended_between_reads_is_started_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reader: WeightsReader, caplog: pytest.LogCaptureFixture
) -> None:
    """One killed while idle (the OOM killer, an operator) failed the next swap, which found its socket closed:
    that swap starts another, and says so in the log."""
    pids = starts_recorded(tmp_path, monkeypatch)
    spec, layout = saved(tmp_path, SmallConvNet().state_dict()), WeightsLayout.of(SmallConvNet())
    reader.read(spec, layout).close()
    (first,) = started(pids)
    os.kill(first, signal.SIGKILL)
    while _running(first):  # (a zombie until the next read reaps it)
        time.sleep(0.01)
    with caplog.at_level(logging.WARNING, logger="streamgpu"), reader.read(spec, layout) as new:
        assert new.kept == frozenset()
    assert started(pids)[0] == first and len(started(pids)) == 2
    assert "the process that reads new weights ended between reads (killed by SIGKILL)" in caplog.text


@pytest.mark.parametrize("when", ["as the read starts the reader", "as the reply comes"])
def test_a_close_from_the_loops_thread_during_a_read_fails_it_or_leaves_its_values_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reader: WeightsReader, when: str
) -> None:
    """``close`` comes from the loop's thread, a read from the loader's, at any point of it: one between the
    reader's start and the request took the socket from under the read (an ``AssertionError``), and one just
    after the reply left the read's values in the segment it closed (an empty buffer, returned as read)."""
    serving = SmallConvNet()
    spec, layout = saved(tmp_path, serving.state_dict()), WeightsLayout.of(serving)
    hooked = "start" if when == "as the read starts the reader" else "_reply"
    real = getattr(WeightsReader, hooked)

    def then_close(self: WeightsReader, *args: object) -> object:
        done = real(self, *args)
        self.close()
        return done

    monkeypatch.setattr(WeightsReader, hooked, then_close)
    if hooked == "start":
        with pytest.raises(ModelLoadError, match="the server has stopped"):
            reader.read(spec, layout)
        return
    with reader.read(spec, layout) as new:
        live = serving.state_dict()
        assert new.buffer.numel() == layout.nbytes
        assert all(torch.equal(entry.view(new.buffer), live[entry.key]) for entry in layout.entries)


def test_a_reply_to_an_earlier_request_is_not_taken_for_the_next_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reader: WeightsReader
) -> None:
    """A reader out of step (here: one that replies twice) left a line on the socket that the next read took for
    its own reply, before the reader wrote that read's values: the server staged the segment's old bytes as the new
    version. Each reply names the request it answers: another is the reader's fault, and it is ended."""
    program = ("import json, os, pickle, socket, sys, time; s = socket.socket(fileno=int(sys.argv[1])); "
               "_, fds, _, _ = socket.recv_fds(s, 1, 2); asked = pickle.load(os.fdopen(fds[0], 'rb'))[0]; "
               "named = {'request': asked} if isinstance(asked, int) else {}; "
               "[s.sendall(json.dumps({**named, 'kept': kept}).encode() + b'\\n') or time.sleep(0.2) "
               " for kept in ([], ['features.1.num_batches_tracked'])]; time.sleep(60)")  # fmt: skip
    spec, layout = saved(tmp_path, SmallConvNet().state_dict()), WeightsLayout.of(SmallConvNet())
    with monkeypatch.context() as patched:
        patched.setattr(weights, "module_command", lambda _module, *args: [sys.executable, "-c", program, *args])
        reader.read(spec, layout).close()
        time.sleep(0.5)  # (its second reply sent)
        out_of_step = "replied to request 1, not 2: it is out of step (check that it can import"
        with pytest.raises(ModelLoadError, match=re.escape(out_of_step)):
            reader.read(spec, layout)
    with reader.read(spec, layout) as new:  # (ended: another reads)
        assert new.kept == frozenset()


def test_the_kept_reader_holds_no_copy_of_the_last_weights_it_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reader: WeightsReader
) -> None:
    """Between reads the reader waits, for as long as the server runs: the state dict it had read stayed
    referenced meanwhile, a second copy of the last version's weights in its memory (the first in the segment)."""
    pids = starts_recorded(tmp_path, monkeypatch)
    small, large = SmallConvNet(), nn.Linear(4096, 4096, bias=False)  # (64 MiB)
    reader.read(saved(tmp_path, small.state_dict(), "small.pt"), WeightsLayout.of(small)).close()
    (pid,) = started(pids)
    before = _anonymous_bytes(pid)
    reader.read(saved(tmp_path, large.state_dict(), "large.pt"), WeightsLayout.of(large)).close()
    assert _anonymous_bytes(pid) - before < WeightsLayout.of(large).nbytes // 4


def _anonymous_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        (kib,) = (line.split()[1] for line in status if line.startswith("RssAnon:"))
    return int(kib) * 1024


def test_the_reader_of_a_server_killed_ends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """It runs in a session of its own: a server killed (no ``close``) left it waiting for requests for good."""
    pids = starts_recorded(tmp_path, monkeypatch)
    spec = saved(tmp_path, SmallConvNet().state_dict())
    program = ("import os, sys, pickle; from streamgpu.models.weights import WeightsReader, WeightsLayout; "
               "from streamgpu.models.builtin import SmallConvNet; "
               f"WeightsReader().read(pickle.loads({pickle.dumps(spec)!r}), WeightsLayout.of(SmallConvNet())); "
               "os._exit(0)")  # fmt: skip
    subprocess.run([sys.executable, "-c", program], check=True, timeout=120)
    reader_pid = started(pids)[1]  # (the killed "server" started first)
    ends = time.monotonic() + 30
    while _running(reader_pid) and time.monotonic() < ends:
        time.sleep(0.05)
    assert not _running(reader_pid)


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, ended and not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_the_reader_runs_this_streamgpu_whatever_folder_the_server_started_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reader: WeightsReader
) -> None:
    """``python -m`` puts the working directory first on the child's path: a ``streamgpu`` there (another
    checkout, or a planted one) was the reader that ran."""
    impostor = tmp_path / "cwd" / "streamgpu" / "models"
    impostor.mkdir(parents=True)
    (impostor.parent / "__init__.py").write_text("")
    (impostor / "__init__.py").write_text("")
    (impostor / "weights.py").write_text("import sys; print('an impostor reads', file=sys.stderr); sys.exit(7)\n")
    monkeypatch.chdir(impostor.parent.parent)
    with reader.read(saved(tmp_path, SmallConvNet().state_dict()), WeightsLayout.of(SmallConvNet())) as new:
        assert new.kept == frozenset()


def test_a_layout_past_a_pipes_capacity_reaches_the_reader_whole(tmp_path: Path, reader: WeightsReader) -> None:
    """The request (spec and layout) went down a pipe whose wait was retried to hear of a stop, and a retried
    ``communicate`` sends nothing more: past the pipe's capacity (64 KiB, a page where the user's pipes took
    their quota) the reader waited for the rest of it for good."""
    serving = nn.Module()
    for i in range(2000):
        serving.register_buffer(f"a_buffer_of_a_rather_long_name_{i}", torch.zeros(1))
    assert len(pickle.dumps((SERVING, WeightsLayout.of(serving)))) > 1 << 16
    spec = saved(tmp_path, {key: torch.ones(1) for key in serving.state_dict()})
    given_up = time.monotonic() + 30  # (it reads in seconds)
    with reader.read(spec, WeightsLayout.of(serving), lambda: time.monotonic() > given_up) as new:
        assert new.buffer.any()


def test_a_server_niced_past_the_readers_niceness_reads_at_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reader: WeightsReader
) -> None:
    """Unprivileged (no CAP_SYS_NICE), a process may not lower a niceness: a server run at nice 15 failed every
    in-place swap with PermissionError asking its reader for 10."""
    real_setpriority = os.setpriority
    asked: list[int] = []

    def unprivileged(which: int, who: int, niceness: int) -> None:  # as the kernel answers such a process
        if niceness < os.getpriority(which, who):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        asked.append(niceness)
        real_setpriority(which, who, niceness)

    monkeypatch.setattr(os, "setpriority", unprivileged)
    spec = saved(tmp_path, SmallConvNet().state_dict())
    done: list[object] = []

    def loader() -> None:  # (niceness is a thread's on Linux, and its children's from birth)
        real_setpriority(os.PRIO_PROCESS, 0, 15)
        try:
            with reader.read(spec, WeightsLayout.of(SmallConvNet())) as new:
                done.append(new.kept)
        except BaseException as exc:
            done.append(exc)

    thread = threading.Thread(target=loader)
    thread.start()
    thread.join()
    assert done == [frozenset()] and asked == [15]


def nested() -> torch.Tensor:
    """A nested tensor (strided: torch reads it, and it has no plain values to copy)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (a prototype, torch says)
        return torch.nested.nested_tensor([torch.zeros(2), torch.zeros(3)])


@pytest.mark.parametrize(
    ("contents", "expected"),
    [
        (b"not a weights file", "cannot load 'state_dict:"),
        ({"fc.weight": torch.zeros(1)}, "the new weights do not fit the serving architecture: 21 entries missing"),
        ({**SmallConvNet().state_dict(), "fc.bias": nested()}, "cannot load 'state_dict:"),
    ],
    ids=["not a zip", "another architecture", "nested tensor"],
)  # fmt: skip
def test_the_reader_process_refuses_a_file_that_does_not_fit_saying_why(
    tmp_path: Path, contents: object, expected: str, reader: WeightsReader
) -> None:
    if isinstance(contents, bytes):
        spec = saved(tmp_path, {})
        (tmp_path / "v2.pt").write_bytes(contents)
    else:
        spec = saved(tmp_path, contents)
    with pytest.raises(ModelLoadError, match=re.escape(expected)):
        reader.read(spec, WeightsLayout.of(SmallConvNet()))
    with reader.read(saved(tmp_path, SmallConvNet().state_dict()), WeightsLayout.of(SmallConvNet())) as new:
        assert new.kept == frozenset()  # (the same reader reads on)


@pytest.mark.parametrize(
    ("program", "expected"),
    [
        ("import sys; print('out of memory', file=sys.stderr); sys.exit(3)",
         re.escape(f"the process reading its weights ({sys.executable} -c ") + ".*"
         + re.escape(") ended (exit status 3): out of memory")),
        ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)",
         re.escape(f"the process reading its weights ({sys.executable} -c ") + ".*"
         + re.escape(") ended (killed by SIGKILL)")),
        ("import os, sys, time; os.write(int(sys.argv[1]), b'{not json\\n'); time.sleep(60)",
         re.escape("the process reading its weights replied b'{not json\\n', not a reply of its own")),
    ],
    ids=["exits", "killed", "garbled reply"],
)  # fmt: skip
def test_a_reader_process_that_fails_is_a_clear_load_error_and_the_next_read_starts_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, program: str, expected: str, reader: WeightsReader
) -> None:
    spec, layout = saved(tmp_path, SmallConvNet().state_dict()), WeightsLayout.of(SmallConvNet())
    with monkeypatch.context() as patched:
        patched.setattr(weights, "module_command", lambda _module, *args: [sys.executable, "-c", program, *args])
        with pytest.raises(ModelLoadError, match=expected + re.escape(" (check that it can import streamgpu")):
            reader.read(spec, layout)
    with reader.read(spec, layout) as new:  # (a failed one is ended, not asked again)
        assert new.kept == frozenset()


@pytest.mark.parametrize("zipped", [True, False])
def test_a_files_values_are_read_mapped_from_a_zip_archive_and_read_whole_from_a_legacy_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, zipped: bool
) -> None:
    """The reader maps torch.save's zip archives (its values copied once, into the shared buffer) by the descriptor
    it opened and checked; the legacy format cannot be mapped and is read as before. The values are the same."""
    state = SmallConvNet().state_dict()
    path = tmp_path / "v.pt"
    torch.save(state, path, _use_new_zipfile_serialization=zipped)
    asked: list[tuple[object, bool]] = []
    load = torch.load

    def recorded(f: object, *args: object, **kwargs: object) -> object:
        asked.append((f, bool(kwargs.get("mmap"))))
        return load(f, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch, "load", recorded)
    read = read_state_dict(dataclasses.replace(SERVING, source=f"state_dict:{path}"))
    assert read.keys() == state.keys() and all(torch.equal(read[k], v) for k, v in state.items())
    [(f, mapped)] = asked
    assert mapped is zipped
    assert (isinstance(f, str) and f.startswith("/proc/self/fd/")) is zipped  # (not the path: the file opened)


@pytest.mark.parametrize("made", ["repacked with a compressed member", "legacy, ending in bytes like a zip's end"])
def test_a_file_torch_cannot_map_as_it_lies_is_read_whole(tmp_path: Path, made: str) -> None:
    """torch maps a compressed member's compressed bytes as its values, without a word: an archive repacked with
    compression (here one member, the others stored after it) served other weights. And torch takes a file for a
    zip by its first bytes: a legacy file that ends in bytes that read as a zip's end was asked to be mapped, which
    torch refuses."""
    torch.manual_seed(0)
    state = {"running_var": torch.ones(1000), "weight": torch.randn(2000)}
    path = tmp_path / "v.pt"
    if made.startswith("repacked"):
        torch.save(state, tmp_path / "saved.pt")
        with zipfile.ZipFile(tmp_path / "saved.pt") as saved_, zipfile.ZipFile(path, "w") as repacked:
            for info in saved_.infolist():
                how = zipfile.ZIP_DEFLATED if info.filename.endswith("/data/0") else zipfile.ZIP_STORED
                repacked.writestr(info.filename, saved_.read(info), compress_type=how)
    else:
        torch.save(state, path, _use_new_zipfile_serialization=False)
        with path.open("ab") as f:
            f.write(b"PK\x05\x06" + bytes(18))  # (an empty archive's end record)
        assert zipfile.is_zipfile(path)
    read = read_state_dict(dataclasses.replace(SERVING, source=f"state_dict:{path}"))
    assert read.keys() == state.keys() and all(torch.equal(read[k], v) for k, v in state.items())


def test_a_file_cut_short_as_the_reader_maps_it_fails_the_read_naming_it_and_the_next_read_starts_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reader: WeightsReader
) -> None:
    """The reader maps a zip archive's values: a file cut short under it (written over in place) kills it with
    SIGBUS as it copies them, and the read failed asking whether streamgpu and torch import and memory is short,
    naming no file."""
    hook = ("import os, streamgpu.models.loader as loader\nread = loader.read_state_dict\n"
            "def cut_short(spec):\n    state = read(spec)\n    path = spec.source.partition(':')[2]\n"
            "    if path.endswith('cut.pt'):\n        os.truncate(path, 0)\n    return state\n"
            "loader.read_state_dict = cut_short")  # fmt: skip
    pids = starts_recorded(tmp_path, monkeypatch, also=hook)
    serving = nn.Linear(1024, 1024)  # (4 MiB: past what the reader touched of the file before it was cut)
    layout, cut = WeightsLayout.of(serving), saved(tmp_path, serving.state_dict(), "cut.pt")
    expected = (") ended (killed by SIGBUS) (was " + repr(cut.source.partition(":")[2])
                + " cut short as it was read? It is mapped")  # fmt: skip
    with pytest.raises(ModelLoadError, match=re.escape(expected)):
        reader.read(cut, layout)
    with reader.read(saved(tmp_path, serving.state_dict()), layout) as new:
        assert new.kept == frozenset() and torch.equal(layout.entries[0].view(new.buffer), serving.weight.detach())
    assert len(started(pids)) == 2


def test_a_reader_a_kill_cannot_end_at_once_does_not_hold_the_servers_stop(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, reader: WeightsReader
) -> None:
    """A reader stuck in a system call that a kill cannot interrupt (a read from a hung network file system) ends
    only once the call returns: the close (the server's stop, on the loop's thread) waited for it, for good."""
    reader.start()
    proc = reader._proc
    assert proc is not None
    returned = threading.Event()  # set: the stuck call returns, and the kill takes effect
    real_wait = proc.wait

    def wait(timeout: float | None = None) -> int:
        if not returned.wait(10 if timeout is None else timeout):
            raise subprocess.TimeoutExpired(proc.args, timeout or 10)
        return real_wait(timeout)

    monkeypatch.setattr(proc, "wait", wait)
    began = time.monotonic()
    with caplog.at_level(logging.WARNING, "streamgpu"):
        reader.close()
    assert time.monotonic() - began < weights._REAP_S + 2
    assert f"(pid {proc.pid}) did not end" in caplog.text
    returned.set()
    ends = time.monotonic() + 30
    while proc.returncode is None and time.monotonic() < ends:  # reaped by a thread of its own
        time.sleep(0.02)
    assert proc.returncode == -signal.SIGKILL


def test_a_close_while_a_read_waits_for_a_reader_that_closed_its_socket_to_end_is_not_held(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reader: WeightsReader
) -> None:
    """A reader whose socket closes is given seconds to end, for its exit status; that wait held the reader's lock,
    and a close (the server's stop, on the loop's thread) waited behind it."""
    # The reader closes its end of the socket as it starts, and runs on
    starts_recorded(tmp_path, monkeypatch, also="import sys, time\nos.close(int(sys.argv[-1]))\ntime.sleep(60)")
    failed: list[BaseException] = []

    def read() -> None:
        try:
            reader.read(saved(tmp_path, SmallConvNet().state_dict()), WeightsLayout.of(SmallConvNet()))
        except ModelLoadError as exc:
            failed.append(exc)

    reading = threading.Thread(target=read)
    reading.start()
    time.sleep(2.0)  # (the reader started, closed its socket, and the read waits for it to end)
    began = time.monotonic()
    reader.close()
    assert time.monotonic() - began < weights._REAP_S + 1
    reading.join(30)
    assert len(failed) == 1
