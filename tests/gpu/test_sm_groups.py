"""SM shares' bookkeeping (no GPU): a share takes SMs no other model holds, a model's new version may take
its old version's, a share that does not fit is refused with what the others hold, and a failed green
context leaves nothing held."""

from __future__ import annotations

import pytest

from streamgpu.errors import DeviceUnavailableError
from streamgpu.gpu import shares
from streamgpu.gpu.shares import GROUP_SMS, SmGroups, SmShares, groups_for


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
    with pytest.raises(ValueError, match=r"no 1 adjacent groups .* free for 'c' .*a 8, b 8"):
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
    bigger = groups.take("m", 6)  # 0..5 would cross x's: the next free run
    assert bigger == range(8, 14)
    groups.give_back("m", old)
    assert groups.take("y", 4) == range(0, 4)


def test_smshares_refuses_a_share_that_does_not_fit_and_names_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shares, "_device_split", lambda device: FakeSplit())  # no driver here
    pool = SmShares()
    pool.groups(0).take("a", 12)  # as a loaded model's share would
    refused = r"'b' asks for sm_share 0.5 \(8 of cuda:0's 16 groups of 8 SMs\).*a 12.*1.0 per"
    with pytest.raises(DeviceUnavailableError, match=refused):
        pool.take("b", 0, 0.5)


def test_a_green_context_that_cannot_be_made_leaves_its_groups_free(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(split: object, groups: range) -> None:
        raise DeviceUnavailableError("no green contexts here")

    monkeypatch.setattr(shares, "_device_split", lambda device: FakeSplit())
    monkeypatch.setattr(shares, "GreenContext", refuse)
    pool = SmShares()
    with pytest.raises(DeviceUnavailableError, match="no green contexts"):
        pool.take("a", 0, 1.0)
    assert pool.groups(0).held() == {}
