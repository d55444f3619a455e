"""SM shares' bookkeeping (no GPU): a share takes SMs no other model holds, a model's new version may take
its old version's, a share that does not fit is refused with what the others hold, a failed green
context leaves nothing held, and inside a share torch.cuda.set_device to its device keeps it current."""

from __future__ import annotations

import ctypes
import threading
from typing import Any

import pytest
import torch

from streamgpu.errors import DeviceUnavailableError
from streamgpu.gpu import shares
from streamgpu.gpu.shares import GROUP_SMS, GreenContext, SmGroups, SmShares, groups_for


def test_groups_for_rounds_down_so_that_shares_adding_to_one_fit() -> None:
    assert GROUP_SMS == 8
    # The H100's driver split: 15 groups of 8 SMs.
    assert [groups_for(f, 15) for f in (0.01, 0.125, 0.25, 0.5, 1.0)] == [1, 1, 3, 7, 15]
    assert groups_for(0.5, 16) == 8 and groups_for(0.3, 10) == 3  # not 2.9999... rounded down
    for fractions in ((0.5, 0.5), (0.25,) * 4, (0.3, 0.3, 0.4), (0.7, 0.2, 0.1)):
        assert sum(groups_for(f, 15) for f in fractions) <= 15, fractions


class FakeSplit:
    groups = 16


def test_shares_of_two_models_never_overlap() -> None:
    groups = SmGroups(16)
    a, b = groups.take("a", 8), groups.take("b", 8)
    assert not set(a) & set(b) and {*a, *b} == set(range(16))
    with pytest.raises(ValueError, match=r"0 groups of SMs are free for 'c', not 1 .*a 8, b 8"):
        groups.take("c", 1)


def test_a_models_new_version_may_take_its_old_versions_groups() -> None:
    groups = SmGroups(16)
    old = groups.take("m", 8)
    other = groups.take("x", 8)
    new = groups.take("m", 8)  # a swap: the old version still holds its groups
    assert new == old and not set(new) & set(other)
    groups.give_back("m", old)
    assert groups.held() == {"m": 8, "x": 8}  # the new version's hold stays
    groups.give_back("m", new)
    assert groups.held() == {"x": 8}
    with pytest.raises(ValueError, match="does not hold"):
        groups.give_back("m", new)


def test_a_share_resized_takes_free_groups_and_the_old_ones_free_on_release() -> None:
    groups = SmGroups(16)
    old = groups.take("m", 4)
    groups.take("x", 4)  # groups 4..7
    bigger = groups.take("m", 6)  # its own 0..3 first, then the lowest free
    assert bigger == (0, 1, 2, 3, 8, 9)
    groups.give_back("m", old)
    assert groups.take("y", 4) == (10, 11, 12, 13)


def test_smshares_refuses_a_share_that_does_not_fit_and_names_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shares, "_device_split", lambda device: FakeSplit())  # no driver here
    pool = SmShares()
    pool.groups(0).take("a", 12)  # as a loaded model's share would
    refused = r"'b' asks for sm_share 0.5 \(8 of cuda:0's 16 groups of 8 SMs\).*a 12.*1.0 per"
    with pytest.raises(DeviceUnavailableError, match=refused):
        pool.take("b", 0, 0.5)


