"""The event loop's process-wide rules: the heap frozen once, before models load."""

from __future__ import annotations

import subprocess
import sys
import textwrap

# In a process of its own: the heap is frozen once per process, and this test process froze it at its
# first server start.
FROZEN_BEFORE_MODELS = textwrap.dedent(
    """
    import asyncio, gc, weakref
    from streamgpu.config import Config, ListenerSpec
    from streamgpu.loops import freeze_heap_once
    from streamgpu.models.spec import ModelSpec
    from streamgpu.server import Server

    class Node:
        pass

    async def main():
        old = Node(); old.me = old  # garbage with a cycle, made before the server starts
        old_ref = weakref.ref(old); del old
        spec = ModelSpec(input_shape=(16, 16, 3), max_batch_size=2)
        async with Server(Config(listeners=[ListenerSpec(port=0)], device="cpu", models=[spec])) as server:
            assert gc.get_freeze_count() > 0, "the heap was not frozen"
            assert old_ref() is None, "garbage that existed at the freeze was frozen, not freed"
            model = server.serving(spec.name)[0]
            model.cycle = model  # a model holding a reference cycle (compiled modules do)
            model_ref = weakref.ref(model); del model
            await server.unload_model(spec.name)
        gc.collect()
        assert model_ref() is None, "a model loaded at start was frozen: once unloaded it is never freed"
        assert not freeze_heap_once(), "the heap is frozen once per process"
        print("ok")

    asyncio.run(main())
    """
)


def test_the_heap_is_frozen_once_before_models_load_so_they_stay_collectable() -> None:
    out = subprocess.run([sys.executable, "-c", FROZEN_BEFORE_MODELS], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")
