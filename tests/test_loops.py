"""The process-wide rules a server sets: the heap frozen and the collector's threshold raised while servers run
(models loaded after it stay collectable), and freed memory kept for reuse in the processes streamgpu runs."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import platform
import subprocess
import sys
import textwrap
import time

import pytest

from streamgpu import loops
from streamgpu.config import Config
from streamgpu.errors import ConfigError


def run_script(script: str, *args: str) -> str:
    """Run ``script`` in a Python process of its own (the settings checked are process-wide); its output."""
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


# In a process of its own: the freeze is process-wide, and its leaks are what is checked.
FROZEN_WHILE_SERVING = textwrap.dedent(
    """
    import asyncio, gc, os, weakref
    from streamgpu.config import Config, ListenerSpec
    from streamgpu.loops import GC_PAUSES, YOUNG_THRESHOLD
    from streamgpu.models.spec import ModelSpec
    from streamgpu.server import Server

    class Node:
        pass

    def ring_fds():
        return [f for f in os.listdir("/proc/self/fd") if "streamgpu" in os.path.realpath(f"/proc/self/fd/{f}")]

    def config():
        spec = ModelSpec(input_shape=(16, 16, 3), max_batch_size=2)
        return Config(listeners=[ListenerSpec(port=0)], device="cpu", models=[spec])

    async def freed(ref):
        # The loader thread's work item (the models it freed among its arguments) is dropped only after
        # the awaiting coroutine was woken: give it a moment
        for _ in range(200):
            gc.collect()
            if ref() is None:
                return True
            await asyncio.sleep(0.01)
        return False

    async def main():
        thresholds = gc.get_threshold()
        old = Node(); old.me = old  # garbage with a cycle, made before the server starts
        old_ref = weakref.ref(old); del old
        first = Server(config())
        await first.start()
        assert gc.get_freeze_count() > 0, "the heap was not frozen"
        assert gc.get_threshold()[0] == YOUNG_THRESHOLD, "frames in flight set off young collections"
        assert gc.callbacks.count(GC_PAUSES) == 1, "collections are not timed"
        name = first.config.models[0].name
        model = first.serving(name)[0]
        model.cycle = model  # a model holding a reference cycle (compiled modules do)
        model_ref = weakref.ref(model); del model
        await first.unload_model(name)
        assert await freed(model_ref), "a model loaded at start was frozen: unloaded, it is never freed"
        second = Server(config())
        await second.start()
        first_ref = weakref.ref(first)
        await first.stop(); del first
        gc.collect()
        assert gc.get_freeze_count() > 0, "a server still runs: the heap stays frozen"
        await second.stop(); del second
        gc.collect()
        assert gc.get_freeze_count() == 0, "no server runs: the heap is thawed"
        assert gc.get_threshold() == thresholds, "the collector's thresholds were not given back"
        assert GC_PAUSES not in gc.callbacks, "collections are timed with no server running"
        assert await freed(first_ref), "a stopped server (and its ring) was never freed"
        assert old_ref() is None, "garbage that was frozen is collected once thawed"
        assert not ring_fds(), ring_fds()
        print("ok")

    asyncio.run(main())
    """
)


def test_the_heap_is_frozen_while_servers_run_and_what_they_leave_is_freed() -> None:
    assert run_script(FROZEN_WHILE_SERVING).endswith("ok")


# The process's own collector settings, however it set them, are what a server leaves it (no torch: quick).
OWN_THRESHOLDS = textwrap.dedent(
    """
    import gc
    from streamgpu.loops import YOUNG_THRESHOLD, freeze_heap, thaw_heap

    for own, running in [((100, 3, 4), (YOUNG_THRESHOLD, 3, 4)),  # raised, its older thresholds kept
                         ((5 * YOUNG_THRESHOLD, 10, 10), (5 * YOUNG_THRESHOLD, 10, 10)),  # higher already: kept
                         ((0, 10, 10), (0, 10, 10))]:  # automatic collection off: it stays off
        gc.set_threshold(*own)
        freeze_heap()
        freeze_heap()  # a second server
        assert gc.get_threshold() == running, (own, gc.get_threshold())
        thaw_heap()
        assert gc.get_threshold() == running, "a server still runs"
        thaw_heap()
        assert gc.get_threshold() == own, (own, gc.get_threshold())
        assert gc.get_freeze_count() == 0
    gc.set_threshold(700, 10, 10)
    freeze_heap()
    gc.set_threshold(50_000, 20, 20)  # the process's own change while a server runs: kept after it
    thaw_heap()
    assert gc.get_threshold() == (50_000, 20, 20), gc.get_threshold()
    gc.set_threshold(700, 10, 10)
    gc.disable()  # off by gc.disable(): the thresholds change, collection stays off
    freeze_heap()
    assert not gc.isenabled() and gc.get_threshold()[0] == YOUNG_THRESHOLD
    thaw_heap()
    assert not gc.isenabled() and gc.get_threshold() == (700, 10, 10)
    print("ok")
    """
)


# Megabyte blocks written and freed three times over, as a batch's results and replies are: the page faults
# of the third time (every 4 KiB page of 32 MiB is 8,192).
REUSED_MEMORY = textwrap.dedent(
    """
    import ctypes, resource, sys
    from streamgpu.loops import tune_malloc

    if sys.argv[1] == "tuned":
        assert tune_malloc(), "no glibc mallopt"
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]

    def batch():
        blocks = [libc.malloc(4 << 20) for _ in range(8)]
        for block in blocks:
            ctypes.memset(block, 1, 4 << 20)
        for block in blocks:
            libc.free(block)

    batch()
    batch()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    batch()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)


