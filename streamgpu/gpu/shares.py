"""SM shares: each model given an ``sm_share`` runs on SMs of its GPU that no other model's share holds.

A share is a green context: work on its streams, and graphs captured inside it, run on its SMs only.
torch's ``GreenContext.create(num_sms=N)`` always takes the *first* N SMs of the device, so two models
given half the GPU each both ran on the same half while the other half idled, and each slowed the
other more than no shares at all did (docs/BENCHMARKS.md, "SM shares"). Here a GPU's SMs are counted
in groups (the driver's split granularity, 8 SMs on Hopper and later); a share takes groups no other model
holds, and its green context is made from exactly those SMs with the driver's own calls (one
``cuDevSmResourceSplitByCount`` of the GPU into groups, a descriptor per share), through ctypes,
since torch does not expose them.

``SmGroups`` is the bookkeeping (no GPU needed); ``SmShares`` adds the green contexts.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

from streamgpu.errors import DeviceUnavailableError
from streamgpu.gpu.driver import Driver, the_driver

__all__ = ["GROUP_SMS", "GreenContext", "Share", "SmGroups", "SmShares", "groups_for", "shareable_groups"]

# SMs per group: the split granularity the driver documents for compute capability 9.0 and later
# (8.x: 4, 7.x: 2). Groups of 8 are whole groups on those too, so one size serves every GPU.
GROUP_SMS = 8


def groups_for(fraction: float, groups: int) -> int:
    """Groups a share of ``fraction`` takes of a GPU's ``groups``: rounded down, so that shares adding up
    to at most 1.0 fit together, and at least one (so shares below ``1 / groups`` take more)."""
    return min(groups, max(1, math.floor(fraction * groups + 1e-9)))


class SmGroups:
    """Which owners (model names) hold which of one GPU's SM groups.

    A group is free for an owner when no *other* owner holds it: the new version of a model, loaded
    beside its old one during a swap or a share change, may take the SMs its old version still runs
    on (the two hand over at a batch boundary), but never another model's.
    """

    def __init__(self, groups: int) -> None:
        if groups < 1:
            raise ValueError(f"a GPU has at least one group of SMs, got {groups}")
        self._holders: list[Counter[str]] = [Counter() for _ in range(groups)]

    def __len__(self) -> int:
        return len(self._holders)

    def take(self, owner: str, count: int) -> tuple[int, ...]:
        """``count`` groups free for ``owner``, now held by it: those it holds already first (a new
        version then runs where its old one does, in the same green context), then the lowest free.
        Any groups will do, adjacent or not, so unloads leave no holes too small to use.

        Raises ValueError, naming what the other owners hold, when fewer are free.
        """
        if not 1 <= count <= len(self._holders):
            raise ValueError(f"a share is 1 to {len(self._holders)} groups of SMs, got {count}")
        free = [g for g, holders in enumerate(self._holders) if not (holders.keys() - {owner})]
        if len(free) < count:
            held = ", ".join(f"{name} {n}" for name, n in sorted(self.held(exclude=owner).items())) or "none"
            total = len(self._holders)
            raise ValueError(
                f"{len(free)} groups of SMs are free for {owner!r}, not {count} (held by other models: {held}; "
                f"{total} groups in all). Lower the sm_share values so that they add up to at most 1.0 per GPU (a "
                f"share is at least one of the {total} groups, so one below 1/{total} takes more than its fraction)"
            )
        groups = tuple(sorted(sorted(free, key=lambda g: (owner not in self._holders[g], g))[:count]))
        for g in groups:
            self._holders[g][owner] += 1
        return groups

    def give_back(self, owner: str, groups: tuple[int, ...]) -> None:
        """Release one hold of ``owner`` on ``groups`` (what ``take`` returned)."""
        for g in groups:
            holders = self._holders[g]
            if holders[owner] <= 0:
                raise ValueError(f"{owner!r} does not hold group {g}")
            holders[owner] -= 1
            if not holders[owner]:
                del holders[owner]

    def held(self, exclude: str = "") -> dict[str, int]:
        """Groups held per owner (each group counted once per owner)."""
        out: Counter[str] = Counter()
        for holders in self._holders:
            out.update(name for name in holders if name != exclude)
        return dict(out)


# --- The driver calls (libcuda through ctypes) ---------------------------------------------------

_CU_DEV_RESOURCE_TYPE_SM = 1
_CU_GREEN_CTX_DEFAULT_STREAM = 0x1  # required by cuGreenCtxCreate
_CU_STREAM_NON_BLOCKING = 0x1  # required by cuGreenCtxStreamCreate
# CUdevResource from CUDA 12.4 to 13.x: the type (4 bytes), 92 bytes the driver keeps, a 48-byte union
# whose first field is the SM count. The split writes an array of them; the layout is checked on use.
_RESOURCE_BYTES = 144
_SM_COUNT_OFFSET = 96


_GREEN_CALLS = (
    "cuDeviceGetDevResource",
    "cuDevSmResourceSplitByCount",
    "cuDevResourceGenerateDesc",
    "cuGreenCtxCreate",
    "cuCtxFromGreenCtx",
    "cuGreenCtxStreamCreate",
    "cuCtxGetStreamPriorityRange",
)


def _the_driver() -> Driver:
    drv = the_driver()
    drv.require(_GREEN_CALLS, "SM shares need a CUDA driver with green contexts (CUDA 12.4 or later)")
    return drv


def _field(record: bytes, offset: int) -> int:
    return int.from_bytes(record[offset : offset + 4], "little")


class _DeviceSplit:
    """One GPU's SMs split by the driver into groups of ``GROUP_SMS``, once: as many as it can make.

    One split call for all of them, because a green context over several groups must be described
    from groups of a single split (the driver refuses others), and splitting a run off what an earlier
    split left over is refused on the H100 ("resources are insufficient"). The driver keeps whole
    clusters of SMs together, so not every SM is in a group: the H100's 132 make 15 groups (120 SMs).
    """

    def __init__(self, device: int) -> None:
        drv = _the_driver()
        self.device = ctypes.c_int()
        drv.check(drv.lib.cuDeviceGet(ctypes.byref(self.device), device), f"cuda:{device}")
        whole, remaining = (ctypes.c_ubyte * _RESOURCE_BYTES)(), (ctypes.c_ubyte * _RESOURCE_BYTES)()
        drv.check(drv.lib.cuDeviceGetDevResource(self.device, whole, _CU_DEV_RESOURCE_TYPE_SM), "reading the SMs")
        asked = max(1, _field(bytes(whole), _SM_COUNT_OFFSET) // GROUP_SMS)
        self._groups = (ctypes.c_ubyte * (_RESOURCE_BYTES * asked))()
        made = ctypes.c_uint(asked)
        drv.check(
            drv.lib.cuDevSmResourceSplitByCount(self._groups, ctypes.byref(made), whole, remaining, 0, GROUP_SMS),
            f"splitting cuda:{device}'s SMs into groups of {GROUP_SMS}",
        )
        records = [bytes(self._groups[k * _RESOURCE_BYTES : (k + 1) * _RESOURCE_BYTES]) for k in range(made.value)]
        fields = [(_field(r, 0), _field(r, _SM_COUNT_OFFSET)) for r in records]  # (type, SM count) of each
        if not 1 <= made.value <= asked or any(f != (_CU_DEV_RESOURCE_TYPE_SM, GROUP_SMS) for f in fields):
            raise DeviceUnavailableError(
                f"cuda:{device}: the driver split its SMs as {made.value} groups {fields[:3]}..., not groups of "
                f"{GROUP_SMS} in the {_RESOURCE_BYTES}-byte layout of CUDA 12.4-13.x: SM shares are unavailable"
            )
        self.groups = made.value

    def describe(self, groups: tuple[int, ...]) -> ctypes.c_void_p:
        """A resource descriptor of the SMs of ``groups`` (any of this split's, adjacent or not)."""
        drv = _the_driver()
        chosen = (ctypes.c_ubyte * (_RESOURCE_BYTES * len(groups)))()  # their records, side by side
        for k, g in enumerate(groups):
            ctypes.memmove(ctypes.addressof(chosen) + k * _RESOURCE_BYTES,
                           ctypes.addressof(self._groups) + g * _RESOURCE_BYTES, _RESOURCE_BYTES)  # fmt: skip
        desc = ctypes.c_void_p()
        drv.check(drv.lib.cuDevResourceGenerateDesc(ctypes.byref(desc), chosen, len(groups)), "describing the share")
        return desc


_splits: dict[int, _DeviceSplit] = {}
_splits_lock = threading.Lock()


def _device_split(device: int) -> _DeviceSplit:
    with _splits_lock:
        if device not in _splits:
            _splits[device] = _DeviceSplit(device)
        return _splits[device]


def shareable_groups(device: int) -> int:
    """How many groups of ``GROUP_SMS`` SMs shares of CUDA device ``device`` are made of (needs the GPU)."""
    return _device_split(device).groups


class GreenContext:
    """A green context over the SMs of groups ``groups`` of one GPU (exactly those SMs).

    Never destroyed: everything made in it (its streams, graph memory, the caching allocator's
    events on those streams, freed as late as interpreter exit) must not outlive it, and a free
    after its destruction aborts the process ("context is destroyed"). ``SmShares`` reuses one no live
    share holds for the same groups, so their number stays bounded: at most two per set of groups (a
    model's old and new versions during a swap, which takes the old version's groups first:
    ``SmGroups.take``), and as many sets as the shares a GPU has been given.
    """

    def __init__(self, split: _DeviceSplit, groups: tuple[int, ...]) -> None:
        drv = _the_driver()
        self._green = ctypes.c_void_p()
        drv.check(
            drv.lib.cuGreenCtxCreate(
                ctypes.byref(self._green), split.describe(groups), split.device, _CU_GREEN_CTX_DEFAULT_STREAM
            ),
            f"creating a green context of {len(groups) * GROUP_SMS} SMs",
        )
        self._context = ctypes.c_void_p()
        drv.check(drv.lib.cuCtxFromGreenCtx(ctypes.byref(self._context), self._green), "the green context's context")
        _keep_shares_on_set_device()

    def stream(self, highest_priority: bool) -> int:
        """A new non-blocking stream of this context (a raw ``CUstream``), at the device's highest
        priority or its lowest."""
        drv = _the_driver()
        least, greatest = ctypes.c_int(), ctypes.c_int()
        with self.current():  # the range is the current context's
            drv.check(drv.lib.cuCtxGetStreamPriorityRange(ctypes.byref(least), ctypes.byref(greatest)), "priorities")
        stream = ctypes.c_void_p()
        priority = greatest.value if highest_priority else least.value
        drv.check(
            drv.lib.cuGreenCtxStreamCreate(ctypes.byref(stream), self._green, _CU_STREAM_NON_BLOCKING, priority),
            "creating a stream in the share",
        )
        return int(stream.value or 0)

    @contextlib.contextmanager
    def current(self) -> Iterator[None]:
        """This context current on the calling thread (graph capture, eager launches), then the one before."""
        drv = _the_driver()
        drv.check(drv.lib.cuCtxPushCurrent_v2(self._context), "entering the share")
        _inside.depth = getattr(_inside, "depth", 0) + 1
        try:
            yield
        finally:
            _inside.depth -= 1
            popped = ctypes.c_void_p()
            drv.check(drv.lib.cuCtxPopCurrent_v2(ctypes.byref(popped)), "leaving the share")
            if popped.value != self._context.value:  # something inside switched contexts and did not switch back
                raise DeviceUnavailableError("the share's context was not the current one on leaving it")


_inside = threading.local()  # depth: how many shares' contexts the calling thread is inside (GreenContext.current)


def _keep_shares_on_set_device() -> None:
    """Make ``torch.cuda.set_device`` keep a share's context current (installed once, by the first share made).

    Compiled code (inductor's) calls ``torch.cuda.set_device(i)`` at every call, and its ``cudaSetDevice`` makes
    device i's primary context current in place of the share's: a compiled model in a share failed its load with
    "the share's context was not the current one on leaving it" and was served uncompiled. Inside a share a
    ``set_device`` to the device already current does nothing; outside one, and to another device, it is torch's.
    """
    import torch
    from torch.cuda._utils import _get_device_index

    set_device = torch.cuda.set_device
    if getattr(set_device, "keeps_shares", False):
        return

    @functools.wraps(set_device)
    def keeping_shares(device: torch.device | str | int | None) -> None:
        # The device read by torch's own reader: what torch's refuses is refused, what it takes is taken.
        if getattr(_inside, "depth", 0) and _get_device_index(device) == torch.cuda.current_device():
            return
        set_device(device)

    keeping_shares.keeps_shares = True  # type: ignore[attr-defined]
    torch.cuda.set_device = keeping_shares


@dataclass(frozen=True, eq=False)
class Share:
    """One model version's share: its owner, GPU, groups and their green context."""

    owner: str
    device: int
    groups: tuple[int, ...]
    context: GreenContext

    @property
    def sms(self) -> int:
        return len(self.groups) * GROUP_SMS


class SmShares:
    """The SM shares of one backend's GPUs: disjoint across models; green contexts reused (``GreenContext``).

    Thread-safe: models load on a loader thread while the loop unloads others.
    """

    def __init__(self) -> None:
        self._groups: dict[int, SmGroups] = {}  # per CUDA device, made at its first share
        self._contexts: dict[tuple[int, tuple[int, ...]], list[GreenContext]] = {}
        # The shares taken and not given back: one given back twice would take a hold of the owner's
        # other version on the same groups, leaving SMs it runs on free for another model.
        self._live: set[Share] = set()
        self._lock = threading.Lock()

    def groups(self, device: int) -> SmGroups:
        """CUDA device ``device``'s groups and who holds them."""
        with self._lock:
            return self._groups_of(device)

    def _groups_of(self, device: int) -> SmGroups:
        if device not in self._groups:
            self._groups[device] = SmGroups(_device_split(device).groups)
        return self._groups[device]

    def take(self, owner: str, device: int, fraction: float) -> Share:
        """A share of ``fraction`` of CUDA device ``device``'s shareable SMs for model ``owner``, on SMs no
        other model's share holds. Raises DeviceUnavailableError, saying what the others hold, when
        it does not fit."""
        with self._lock:
            groups = self._groups_of(device)
            count = groups_for(fraction, len(groups))
            try:
                taken = groups.take(owner, count)
            except ValueError as exc:
                raise DeviceUnavailableError(
                    f"model {owner!r} asks for sm_share {fraction:g} ({count} of cuda:{device}'s {len(groups)} "
                    f"groups of {GROUP_SMS} SMs), which does not fit beside the other models' shares: {exc}"
                ) from None
            # A context current on two threads at once is undefined (the driver does not lock it): a
            # model's new version, loading on the loader thread, gets a context of its own, not the one
            # its old version (same groups) may have current on the launcher thread.
            in_use = {live.context for live in self._live}
            made = self._contexts.setdefault((device, taken), [])
            context = next((c for c in made if c not in in_use), None)
            if context is None:
                try:
                    context = GreenContext(_device_split(device), taken)
                except BaseException:
                    groups.give_back(owner, taken)
                    raise
                made.append(context)
            share = Share(owner, device, taken, context)
            self._live.add(share)
        return share

    def give_back(self, share: Share) -> None:
        """Release ``share`` (its model's streams are idle): its SMs may go to another model. Raises
        ValueError for a share given back already."""
        with self._lock:
            if share not in self._live:
                raise ValueError(f"{share.owner!r}'s share of cuda:{share.device} groups {list(share.groups)} was "
                                 "given back already")  # fmt: skip
            self._live.discard(share)
            self._groups[share.device].give_back(share.owner, share.groups)
