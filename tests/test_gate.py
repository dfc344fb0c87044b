"""The promotion gate live: a deliberately worse retrain of 'colors' (one training step: the base's
answers) is published while the server runs; the gate replays its golden prompts on both versions
and keeps the live one, which goes on answering as before. Then name@candidate, promote,
rollback, a restart, a request in flight during a promote, and the /v1/adapters routes.

The verdicts compare adapters separated by the whole scale (the live one answers its eval set,
the worse one is the untrained base), never near-ties, so they hold on any CPU."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from adapters.card import CARD_FILE, read_card
from adapters.metric import is_exact_match
from adapters.store import AdapterStore
from serve.engine import ChatResult
from serve.gate import HELD, PROMOTED, UNCHECKED, GateSettings, PromotionGate, golden_requests
from serve.server import AccessConfig
from serve.slots import DecodeSettings
from tests.conftest import (ANIMAL_COLORS, TRAINING_SOURCES, LiveServer, build_once, chat, free_port, start_service,
                            write_jsonl)
from tests.test_versions import published_copy, republish

PROMPTS = [f"Color of {animal}?" for animal in ANIMAL_COLORS]
KEY = "gate-key"


def train_worse_colors(base: Path, root: Path) -> None:
    """'colors' trained one step on the right data: it scores as the base does on its own eval set."""
    from train.__main__ import main as train_cli

    rows = [chat(f"Color of {a}?", c) for a, c in ANIMAL_COLORS.items()]
    data = write_jsonl(root / "data" / "train.jsonl", rows * 20)
    evals = write_jsonl(root / "data" / "eval.jsonl", rows)
    assert train_cli(["--name", "colors", "--base", str(base), "--data", str(data), "--eval-data", str(evals),
                      "--r", "8", "--alpha", "16", "--lr", "5e-3", "--max-steps", "1", "--micro-batch-size", "8",
                      "--runs-dir", str(root / "runs"), "--adapters", str(root / "store")]) == 0


@pytest.fixture(scope="session")
def worse_colors(tiny_base, tmp_path_factory, pytestconfig) -> Path:
    """The worse version's folder (built once per machine and code, as the trained fixtures are)."""
    scratch = tmp_path_factory.mktemp("worse-colors") / "built"
    built = build_once(pytestconfig, "worse-colors", TRAINING_SOURCES, lambda f: train_worse_colors(tiny_base, f), scratch)
    return (built / "store" / "colors").resolve()


def golden_asks(service, adapter: str) -> list:
    """Requests for the golden prompts (all six eval prompts, in order) with the budget the gate gives."""
    golden = read_card(service.registry.resolve(adapter).path).golden
    assert [g.messages[-1]["content"] for g in golden] == PROMPTS
    return golden_requests(adapter, golden, lambda text: len(service.base.tokenizer(text, add_special_tokens=False)["input_ids"]))


def answers(service, adapter: str) -> list[str]:
    results = service.engine.generate(golden_asks(service, adapter))
    assert all(r.error is None for r in results), results
    return [r.text for r in results]


def serve(tiny_base, store: AdapterStore):
    """Deterministic: the worse version answers the base's near-ties, which must not depend on the batch."""
    return start_service(tiny_base, store, decode=DecodeSettings(deterministic=True))