def test_a_process_gets_its_own_collector_thresholds_back_and_collection_left_off_stays_off() -> None:
    assert run_script(OWN_THRESHOLDS).endswith("ok")


def test_a_server_process_reuses_freed_megabytes_without_page_faults() -> None:
    """``tune_malloc`` (``streamgpu serve`` and the ingest workers): freed blocks are reused, not mapped afresh."""
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("tune_malloc sets glibc's mallopt; this C library is not glibc")
    faults = {}
    for how in ("default", "tuned"):
        faults[how] = int(run_script(REUSED_MEMORY, how))
    assert faults["default"] > 4000, f"glibc's defaults no longer fault here: the test proves nothing ({faults})"
    assert faults["tuned"] < 100, faults


# A stop that is cancelled while it drains, and one whose release fails, still give back the process-wide
# collector settings (else the heap stays frozen and every later collection is timed for good).
STOP_CUT_SHORT = textwrap.dedent(
    """
    import asyncio, gc
    from streamgpu.config import Config, ListenerSpec
    from streamgpu.loops import GC_PAUSES
    from streamgpu.models.spec import ModelSpec
    from streamgpu.server import Server

    def config():
        return Config(listeners=[ListenerSpec(port=0)], device="cpu",
                      models=[ModelSpec(input_shape=(16, 16, 3), max_batch_size=2)])

    def settings():
        return gc.get_freeze_count(), gc.get_threshold(), GC_PAUSES in gc.callbacks

    async def never_idle():
        await asyncio.sleep(3600)

    async def main():
        before = settings()
        server = Server(config())
        await server.start()
        server._scheduler.idle = never_idle  # frames that never finish: the drain waits
        stopping = asyncio.ensure_future(server.stop(timeout=3600))
        await asyncio.sleep(0.2)
        stopping.cancel()
        try:
            await stopping
        except asyncio.CancelledError:
            pass
        assert settings() == before, f"a cancelled stop left {settings()} (before {before})"
        assert not server.addresses, "a cancelled stop left its listeners open"

        server = Server(config())
        await server.start()

        async def broken():
            raise RuntimeError("the results sink failed to close")

        server.results.close = broken
        try:
            await server.stop()
        except RuntimeError:
            pass
        assert settings() == before, f"a failed release left {settings()} (before {before})"
        print("ok")

    asyncio.run(main())
    """
)


