"""docs/PROTOCOL.md against the code: its client runs against a real server; its bytes and tables are wire.py's."""

from __future__ import annotations

import ast
import asyncio
import dataclasses
import re
import socket
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_asyncio

from streamgpu.config import Config, ListenerSpec
from streamgpu.models.spec import ModelSpec
from streamgpu.protocol import wire
from streamgpu.protocol.wire import FrameFlags, FrameHeader, Hello, Limits, ReplyFlags, ReplyHeader, Status, Timings
from streamgpu.server import Server

DOC = (Path(__file__).parent.parent / "docs" / "PROTOCOL.md").read_text()


def section(number: int) -> str:
    """The text of ``## <number>.`` up to the next ``## `` heading."""
    start = DOC.index(f"\n## {number}. ")
    end = DOC.find("\n## ", start + 1)
    return DOC[start : end if end >= 0 else len(DOC)]


def client_code() -> str:
    """The section-9 client, exactly as printed."""
    text = section(9)
    code = text[text.index("```python\n") + len("```python\n") :]
    return code[: code.index("```")]


def sketch(port: int, version: int) -> str:
    """The section-9 client with only its port (and protocol version) substituted."""
    code = client_code()
    assert code.count("\nPORT = 7878") == 1 and code.count("\nVERSION = 2") == 1
    return code.replace("\nPORT = 7878", f"\nPORT = {port}").replace("\nVERSION = 2", f"\nVERSION = {version}")


def shipped_config() -> Config:
    """``streamgpu serve`` as shipped (model ``default``, builtin:small), on a free port, on the CPU."""
    overrides: dict[str, Any] = {"port": 0, "device": "cpu"}
    try:
        return Config(**overrides)
    except TypeError:  # a Config whose address lives in its listeners: port addresses the first one
        return Config.load(None, env={}, **overrides)


@pytest_asyncio.fixture
async def server() -> AsyncIterator[Server]:
    async with Server(shipped_config()) as srv:
        yield srv


async def run_python(code: str, timeout: float = 120.0) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode == 0, err.decode()
    return out.decode()


# --- section 9: the minimal client, run as written against the shipped server ------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("version", [2, 1])
async def test_minimal_client_runs_as_written_against_the_shipped_server(server: Server, version: int) -> None:
    out = await run_python(sketch(server.port, version))
    lines = out.splitlines()
    assert lines[0].startswith(f"protocol version {version} limits ")
    limits = ast.literal_eval(lines[0].split(" limits ", 1)[1])
    if version == 1:
        assert limits is None
    else:  # the shipped defaults, as section 6 documents them
        cfg = Config()
        assert limits == {
            "max_frames_in_flight": cfg.max_frames_per_connection,
            "max_producer_bytes": cfg.ring_bytes // 4,
            "receive_timeout_ms": int(cfg.receive_timeout_s * 1000),
            "min_receive_rate": cfg.min_receive_rate,
            "max_priority": 255,
        }
    assert re.fullmatch(r"status 0 +dtype 8 shape \(1000,\)", lines[1]), lines[1]
    assert re.fullmatch(r"arg max \d+ \(random weights: meaningless\)", lines[2]), lines[2]


def test_minimal_client_output_shown_in_the_doc_matches_what_it_prints() -> None:
    text = section(9)
    shown = text[text.index("It prints something like:") :]
    shown = shown[shown.index("```\n") + 4 :]
    shown = shown[: shown.index("```")]
    first, second, third = shown.splitlines()
    assert ast.literal_eval(first.split(" limits ", 1)[1])["max_frames_in_flight"] == 256
    assert re.fullmatch(r"status 0 +dtype 8 shape \(1000,\)", second)
    assert third.startswith("arg max ")


