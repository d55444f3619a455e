"""What waking a sleeping process costs on this machine: what ``busy_poll_us`` spares.

Two processes trade 64 bytes over a UNIX socket pair, N round trips; each side either sleeps in ``recv``
(woken by the kernel when the bytes land, as an event loop asleep in ``epoll_wait`` is) or polls (a
non-blocking ``recv`` in a loop, as a loop kept busy by ``busy_poll_us`` does). Between round trips the
parent stays busy for a gap (0, 200 and 1,000 us), leaving the child idle that long, as a server is between
a producer's frames. Prints p50, p99 and mean round trip per combination.

    python tools/bench_wakeup.py
"""

from __future__ import annotations

import argparse
import os
import socket
import time

import numpy as np


def echo(sock: socket.socket, polls: bool) -> None:
    sock.setblocking(not polls)
    while True:
        try:
            data = sock.recv(64)
        except BlockingIOError:
            continue
        if not data:
            return
        sock.send(data)


def round_trips(child_polls: bool, parent_polls: bool, gap_us: int, n: int) -> np.ndarray:
    """Round trip times in us (the first twentieth dropped: warm-up)."""
    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        ours.close()
        echo(theirs, child_polls)
        os._exit(0)
    theirs.close()
    ours.setblocking(not parent_polls)
    rtt = np.empty(n)
    message = b"x" * 64
    for i in range(n):
        busy_until = time.perf_counter_ns() + gap_us * 1000
        while time.perf_counter_ns() < busy_until:  # the parent busy elsewhere: the child idles meanwhile
            pass
        t0 = time.perf_counter_ns()
        ours.send(message)
        while True:
            try:
                ours.recv(64)
                break
            except BlockingIOError:
                continue
        rtt[i] = time.perf_counter_ns() - t0
    ours.close()
    os.waitpid(pid, 0)
    return rtt[n // 20 :] / 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--round-trips", type=int, default=20000)
    args = parser.parse_args()
    print(f"{'child':6s} {'parent':6s} {'gap us':>6s} | p50 us | p99 us | mean us")
    for gap in (0, 200, 1000):
        for child_polls, parent_polls in ((False, False), (True, False), (False, True), (True, True)):
            r = round_trips(child_polls, parent_polls, gap, args.round_trips)
            p50, p99 = np.percentile(r, [50, 99])
            child, parent = ("polls" if child_polls else "sleeps"), ("polls" if parent_polls else "sleeps")
            print(f"{child:6s} {parent:6s} {gap:6d} | {p50:6.1f} | {p99:6.1f} | {r.mean():6.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