def test_a_stop_cut_short_still_gives_the_collector_settings_back() -> None:
    assert run_script(STOP_CUT_SHORT).endswith("ok")


# In a process of its own: the affinity of the loop's thread is what is checked, and a failure must not leave
# the test process pinned.
LOOP_CPU = textwrap.dedent(
    """
    import asyncio, os, signal, sys, threading
    import numpy as np
    from streamgpu import client
    from streamgpu.config import Config, ListenerSpec
    from streamgpu.loops import new_event_loop
    from streamgpu.models.spec import ModelSpec
    from streamgpu.ingest import workers as ingest_workers
    from streamgpu.server import Server

    at_spawn = []  # each worker's CPUs as its spawn returns: it is still starting (an interpreter, imports)
    spawn = ingest_workers._Worker.spawn
    async def spawn_and_look(worker, *args):
        await spawn(worker, *args)
        at_spawn.append(os.sched_getaffinity(worker.proc.pid))
    ingest_workers._Worker.spawn = spawn_and_look

    async def main():
        allowed = os.sched_getaffinity(0)
        cpu = max(allowed)
        spare = allowed - {cpu}
        spec = ModelSpec(input_shape=(16, 16, 3), max_batch_size=2)
        cfg = Config(listeners=[ListenerSpec(port=0)], device="cpu", models=[spec], ingest_workers=1, loop_cpu=cpu)
        async with Server(cfg) as server:
            assert os.sched_getaffinity(0) == {cpu}, f"loop thread on {os.sched_getaffinity(0)}"
            conn = await client.connect("127.0.0.1", server.port)  # through a worker; the first batch starts
            reply = await conn.infer(np.zeros((16, 16, 3), np.uint8))  # the backend's thread
            await conn.close()
            assert reply.ok, reply
            helpers = {t.name: os.sched_getaffinity(t.native_id) for t in threading.enumerate()
                       if t.name.startswith("streamgpu-")}
            assert any(n.startswith("streamgpu-cpu") for n in helpers) and any(
                n.startswith("streamgpu-loader") for n in helpers), helpers
            assert all(cpus == spare for cpus in helpers.values()), f"helper threads on the loop's CPU: {helpers}"
            (listener,) = server._listeners
            workers = {pid: os.sched_getaffinity(pid) for pid in listener.pids}
            assert workers and all(cpus == spare for cpus in workers.values()), f"workers: {workers}"
            (pid,) = listener.pids
            os.kill(pid, signal.SIGKILL)  # its replacement is spawned while the loop serves
            while listener.pids in ([], [pid]) or len(at_spawn) < 2:  # (the new pid shows before spawn returns)
                await asyncio.sleep(0.05)
            assert at_spawn == [spare, spare], f"workers starting on {at_spawn}"
            assert os.sched_getaffinity(listener.pids[0]) == spare
        assert os.sched_getaffinity(0) == allowed, "the loop thread did not get its CPUs back"
        print("ok")

    new_event_loop(sys.argv[1]).run_until_complete(main())
    """
)


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs")
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_loop_cpu_runs_the_loop_alone_on_its_cpu(loop: str) -> None:
    """``loop_cpu``: the scheduling loop's thread on that CPU only; the helper threads it starts and the ingest
    workers (which inherit its CPUs when spawned) on the others; the thread's CPUs given back at stop."""
    assert run_script(LOOP_CPU, loop) == "ok"


