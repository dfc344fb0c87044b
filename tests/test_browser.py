"""A real browser (Debian's headless chromium driven by Playwright) against a live server.

Screenshots go to test-output/screenshots/. Without /usr/bin/chromium the test is skipped and
says why, unless LORASWAP_REQUIRE_BROWSER=1 (set by .ci/run, which installs chromium): then it fails.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from serve.server import AccessConfig
from tests.conftest import LiveServer, free_port, start_service
from tests.ui_tour import CHROMIUM, adapters_tab, chat, compare, open_browser

SHOTS = Path(__file__).resolve().parents[1] / "test-output" / "screenshots"

if not Path(CHROMIUM).exists() and os.environ.get("LORASWAP_REQUIRE_BROWSER") != "1":
    pytest.skip(f"{CHROMIUM} missing: apt-get install chromium (set LORASWAP_REQUIRE_BROWSER=1 to fail instead)", allow_module_level=True)


@pytest.mark.slow
def test_browser_chats_streams_compares_three_adapters_and_shows_the_table(tiny_base, two_adapters):
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    with LiveServer(start_service(tiny_base, two_adapters), AccessConfig("127.0.0.1", free_port())) as server:
        with sync_playwright() as p:
            browser = open_browser(p)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(server.url)
            reply = chat(page, "colors", "Color of cat?", "red", SHOTS)
            assert "[colors]" in reply and "red" in reply
            columns = compare(page, ["base", "colors", "sizes"], "Size of dog?", SHOTS)
            assert len(columns) == 3
            assert columns[0].startswith("base") and columns[1].startswith("colors") and columns[2].startswith("sizes")
            assert "big" in columns[2]  # the sizes adapter's own answer
            table = adapters_tab(page, SHOTS)
            assert "colors" in table and "sizes" in table
            browser.close()
    for name in ("chat.png", "compare.png", "adapters.png"):
        assert (SHOTS / name).stat().st_size > 10_000, name
