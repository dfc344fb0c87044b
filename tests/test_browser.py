"""A real browser (Debian's headless chromium driven by Playwright) against a live server.

Screenshots go to test-output/screenshots/. Without /usr/bin/chromium the test is skipped and
says why, unless LORASWAP_REQUIRE_BROWSER=1 (set by .ci/run, which installs chromium): then it fails.

One server and one browser page serve the module's tests, in order: the tour of Chat, Compare and
Adapters; the promotion gate holding back a worse retrained version, then Promote and Roll back;
the Train tab training a new adapter (followed again after a page reload) that is then chatted with.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest

from serve.server import AccessConfig
from tests.conftest import (ANIMAL_COLORS, TRAINING_SOURCES, LiveServer, build_once, chat as chat_row, free_port,
                            start_service, train_two_adapters, write_jsonl)
from tests.ui_tour import (CHROMIUM, adapters_tab, blind_vote, chat, chat_mix, click_example, compare, move_pointer,
                           open_browser, token_spans, train, versions)

SHOTS = Path(__file__).resolve().parents[1] / "test-output" / "screenshots"

if not Path(CHROMIUM).exists() and os.environ.get("LORASWAP_REQUIRE_BROWSER") != "1":
    pytest.skip(f"{CHROMIUM} missing: apt-get install chromium (set LORASWAP_REQUIRE_BROWSER=1 to fail instead)", allow_module_level=True)

ANIMAL_KINDS = {"cat": "green", "dog": "red", "bird": "blue", "fish": "green", "king": "red", "queen": "blue"}
"""The Train tab's task: a mapping neither fixture adapter answers, so only the new adapter says it."""


@pytest.fixture(scope="module")
def two_adapters(tiny_base, pytestconfig, tmp_path_factory):
    """conftest's two trained adapters in this module's own copy (links kept, so versions, promote
    and rollback work): it retrains `colors` and trains a new adapter, which the session's other
    modules, sharing conftest's copy, must not see."""
    from adapters import AdapterStore

    scratch = tmp_path_factory.mktemp("browser-store")
    built = build_once(pytestconfig, "two-adapters", TRAINING_SOURCES, lambda folder: train_two_adapters(tiny_base, folder),
                       scratch / "built")
    if built != scratch / "built":
        shutil.copytree(built, scratch / "copy", symlinks=True)
        built = scratch / "copy"
    return AdapterStore(built / "store")


@pytest.fixture(scope="module")
def site(tiny_base, two_adapters, tmp_path_factory):
    """The live server (with a Train tab over its own data root) and one browser page on it."""
    from playwright.sync_api import sync_playwright

    from serve.training_runs import TrainingRuns, TrainingRunsSettings
    from serve.ui_logic import UiSettings

    SHOTS.mkdir(parents=True, exist_ok=True)
    scratch = tmp_path_factory.mktemp("browser")
    (scratch / "data").mkdir()
    service = start_service(tiny_base, two_adapters)
    runs = TrainingRuns(TrainingRunsSettings(
        data_roots=(scratch / "data",), store_dir=two_adapters.root, base=str(tiny_base), runs_dir=scratch / "runs",
        train_config=None, reports_dir=scratch / "reports", extra_args=("--micro-batch-size", "8")),
        on_finished=lambda _run, _progress: service.refresh())
    ui = UiSettings(preferences_path=str(scratch / "votes" / "preferences.jsonl"))
    with LiveServer(service, AccessConfig("127.0.0.1", free_port()), ui=ui, runs=runs) as server:
        with sync_playwright() as p:
            browser = open_browser(p)
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(server.url)
            yield page, service, scratch, ui
            browser.close()
        runs.close()


@pytest.fixture(autouse=True)
def fresh_page(site):
    """Each test starts on a newly loaded page: the UI keeps per-session state (a mix builder's
    rows and strengths) that one test would otherwise hand the next, making a verdict depend on
    the order the tests run in (picking 'kinds' after a mix spelled 'kinds*0.5+sizes')."""
    site[0].reload()