# An application's threads started from the pinned loop's thread (its default executor's, say) inherit its CPU; native
# threads a helper starts (torch's) inherit the others.
LOOP_CPU_THREADS = textwrap.dedent(
    """
    import asyncio, os, sys
    from streamgpu.config import Config, ListenerSpec
    from streamgpu.loops import new_event_loop
    from streamgpu.models.spec import ModelSpec
    from streamgpu.server import Server

    def threads():
        return {int(tid): os.sched_getaffinity(int(tid)) for tid in os.listdir("/proc/self/task")}

    async def main():
        allowed = os.sched_getaffinity(0)
        cpu = max(allowed)
        spec = ModelSpec(input_shape=(16, 16, 3), max_batch_size=2)
        cfg = Config(listeners=[ListenerSpec(port=0)], device="cpu", models=[spec], loop_cpu=cpu)
        async with Server(cfg):
            inherited = await asyncio.get_running_loop().run_in_executor(None, os.sched_getaffinity, 0)
            assert inherited == {cpu}, inherited
        assert all(cpus == allowed for cpus in threads().values()), f"after stop: {threads()}, allowed {allowed}"
        print("ok")

    new_event_loop(sys.argv[1]).run_until_complete(main())
    """
)


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs")
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_loop_cpu_gives_threads_started_while_pinned_their_cpus_back_at_stop(loop: str) -> None:
    """A thread started while the loop was pinned (the loop's default executor's, an ingest worker's reaper, torch's
    own) is on the loop's CPU or beside it; at stop it gets the CPUs the loop had, not kept off them for good."""
    assert run_script(LOOP_CPU_THREADS, loop) == "ok"


def test_loop_cpu_pins_one_loop_per_process_and_nests_on_the_same_one() -> None:
    script = textwrap.dedent(
        """
        import os, threading
        from streamgpu import loops

        allowed = os.sched_getaffinity(0)
        cpu, other = max(allowed), min(allowed)
        loops.pin_loop_thread(cpu)
        loops.pin_loop_thread(cpu)  # a second server on the same loop
        assert loops.spare_cpus() == tuple(sorted(allowed - {cpu}))
        seen = []
        t = threading.Thread(target=lambda: seen.append(os.sched_getaffinity(0)))
        t.start(); t.join()
        assert seen == [{cpu}], seen  # inherited: why helper threads call leave_loop_cpu
        t = threading.Thread(target=lambda: (loops.leave_loop_cpu(), seen.append(os.sched_getaffinity(0))))
        t.start(); t.join()
        assert seen[1] == allowed - {cpu}, seen
        errors = []
        def elsewhere():
            try:
                loops.pin_loop_thread(cpu)
            except ValueError as exc:
                errors.append(str(exc))
        t = threading.Thread(target=elsewhere)
        t.start(); t.join()
        assert errors and "loop_cpu" in errors[0] and "one pinned loop per process" in errors[0], errors
        loops.unpin_loop_thread()
        assert os.sched_getaffinity(0) == {cpu}  # the first server still runs
        loops.unpin_loop_thread()
        assert os.sched_getaffinity(0) == allowed and loops.spare_cpus() is None
        print("ok")
        """
    )
    if not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPUs")
    assert run_script(script) == "ok"