def wait_for_report(service, name: str, version: str, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        report = service.gate_report(name)
        if report is not None and report.candidate_version == version:
            assert service.gate.wait_idle(timeout)  # and applied
            return report
        time.sleep(0.1)
    raise AssertionError(f"no gate report on {name}@{version} in {timeout} s")


@dataclass(frozen=True)
class Held:
    """What the gate left after the worse version was published while serving, and what was seen then."""

    snapshot: Path
    old: str
    new: str
    live_before: list[str]
    live_during: list[str]
    live_after: list[str]
    candidate: list[str]
    report: object


@pytest.fixture(scope="module")
def held(tiny_base, two_adapters, worse_colors, tmp_path_factory) -> Held:
    store = published_copy(two_adapters, tmp_path_factory.mktemp("gated") / "store")
    service = serve(tiny_base, store)
    try:
        old = store.live_version("colors")
        before = answers(service, "colors")
        new = republish(store, "colors", worse_colors)
        during = answers(service, "colors")  # the link names `new` now; requests still get `old`
        report = wait_for_report(service, "colors", new)
        after, candidate = answers(service, "colors"), answers(service, "colors@candidate")
    finally:
        service.close()
    return Held(store.root, old, new, before, during, after, candidate, report)


def copy_of(held: Held, tmp_path: Path) -> AdapterStore:
    shutil.copytree(held.snapshot, tmp_path / "store", symlinks=True)  # the links are relative: the copy is whole
    return AdapterStore(tmp_path / "store", keep_versions=4)


def test_a_worse_version_stays_a_candidate_and_the_live_one_keeps_serving(held):
    assert [is_exact_match(a, ANIMAL_COLORS[p.split()[-1][:-1]]) for a, p in zip(held.live_before, PROMPTS)] == [True] * 6
    assert held.live_during == held.live_after == held.live_before
    report = held.report
    assert (report.verdict, report.live_version, report.candidate_version) == (HELD, held.old, held.new)
    assert report.prompts == 6 and report.live_score == 1.0 and report.candidate_score == 0.0
    assert report.margin == 0.05 and len(report.regressed) == 6
    for regressed in report.regressed:  # each with the prompt, the expected answer and both answers
        assert regressed.prompt in PROMPTS and regressed.live_answer in held.live_before
        assert is_exact_match(regressed.live_answer, regressed.expected)
        assert not is_exact_match(regressed.candidate_answer, regressed.expected)
    assert [r.candidate_answer for r in report.regressed] == held.candidate  # name@candidate serves it
    assert held.candidate != held.live_before
    assert AdapterStore(held.snapshot).live_version("colors") == held.old  # the link flipped back


def test_the_decision_survives_a_restart_and_promote_then_rollback_flip(held, tiny_base, tmp_path):
    store = copy_of(held, tmp_path)
    service = serve(tiny_base, store)
    try:
        assert answers(service, "colors") == held.live_before
        assert answers(service, "colors@candidate") == answers(service, f"colors@{held.new}") == held.candidate
        assert service.gate_report("colors").verdict == HELD
        rows = {row.version: row for row in service.versions("colors")}
        assert (rows[held.old].live, rows[held.new].candidate, rows[held.new].golden) == (True, True, 6)
        assert rows[held.old].adapter_metric == read_card(store.path("colors")).metric.adapter
        pointers = service.promote("colors")
        assert (pointers.live, pointers.candidate, pointers.rollback_target) == (held.new, None, held.old)
        assert answers(service, "colors") == held.candidate and store.live_version("colors") == held.new
        pointers = service.rollback("colors")
        assert (pointers.live, pointers.rollback_target) == (held.old, held.new)
        assert answers(service, "colors") == held.live_before
        service.refresh()  # a scan after the flips changes nothing, and the gate is not asked
        assert answers(service, "colors") == held.live_before and service.gate.wait_idle(5)
    finally:
        service.close()


def test_a_request_in_flight_during_a_promote_finishes_on_the_version_it_started_with(held, tiny_base, tmp_path):
    service = serve(tiny_base, copy_of(held, tmp_path))
    try:
        asks = golden_asks(service, "colors")
        resolved = service.engine.prepare(asks[0])  # resolved, not yet run
        running = service.submit(asks[1])
        service.promote("colors")
        after = service.submit(asks[0])
        assert service.batcher.submit(resolved).wait(60).text == held.live_before[0]
        assert running.wait(60).text == held.live_before[1]
        assert after.wait(60).text == held.candidate[0] != held.live_before[0]
    finally:
        service.close()


def test_an_equal_version_goes_live_and_one_without_golden_prompts_goes_live_unchecked(held, tiny_base, tmp_path):
    store = copy_of(held, tmp_path)
    service = serve(tiny_base, store)
    try:
        same = republish(store, "colors", store.version_folder("colors", held.old))
        report = wait_for_report(service, "colors", same)
        assert (report.verdict, report.live_score, report.candidate_score) == (PROMOTED, 1.0, 1.0)
        assert store.live_version("colors") == same and service.registry.resolve("colors").path.name == same
        assert service.pointers("colors").rollback_target == held.old
        card = json.loads((store.path("colors") / CARD_FILE).read_text())
        bare = tmp_path / "bare"
        shutil.copytree(store.path("colors"), bare)
        (bare / CARD_FILE).write_text(json.dumps({**card, "golden": []}))
        unchecked = republish(store, "colors", bare)
        report = wait_for_report(service, "colors", unchecked)
        assert (report.verdict, report.prompts, report.live_score) == (UNCHECKED, 0, None)
        assert store.live_version("colors") == unchecked
    finally:
        service.close()


def test_with_the_gate_off_a_new_version_goes_live_at_once(two_adapters, worse_colors, tiny_base, tmp_path):
    from serve.service import Service, ServiceConfig

    store = published_copy(two_adapters, tmp_path / "store")
    service = Service.start(ServiceConfig(base=str(tiny_base), adapters=str(store.root), watch_s=0.2,
                                          reports=str(tmp_path / "reports"), gate=GateSettings(enabled=False)))
    try:
        old = store.live_version("colors")
        new = republish(store, "colors", worse_colors)
        deadline = time.monotonic() + 30
        while service.registry.resolve("colors").path.name != new:
            assert time.monotonic() < deadline, "the new version was not picked up"
            time.sleep(0.05)
        assert service.gate is None and service.gate_report("colors") is None
        assert store.rollback_target("colors") == old == store.pointer("colors", "previous")
    finally:
        service.close()


def test_examples_come_from_the_cards_of_the_chosen_adapters_each_once(held, tiny_base, tmp_path):
    service = serve(tiny_base, copy_of(held, tmp_path))
    try:
        colors = service.examples(["colors"])
        assert len(colors) == 4 and set(colors) <= set(PROMPTS)
        both = service.examples(["colors", "sizes", "colors@candidate", "base", "gone"])
        assert both[:4] == colors and len(both) == len(set(both)) and len(both) > 4
        assert {p.split()[0] for p in both} == {"Color", "Size"}
        assert [e.user for e in service.example_prompts(["colors"])] == colors  # the eval data has no system prompt
        assert all(e.system is None for e in service.example_prompts(["colors"]))
    finally:
        service.close()


def test_a_version_whose_replies_fail_or_never_come_is_held_back_and_the_report_says_why(held, tiny_base, tmp_path):
    """The worse version on both sides scores 0 against 0: only its failed replies can hold it back."""
    service = serve(tiny_base, copy_of(held, tmp_path))
    worse = service.registry.resolve("colors@candidate")

    def candidate_fails(requests, timeout):  # the new version's replies are the odd ones
        results = service.generate_in_turn(requests, timeout)
        return [r if i % 2 == 0 else ChatResult(r.adapter, error="adapter 'colors' unavailable") for i, r in enumerate(results)]

    def never_answers(requests, timeout):
        raise TimeoutError

    def count(text: str) -> int:
        return len(service.base.tokenizer(text, add_special_tokens=False)["input_ids"])

    try:
        for generate, verdict, why in ((service.generate_in_turn, PROMOTED, ""), (candidate_fails, HELD, "adapter 'colors' unavailable"),
                                       (never_answers, HELD, "no reply within 600 s")):
            gate = PromotionGate(service.registry, generate, count, GateSettings())
            try:
                report = gate.evaluate(worse, worse)
            finally:
                gate.close()
            assert (report.verdict, report.live_score, report.candidate_score, report.reason) == (verdict, 0.0, 0.0, why)
    finally:
        service.close()


# -- the API ----------------------------------------------------------------------------------

@pytest.fixture
def api(held, tiny_base, tmp_path):
    service = serve(tiny_base, copy_of(held, tmp_path))
    with LiveServer(service, AccessConfig("127.0.0.1", free_port(), (), KEY)) as server:
        yield httpx.Client(base_url=f"{server.url}/v1", headers={"Authorization": f"Bearer {KEY}"}, timeout=60)


def reply(api: httpx.Client, model: str) -> str:
    answer = api.post("/chat/completions", json={"model": model, "temperature": 0, "max_tokens": 8,
                                                "messages": [{"role": "user", "content": PROMPTS[0]}]})
    assert answer.status_code == 200, answer.text
    return answer.json()["choices"][0]["message"]["content"]


def error_of(response: httpx.Response) -> tuple[int, str, str | None]:
    error = response.json()["error"]
    return response.status_code, error["code"], error["param"]


def test_the_version_routes_list_promote_and_roll_back_behind_the_key(api, held):
    assert httpx.get(f"{api.base_url}adapters/colors/versions").status_code == 401
    assert httpx.post(f"{api.base_url}adapters/colors/promote").status_code == 401
    listing = api.get("/adapters/colors/versions").json()
    assert (listing["live"], listing["candidate"], listing["gate"]["verdict"]) == (held.old, held.new, HELD)
    assert [v["version"] for v in listing["versions"] if v["live"] or v["candidate"]] == sorted([held.old, held.new])
    assert len(listing["gate"]["regressed"]) == 6
    assert error_of(api.get("/adapters/nope/versions")) == (404, "adapter_not_found", "name")
    assert error_of(api.post("/adapters/colors/promote", json={"version": 5}))[0] == 400
    assert error_of(api.post("/adapters/colors/promote", json={"version": "nope"})) == (404, "version_not_found", "version")
    promoted = api.post("/adapters/colors/promote")
    assert promoted.status_code == 200, promoted.text
    assert promoted.json() == {"name": "colors", "live": held.new, "candidate": None, "rollback_target": held.old}
    assert error_of(api.post("/adapters/colors/promote")) == (409, "no_candidate", "version")
    assert reply(api, "colors") == reply(api, f"colors@{held.new}") != reply(api, f"colors@{held.old}")
    rolled = api.post("/adapters/colors/rollback").json()
    assert (rolled["live"], rolled["rollback_target"]) == (held.old, held.new)
    assert reply(api, "colors") == reply(api, f"colors@{held.old}")
    explicit = api.post("/adapters/colors/promote", json={"version": held.new}).json()
    assert explicit["live"] == held.new


def test_the_gate_flags_set_its_settings_and_a_margin_off_the_scale_is_named(monkeypatch):
    from serve.__main__ import UsageError, build_parser, check_web_args

    monkeypatch.delenv("LORASWAP_AUTH", raising=False)

    config, _ = check_web_args(build_parser().parse_args(["web", "--no-gate", "--gate-margin", "0.2"]))
    assert (config.service.gate.enabled, config.service.gate.margin) == (False, 0.2)
    config, _ = check_web_args(build_parser().parse_args(["web"]))
    assert (config.service.gate.enabled, config.service.gate.margin) == (True, 0.05)
    with pytest.raises(UsageError, match="--gate-margin must be between 0 and 1, got 1.5"):
        check_web_args(build_parser().parse_args(["web", "--gate-margin", "1.5"]))