def test_a_green_context_that_cannot_be_made_leaves_its_groups_free(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(split: object, groups: tuple[int, ...]) -> None:
        raise DeviceUnavailableError("no green contexts here")

    monkeypatch.setattr(shares, "_device_split", lambda device: FakeSplit())
    monkeypatch.setattr(shares, "GreenContext", refuse)
    pool = SmShares()
    with pytest.raises(DeviceUnavailableError, match="no green contexts"):
        pool.take("a", 0, 1.0)
    assert pool.groups(0).held() == {}


def test_free_groups_left_apart_by_unloads_still_make_a_share(monkeypatch: pytest.MonkeyPatch) -> None:
    # The H100's 15 groups: four models at 0.25 (3 groups each), two of them unloaded through the admin
    # API. 9 groups are free, in runs of 3: a model at 0.5 (7 groups) takes groups from all three runs
    # (a share was one run of adjacent groups, and this was refused though the shares add up to 1.0).
    monkeypatch.setattr(shares, "_device_split", lambda device: FakeSplit15())
    monkeypatch.setattr(shares, "GreenContext", lambda split, groups: object())
    pool = SmShares()
    held = {name: pool.take(name, 0, 0.25) for name in "abcd"}
    pool.give_back(held["a"])
    pool.give_back(held["c"])
    e = pool.take("e", 0, 0.5)
    assert e.groups == (0, 1, 2, 6, 7, 8, 12)
    assert not set(e.groups) & {*held["b"].groups, *held["d"].groups}


def test_small_shares_that_round_up_to_a_group_are_refused_saying_so(monkeypatch: pytest.MonkeyPatch) -> None:
    # 0.03 of 15 groups is 0.45 of a group: each such share takes a whole one, so 0.03 x 3 + 0.91 (1.0 in
    # all) needs 16 groups of 15. The refusal names that rounding.
    monkeypatch.setattr(shares, "_device_split", lambda device: FakeSplit15())
    monkeypatch.setattr(shares, "GreenContext", lambda split, groups: object())
    pool = SmShares()
    for name in "abc":
        pool.take(name, 0, 0.03)
    with pytest.raises(DeviceUnavailableError, match=r"at least one of the 15 groups"):
        pool.take("d", 0, 0.91)


class FakeSplit15:
    groups = 15


def test_a_share_given_back_twice_does_not_free_its_new_versions_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    # During a swap the old and new versions of 'm' both hold groups 0-7; the old one's share given back
    # twice (an unload repeated) took the new version's hold too, and 'y' got the SMs 'm' still runs on.
    monkeypatch.setattr(shares, "_device_split", lambda device: FakeSplit())
    monkeypatch.setattr(shares, "GreenContext", lambda split, groups: object())
    pool = SmShares()
    old, new = pool.take("m", 0, 0.5), pool.take("m", 0, 0.5)
    assert old.groups == new.groups == tuple(range(8))
    pool.give_back(old)
    with pytest.raises(ValueError, match="given back already"):
        pool.give_back(old)
    assert pool.groups(0).held() == {"m": 8}
    assert pool.take("y", 0, 0.5).groups == tuple(range(8, 16))


def test_a_models_two_versions_on_the_same_groups_get_contexts_of_their_own(monkeypatch: pytest.MonkeyPatch) -> None:
    # The old version may have its context current on the launcher thread (eager batches) while the new
    # one's load has it current on the loader thread: a context current on two threads is undefined.
    made: list[object] = []

    def context(split: object, groups: tuple[int, ...]) -> object:
        made.append(object())
        return made[-1]

    monkeypatch.setattr(shares, "_device_split", lambda device: FakeSplit())
    monkeypatch.setattr(shares, "GreenContext", context)
    pool = SmShares()
    old, new = pool.take("m", 0, 0.5), pool.take("m", 0, 0.5)
    assert old.groups == new.groups and old.context is not new.context
    pool.give_back(old)
    newer = pool.take("m", 0, 0.5)  # the next swap reuses the free one: contexts stay bounded
    assert newer.context is old.context and len(made) == 2


class FakeContexts:
    """The driver calls of ``GreenContext`` over a per-thread stack of current contexts (no GPU)."""

    def __init__(self) -> None:
        self.local = threading.local()
        self.refuse_push = False
        self.made = 0

    @property
    def stack(self) -> list[int]:
        if not hasattr(self.local, "stack"):
            self.local.stack = []
        return self.local.stack

    def cuGreenCtxCreate(self, out: Any, desc: Any, device: Any, flags: int) -> int:
        self.made += 1
        out._obj.value = self.made
        return 0

    def cuCtxFromGreenCtx(self, out: Any, green: ctypes.c_void_p) -> int:
        out._obj.value = 1000 + (green.value or 0)
        return 0

    def cuCtxPushCurrent_v2(self, context: ctypes.c_void_p) -> int:
        if self.refuse_push:
            return 201
        self.stack.append(context.value or 0)
        return 0

    def cuCtxPopCurrent_v2(self, out: Any) -> int:
        out._obj.value = self.stack.pop()
        return 0


class FakeDriver:
    def __init__(self, lib: FakeContexts) -> None:
        self.lib = lib

    def check(self, result: int, what: str) -> None:
        if result:
            raise DeviceUnavailableError(f"{what}: error {result}")


class FakeDeviceSplit:
    device = ctypes.c_int(0)

    def describe(self, groups: tuple[int, ...]) -> ctypes.c_void_p:
        return ctypes.c_void_p(1)


def test_inside_a_share_set_device_to_its_device_keeps_it_and_any_other_call_is_torchs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Inductor's code calls torch.cuda.set_device(i) at every call, and torch's makes the device's primary
    # context current in place of the share's. A device given as torch.cuda.device(0) failed inside a share
    # with a TypeError, where torch's takes it, and "cpu:0" was taken, where torch's refuses it.
    calls: list[tuple[object, str]] = []

    def torchs(device: object) -> None:
        calls.append((device, threading.current_thread().name))

    monkeypatch.setattr(torch.cuda, "set_device", torchs)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    lib = FakeContexts()
    monkeypatch.setattr(shares, "_the_driver", lambda: FakeDriver(lib))
    a, b = GreenContext(FakeDeviceSplit(), (0,)), GreenContext(FakeDeviceSplit(), (1,))  # type: ignore[arg-type]
    assert torch.cuda.set_device.__wrapped__ is torchs  # type: ignore[attr-defined]  # wrapped once
    me = threading.current_thread().name
    with a.current():
        same: Any  # torch's takes a torch.cuda.device too
        for same in (0, "cuda:0", torch.device("cuda", 0), torch.cuda.device(0)):
            torch.cuda.set_device(same)
        assert not calls
        torch.cuda.set_device(1)  # another device: torch's
        for refused in ("cpu:0", "cuda", None):
            with pytest.raises(ValueError, match="Expected a"):
                torch.cuda.set_device(refused)
        other = threading.Thread(target=torch.cuda.set_device, args=(0,), name="other")  # not in a share
        other.start()
        other.join()
    assert calls == [(1, me), (0, "other")]
    with pytest.raises(RuntimeError, match="inside"), a.current(), b.current():  # nested, left by an exception
        torch.cuda.set_device(0)
        raise RuntimeError("inside")
    lib.refuse_push = True
    with pytest.raises(DeviceUnavailableError, match="entering the share"), a.current():
        pass
    torch.cuda.set_device(0)  # outside every share again: torch's
    assert calls[2:] == [(0, me)] and lib.stack == []