# In a process of its own: the collector's settings and the pin are process-wide.
UNPIN_REFUSED = textwrap.dedent(
    """
    import asyncio, errno, gc, os, sys
    from streamgpu import loops
    from streamgpu.config import Config, ListenerSpec
    from streamgpu.loops import new_event_loop
    from streamgpu.models.spec import ModelSpec
    from streamgpu.server import Server

    def refused(pid, cpus):  # the cgroup's cpuset moved off every CPU the loop had (a kubelet's shared pool)
        raise OSError(errno.EINVAL, "Invalid argument")

    async def main():
        before = gc.get_freeze_count(), gc.get_threshold()
        spec = ModelSpec(input_shape=(16, 16, 3), max_batch_size=2)
        server = Server(Config(listeners=[ListenerSpec(port=0)], device="cpu", models=[spec],
                               loop_cpu=max(os.sched_getaffinity(0))))
        await server.start()
        os.sched_setaffinity = refused
        try:
            await server.stop()
        except OSError:
            pass
        after = gc.get_freeze_count(), gc.get_threshold()
        assert after == before, f"an unpin that failed left the collector's settings {after} (before {before})"
        assert loops.spare_cpus() is None
        print("ok")

    new_event_loop(sys.argv[1]).run_until_complete(main())
    """
)


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs")
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_loop_cpu_unpin_refused_at_stop_still_gives_the_collector_settings_back(loop: str) -> None:
    """The thread's CPUs cannot be given back (its cgroup moved): stop raises, but the heap is still thawed."""
    assert run_script(UNPIN_REFUSED, loop) == "ok"


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux")
def test_leave_loop_cpu_copes_with_the_pin_released_meanwhile(monkeypatch: pytest.MonkeyPatch) -> None:
    """A helper thread starting (another server's, on another loop) as the pinned server stops: the pin released
    between ``leave_loop_cpu``'s check and its use must not fail the pool's initializer (a broken pool)."""
    allowed = frozenset(os.sched_getaffinity(0))

    class Released:  # a pin that the loop's thread releases as soon as it is looked at
        spare = allowed

        @property
        def thread(self) -> int:
            monkeypatch.setattr(loops, "_pin", None)
            return -1

    monkeypatch.setattr(loops, "_pin", Released())
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, initializer=loops.leave_loop_cpu) as pool:
        assert pool.submit(lambda: 1).result() == 1


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs")
def test_loop_cpu_refused_by_the_system_names_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """A sandbox that refuses affinity changes (seccomp: EPERM): a ConfigError naming ``loop_cpu`` ('cannot serve:
    loop_cpu = ...'), not a bare OSError, and nothing pinned."""

    def refused(pid: int, cpus: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setaffinity", refused)
    with pytest.raises(ConfigError, match=r"loop_cpu = \d+: .*Operation not permitted.*leave it unset \(-1\)"):
        loops.pin_loop_thread(max(os.sched_getaffinity(0)))
    assert loops.spare_cpus() is None


@pytest.mark.parametrize("platform_name", ["darwin", "win32", "freebsd14"])
def test_loop_cpu_elsewhere_than_linux_is_a_config_error(monkeypatch: pytest.MonkeyPatch, platform_name: str) -> None:
    """Pinning reads /proc/self/task: on another system (even one whose Python has ``os.sched_setaffinity``)
    ``loop_cpu`` is refused when the config is checked, naming the setting; unset, nothing is asked of the system."""
    monkeypatch.setattr(sys, "platform", platform_name)
    if platform_name != "freebsd14":
        monkeypatch.delattr(os, "sched_setaffinity", raising=False)
        monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    with pytest.raises(ConfigError, match=r"loop_cpu needs Linux"):
        Config(loop_cpu=0)
    assert Config().loop_cpu == -1
    loops.leave_loop_cpu()  # (a helper thread's initializer, no loop pinned)
    assert loops.spare_cpus() is None


@pytest.mark.asyncio
async def test_busy_poll_keeps_the_loop_polling_for_its_window_after_each_poke() -> None:
    """While polling, the loop's thread stays on the CPU through an ``asyncio.sleep`` (its selector waits 0 s);
    the window runs from the last poke; once it is over, or the poll closed, the loop sleeps in its selector."""

    async def cpu_share(seconds: float) -> float:  # of the loop's thread over an asyncio.sleep
        wall, cpu = time.perf_counter(), time.thread_time()
        await asyncio.sleep(seconds)
        return (time.thread_time() - cpu) / (time.perf_counter() - wall)

    busy = loops.BusyPoll(0.15)
    assert await cpu_share(0.05) < 0.15  # not poked: asleep
    busy.poke()
    await asyncio.sleep(0.1)
    busy.poke()  # from here the window runs 150 ms more
    assert await cpu_share(0.1) > 0.35  # 100 to 200 ms after the first poke
    assert busy.polling  # 200 ms after the first poke (its own window is over), 100 ms after the last
    await asyncio.sleep(0.1)
    assert not busy.polling and await cpu_share(0.05) < 0.15
    busy.poke()
    busy.close()
    assert not busy.polling and await cpu_share(0.05) < 0.15  # a closed poll's callback is cancelled, not re-armed


@pytest.mark.asyncio
async def test_busy_poll_off_never_polls() -> None:
    busy = loops.BusyPoll(0.0)
    busy.poke()
    assert not busy.polling
    with pytest.raises(ValueError, match="window_s must be >= 0"):
        loops.BusyPoll(-1.0)
