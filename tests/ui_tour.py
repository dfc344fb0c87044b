"""Drive the web UI in a real browser: chat with an adapter or a mix, click an example, compare
with the token view, vote blind, open the adapter table and its versions, promote and roll back,
train from the Train tab.

Used by the browser test and, against the running demo, to take the docs' screenshots
(`make screenshots`):
    .venv/bin/python -m tests.ui_tour --url http://127.0.0.1:7860 --out docs/screenshots \
        --adapter json --prompt "Extract name, age and city as JSON: Ana is 34 and lives in Lima." \
        --compare base json sentiment --mix json sentiment
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
    pattern = re.escape(name).replace("/", r"\/")  # Playwright's selector ends a regex at a bare '/'
    page.get_by_role("option", name=re.compile(rf"^{pattern}\b")).first.click()


def set_number(page, box: str, value: float) -> None:
    """Type a value into a gradio slider's or number's box and commit it."""
    field = page.locator(f"{box} input[type=number]")
    field.fill(str(value))
    field.press("Enter")
    field.blur()


def build_mix(page, prefix: str, parts: list[tuple[str, float]]) -> str:
    """Fill a mix builder (`chat` or `compare`) with (adapter, strength) rows; returns the spelling box's text."""
    from playwright.sync_api import expect

    pick_option(page, f"#{prefix}-adapter", parts[0][0])
    set_number(page, f"#{prefix}-strength", parts[0][1])
    if len(parts) > 1:
        page.locator(f"#{prefix}-mix").get_by_text("Mix in more adapters").click()
    for i, (name, strength) in enumerate(parts[1:], start=1):
        pick_option(page, f"#{prefix}-mix-{i}", name)
        set_number(page, f"#{prefix}-mix-strength-{i}", strength)
    spelled = "+".join(n if s == 1 else f"{n}*{s:g}" for n, s in parts)
    expect(page.locator(f"#{prefix}-spelling textarea")).to_have_value(spelled, timeout=10_000)
    return spelled


def send_chat(page, text: str, label: str, expect_text: str | None) -> str:
    """Send a message in the Chat tab; the reply's text once it is labelled with `label`."""
    from playwright.sync_api import expect

    page.locator("#chat-message textarea").fill(text)
    page.locator("#chat-send").click()
    bot = page.locator("#chatbot .message.bot, #chatbot [data-testid='bot']").last
    expect(bot).to_contain_text(f"[{label}]", timeout=60_000)
    if expect_text is not None:
        expect(bot).to_contain_text(expect_text, timeout=60_000)
    return settled(page, bot)


def settled(page, locator, quiet_ms: int = 1500, timeout_ms: int = 60_000) -> str:
    """The locator's text once it has stopped changing for `quiet_ms` (a streamed reply has ended)."""
    text, still, waited = locator.inner_text(), 0, 0
    while still < quiet_ms and waited < timeout_ms:
        page.wait_for_timeout(250)
        waited += 250
        now = locator.inner_text()
        still = still + 250 if now == text else 0
        text = now
    return text


def clear_chat(page) -> None:
    """Start a new conversation: an adapter answers the whole history, so a test's turn starts clean."""
    from playwright.sync_api import expect

    page.locator("#chat-clear").click()
    expect(page.locator("#chatbot .message.bot, #chatbot [data-testid='bot']")).to_have_count(0, timeout=10_000)


def chat(page, adapter: str, prompt: str, expect_text: str | None, shots: Path | None, shot: str = "chat.png") -> str:
    """A new conversation with one adapter: pick it, send `prompt`, wait for the labelled reply."""
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Chat").click()
    clear_chat(page)
    pick_option(page, "#chat-adapter", adapter)
    expect(page.locator("#chat-spelling textarea")).to_have_value(adapter, timeout=10_000)  # what the request names
    reply = send_chat(page, prompt, adapter, expect_text)
    if shots:
        page.screenshot(path=str(shots / shot), full_page=True)
    return reply


def chat_mix(page, parts: list[tuple[str, float]], prompt: str, shots: Path | None) -> tuple[str, str]:
    """Chat with a mix built in the builder; (its spelling, the reply)."""
    page.get_by_role("tab", name="Chat").click()
    clear_chat(page)
    spelled = build_mix(page, "chat", parts)
    reply = send_chat(page, prompt, spelled, None)
    if shots:
        page.screenshot(path=str(shots / "chat-mix.png"), full_page=True)
    return spelled, reply


