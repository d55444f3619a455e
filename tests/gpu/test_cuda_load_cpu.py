"""CudaBackend.load's bookkeeping without a GPU (torch's device calls, the model and its streams faked): a
load that fails after its model is made gives its SM share and streams back; a model freed while others
are loaded in the process leaves its memory in torch's cache, up to ``CACHED_SHARE`` added since the cache
was last given back."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
import torch

from streamgpu.gpu import cuda, shares
from streamgpu.gpu.shares import SmShares
from streamgpu.models.spec import ModelSpec

EMPTIED: list[bool] = []  # a torch.cuda.empty_cache call each
MEMORY = {"reserved": 0, "allocated": 0}
TOTAL = 80 << 30


class FakeSplit:
    groups = 16


class FakeStream:
    def synchronize(self) -> None:
        pass


class FakeStreams:
    def __init__(self, share: Any) -> None:
        self.serve, self.capture, self.share = FakeStream(), FakeStream(), share

    @classmethod
    def make(cls, gpu: torch.device, share: Any = None) -> FakeStreams:
        return cls(share)

    def warm(self) -> None:
        raise RuntimeError("CUDA out of memory (warming the spare streams' cuBLAS workspaces)")


class FakeModel:
    def __init__(self, spec: ModelSpec, module: Any, gpu: torch.device, device: int, use_kernels: bool,
                 streams: FakeStreams, share: Any = None) -> None:  # fmt: skip
        self.spec, self.gpu, self.device, self.streams, self.share = spec, gpu, device, streams, share
        self.stream, self.capture_stream = streams.serve, streams.capture
        self.released = False

    def release(self) -> None:
        self.released = True


@pytest.fixture
def backend(monkeypatch: pytest.MonkeyPatch) -> cuda.CudaBackend:
    monkeypatch.setattr(shares, "_device_split", lambda device: FakeSplit())
    monkeypatch.setattr(shares, "GreenContext", lambda split, groups: object())
    monkeypatch.setattr(torch.cuda, "device", lambda gpu: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: EMPTIED.append(True))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda gpu: MEMORY["reserved"])
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda gpu: MEMORY["allocated"])
    monkeypatch.setattr(cuda, "ModelStreams", FakeStreams)
    monkeypatch.setattr(cuda, "CudaModel", FakeModel)
    monkeypatch.setattr(cuda, "PROCESS_CACHE", cuda.ProcessCache())
    monkeypatch.setattr(cuda.CudaBackend, "_prepare", lambda self, model: None)
    EMPTIED.clear()
    MEMORY.update(reserved=0, allocated=0)
    return fake_backend()


def fake_backend() -> cuda.CudaBackend:
    backend = cuda.CudaBackend.__new__(cuda.CudaBackend)  # no GPU here: only what load and unload use
    backend.gpus = [torch.device("cuda", 0)]
    backend.load_streams = [FakeStream()]  # type: ignore[list-item]
    backend.use_kernels = False
    backend._spare_streams = {0: []}
    backend._spare_made = [False]
    backend._total_memory = [TOTAL]
    backend._shares = SmShares()
    backend._loaded = 0
    return backend


def test_a_load_that_fails_making_the_spare_streams_leaves_no_share_held(backend: cuda.CudaBackend) -> None:
    # The first load on a GPU makes and warms a spare set of streams after the model is made; a failure
    # there (out of memory for the cuBLAS workspaces) failed the load with the model's share still held,
    # so no other model could take those SMs again.
    spec = ModelSpec(name="a", sm_share=0.5)
    with pytest.raises(RuntimeError, match="out of memory"):
        backend.load(spec, torch.nn.Identity())
    assert backend._shares.groups(0).held() == {}
    model = backend.load(ModelSpec(name="b", sm_share=1.0), torch.nn.Identity())  # every group is free
    assert backend._shares.groups(0).held() == {"b": 16}  # no second try at the spare: it failed once
    backend.unload(model)
    assert backend._shares.groups(0).held() == {}


def test_a_model_freed_beside_others_leaves_its_memory_cached_up_to_a_share_of_the_gpu(
    backend: cuda.CudaBackend,
) -> None:
    # empty_cache (cudaFree) waits for the whole device and holds every launch meanwhile: called at every
    # unload, a swap's under load left the GPU idle for 15 ms between the two versions' batches (H100).
    backend._spare_made = [True]
    serving = backend.load(ModelSpec(name="a"), torch.nn.Identity())
    old = backend.load(ModelSpec(name="b"), torch.nn.Identity())
    MEMORY.update(reserved=6 << 30, allocated=2 << 30)  # 4 GiB cached, a twentieth of the GPU
    backend.unload(old)
    assert EMPTIED == []  # "a" still serves on the GPU: nothing given back to the device
    extra = backend.load(ModelSpec(name="c"), torch.nn.Identity())
    MEMORY.update(reserved=int(TOTAL * cuda.CACHED_SHARE) + (3 << 30), allocated=2 << 30)
    backend.unload(extra)
    assert EMPTIED == [True]  # the cache past its share of the GPU: given back
    backend.unload(serving)  # the last model on the GPU: its memory goes back
    assert EMPTIED == [True, True]


def test_the_free_memory_inside_serving_models_graph_pools_does_not_empty_the_cache_at_every_unload(
    backend: cuda.CudaBackend,
) -> None:
    # Reserved minus allocated also counts the free blocks inside the graph pools of models still serving, which
    # no empty_cache gives back: where those alone passed CACHED_SHARE, every unload emptied the cache (and held
    # every launch on the GPU) again. The cache is now measured against what it held after it was last emptied.
    backend._spare_made = [True]
    serving = backend.load(ModelSpec(name="a"), torch.nn.Identity())
    pools = int(TOTAL * cuda.CACHED_SHARE) + (1 << 30)  # the serving graphs' pools: past the share alone
    MEMORY.update(reserved=pools + (4 << 30), allocated=4 << 30)
    first = backend.load(ModelSpec(name="b"), torch.nn.Identity())
    backend.unload(first)
    assert EMPTIED == [True]  # once: the cache had never been given back
    for name in "cde":  # swaps: each version's memory back in the cache, the serving pools' free memory still there
        backend.unload(backend.load(ModelSpec(name=name), torch.nn.Identity()))
    assert EMPTIED == [True]
    MEMORY.update(reserved=pools + (4 << 30) + int(TOTAL * cuda.CACHED_SHARE) + 1)  # grown past its share since
    backend.unload(backend.load(ModelSpec(name="f"), torch.nn.Identity()))
    assert EMPTIED == [True, True]
    backend.unload(serving)
    assert EMPTIED == [True, True, True]


def test_a_model_freed_in_one_server_leaves_the_cache_while_another_server_of_the_process_serves(
    backend: cuda.CudaBackend,
) -> None:
    # torch's cache is one per process (and empty_cache empties it on every GPU): counted per backend, the last
    # model of one embedded server emptied it under the batches of another server's models.
    other = fake_backend()
    other._spare_made = [True]
    backend._spare_made = [True]
    serving = other.load(ModelSpec(name="a"), torch.nn.Identity())
    backend.unload(backend.load(ModelSpec(name="b"), torch.nn.Identity()))
    assert EMPTIED == []  # "a" still serves in this process
    other.unload(serving)
    assert EMPTIED == [True]


class Closable:
    def close(self) -> None:
        pass

    def shutdown(self, wait: bool) -> None:
        pass


def test_a_server_stopped_with_its_models_loaded_leaves_none_of_them_counted(backend: cuda.CudaBackend) -> None:
    # A stopped server frees no model (its memory goes with the objects): counted on, the process never again had
    # "no model loaded", so a later server's last unload kept the cache.
    stopped = fake_backend()
    stopped._spare_made = [True]
    stopped._bridge = stopped._launcher = Closable()  # type: ignore[assignment]
    stopped._host = None
    stopped.load(ModelSpec(name="a"), torch.nn.Identity())
    stopped.close()
    backend._spare_made = [True]
    backend.unload(backend.load(ModelSpec(name="b"), torch.nn.Identity()))
    assert EMPTIED == [True]  # the last model in the process


def test_a_model_whose_release_fails_is_counted_gone_and_its_share_given_back(backend: cuda.CudaBackend) -> None:
    # A lost context makes the release raise: the unload stopped there, the model counted for good and its SM
    # share held, so no later model could take those SMs and the cache was never given back by the count.
    backend._spare_made = [True]
    serving = backend.load(ModelSpec(name="a"), torch.nn.Identity())
    lost = backend.load(ModelSpec(name="b", sm_share=0.5), torch.nn.Identity())

    def fails() -> None:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    lost.release = fails  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="illegal memory access"):
        backend.unload(lost)
    assert backend._shares.groups(0).held() == {}
    assert EMPTIED == []  # nothing to give back from a failed release
    backend.unload(serving)
    assert EMPTIED == [True]  # the last model: the failed one no longer counted
