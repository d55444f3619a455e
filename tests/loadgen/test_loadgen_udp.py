"""The load generator's ``udp`` transport against a real server (CPU backend), with --loss."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from loadgen_support import Cli, serving

from streamgpu.config import Config, ListenerSpec
from streamgpu.loadgen import CONCURRENCY, Endpoint, LoadLevel, RunConfig, run
from streamgpu.loadgen.transports import UdpTransport
from streamgpu.models.spec import ModelSpec
from streamgpu.server import Server

SHAPE = (32, 32, 3)


@pytest.fixture(scope="module")
def udp_server() -> Iterator[Server]:
    """A real server with a UDP listener, on its own loop in a thread."""
    spec = ModelSpec(input_shape=SHAPE, max_batch_size=8, batch_buckets=(1, 8))
    listeners = [ListenerSpec("udp", "127.0.0.1", 0, {"reassembly_timeout_s": 0.2})]
    with serving(Config(listeners=listeners, device="cpu", models=[spec])) as server:
        yield server


def test_udp_transport_with_loss(udp_server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(UdpTransport, "REPLY_TIMEOUT_S", 1.0)  # a frame lost whole (p ~ 1e-5) costs 1 s, not 5
    cfg = RunConfig(
        endpoints=[Endpoint("127.0.0.1", udp_server.port)], levels=[LoadLevel(CONCURRENCY, 4)], transport="udp",
        loss=0.03, count=150, shape=SHAPE, warmup_s=0.0, window_s=0.3,
    )  # fmt: skip
    (r,) = run(cfg).results
    assert r.sent == r.completed == 150
    # 32x32x3 frames are 3 datagrams each: 3 % loss damages ~9 % of them, which the server answers INCOMPLETE
    assert r.statuses.get("OK", 0) + r.statuses.get("INCOMPLETE", 0) == 150
    assert 0 < r.statuses.get("INCOMPLETE", 0) < 40
    stats = udp_server.metrics()["listeners"][0]
    # A frame whose every datagram was lost (p ~ 3e-5 each) never reached the server: the client times it out
    # and counts it INCOMPLETE too (it once made the counts 12 against 13)
    lost_whole = r.statuses["INCOMPLETE"] - stats["incomplete"]
    assert stats["frames"] == r.statuses["OK"] and 0 <= lost_whole <= 2


def test_loss_needs_a_datagram_transport(cli: Cli) -> None:
    rc, _, err = cli("--loss", "0.1", "--count", "1")
    assert rc == 2 and "--loss needs a datagram transport" in err
    rc, _, err = cli("-i", "udp", "--loss", "1.5", "--count", "1")
    assert rc == 2 and "--loss must be a fraction" in err