def click_example(page, box: str, examples: str, shots: Path | None, shot: str = "examples.png") -> tuple[str, str]:
    """Click the first example prompt; (the example's text, the prompt box's value after the click)."""
    from playwright.sync_api import expect

    first = page.locator(f"{examples} button").first
    expect(first).to_be_visible(timeout=10_000)
    text = first.inner_text().strip()
    first.click()
    expect(page.locator(f"{box} textarea")).to_have_value(text, timeout=10_000)
    if shots:
        page.screenshot(path=str(shots / shot), full_page=True)
    return text, page.locator(f"{box} textarea").input_value()


def compare(page, adapters: list[str], prompt: str, shots: Path | None, token_view: bool = False,
            mixes: list[str] = (), shot: str = "compare.png") -> list[str]:
    """Compare the ticked adapters and the mix spellings given; each column's text."""
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Compare").click()
    page.get_by_role("tab", name="Side by side").click()
    group = page.locator("#compare-adapters")
    for label in group.locator("label").all():
        name = label.inner_text().split(" ", 1)[0]
        if label.locator("input").is_checked() != (name in adapters):
            label.click()
    page.locator("#compare-mixes textarea").fill("\n".join(mixes))
    tokens = page.locator("#compare-tokens input")
    if tokens.is_checked() != token_view:
        tokens.click()
    page.locator("#compare-prompt textarea").fill(prompt)
    page.locator("#compare-go").click()
    answers = page.locator(".compare-answer")
    columns = len(adapters) + len(mixes)
    expect(answers).to_have_count(columns, timeout=60_000)
    for i in range(columns):
        expect(answers.nth(i)).to_contain_text("tok/s", timeout=60_000)
    if token_view:
        expect(page.locator(".compare-answer .token-view").first).to_be_visible(timeout=30_000)
        page.locator(".compare-answer span.tok").first.hover()  # the hover text: the base's own choice
    if shots:
        page.screenshot(path=str(shots / shot), full_page=True)
    return [answers.nth(i).inner_text() for i in range(columns)]


def token_spans(page) -> list[dict]:
    """Every token-view span on the page: its text, background and hover title."""
    return page.locator(".compare-answer span.tok").evaluate_all(
        "spans => spans.map(s => ({text: s.textContent, background: s.style.background, title: s.title,"
        " shift: parseFloat(s.dataset.shift)}))")


def blind_vote(page, first: str, second: str, prompt: str, choice: str | None, shots: Path | None) -> str:
    """Get two blind answers and vote `choice` (A, B or tie; None: no vote); the reveal's text."""
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Compare").click()
    page.get_by_role("tab", name="Blind A/B").click()
    pick_option(page, "#ab-first", first)
    pick_option(page, "#ab-second", second)
    page.locator("#ab-prompt textarea").fill(prompt)
    page.locator("#ab-go").click()
    expect(page.locator("#ab-answer-b")).to_contain_text("B", timeout=60_000)
    if shots:
        page.screenshot(path=str(shots / "ab-blind.png"), full_page=True)
    if choice is None:
        return ""
    page.locator(f"#ab-vote-{choice.lower()}").click()
    reveal = page.locator("#ab-reveal")
    expect(reveal).to_contain_text("A was", timeout=30_000)
    if shots:
        page.screenshot(path=str(shots / "ab-revealed.png"), full_page=True)
    return reveal.inner_text()


def adapters_tab(page, shots: Path | None, show: str | None = None, shot: str = "adapters.png") -> str:
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Adapters").click()
    table = page.locator("#adapters-table")
    expect(table).to_contain_text("servable", timeout=30_000)
    if show:
        pick_option(page, "#adapters-pick", show)
        expect(page.locator("#adapter-versions")).to_contain_text("live", timeout=30_000)
    if shots:
        page.screenshot(path=str(shots / shot), full_page=True)
    return table.inner_text()


def versions(page, name: str, expect_text: str | None = None, shots: Path | None = None,
             shot: str = "versions.png") -> tuple[str, str]:
    """Show `name`'s versions in the Adapters tab; (the versions table's text, the gate report's)."""
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Adapters").click()
    pick_option(page, "#adapters-pick", name)
    table = page.locator("#adapter-versions")
    expect(table).to_contain_text(expect_text or "live", timeout=30_000)
    if shots:
        page.locator("#adapter-versions").scroll_into_view_if_needed()
        page.screenshot(path=str(shots / shot), full_page=True)
    return table.inner_text(), page.locator("#gate-report").inner_text()


