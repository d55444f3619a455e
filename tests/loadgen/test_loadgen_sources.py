"""Frame sources and transport plug-ins."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from fakeserver import FakeServer
from loadgen_support import FAST, Cli

from streamgpu.loadgen import CONCURRENCY, Endpoint, LoadLevel, RunConfig, register_transport, run, sources
from streamgpu.loadgen.errors import UsageError
from streamgpu.loadgen.transports import Connection, ReplyLike, Transport, transport_names
from streamgpu.protocol.wire import Status, Timings


def test_parse_shape_and_dtype() -> None:
    assert sources.parse_shape("224x224x3") == (224, 224, 3)
    assert sources.parse_shape("3, 224, 224") == (3, 224, 224)
    assert sources.parse_dtype("float32") == np.dtype("<f4")
    for bad in ("", "x", "axb", "2x-1", "1x2x3x4x5x6x7x8x9"):
        with pytest.raises(ValueError):
            sources.parse_shape(bad)


def test_synthetic_frames_are_seeded() -> None:
    a = sources.synthetic((4, 5, 3), np.dtype("u1"), seed=1)
    b = sources.synthetic((4, 5, 3), np.dtype("u1"), seed=1)
    c = sources.synthetic((4, 5, 3), np.dtype("u1"), seed=2)
    assert len(a) == 8 and all(f.shape == (4, 5, 3) and f.dtype == np.uint8 for f in a)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[0], a[1])
    floats = sources.synthetic((16,), np.dtype("<f2"), seed=0, count=2)
    assert floats[0].dtype == np.float16 and len(floats) == 2


def _image(path: Path, size: tuple[int, int], color: tuple[int, int, int]) -> Path:
    pil = pytest.importorskip("PIL.Image")
    img = pil.new("RGB", size, color)
    r = min(size) // 5
    img.paste((255, 255, 255), (size[0] // 2 - r, size[1] // 2 - r, size[0] // 2 + r, size[1] // 2 + r))
    img.save(path)
    return path


def test_images_are_cropped_and_resized(tmp_path: Path) -> None:
    path = _image(tmp_path / "wide.png", (200, 100), (10, 20, 30))
    (hwc,) = sources.from_images([path], (32, 32, 3), np.dtype("u1"))
    assert hwc.shape == (32, 32, 3) and tuple(hwc[0, 0]) == (10, 20, 30)
    assert hwc[16, 16].min() > 200  # the white centre survives the centre crop
    (chw,) = sources.from_images([path], (1, 3, 16, 24), np.dtype("<f4"))
    assert chw.shape == (1, 3, 16, 24) and chw.dtype == np.float32 and chw[0, 2, 0, 0] == 30.0
    (gray,) = sources.from_images([path], (8, 8), np.dtype("u1"))
    assert gray.shape == (8, 8)
    with pytest.raises(UsageError, match="not an image shape"):
        sources.from_images([path], (5, 5, 5), np.dtype("u1"))


def test_video_frames(tmp_path: Path) -> None:
    iio = pytest.importorskip("imageio.v3")
    pytest.importorskip("PIL")
    frames = np.stack([np.full((40, 60, 3), 20 * i, dtype=np.uint8) for i in range(5)])
    path = tmp_path / "clip.gif"
    iio.imwrite(path, frames)
    out = sources.from_video(path, (16, 16, 3), np.dtype("u1"))
    assert len(out) == 5 and out[0].shape == (16, 16, 3)
    assert [int(f[0, 0, 0]) for f in out] == [0, 20, 40, 60, 80]


def test_images_through_the_cli(cli: Cli, server: FakeServer, tmp_path: Path) -> None:
    paths = [_image(tmp_path / f"{i}.png", (64, 48), (i, i, i)) for i in range(3)]
    rc, _, err = cli("-u", server.url, "--count", "6", *FAST, "--shape", "3x24x24", "--images", *map(str, paths))
    assert rc == 0, err
    assert {h.shape for h in server.stats.headers} == {(3, 24, 24)}


class _Instant:
    """A reply that arrived at once."""

    status = Status.OK
    latency_s = 0.001
    timings = Timings(total_us=5)
    message = ""


class _MemoryConnection:
    max_payload = 0

    def __init__(self) -> None:
        self.frames = 0

    def submit(self, frame: np.ndarray, **_: object) -> asyncio.Future[ReplyLike]:
        self.frames += 1
        fut: asyncio.Future[ReplyLike] = asyncio.get_running_loop().create_future()
        fut.get_loop().call_soon(fut.set_result, _Instant())
        return fut

    async def close(self) -> None:
        pass


class _MemoryTransport(Transport):
    name = "memory"
    opened: ClassVar[list[_MemoryConnection]] = []

    async def connect(self, host: str, port: int, *, token: str = "", timeout: float = 10.0) -> Connection:
        conn = _MemoryConnection()
        self.opened.append(conn)
        return conn


def test_transport_plugin() -> None:
    register_transport("memory", _MemoryTransport)
    assert {"memory", "tcp"} <= set(transport_names())
    cfg = RunConfig(
        endpoints=[Endpoint("nowhere", 1)], levels=[LoadLevel(CONCURRENCY, 2)], transport="memory",
        shape=(4,), warmup_s=0, count=50,
    )  # fmt: skip
    (r,) = run(cfg).results
    assert r.statuses == {"OK": 50} and r.latency["p50"] == 0.001 and r.server_us["total_us"] == 5
    assert _MemoryTransport.opened[-1].frames == 50