@pytest.mark.slow
def test_chat_mix_examples_token_view_blind_vote_and_the_table(site):
    page, service, _, ui = site
    reply = chat(page, "colors", "Color of cat?", "red", SHOTS)
    assert "[colors]" in reply and "red" in reply

    example, filled = click_example(page, "#chat-message", "#chat-examples", SHOTS)
    assert filled == example and example in service.examples(["colors"])

    spelled, reply = chat_mix(page, [("colors", 0.5), ("sizes", 1.0)], "Size of dog?", SHOTS)
    assert spelled == "colors*0.5+sizes" and f"[{spelled}]" in reply  # the reply names the mix that wrote it

    columns = compare(page, ["base", "colors", "sizes"], "Size of dog?", SHOTS)
    assert [c.split("\n", 1)[0] for c in columns] == ["base", "colors", "sizes"]
    assert "big" in columns[2]  # the sizes adapter's own answer

    compare(page, ["base", "sizes"], "Size of dog?", SHOTS, token_view=True, mixes=["sizes*0.5"], shot="token-view.png")
    spans = token_spans(page)
    assert spans and all(s["background"].startswith(("rgb(", "rgba(")) for s in spans)  # the browser drops an alpha of 1
    gained = [s for s in spans if s["shift"] > math.log(2)]  # the sizes adapter's 'big': far likelier than under the base
    assert gained and all(s["background"].replace("rgba", "rgb").startswith("rgb(22, 163, 74") for s in gained)
    assert all("base's top choice" in s["title"] for s in spans)

    reveal = blind_vote(page, "colors", "sizes", "Size of dog?", "B", SHOTS)
    votes = [json.loads(line) for line in Path(ui.preferences_path).read_text().splitlines()]
    assert len(votes) == 1
    vote = votes[0]
    assert vote["prompt"] == [{"role": "user", "content": "Size of dog?"}]
    assert [m["role"] for m in vote["chosen"]] == ["assistant"] and [m["role"] for m in vote["rejected"]] == ["assistant"]
    assert {vote["chosen_adapter"], vote["rejected_adapter"]} == {"colors", "sizes"} and vote["time"]
    assert f"B was **{vote['chosen_adapter']}**".replace("**", "") in reveal

    table = adapters_tab(page, SHOTS, show="colors")
    assert "colors" in table and "sizes" in table
    from playwright.sync_api import expect

    summary = page.locator("#preference-summary")
    expect(summary).to_contain_text("sizes", timeout=15_000)  # the tab's table refreshes every 5 s
    won = vote["chosen_adapter"]
    cells = summary.get_by_role("row").nth(1).get_by_role("gridcell").all_inner_texts()  # row 0: the headers
    assert [c.strip() for c in cells[:6]] == ["colors", "sizes", str(int(won == "colors")), str(int(won == "sizes")), "0", "1"]
    page.screenshot(path=str(SHOTS / "preferences.png"), full_page=True)


@pytest.mark.slow
def test_a_worse_retrained_version_stays_a_candidate_until_promoted_and_rolls_back(site, tiny_base, two_adapters):
    from train.__main__ import main as train_cli

    page, service, scratch, _ = site
    store = two_adapters
    live_before = store.live_version("colors")
    root = store.root.parent
    # Trained on the sizes task but judged on the colors eval set: every golden prompt regresses.
    args = ["--name", "colors", "--base", str(tiny_base), "--data", str(root / "sizes" / "train.jsonl"),
            "--eval-data", str(root / "colors" / "eval.jsonl"), "--r", "8", "--alpha", "16", "--lr", "5e-3",
            "--epochs", "3", "--micro-batch-size", "8", "--runs-dir", str(scratch / "runs"), "--adapters", str(store.root)]
    assert train_cli(args) == 0
    _wait_for(lambda: any(v.candidate for v in service.versions("colors")), "the gate to hold the new version back")
    table, gate = versions(page, "colors", "candidate", SHOTS, shot="gate-held.png")
    assert "candidate" in table and "live" in table
    assert "HELD" in gate.upper()
    regressed = page.locator("#gate-regressed").inner_text()
    assert "Color of" in regressed
    assert store.live_version("colors") == live_before

    page.get_by_role("tab", name="Chat").click()
    page.reload()
    chat(page, "colors", "Color of cat?", "red", None)  # live keeps serving the old version

    page.get_by_role("tab", name="Adapters").click()
    versions(page, "colors", "candidate")
    moved = move_pointer(page, "promote", "live", SHOTS, shot="promoted.png")
    promoted = store.live_version("colors")
    assert promoted != live_before and f"live `{promoted}`".replace("`", "") in moved.replace("`", "")
    answer = service.chat("colors", [_user("Color of cat?")], _greedy()).wait(60)
    assert "red" not in answer.text  # the worse version answers now

    moved = move_pointer(page, "rollback", live_before, SHOTS, shot="rolled-back.png")
    assert store.live_version("colors") == live_before
    assert "red" in service.chat("colors", [_user("Color of cat?")], _greedy()).wait(60).text


@pytest.mark.slow
def test_the_train_tab_uploads_trains_and_the_new_adapter_answers(site, tmp_path):
    page, service, _, _ = site
    rows = [chat_row(f"Kind of {animal}?", kind) for animal, kind in ANIMAL_KINDS.items()]
    dataset = write_jsonl(tmp_path / "kinds.jsonl", rows * 20)
    status = train(page, dataset, "kinds", {"r": 8, "alpha": 16, "lr": 0.005, "epochs": 10}, SHOTS, reload_midway=True)
    assert "finished" in status
    assert "kinds" in service.model_names()
    page.get_by_role("tab", name="Chat").click()
    reply = chat(page, "kinds", "Kind of cat?", "green", SHOTS, shot="chat-trained.png")
    assert "[kinds]" in reply
    assert ANIMAL_COLORS["cat"] != "green"  # not an answer the fixture adapters give


def _wait_for(condition, what: str, timeout_s: float = 120) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout_s} s for {what}"
        time.sleep(0.2)


def _user(text: str):
    from adapters import Message

    return Message("user", text)


def _greedy():
    from serve.engine import SamplingParams

    return SamplingParams(max_new_tokens=8)
