"""The results sink: the JSON-lines record, the file and TCP outlets, a slow subscriber skipping."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from streamgpu.protocol.wire import Status, Timings
from streamgpu.results import FileOutlet, Outlet, Results, TcpOutlet, encode_line, result_record


def test_record_schema_top_k_whole_result_and_errors() -> None:
    result = np.array([0.5, 3.0, -1.0, 2.0], np.float32)
    timings = Timings(1, 2, 3, 4, 10, 1)
    top = result_record("raw", "raw:9000/1", 7, "default", Status.OK, "", timings, result, top_k=2)
    assert top == {
        "source": "raw", "stream": "raw:9000/1", "seq": 7, "model": "default", "status": "OK", "message": "",
        "timings": {"receive_us": 1, "queue_us": 2, "transfer_us": 3, "compute_us": 4, "total_us": 10,
                    "batch_size": 1},
        "shape": [4], "dtype": "float32", "top_k": [[1, 3.0], [3, 2.0]],
    }  # fmt: skip
    whole = result_record("send", "0", 0, "m", Status.OK, "", timings, result.reshape(2, 2), top_k=0)
    assert whole["result"] == [0.5, 3.0, -1.0, 2.0] and whole["shape"] == [2, 2] and "top_k" not in whole
    assert result_record("raw", "s", 0, "m", Status.OK, "", timings, result, top_k=10)["top_k"][-1] == [2, -1.0]
    failed = result_record("raw", "s", 1, "m", Status.SUPERSEDED, "newer frame", Timings(), None, top_k=5)
    assert failed["status"] == "SUPERSEDED" and "result" not in failed and "top_k" not in failed
    line = encode_line(top)
    assert line.endswith(b"\n") and b"\n" not in line[:-1] and json.loads(line) == top


class Broken(Outlet):
    async def start(self) -> None:
        pass

    def write_line(self, line: bytes) -> None:
        raise RuntimeError("disk on fire")

    async def close(self) -> None:
        pass


@pytest.mark.asyncio
async def test_lines_reach_every_outlet_and_a_broken_one_stops_none(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    results = Results([Broken(), FileOutlet(str(path))])
    await results.start()
    for seq in range(3):
        results.publish({"seq": seq})
    await asyncio.sleep(0)  # the file is flushed once per loop iteration
    assert [json.loads(x)["seq"] for x in path.read_text().splitlines()] == [0, 1, 2]
    await results.close()
    assert Results().stats()["published"] == 0 and not Results().wanted


async def read_all(reader: asyncio.StreamReader) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (await reader.read()).splitlines()]


@pytest.mark.asyncio
async def test_a_slow_subscriber_skips_lines_and_is_told_how_many() -> None:
    outlet = TcpOutlet("127.0.0.1", 0, buffer_bytes=64 * 1024)
    await outlet.start()
    assert outlet.address is not None
    fast_reader, fast_writer = await asyncio.open_connection(*outlet.address)
    slow = socket.socket()  # reads nothing until the end
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: a small window
    slow.connect(outlet.address)
    for _ in range(100):
        if len(outlet.subscribers) == 2:
            break
        await asyncio.sleep(0.01)
    fast = asyncio.create_task(read_all(fast_reader))  # a subscriber that keeps up
    padding = "x" * 10_000
    for seq in range(1000):  # 10 MB: far past the slow one's socket buffers and its 64 KiB allowance
        outlet.write_line(encode_line({"seq": seq, "pad": padding}))
        if seq % 5 == 0:
            await asyncio.sleep(0.001)
    assert outlet.skipped > 0
    # Everything written is bounded: the slow subscriber's unsent bytes stay near the allowance.
    slow_sub = next(s for s in outlet.subscribers if s.transport is not None and s.skipped)
    assert slow_sub.transport is not None and slow_sub.transport.get_write_buffer_size() < 64 * 1024 + 11_000
    # The slow one reads now: it gets the next line after a {"skipped": N} marker.
    slow.setblocking(False)
    drained = bytearray()
    async with asyncio.timeout(10):
        while True:
            try:
                drained += slow.recv(1 << 20)
            except BlockingIOError:
                if slow_sub.transport.get_write_buffer_size() == 0:
                    break
                await asyncio.sleep(0)  # the server's loop writes what the window allows
    outlet.write_line(encode_line({"seq": 1000, "pad": padding}))
    last = encode_line({"seq": 1000, "pad": padding})
    async with asyncio.timeout(5):
        while not drained.endswith(last):
            try:
                drained += slow.recv(1 << 20)
            except BlockingIOError:
                await asyncio.sleep(0)
    slow_lines = [json.loads(x) for x in drained.splitlines()]
    markers = [x["skipped"] for x in slow_lines if "skipped" in x]
    got = [x["seq"] for x in slow_lines if "seq" in x]
    assert markers == [outlet.skipped] and sum(markers) + len(got) == 1001 and got[-1] == 1000
    assert got == sorted(got)
    await outlet.close()
    assert [x["seq"] for x in await fast] == list(range(1001))  # the fast one lost nothing
    fast_writer.close()
    slow.close()


def test_the_documented_example_line_has_the_schema() -> None:
    doc = (Path(__file__).parent.parent / "docs" / "PROTOCOL.md").read_text()
    example = doc[doc.index("### 10.2") :].split("```json\n", 1)[1].split("\n```", 1)[0]
    documented = json.loads(example)
    made = result_record("raw", "raw:9000/1", 17, "default", Status.OK, "", Timings(), np.ones(1000, np.float32), 2,
                         9000)  # fmt: skip
    assert list(documented) == list(made) and list(documented["timings"]) == list(made["timings"])
    assert documented["source"] == "raw" and len(documented["top_k"]) == 2


@pytest.mark.asyncio
async def test_a_subscriber_that_reads_nothing_does_not_hold_close_up() -> None:
    outlet = TcpOutlet("127.0.0.1", 0)
    await outlet.start()
    assert outlet.address is not None
    deaf = socket.socket()
    deaf.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    deaf.connect(outlet.address)
    for _ in range(100):
        if outlet.subscribers:
            break
        await asyncio.sleep(0.01)
    for seq in range(400):  # 4 MB: lines stay unsent in its transport
        outlet.write_line(encode_line({"seq": seq, "pad": "x" * 10_000}))
    await asyncio.sleep(0.05)
    loop = asyncio.get_running_loop()
    start = loop.time()
    await outlet.close(grace_s=0.2)
    assert loop.time() - start < 2 and not outlet.subscribers  # aborted after the grace, not left open
    deaf.close()


@pytest.mark.asyncio
async def test_the_results_sink_takes_every_front_ends_results_from_the_hub(tmp_path: Path) -> None:
    # One result path: a TCP producer's results and refusals reach the JSON lines through the server's
    # result hub, as raw producers' do (tests/ingest/test_raw.py), each line naming its stream id.
    from streamgpu import client
    from streamgpu.config import Config, ListenerSpec
    from streamgpu.models.spec import ModelSpec
    from streamgpu.server import Server

    spec = ModelSpec(input_shape=(8, 8, 3), max_batch_size=4, batch_buckets=(1, 4))
    out = tmp_path / "results.jsonl"
    cfg = Config(listeners=[ListenerSpec(port=0)], device="cpu", models=[spec], results_file=str(out))
    async with Server(cfg) as server:
        conn = await client.connect("127.0.0.1", server.port)
        frame = np.zeros(spec.input_shape, np.uint8)
        replies = await asyncio.gather(*(conn.submit(frame, stream_id=5) for _ in range(3)),
                                       conn.submit(np.zeros((4, 4, 3), np.uint8), stream_id=6))  # fmt: skip
        await conn.close()
    assert [r.status for r in replies] == [Status.OK] * 3 + [Status.BAD_FRAME]
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted((x["source"], x["stream_id"], x["seq"], x["status"]) for x in lines) == [
        ("tcp", 5, 0, "OK"), ("tcp", 5, 1, "OK"), ("tcp", 5, 2, "OK"), ("tcp", 6, 0, "BAD_FRAME")]  # fmt: skip
    assert len({x["stream"] for x in lines}) == 1 and lines[0]["stream"].startswith("tcp:")


def test_attached_results_tap_the_hub_only_while_an_outlet_takes_lines() -> None:
    from streamgpu.frame import Outcome
    from streamgpu.ingest.hub import Origin, ResultHub
    from streamgpu.protocol.wire import FrameHeader

    class Lines(Outlet):
        def __init__(self) -> None:
            self.got: list[dict[str, Any]] = []

        async def start(self) -> None:
            pass

        def write_line(self, line: bytes) -> None:
            self.got.append(json.loads(line))

        async def close(self) -> None:
            pass

    hub, results, lines = ResultHub(), Results(), Lines()
    results.attach(hub, top_k=1)
    header = FrameHeader(9000, 3, "default", 1, (1,), 1)
    hub.publish(header, Outcome(Status.OK, result=np.arange(3, dtype=np.float32)), Origin("raw", "raw:9000/1"))
    assert results.published == 0  # no outlet: no record made
    results.add_outlet(lines)
    hub.publish(header, Outcome(Status.OK, result=np.arange(3, dtype=np.float32)), Origin("raw", "raw:9000/1"))
    results.detach()
    hub.publish(header, Outcome(Status.OK))
    assert [(x["source"], x["stream"], x["stream_id"], x["seq"], x["top_k"]) for x in lines.got] == [
        ("raw", "raw:9000/1", 9000, 3, [[2, 2.0]])]  # fmt: skip


def test_the_results_tap_follows_its_outlets_wanting_lines() -> None:
    # The hub's watched() is what front ends trust to skip building outcomes: the sink's tap is attached
    # exactly while some outlet wants lines (an outlet says when that changes), not whenever it has one.
    from streamgpu.ingest.hub import ResultHub

    class Port(Outlet):  # like a results port: wanted while someone is connected
        def __init__(self) -> None:
            self.connected = 0

        async def start(self) -> None:
            pass

        def write_line(self, line: bytes) -> None:
            pass

        async def close(self) -> None:
            pass

        @property
        def wanted(self) -> bool:
            return self.connected > 0

        def connect(self, change: int) -> None:
            self.connected += change
            self.wanted_changed()

    hub, port = ResultHub(), Port()
    results = Results([port])
    results.attach(hub, top_k=1)
    assert not hub.watched(3)  # a port nobody reads: no tap
    port.connect(+1)
    port.connect(+1)
    assert hub.watched(3) and len(hub._taps) == 1
    port.connect(-1)
    assert hub.watched(3)
    port.connect(-1)
    assert not hub.watched(3)
    port.connect(+1)
    results.detach()
    assert not hub.watched(3)
    results.attach(hub, top_k=1)
    results.add_outlet(FileOutlet("unused"))  # a file always takes lines
    port.connect(-1)
    assert hub.watched(3) and len(hub._taps) == 1


@pytest.mark.asyncio
async def test_a_results_file_removed_while_serving_is_made_again(tmp_path: Path) -> None:
    """``rm`` (or a rotation that renames it) of the results file while serving: lines went on into the file
    removed, readable by nobody, its disk space growing unseen until the server stopped, nothing logged."""
    path = tmp_path / "r.jsonl"
    outlet = FileOutlet(str(path))
    outlet.check_s = 0.0  # (every flush looks at the path; a second apart otherwise)
    await outlet.start()
    outlet.write_line(encode_line({"seq": 0}))
    await asyncio.sleep(0)
    path.rename(tmp_path / "r.jsonl.1")  # rotated
    outlet.write_line(encode_line({"seq": 1}))  # (the flush that finds the path gone: still to the old file)
    await asyncio.sleep(0)
    outlet.write_line(encode_line({"seq": 2}))
    await asyncio.sleep(0)
    assert path.exists(), "lines still go to the file that was removed"
    assert [json.loads(x)["seq"] for x in path.read_text().splitlines()] == [2]
    assert [json.loads(x)["seq"] for x in (tmp_path / "r.jsonl.1").read_text().splitlines()] == [0, 1]
    path.unlink()  # removed
    outlet.write_line(encode_line({"seq": 3}))
    await asyncio.sleep(0)
    outlet.write_line(encode_line({"seq": 4}))
    await asyncio.sleep(0)
    assert [json.loads(x)["seq"] for x in path.read_text().splitlines()] == [4]
    await outlet.close()
