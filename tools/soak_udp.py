"""UDP soak (issue 10): memory stays flat under loss, and a clean producer is not affected.

A server (its own process: CPU backend, a trivial TorchScript model, TCP + UDP
listeners) and two UDP producers in this process, each keeping ``--window``
frames in flight for ``--minutes``:

* ``lossy``: 1 % of its datagrams dropped, 1 % sent twice, and the datagrams
  shuffled within windows of 16 (what ``--loss``/``--dup``/``--reorder`` say);
* ``clean``: plain ``streamgpu.client.connect_udp``.

Every ``--interval`` seconds the server reports its RSS, the ring bytes and
slots in use and the frames in reassembly; the table shows them with each
producer's replies in the interval. The checks (exit status 1 if one fails):

* every frame of which all datagrams were sent is answered OK with the right
  result (each input's result was computed over TCP first);
* every frame that lost some datagrams (and sent at least one) is answered
  INCOMPLETE, each exactly once (no reply is left over unmatched);
* the clean producer gets no INCOMPLETE and no error, and its frames/s in
  every full interval is at least ``--steady`` (0.5) of its median;
* memory is flat: the server's RSS grows by at most ``--rss-slack-mb``
  (16 MiB) from the first sample after ``--warmup`` to the last; after the
  producers stop, the ring is empty and no frame is in reassembly.

    python tools/soak_udp.py --minutes 10 --json out/soak_udp.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from streamgpu import client  # noqa: E402 - the repository is put on the path just above
from streamgpu.protocol import udp  # noqa: E402
from streamgpu.protocol.wire import Status  # noqa: E402

# --- the server (``soak_udp.py _server SHAPE TIMEOUT``: answers "sample" and "stop" lines on stdin) ----------


def server_main(shape: tuple[int, ...], reassembly_timeout_s: float) -> None:
    from bench_udp import model_source

    from streamgpu.config import Config, ListenerSpec
    from streamgpu.loops import new_event_loop
    from streamgpu.models.spec import ModelSpec
    from streamgpu.server import Server

    async def main() -> None:
        spec = ModelSpec(source=model_source("trivial", Path(tempfile.mkdtemp())), input_shape=shape)
        udp_spec = ListenerSpec("udp", "127.0.0.1", 0, {"reassembly_timeout_s": reassembly_timeout_s})
        cfg = Config(listeners=[ListenerSpec("tcp", "127.0.0.1", 0), udp_spec], device="cpu", models=[spec])
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        page = os.sysconf("SC_PAGE_SIZE")
        async with Server(cfg) as srv:
            print(json.dumps({"tcp": srv.addresses[0][1], "udp": srv.addresses[1][1]}), flush=True)
            while (await reader.readline()).strip() == b"sample":
                with open("/proc/self/statm") as statm:
                    rss = int(statm.read().split()[1]) * page
                metrics = srv.metrics()
                stats = metrics["listeners"][1]
                ring = metrics["ring"]
                sample = {"rss": rss, "ring_used": ring["used_bytes"], "slots": ring["slots_in_use"],
                          "partial": stats["partial_frames"], "udp": stats}  # fmt: skip
                print(json.dumps(sample), flush=True)

    new_event_loop("auto").run_until_complete(main())


class ServerProcess:
    """The server subprocess: its ports, and a sample on request."""

    def __init__(self, proc: asyncio.subprocess.Process, ports: dict[str, int]) -> None:
        self.proc = proc
        self.tcp, self.udp = ports["tcp"], ports["udp"]

    @classmethod
    async def start(cls, shape: tuple[int, ...], reassembly_timeout_s: float) -> ServerProcess:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "_server", ",".join(map(str, shape)), str(reassembly_timeout_s),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 120)
        if not line:
            raise RuntimeError("the soak server did not start (see its stderr above)")
        return cls(proc, json.loads(line))

    async def sample(self) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(b"sample\n")
        sample: dict[str, Any] = json.loads(await asyncio.wait_for(self.proc.stdout.readline(), 30))
        return sample

    async def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"stop\n")
        self.proc.stdin.close()
        await asyncio.wait_for(self.proc.wait(), 60)


# --- the producers ------------------------------------------------------------------------------------


class Damage:
    """Stands in for a UdpConnection's sending: drops ``loss``, repeats ``dup`` of the datagrams, and
    shuffles them within windows of ``reorder``; notes which frames lost a datagram and which sent any."""

    def __init__(self, conn: client.UdpConnection, loss: float, dup: float, reorder: int, seed: int) -> None:
        self.sock = conn.socket
        self.loss, self.dup, self.reorder = loss, dup, reorder
        self.rng = random.Random(seed)
        self.window: list[bytes] = []
        self.damaged: set[tuple[int, int]] = set()
        self.sent: set[tuple[int, int]] = set()
        self.datagrams = Counter[str]()
        self.handle: asyncio.TimerHandle | None = None

    def write(self, encoded: Any) -> None:
        datagrams: udp.Datagrams = encoded
        ch = udp.decode_chunk_header(datagrams.heads[: udp.HEADER_SIZE])
        key = (ch.stream_id, ch.sequence)
        for parts in datagrams:
            if self.rng.random() < self.loss:
                self.damaged.add(key)
                self.datagrams["dropped"] += 1
                continue
            self.sent.add(key)
            data = udp.join(parts)
            self.window.append(data)
            if self.rng.random() < self.dup:
                self.window.append(data)
                self.datagrams["repeated"] += 1
            if len(self.window) >= self.reorder:
                self.flush()
        if self.window and self.handle is None:  # the tail goes out shortly, still shuffled
            self.handle = asyncio.get_running_loop().call_later(0.005, self.flush)

    def flush(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None
        self.rng.shuffle(self.window)
        for data in self.window:
            try:
                self.sock.send(data)
                self.datagrams["sent"] += 1
            except OSError:  # send buffer full: lost like any other datagram
                self.datagrams["send_failed"] += 1
        self.window.clear()


@dataclass
class Tally:
    """One producer's replies: by status, wrong results, frames without a reply, and OK per interval."""

    name: str
    statuses: Counter[str] = field(default_factory=Counter)
    wrong: list[str] = field(default_factory=list)  # what went wrong, for the first few frames it did
    errors: int = 0
    no_reply: int = 0  # every datagram of the frame dropped: no reply can come (TimeoutError)
    answered: dict[tuple[int, int], Status] = field(default_factory=dict)
    interval: Counter[str] = field(default_factory=Counter)  # replies since the last sample

    def note(self, what: str) -> None:
        self.errors += 1
        if len(self.wrong) < 10:
            self.wrong.append(what)


