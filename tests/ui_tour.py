"""Drive the web UI in a real browser: chat with an adapter, compare three, open the adapter table.

Used by the browser test and, against the running demo, to take the README's screenshots:
    .venv/bin/python -m tests.ui_tour --url http://127.0.0.1:7860 --out docs/screenshots \
        --adapter json --prompt "Extract name, age and city as JSON: Ana is 34 and lives in Lima." \
        --compare base json sentiment
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"


@dataclass
class TourResult:
    chat_text: str
    compare_texts: list[str]


def open_browser(playwright):
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])


def pick_option(page, box: str, name: str) -> None:
    """Open a gradio dropdown and choose the option whose label starts with `name`."""
    page.locator(f"{box} input").click()
    page.get_by_role("option", name=re.compile(rf"^{re.escape(name)}\b")).first.click()


def chat(page, adapter: str, prompt: str, expect_text: str | None, shots: Path | None) -> str:
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Chat").click()
    pick_option(page, "#chat-adapter", adapter)
    page.locator("#chat-message textarea").fill(prompt)
    page.locator("#chat-send").click()
    bot = page.locator("#chatbot .message.bot, #chatbot [data-testid='bot']").last
    expect(bot).to_contain_text(f"[{adapter}]", timeout=60_000)
    if expect_text is not None:
        expect(bot).to_contain_text(expect_text, timeout=60_000)
    page.wait_for_timeout(500)
    if shots:
        page.screenshot(path=str(shots / "chat.png"), full_page=True)
    return bot.inner_text()


def compare(page, adapters: list[str], prompt: str, shots: Path | None) -> list[str]:
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Compare").click()
    group = page.locator("#compare-adapters")
    for label in group.locator("label").all():
        name = label.inner_text().split(" ", 1)[0]
        if label.locator("input").is_checked() != (name in adapters):
            label.click()
    page.locator("#compare-prompt textarea").fill(prompt)
    page.locator("#compare-go").click()
    answers = page.locator(".compare-answer")
    expect(answers).to_have_count(len(adapters), timeout=60_000)
    for i in range(len(adapters)):
        expect(answers.nth(i)).to_contain_text("tok/s", timeout=60_000)
    if shots:
        page.screenshot(path=str(shots / "compare.png"), full_page=True)
    return [answers.nth(i).inner_text() for i in range(len(adapters))]


def adapters_tab(page, shots: Path | None, show: str | None = None) -> str:
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Adapters").click()
    table = page.locator("#adapters-table")
    expect(table).to_contain_text("servable", timeout=30_000)
    if show:
        pick_option(page, "#adapters-pick", show)
        page.wait_for_timeout(1500)
    if shots:
        page.screenshot(path=str(shots / "adapters.png"), full_page=True)
    return table.inner_text()


def main() -> None:
    from playwright.sync_api import sync_playwright

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:7860")
    parser.add_argument("--out", default="docs/screenshots")
    parser.add_argument("--adapter", default="json")
    parser.add_argument("--prompt", default="Extract name, age and city as JSON: Ana is 34 and lives in Lima.")
    parser.add_argument("--compare", nargs="+", default=["base", "json", "sentiment"])
    parser.add_argument("--compare-prompt", default="Is this positive or negative? the kind farmer sings")
    args = parser.parse_args()
    shots = Path(args.out)
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = open_browser(p)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(args.url)
        chat(page, args.adapter, args.prompt, None, shots)
        compare(page, args.compare, args.compare_prompt, shots)
        adapters_tab(page, shots, show=args.adapter)
        browser.close()
    print(f"screenshots in {shots}")


if __name__ == "__main__":
    main()
