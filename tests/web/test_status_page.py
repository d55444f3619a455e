"""The status page in a real headless browser (Debian's chromium driven by Playwright): the numbers change
as frames flow. ``STATUS_PAGE_SCREENSHOT=docs/status_page.png`` also keeps a screenshot there."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp.test_utils import TestClient, TestServer

from streamgpu import client
from streamgpu.config import Config, ListenerSpec
from streamgpu.models.spec import ModelSpec
from streamgpu.server import Server
from streamgpu.web.app import create_app

SPEC = ModelSpec(input_shape=(32, 32, 3), max_batch_size=4, batch_buckets=(1, 4))


@pytest.mark.asyncio(loop_factories=["asyncio"])  # Playwright drives the browser over asyncio subprocess pipes
async def test_status_page_numbers_change_as_frames_flow(tmp_path: Path, browser_page: Any) -> None:
    config = Config(listeners=[ListenerSpec(port=0)], device="cpu", models=[SPEC])
    page = browser_page
    async with Server(config) as server, TestClient(TestServer(create_app(server))) as http:
        await page.goto(str(http.make_url("/")))
        await page.wait_for_function("document.getElementById('device').textContent.includes('cpu')")
        ok_cell = page.locator("tr[data-model=default] td.ok")
        assert await ok_cell.text_content() == "0"
        assert await page.locator("tr[data-model=default] td.p50").text_content() == "–"

        conn = await client.connect("127.0.0.1", server.port)
        frame = np.zeros(SPEC.input_shape, np.uint8)
        sent = 0
        rates: list[float] = []

        seen = asyncio.Event()  # the page showed a rate above zero (and its screenshot is taken): frames stop

        async def flow(seconds: float) -> None:
            nonlocal sent
            end = asyncio.get_running_loop().time() + seconds
            while asyncio.get_running_loop().time() < end and not seen.is_set():
                assert all(r.ok for r in await asyncio.gather(*(conn.infer(frame) for _ in range(4))))
                sent += 4
                await asyncio.sleep(0.02)

        shot = tmp_path / "status_page.png"
        sender = asyncio.create_task(flow(3.0))
        while not sender.done():  # while frames flow, the page's rate goes above zero
            rates.append(float(await page.locator("#throughput").text_content() or 0))
            if rates[-1] > 0 and not shot.exists():
                await page.screenshot(path=str(shot), full_page=True)
                seen.set()
            await asyncio.sleep(0.25)
        await sender
        assert max(rates) > 0, rates
        await page.wait_for_function(
            f"document.querySelector('tr[data-model=default] td.ok').textContent === '{sent}'", timeout=5000
        )
        assert await page.locator("tr[data-model=default] td.p50").text_content() != "–"
        assert await page.locator("tr[data-status=OK] td.count").text_content() == str(sent)
        bad = await conn.infer(np.zeros((2, 2, 3), np.uint8))
        assert not bad.ok
        await page.wait_for_function(
            "(document.querySelector('tr[data-status=BAD_FRAME] td.count') || {}).textContent === '1'",
            timeout=5000,
        )
        assert await page.locator("#connections").text_content() == "1"
        if target := os.environ.get("STATUS_PAGE_SCREENSHOT"):
            shutil.copyfile(shot, target)
        await conn.close()


@pytest.mark.asyncio(loop_factories=["asyncio"])  # what a handler answers, not loop behaviour
async def test_status_lists_a_model_loaded_while_serving() -> None:
    config = Config(listeners=[ListenerSpec(port=0)], device="cpu", models=[SPEC])
    late = ModelSpec(name="late", source="builtin:small", input_shape=(16, 16, 3), max_batch_size=2)
    async with Server(config) as server, TestClient(TestServer(create_app(server))) as http:
        await server.load_model(late)
        response = await http.get("/v1/status")
        assert response.status == 200, await response.text()
        models = {m["name"]: m for m in (await response.json())["models"]}
        assert models["late"]["source"] == "builtin:small" and models["late"]["input"] == "uint8 [16, 16, 3]"