async def produce(conn: client.UdpConnection, tally: Tally, inputs: list[np.ndarray], expected: list[np.ndarray],
                  window: int, stop: asyncio.Event, damage: Damage | None) -> None:  # fmt: skip
    room = asyncio.Semaphore(window)
    tasks: set[asyncio.Task[None]] = set()

    async def one(seq: int) -> None:
        i = seq % len(inputs)
        try:
            reply = await conn.submit(inputs[i], stream_id=0, sequence=seq)
        except TimeoutError:
            if damage is not None and (0, seq) not in damage.sent:
                tally.no_reply += 1
                tally.interval["no_reply"] += 1
            else:
                tally.note(f"frame {seq}: no reply")
            return
        finally:
            room.release()
        tally.statuses[reply.status.name] += 1
        tally.interval[reply.status.name] += 1
        tally.answered[(0, seq)] = reply.status
        damaged = damage is not None and (0, seq) in damage.damaged
        if damaged and reply.status != Status.INCOMPLETE:
            tally.note(f"frame {seq} lost datagrams but was answered {reply.status.name}: {reply.message}")
        elif not damaged and not (reply.ok and np.allclose(reply.unwrap(), expected[i], rtol=1e-4, atol=1e-5)):
            tally.note(f"frame {seq} was whole but answered {reply.status.name} {reply.message!r} or a wrong result")

    seq = 0
    while not stop.is_set():
        await room.acquire()
        task = asyncio.ensure_future(one(seq))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        seq += 1
    if tasks:
        await asyncio.wait(tasks)


@dataclass
class Report:
    rows: list[dict[str, Any]]
    checks: dict[str, tuple[bool, str]]
    producers: dict[str, Any]

    @property
    def ok(self) -> bool:
        return all(ok for ok, _ in self.checks.values())