def move_pointer(page, action: str, expect_text: str, shots: Path | None = None, shot: str | None = None) -> str:
    """Press Promote or Roll back in the Adapters tab; the pointers' text once it shows `expect_text`."""
    from playwright.sync_api import expect

    page.locator(f"#adapters-{action}").click()
    moved = page.locator("#adapters-pointers")
    expect(moved).to_contain_text(expect_text, timeout=30_000)
    if shots and shot:
        page.screenshot(path=str(shots / shot), full_page=True)
    return moved.inner_text()


def train_preview(page, dataset: str, shots: Path | None) -> str:
    """Pick a dataset under the data roots in the Train tab, without starting a run; its validation text."""
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Train").click()
    pick_option(page, "#train-dataset", dataset)
    checked = page.locator("#train-validation")
    expect(checked).to_contain_text("examples", timeout=30_000)
    if shots:
        page.screenshot(path=str(shots / "train.png"), full_page=True)
    return checked.inner_text()


def has_examples(page, examples: str) -> bool:
    page.wait_for_timeout(1000)  # the examples follow the adapter picked
    return page.locator(f"{examples} button").count() > 0


def train(page, dataset: Path, name: str, settings: dict[str, float], shots: Path | None, timeout_s: float = 300,
          reload_midway: bool = False) -> str:
    """Upload a dataset in the Train tab, set the run, start it and wait for it to finish; the status text.
    reload_midway: reload the page once the run is going; the Train tab must pick the run up again."""
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Train").click()
    page.locator("#train-upload input[type=file]").set_input_files(str(dataset))
    expect(page.locator("#train-validation")).to_contain_text("examples", timeout=30_000)
    page.locator("#train-name textarea, #train-name input").first.fill(name)
    for key, value in settings.items():
        set_number(page, f"#train-{key}", value)
    page.locator("#train-start").click()
    status = page.locator("#train-status")
    expect(status).to_contain_text("running", timeout=60_000)
    expect(page.locator("#train-loss")).to_be_visible()
    if shots:
        page.wait_for_timeout(2000)
        page.screenshot(path=str(shots / "train-running.png"), full_page=True)
    if reload_midway:
        page.reload()
        page.get_by_role("tab", name="Train").click()
        expect(status).to_contain_text(f"{name}:", timeout=30_000)  # nothing was clicked on this page
    expect(status).to_contain_text("finished", timeout=timeout_s * 1000)
    if shots:
        page.screenshot(path=str(shots / "train-finished.png"), full_page=True)
    return status.inner_text()


def main() -> None:
    from playwright.sync_api import sync_playwright

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:7860")
    parser.add_argument("--out", default="docs/screenshots")
    parser.add_argument("--adapter", default="json")
    parser.add_argument("--prompt", default="Extract name, age and city as JSON: Ana is 34 and lives in Lima.")
    parser.add_argument("--compare", nargs="+", default=["base", "json", "sentiment"])
    parser.add_argument("--compare-prompt", default="Is this positive or negative? the kind farmer sings")
    parser.add_argument("--mix", nargs=2, default=["json", "sentiment"], help="two adapters to mix (the first at 0.5)")
    parser.add_argument("--vote", choices=("A", "B", "tie"), default=None,
                        help="cast this blind A/B vote (it is appended to the server's preference file); default: none")
    parser.add_argument("--dataset", default="data/sentiment/train.jsonl", help="a dataset to pick in the Train tab (no run starts)")
    args = parser.parse_args()
    shots = Path(args.out)
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = open_browser(p)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(args.url)
        chat(page, args.adapter, args.prompt, None, shots)
        if has_examples(page, "#chat-examples"):
            click_example(page, "#chat-message", "#chat-examples", shots)
        else:
            print("no example prompts on these adapters' cards (cards from before examples: retrain them)")
        chat_mix(page, [(args.mix[0], 0.5), (args.mix[1], 1.0)], args.compare_prompt, shots)
        compare(page, args.compare, args.compare_prompt, shots)
        compare(page, args.compare, args.compare_prompt, shots, token_view=True, shot="token-view.png")
        blind_vote(page, args.compare[1], args.compare[2], args.compare_prompt, args.vote, shots)
        adapters_tab(page, shots, show=args.adapter)
        versions(page, args.adapter, shots=shots)
        train_preview(page, args.dataset, shots)
        browser.close()
    print(f"screenshots in {shots}")


if __name__ == "__main__":
    main()
