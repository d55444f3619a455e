"""Gather and pre-processing kernels against torch references (needs a CUDA device and cupy)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(importlib.util.find_spec("cupy") is None, reason="needs cupy"),
]

MEAN = (0.485, 0.456, 0.406, 0.5)
STD = (0.229, 0.224, 0.225, 0.25)
DEV = "cuda"


def _ring_with_frames(n: int, frame_nbytes: int, gen: torch.Generator) -> tuple[torch.Tensor, list[int]]:
    """A pinned ring of random bytes with n frames at scattered 256-aligned slots."""
    slot = -(-frame_nbytes // 256) * 256
    slots = 2 * n + 3
    ring = torch.randint(0, 256, (slots * slot,), dtype=torch.uint8, generator=gen).pin_memory()
    order = torch.randperm(slots, generator=gen)[:n].tolist()
    return ring, [s * slot for s in order]


def _reference_frames(ring: torch.Tensor, offsets: list[int], frame_nbytes: int) -> torch.Tensor:
    return torch.stack([ring[o : o + frame_nbytes] for o in offsets]).to(DEV)


def _reference_pre(frames: torch.Tensor, c: int) -> torch.Tensor:
    """float64 NCHW reference of (x / 255 - mean) / std for uint8 [N, H, W, C] frames."""
    mean = torch.tensor(MEAN[:c], dtype=torch.float64, device=frames.device)
    std = torch.tensor(STD[:c], dtype=torch.float64, device=frames.device)
    return ((frames.double() / 255 - mean) / std).permute(0, 3, 1, 2)


def _assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert not torch.isnan(out).any(), "an output element was never written (poison NaN left)"
    err = (out.double() - ref).abs().max().item()
    tol = 2e-3 * ref.abs().max().item() if dtype == torch.float16 else 1e-5 * ref.abs().max().item()
    assert err <= tol, f"max abs error {err} > {tol}"


def test_pinned_ring_is_device_mapped_at_same_address() -> None:
    import cupy

    ring = torch.empty(1 << 20, dtype=torch.uint8, pin_memory=True)
    attrs = cupy.cuda.runtime.pointerGetAttributes(ring.data_ptr())
    assert attrs.type == cupy.cuda.runtime.memoryTypeHost
    assert attrs.devicePointer == ring.data_ptr() == attrs.hostPointer


@pytest.mark.parametrize("frame_nbytes", [150528, 1000, 17, 4099, 6 * 1024 * 1024])
@pytest.mark.parametrize("n", [1, 8, 33])
def test_gather_frames_matches_reference(frame_nbytes: int, n: int) -> None:
    from streamgpu.gpu.kernels import gather_frames

    if frame_nbytes > 1 << 20 and n > 8:
        pytest.skip("keep the pinned ring small")
    gen = torch.Generator().manual_seed(n * 100003 + frame_nbytes)
    ring, offsets = _ring_with_frames(n, frame_nbytes, gen)
    ref = _reference_frames(ring, offsets, frame_nbytes)
    stream = torch.cuda.Stream()
    for poison in (0x00, 0xFF):  # an unwritten byte mismatches under one of the two poisons
        out = torch.full((n, frame_nbytes), poison, dtype=torch.uint8, device=DEV)
        with torch.cuda.stream(stream):
            gather_frames(ring, offsets, frame_nbytes, out, stream)
        stream.synchronize()
        assert torch.equal(out, ref)


def test_gather_frames_more_than_one_launch_and_misaligned_ring() -> None:
    from streamgpu.gpu.kernels import MAX_FRAMES_PER_LAUNCH, gather_frames

    gen = torch.Generator().manual_seed(7)
    n, nbytes = MAX_FRAMES_PER_LAUNCH + 44, 333
    ring, offsets = _ring_with_frames(n, nbytes, gen)
    view = ring[3:]  # base not 16-aligned: byte path
    for r in (ring, view):
        ref = _reference_frames(r, offsets, nbytes)
        out = torch.full((n, nbytes), 0xAB, dtype=torch.uint8, device=DEV)
        gather_frames(r, offsets, nbytes, out, torch.cuda.current_stream())
        torch.cuda.synchronize()
        assert torch.equal(out, ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(
    ("n", "h", "w", "c"), [(1, 224, 224, 3), (33, 32, 48, 3), (2, 7, 5, 3), (3, 16, 16, 1), (4, 9, 8, 4)]
)
def test_preprocess_image_matches_reference(
    dtype: torch.dtype, channels_last: bool, n: int, h: int, w: int, c: int
) -> None:
    from streamgpu.gpu.kernels import preprocess_image

    frames = torch.randint(0, 256, (n, h, w, c), dtype=torch.uint8, device=DEV)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.full((n, c, h, w), float("nan"), dtype=dtype, device=DEV).contiguous(memory_format=fmt)
    got = preprocess_image(frames, MEAN[:c], STD[:c], dtype, channels_last, out=out)
    torch.cuda.synchronize()
    assert got is out
    _assert_close(out, _reference_pre(frames, c), dtype)
    fresh = preprocess_image(frames, MEAN[:c], STD[:c], dtype, channels_last)
    assert fresh.is_contiguous(memory_format=fmt) and fresh.shape == (n, c, h, w)
    torch.cuda.synchronize()
    _assert_close(fresh, _reference_pre(frames, c), dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(("n", "h", "w", "c"), [(1, 224, 224, 3), (33, 224, 224, 3), (5, 7, 5, 3), (300, 4, 4, 4)])
def test_gather_preprocess_matches_reference(
    dtype: torch.dtype, channels_last: bool, n: int, h: int, w: int, c: int
) -> None:
    from streamgpu.gpu.kernels import gather_preprocess

    gen = torch.Generator().manual_seed(n + h + c)
    nbytes = h * w * c
    ring, offsets = _ring_with_frames(n, nbytes, gen)
    frames = _reference_frames(ring, offsets, nbytes).view(n, h, w, c)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.full((n, c, h, w), float("nan"), dtype=dtype, device=DEV).contiguous(memory_format=fmt)
    stream = torch.cuda.Stream()
    gather_preprocess(ring, offsets, h, w, c, MEAN[:c], STD[:c], dtype, channels_last, out=out, stream=stream)
    stream.synchronize()
    _assert_close(out, _reference_pre(frames, c), dtype)


def test_argument_errors() -> None:
    from streamgpu.gpu.kernels import gather_frames, gather_preprocess, preprocess_image

    pinned = torch.zeros(4096, dtype=torch.uint8).pin_memory()
    out = torch.empty((1, 256), dtype=torch.uint8, device=DEV)
    s = torch.cuda.current_stream()
    with pytest.raises(ValueError, match="pinned"):
        gather_frames(torch.zeros(4096, dtype=torch.uint8), [0], 256, out, s)
    with pytest.raises(ValueError, match="multiple of 256"):
        gather_frames(pinned, [100], 256, out, s)
    with pytest.raises(ValueError, match="overruns"):
        gather_frames(pinned, [4096 - 256 + 256], 256, out, s)
    with pytest.raises(ValueError, match="shape"):
        gather_frames(pinned, [0, 256], 256, out, s)
    frames = torch.zeros((1, 4, 4, 3), dtype=torch.uint8, device=DEV)
    with pytest.raises(ValueError, match="dtype"):
        preprocess_image(frames, MEAN[:3], STD[:3], torch.bfloat16, False)
    with pytest.raises(ValueError, match="3 values"):
        preprocess_image(frames, MEAN[:2], STD[:3], torch.float16, False)
    with pytest.raises(ValueError, match="channels_last"):
        preprocess_image(
            frames, MEAN[:3], STD[:3], torch.float16, True, out=torch.empty((1, 3, 4, 4), device=DEV).half()
        )
    with pytest.raises(ValueError, match="channels"):
        gather_preprocess(pinned, [0], 4, 4, 5, (*MEAN, 0.0), (*STD, 1.0), torch.float16, False)
    from streamgpu.gpu.kernels import preprocess_table

    image = torch.empty((2, 3, 4, 4), dtype=torch.float16, device=DEV).contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="at least 3 entries"):
        preprocess_table(torch.zeros(2, dtype=torch.int64, device=DEV), MEAN[:3], STD[:3], True, image, s)
    with pytest.raises(ValueError, match="int64"):
        preprocess_table(torch.zeros(3, dtype=torch.int32, device=DEV), MEAN[:3], STD[:3], True, image, s)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize(("n", "h", "w", "c"), [(5, 224, 224, 3), (3, 7, 5, 3)])
def test_preprocess_table_captured_once_serves_other_batches(
    dtype: torch.dtype, n: int, h: int, w: int, c: int
) -> None:
    """The table is read when the kernel runs: one captured launch, replayed (by ``enqueue_replay``, with
    the table uploaded from page-locked memory and the result copied back) after the table was filled
    with another batch (fewer images, some in the mapped ring, some in device memory), processes that
    batch and leaves the rows past its count as they were."""
    from streamgpu.gpu.kernels import enqueue_replay, preprocess_table

    gen = torch.Generator().manual_seed(n * w)
    nbytes = h * w * c
    ring, offsets = _ring_with_frames(n, nbytes, gen)
    on_device = torch.randint(0, 256, (n, h, w, c), dtype=torch.uint8, generator=gen).to(DEV)
    fmt = torch.channels_last
    out = torch.full((n, c, h, w), float("nan"), dtype=dtype, device=DEV).contiguous(memory_format=fmt)
    table = torch.zeros(1 + n, dtype=torch.int64, device=DEV)
    stream = torch.cuda.Stream()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        preprocess_table(table, MEAN[:c], STD[:c], True, out, stream)

    count = n - 1  # fewer than captured: the last row must stay untouched
    sources = [ring.data_ptr() + offsets[i] if i % 2 else on_device[i].data_ptr() for i in range(count)]
    host_table = torch.tensor([count, *sources, 0], dtype=torch.int64).pin_memory()
    host_out = torch.empty(out.numel(), dtype=dtype, pin_memory=True)  # NHWC, as channels_last is in memory
    upload = (table.data_ptr(), host_table.data_ptr(), host_table.nbytes)
    download = (host_out.data_ptr(), out.data_ptr(), out.nbytes)
    enqueue_replay(0, stream.cuda_stream, upload, int(graph.raw_cuda_graph_exec()), [download])
    stream.synchronize()
    expected = torch.stack(
        [
            _reference_frames(ring, [offsets[i]], nbytes)[0].view(h, w, c) if i % 2 else on_device[i]
            for i in range(count)
        ]
    )
    got = host_out.to(DEV).view(n, h, w, c).permute(0, 3, 1, 2)
    _assert_close(got[:count], _reference_pre(expected, c), dtype)
    assert torch.isnan(got[count:]).all(), "a row past the table's count was written"