async def soak(seconds: float, interval: float, shape: tuple[int, ...] = (224, 224, 3), window: int = 8,
               loss: float = 0.01, dup: float = 0.01, reorder: int = 16, warmup: float = 60.0,
               rss_slack_mb: float = 16.0, steady: float = 0.5, reassembly_timeout_s: float = 1.0,
               seed: int = 1, out: Any = sys.stdout) -> Report:  # fmt: skip
    """Run the soak; print the table to ``out`` as it goes; return the rows and checks."""
    server = await ServerProcess.start(shape, reassembly_timeout_s)
    rng = np.random.default_rng(seed)
    inputs = [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(8)]
    try:
        async with await client.connect("127.0.0.1", server.tcp) as tcp:
            expected = [(await tcp.infer(f)).unwrap().copy() for f in inputs]
        lossy = await client.connect_udp("127.0.0.1", server.udp, reply_timeout=10)
        clean = await client.connect_udp("127.0.0.1", server.udp, reply_timeout=10)
        damage = Damage(lossy, loss, dup, reorder, seed)
        lossy._write = damage.write  # type: ignore[method-assign]
        tallies = {"lossy": Tally("lossy"), "clean": Tally("clean")}
        stop = asyncio.Event()
        producers = [
            asyncio.ensure_future(produce(lossy, tallies["lossy"], inputs, expected, window, stop, damage)),
            asyncio.ensure_future(produce(clean, tallies["clean"], inputs, expected, window, stop, None)),
        ]
        rows: list[dict[str, Any]] = []
        print(f"{'t s':>6} {'RSS MiB':>8} {'ring KiB':>9} {'slots':>6} {'partial':>8} {'clean OK/s':>11}"
              f" {'lossy OK/s':>11} {'INCOMPLETE/s':>13}", file=out, flush=True)  # fmt: skip
        start = last = time.perf_counter()
        while True:
            now = time.perf_counter()
            await asyncio.sleep(max(0.0, min(last + interval, start + seconds) - now))
            now = time.perf_counter()
            span, last = now - last, now
            sample = await server.sample()
            row = {"t": round(now - start, 1), "rss": sample["rss"], "ring_used": sample["ring_used"],
                   "slots": sample["slots"], "partial": sample["partial"], "span": span,
                   "clean_ok": tallies["clean"].interval["OK"], "lossy_ok": tallies["lossy"].interval["OK"],
                   "lossy_incomplete": tallies["lossy"].interval["INCOMPLETE"]}  # fmt: skip
            for t in tallies.values():
                t.interval.clear()
            rows.append(row)
            print(f"{row['t']:>6.0f} {row['rss'] / 2**20:>8.1f} {row['ring_used'] / 1024:>9.0f} {row['slots']:>6}"
                  f" {row['partial']:>8} {row['clean_ok'] / span:>11.1f} {row['lossy_ok'] / span:>11.1f}"
                  f" {row['lossy_incomplete'] / span:>13.1f}", file=out, flush=True)  # fmt: skip
            if now - start >= seconds - 1e-3:
                break
        stop.set()
        await asyncio.gather(*producers)
        unmatched = {name: conn._protocol.unmatched_replies for name, conn in (("lossy", lossy), ("clean", clean))}
        await lossy.close()
        await clean.close()
        await asyncio.sleep(reassembly_timeout_s * 2)  # frames given up after the producers stopped
        final = await server.sample()
    finally:
        await server.stop()
    return judge(rows, final, tallies, damage, unmatched, warmup, rss_slack_mb, steady, out)