def test_minimal_client_handles_a_refusal_and_a_connection_reply() -> None:
    """The sketch's error paths, against canned server bytes (no streamgpu server needed)."""
    namespace: dict[str, Any] = {"__name__": "sketch"}
    exec(compile(client_code(), "PROTOCOL.md", "exec"), namespace)
    connect, infer = namespace["connect"], namespace["infer"]
    refusal = wire.encode_welcome(wire.Welcome(Status.UNSUPPORTED_VERSION, 0, 0, "use 1 or 2", version=1))
    welcome = wire.encode_welcome(wire.Welcome(Status.OK, 1, 2, limits=Limits(3, 4, 5, 6, 7)))
    bye = ReplyHeader(0, 0, Status.RECEIVE_TIMEOUT, message="late", flags=ReplyFlags.CONNECTION)
    bye_bytes = b"".join(bytes(p) for p in wire.encode_reply(bye))

    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve(messages: list[bytes]) -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(8)  # the HELLO (no token)
                for m in messages:
                    conn.sendall(m)
                conn.recv(1 << 20)  # until the client closes

        t = threading.Thread(target=serve, args=([refusal],))
        t.start()
        with pytest.raises(ConnectionError, match="refused: status 10: use 1 or 2"):
            connect("127.0.0.1", port)  # asked for v2, refused in the v1 layout
        t.join(10)
        t = threading.Thread(target=serve, args=([welcome, bye_bytes],))
        t.start()
        sock, info = connect("127.0.0.1", port)
        try:
            names = ("max_frames_in_flight", "max_producer_bytes", "receive_timeout_ms", "min_receive_rate")
            limits = dict(zip((*names, "max_priority"), (3, 4, 5, 6, 7), strict=True))
            assert info == {"version": 2, "max_payload": 1, "ring_bytes": 2, "limits": limits}
            with pytest.raises(ConnectionError, match="server closed the connection: status 11: late"):
                infer(sock, bytes(3), (3,))  # the connection reply is not taken for the frame's (0, 0)
        finally:
            sock.close()
        t.join(10)


# --- section 8: the worked examples, byte for byte ----------------------------------------------

HEX_LINE = re.compile(r"^[0-9a-f]{4}  ((?:[0-9a-f]{2} ?)+)$")


def hex_dumps(text: str) -> list[bytes]:
    """Every hex dump (``0000  53 47 ...`` lines in a code block) in ``text``, in order."""
    dumps: list[bytes] = []
    for block in re.findall(r"```\n(.*?)```", text, flags=re.S):
        rows = [m.group(1) for line in block.splitlines() if (m := HEX_LINE.match(line))]
        if rows:
            dumps.append(bytes.fromhex(" ".join(rows)))
    return dumps


def test_worked_example_bytes_are_wire_py_output() -> None:
    frame_payload = bytes([1, 2, 3, 4, 5, 6])
    frame = FrameHeader(
        stream_id=7, sequence=42, model="echo", dtype_code=1, shape=(2, 3), payload_len=6,
        timestamp_ns=0x0102030405060708, deadline_us=20_000, priority=10, flags=FrameFlags.LIVE,
    )  # fmt: skip
    reply = ReplyHeader(
        stream_id=7, sequence=42, status=Status.OK, dtype_code=1, shape=(2, 3), timestamp_ns=0x0102030405060708,
        timings=Timings(receive_us=3, queue_us=150, transfer_us=12, compute_us=900, total_us=1100, batch_size=4),
    )  # fmt: skip
    limits = Limits(max_frames_in_flight=256, max_producer_bytes=64 << 20, receive_timeout_ms=10_000,
                    min_receive_rate=1_000_000, max_priority=200)  # fmt: skip
    bye = ReplyHeader(0, 0, Status.RECEIVE_TIMEOUT, message="late", flags=ReplyFlags.CONNECTION)
    expected = [
        wire.encode_hello(Hello(version=1, token="ab")),
        wire.encode_welcome(wire.Welcome(Status.OK, 1 << 24, 1 << 28, "hi", version=1)),
        wire.encode_hello(Hello(version=2, token="ab")),
        wire.encode_welcome(wire.Welcome(Status.OK, 1 << 24, 1 << 28, "hi", version=2, limits=limits)),
        wire.encode_frame_header(frame) + frame_payload,
        b"".join(bytes(p) for p in wire.encode_reply(reply, frame_payload)),
        b"".join(bytes(p) for p in wire.encode_reply(bye, b"", 2)),
    ]
    assert hex_dumps(section(8)) == expected
    assert [len(e) for e in expected] == [10, 28, 10, 52, 66, 78, 68]  # the sizes the text states


# --- the tables -----------------------------------------------------------------------------------


def table_rows(text: str, header: str) -> list[list[str]]:
    """Cells of the markdown table whose header row starts with ``header``."""
    lines = text[text.index(header) :].splitlines()
    rows = []
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def test_status_table_is_wire_status() -> None:
    rows = table_rows(section(5), "| code | name | meaning |")
    assert {int(code): name for code, name, _ in rows} == {s.value: s.name for s in Status}
    v2_only = {name for code, name, meaning in rows if "v2 only" in meaning}
    assert v2_only == {s.name for s in Status if s not in wire.V1_STATUSES}


def test_dtype_table_is_wire_dtypes() -> None:
    rows = table_rows(section(4), "| code | type | numpy | itemsize |")
    documented = {int(code): (np.dtype(numpy.strip("`")), int(size)) for code, _, numpy, size in rows if code != "0"}
    assert documented == {code: (dt, dt.itemsize) for code, dt in wire.DTYPES.items()}


