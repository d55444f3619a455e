"""docs/HTTP.md's browser JavaScript (the WebSocket subscriber and producer), run as written but for the
server's address, in headless chromium against a running server: its console output is checked."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from streamgpu import client
from streamgpu.config import Config, ListenerSpec
from streamgpu.models.spec import ModelSpec
from streamgpu.server import Server

DOC = Path(__file__).parents[2] / "docs" / "HTTP.md"
SPEC = ModelSpec(input_shape=(224, 224, 3), max_batch_size=4, batch_buckets=(1, 4))  # what the snippet sends
RESULT = re.compile(r"seq (\d+) status (\d+) (\d+) us (\d+) logits")


def snippets() -> list[str]:
    """The ```js blocks of the WebSocket section, in order."""
    section = DOC.read_text().split("## WebSocket streams", 1)[1]
    return re.findall(r"```js\n(.*?)```", section, re.S)


async def lines_until(lines: list[str], n: int, errors: list[Any]) -> list[str]:
    """Wait (10 s at most) until the page logged ``n`` lines; fail at once on a script error."""
    async with asyncio.timeout(10):
        while len(lines) < n:
            assert not errors, errors
            await asyncio.sleep(0.02)
    return lines


@pytest.mark.asyncio(loop_factories=["asyncio"])  # Playwright drives the browser over asyncio subprocess pipes
async def test_the_browser_snippets_subscribe_produce_and_decode_replies(browser_page: Any) -> None:
    subscriber, producer = snippets()
    cfg = Config(listeners=[ListenerSpec(port=0), ListenerSpec("http", port=0)], device="cpu", models=[SPEC],
                 auth_token="TOKEN")  # fmt: skip
    page, lines, errors = browser_page, [], []

    def console(message: Any) -> None:  # console.log lines only (the browser logs a favicon 404 as an error)
        if message.type == "log":
            lines.append(message.text)

    page.on("console", console)
    page.on("pageerror", lambda error: errors.append(error))
    async with Server(cfg) as server:
        address = f"127.0.0.1:{server.addresses[1][1]}"
        await page.goto(f"http://{address}/")
        await page.add_script_tag(content=subscriber.replace("127.0.0.1:8000", address))
        assert await lines_until(lines, 1, errors) == ['{"subscribed": [7]}']
        # A TCP producer's frame of stream 7 reaches the browser's subscription.
        conn = await client.connect("127.0.0.1", server.port, token="TOKEN")
        reply = await conn.infer(np.zeros(SPEC.input_shape, np.uint8), stream_id=7)
        await conn.close()
        assert reply.ok and reply.result is not None
        await lines_until(lines, 2, errors)
        # The browser's producer: three frames of stream 7; their REPLYs come to it and to the subscriber.
        await page.add_script_tag(content=producer.replace("127.0.0.1:8000", address))
        await lines_until(lines, 8, errors)
        await asyncio.sleep(0.2)
    assert not errors, errors
    results = [RESULT.fullmatch(line) for line in lines[1:]]
    assert all(results) and len(results) == 7, lines
    got = [(int(m[1]), int(m[2]), int(m[4])) for m in results if m]
    assert sorted(got) == sorted([(0, 0, reply.result.size)] * 3 + [(1, 0, 1000), (2, 0, 1000)] * 2), lines
    assert all(m and int(m[3]) > 0 for m in results)  # total_us read at its offset: never 0 for a run frame
