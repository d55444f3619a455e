"""Shared by the web tests: a page of a real headless browser (Debian's chromium driven by Playwright).

A test that takes ``browser_page`` runs on the plain asyncio loop only (Playwright drives the browser
over asyncio subprocess pipes: ``@pytest.mark.asyncio(loop_factories=["asyncio"])``), and is skipped
with the reason when chromium or the playwright package is missing.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip


@pytest_asyncio.fixture
async def browser_page() -> AsyncIterator[Any]:
    """A fresh Playwright ``Page`` (1200 x 480) of headless chromium, closed after the test."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not installed (Debian package chromium; tools/install_test_deps.sh installs it)")
    playwright_api = pytest.importorskip("playwright.async_api", reason="the playwright package (test extra)")
    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield await browser.new_page(viewport={"width": 1200, "height": 480})
        finally:
            with contextlib.suppress(Exception):
                await browser.close()