def test_admission_defaults_are_the_servers() -> None:
    """Section 6's table of settings and defaults against Config() and ModelSpec()."""
    cfg, spec = Config(), ModelSpec()
    rows = table_rows(section(6), "| setting | default | what it bounds |")
    assert len(rows) >= 10
    for setting, default, _ in rows:
        name = setting.split("`")[1]
        value = float(default.strip("`"))
        owner = spec if "per model" in setting else cfg
        assert getattr(owner, name) == value, f"{name}: doc says {default}, code has {getattr(owner, name)!r}"


def test_layout_tables_match_wire_sizes() -> None:
    def end_of(header_text: str) -> int:
        rows = table_rows(header_text, "| offset | size | type | field | meaning |")
        fixed = [r for r in rows if r[0].isdigit() and r[1].isdigit()]
        last = fixed[-1]
        return int(last[0]) + int(last[1])

    s3 = section(3)
    hello = s3[s3.index("### 3.1") : s3.index("### 3.2")]
    welcome = s3[s3.index("### 3.2") : s3.index("### 3.3")]
    frame = s3[s3.index("### 3.3") : s3.index("### 3.4")]
    reply = s3[s3.index("### 3.4") :]
    assert end_of(hello) == 8
    assert end_of(welcome) == wire.WELCOME_V1_SIZE
    assert end_of(welcome[welcome.index("v2 layout, from offset 26 on") :]) == wire.WELCOME_V2_SIZE
    assert end_of(frame) == wire.FRAME_HEADER_SIZE
    assert end_of(reply) == wire.REPLY_HEADER_SIZE


def test_no_examples_of_things_that_do_not_exist() -> None:
    assert "7070" not in DOC
    assert ModelSpec().name == "default" and ModelSpec().input_shape == (224, 224, 3)
    assert "224 x 224 x 3" in DOC and "(1000,)" in DOC
    # the hypothetical model `echo` only appears in the worked example, which says it is illustrative
    assert "echo`" not in DOC.replace(section(8), "")


def test_udp_section_matches_protocol_udp() -> None:
    from streamgpu.ingest.udp import UdpOptions
    from streamgpu.protocol import udp

    text = section(11)
    rows = table_rows(text, "| offset | size | type | field | meaning |")
    assert int(rows[-1][0]) + int(rows[-1][1]) == udp.HEADER_SIZE
    fields = [r[3] for r in rows]
    names = udp.HEADER_DTYPE.names or ()
    assert fields[1:] == [n if n not in ("index", "count") else f"chunk_{n}" for n in names[1:]]
    rows = table_rows(text, "| option | default | meaning |")
    options = {name.strip("`"): default.strip("`") for name, default, _ in rows}
    defaults = UdpOptions()
    assert set(options) == set(UdpOptions.__dataclass_fields__)
    for name, value in options.items():
        want = getattr(defaults, name)
        value = {"true": "True", "false": "False"}.get(value, value)  # TOML's booleans
        assert (list(want) if isinstance(want, tuple) else want) == ast.literal_eval(value), name
    assert f"at most {udp.DEFAULT_DATAGRAM_BYTES} bytes" in text
    assert "| 12 | INCOMPLETE |" in section(5) and wire.Status.INCOMPLETE == 12


@pytest.mark.asyncio(loop_factories=["uvloop"])  # the subprocess is what is tested
async def test_udp_send_example_runs_as_written_and_prints_what_the_doc_says() -> None:
    """Section 11.7: a camera sending with ``UdpConnection.send`` and a WebSocket watcher of its stream id."""
    text = section(11)
    text = text[text.index("### 11.7") :]
    code = text[text.index("```python\n") + len("```python\n") :]
    code = code[: code.index("```")]
    assert code.count("\nUDP_PORT = 7879\n") == 1 and code.count("\nHTTP_PORT = 8080\n") == 1
    listeners = [ListenerSpec(kind, "127.0.0.1", 0) for kind in ("tcp", "udp", "http")]
    async with Server(dataclasses.replace(shipped_config(), listeners=listeners)) as srv:
        udp_port, http_port = srv.addresses[1][1], srv.addresses[2][1]
        out = await run_python(code.replace("7879", str(udp_port)).replace("8080", str(http_port)))
    shown = text[text.index("It prints") :]
    assert out.splitlines()[0] == "{'subscribed': [7]}" and "`{'subscribed': [7]}`" in shown
    assert sorted(out.splitlines()[1:]) == ["0 OK 4000", "1 OK 4000", "2 OK 4000"]
    assert all(f"`{line}`" in shown for line in out.splitlines()[1:])