def judge(rows: list[dict[str, Any]], final: dict[str, Any], tallies: dict[str, Tally], damage: Damage,
          unmatched: dict[str, int], warmup: float, rss_slack_mb: float, steady: float,
          out: Any) -> Report:  # fmt: skip
    lossy, clean = tallies["lossy"], tallies["clean"]
    incomplete_expected = len(damage.damaged & damage.sent)
    checks: dict[str, tuple[bool, str]] = {}
    checks["lossy: whole frames OK with the right result, damaged ones INCOMPLETE"] = (
        lossy.errors == 0 and lossy.statuses["OK"] > 0 and lossy.statuses["INCOMPLETE"] > 0,
        f"{lossy.statuses['OK']} OK, {lossy.statuses['INCOMPLETE']} INCOMPLETE, {lossy.errors} wrong"
        f" {lossy.wrong[:3]}, {lossy.no_reply} with every datagram dropped (no reply)",
    )
    checks["lossy: each damaged frame answered INCOMPLETE exactly once"] = (
        lossy.statuses["INCOMPLETE"] == incomplete_expected and unmatched["lossy"] == 0,
        f"{lossy.statuses['INCOMPLETE']} INCOMPLETE for {incomplete_expected} damaged frames;"
        f" {unmatched['lossy']} replies left over",
    )
    rates = [r["clean_ok"] / r["span"] for r in rows[1:-1] if r["span"] > 0] or [
        r["clean_ok"] / r["span"] for r in rows if r["span"] > 0
    ]
    median = statistics.median(rates) if rates else 0.0
    checks["clean: unaffected (all OK, right results, steady frames/s)"] = (
        clean.errors == 0 and set(clean.statuses) == {"OK"} and unmatched["clean"] == 0 and median > 0
        and min(rates) >= steady * median,
        f"{dict(clean.statuses)}, {clean.errors} wrong {clean.wrong[:3]}; frames/s per interval"
        f" min {min(rates, default=0):.1f}, median {median:.1f} (floor {steady:.2f} x median)",
    )  # fmt: skip
    after = [r for r in rows if r["t"] >= warmup] or rows[len(rows) // 2 :]
    growth = (after[-1]["rss"] - after[0]["rss"]) / 2**20
    checks["server memory flat"] = (
        growth <= rss_slack_mb and final["ring_used"] == 0 and final["slots"] == 0 and final["partial"] == 0,
        f"RSS {after[0]['rss'] / 2**20:.1f} -> {after[-1]['rss'] / 2**20:.1f} MiB from t={after[0]['t']:.0f} s"
        f" ({growth:+.1f} MiB, slack {rss_slack_mb:g}); highest ring use {max(r['ring_used'] for r in rows) / 1024:.0f}"
        f" KiB, partial frames at most {max(r['partial'] for r in rows)}; after the producers stopped: ring"
        f" {final['ring_used']} bytes, {final['slots']} slots, {final['partial']} partial frames",
    )
    for name, (ok, detail) in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", file=out)
    producers = {t.name: {"statuses": dict(t.statuses), "errors": t.errors, "wrong": t.wrong,
                          "no_reply": t.no_reply} for t in tallies.values()}  # fmt: skip
    producers["lossy"]["datagrams"] = dict(damage.datagrams)
    producers["server_udp_stats"] = final["udp"]
    print(f"lossy datagrams: {dict(damage.datagrams)}; server UDP counters: {final['udp']}", file=out)
    return Report(rows, checks, producers)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_server":
        server_main(tuple(int(d) for d in sys.argv[2].split(",")), float(sys.argv[3]))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0, help="how long (default 10)")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between samples (default 10)")
    p.add_argument("--shape", default="224,224,3", help="frame shape, uint8 (default 224,224,3: 107 datagrams)")
    p.add_argument("--window", type=int, default=8, help="frames in flight per producer (default 8)")
    p.add_argument("--loss", type=float, default=0.01, help="lossy producer: datagrams dropped (default 0.01)")
    p.add_argument("--dup", type=float, default=0.01, help="lossy producer: datagrams sent twice (default 0.01)")
    p.add_argument("--reorder", type=int, default=16, help="lossy producer: shuffle window (default 16)")
    p.add_argument("--warmup", type=float, default=60.0, help="RSS is compared from the first sample after this")
    p.add_argument("--rss-slack-mb", type=float, default=16.0, help="RSS growth allowed after warm-up (default 16)")
    p.add_argument("--steady", type=float, default=0.5, help="clean frames/s floor, x its median (default 0.5)")
    p.add_argument(
        "--reassembly-timeout",
        type=float,
        default=1.0,
        help="the server's reassembly_timeout_s (default 1.0, the listener's default)",
    )
    p.add_argument("--json", help="write the rows and checks here")
    args = p.parse_args()
    report = asyncio.run(soak(
        args.minutes * 60, args.interval, tuple(int(d) for d in args.shape.split(",")), args.window, args.loss,
        args.dup, args.reorder, args.warmup, args.rss_slack_mb, args.steady, args.reassembly_timeout,
    ))  # fmt: skip
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        checks = {name: {"ok": ok, "detail": detail} for name, (ok, detail) in report.checks.items()}
        Path(args.json).write_text(json.dumps({"rows": report.rows, "checks": checks, "producers": report.producers},
                                              indent=2) + "\n")  # fmt: skip
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
