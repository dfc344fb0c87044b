"""The UI's gradio-free logic: the mix builder's spelling, compare columns, the blind A/B session,
the settings, and the Train tab's views over TrainingRuns."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from adapters import Message
from serve.mixes import MixError, parse_mix
from serve.preferences import PreferenceLog
from serve.train_view import (FALLBACK, dataset_choices, dataset_view, loss_rows, progress_text, settings_for,
                              validation_text)
from serve.training_runs import RunProgress, RunState, TrainingRuns, TrainingRunsSettings
from serve.ui_logic import (BlindSession, UiSettings, add_mix_line, compare_names, example_prompts, mix_names,
                            move_pointer, preference_rows, spell_mix, versions_view)


def test_the_builder_spells_a_single_adapter_a_strength_and_a_mix():
    assert spell_mix([("json", 1.0), (None, 1.0), (None, 1.0)]) == "json"
    assert spell_mix([("json", 0.7000000000000001), (None, 1.0)]) == "json*0.7"  # a slider's float noise
    assert spell_mix([("json", 0.5), ("sentiment", 1.0), ("colors", -0.25)]) == "json*0.5+sentiment+colors*-0.25"
    assert parse_mix(spell_mix([("json", 0.5), ("sentiment", 1.0)])).spelling() == "json*0.5+sentiment"


def test_the_builder_without_an_adapter_is_the_base_and_base_rows_add_nothing():
    assert spell_mix([("base", 0.3), (None, 1.0)]) == "base"
    assert spell_mix([("base", 1.0), ("json", 2.0)]) == "json*2"


def test_the_builder_refuses_one_adapter_twice_by_name():
    with pytest.raises(MixError, match="'json' appears twice"):
        spell_mix([("json", 1.0), ("json", 0.5)])


def test_mix_names_lists_each_part():
    assert mix_names("base") == []
    assert mix_names("json") == ["json"]
    assert mix_names("json*0.5+sentiment@2") == ["json", "sentiment@2"]


def test_examples_come_from_the_chosen_adapters_or_from_all_for_the_base():
    class FakeService:
        asked: list = []

        def model_names(self):
            return ["base", "colors", "sizes"]

        def examples(self, names):
            self.asked.append(list(names))
            return [f"example {i}" for i in range(20)]

    service = FakeService()
    assert example_prompts(service, "colors*0.5+sizes") == [f"example {i}" for i in range(8)]
    example_prompts(service, "base")
    example_prompts(service, ["base", "sizes", "sizes*0.5+colors"])  # Compare's columns, each adapter once
    assert service.asked == [["colors", "sizes"], ["colors", "sizes"], ["sizes", "colors"]]


def test_compare_columns_are_the_ticked_then_the_mixes_without_repeats():
    assert compare_names(["base", "json"], "json*0.5\n\n json+sentiment \njson") == ["base", "json", "json*0.5", "json+sentiment"]
    assert add_mix_line("", "json*0.5") == "json*0.5"
    assert add_mix_line("json*0.5", "json*0.5") == "json*0.5"
    assert add_mix_line("json*0.5\n", "a+b") == "json*0.5\na+b"


def test_a_blind_session_takes_one_vote_per_pair_and_reveals_after_it(tmp_path):
    log = PreferenceLog(tmp_path / "p.jsonl")
    session = BlindSession(rng=random.Random(1))
    with pytest.raises(ValueError, match="get two answers first"):
        session.vote(log, "A")
    order = session.draw("colors", "sizes")
    assert sorted(order) == ["colors", "sizes"]
    session.show([Message("user", "Size of dog?")], order, ("first answer", "second answer"))
    assert session.reveal() == ""  # names stay hidden until the vote
    row = session.vote(log, "B")
    assert row["chosen_adapter"] == order[1] and row["chosen"][0]["content"] == "second answer"
    assert f"A was **{order[0]}**, B was **{order[1]}**" in session.reveal()
    with pytest.raises(ValueError, match="already has its vote"):
        session.vote(log, "A")
    assert preference_rows(log) == [["colors", "sizes", int(order[1] == "colors"), int(order[1] == "sizes"), 0, 1]]
    session.draw("colors", "sizes")
    assert session.reveal() == "" and session.pair is None


def test_votes_go_beside_the_reports_unless_a_path_is_set(tmp_path):
    assert UiSettings().preferences_file(tmp_path) == tmp_path / "preferences.jsonl"
    assert UiSettings(preferences_path=str(tmp_path / "v.jsonl")).preferences_file("reports") == tmp_path / "v.jsonl"


# -- the Train tab's views -------------------------------------------------------------------

def make_runs(tmp_path: Path, train_config=None) -> TrainingRuns:
    root = tmp_path / "data"
    (root / "colors").mkdir(parents=True)
    rows = [{"messages": [{"role": "user", "content": "Color of cat?"}, {"role": "assistant", "content": "red"}]}] * 3
    (root / "colors" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "bad.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n')
    return TrainingRuns(TrainingRunsSettings(data_roots=(root,), store_dir=tmp_path / "store", base="unused",
                                             runs_dir=tmp_path / "runs", train_config=train_config,
                                             reports_dir=tmp_path / "reports"))


def test_datasets_are_offered_by_their_path_from_the_root(tmp_path):
    runs = make_runs(tmp_path)
    assert [label for label, _ in dataset_choices(runs)] == ["data/bad.jsonl", "data/colors/train.jsonl"]
    assert all(Path(value).is_file() for _, value in dataset_choices(runs))


def test_validation_says_how_many_examples_or_where_the_first_error_is(tmp_path):
    runs = make_runs(tmp_path)
    good = validation_text(runs.validate(tmp_path / "data" / "colors" / "train.jsonl"))
    assert good.startswith("**3 examples** for task `colors`")
    bad = runs.validate(tmp_path / "data" / "bad.jsonl")
    text = validation_text(bad)
    assert text.startswith(f"**Not usable (line {bad.line}") and "bad.jsonl" in text
    outside = validation_text(runs.validate(tmp_path / "elsewhere.jsonl"))
    assert "outside the data roots" in outside


def test_defaults_fall_back_when_there_is_no_sweep_and_no_config(tmp_path):
    runs = make_runs(tmp_path)
    report = runs.validate(tmp_path / "data" / "colors" / "train.jsonl")
    assert settings_for(runs, "", report) == FALLBACK
    config = tmp_path / "train.yaml"
    config.write_text("lora: {r: 4, alpha: 8}\noptim: {lr: 0.01, epochs: 3}\n")
    chosen = settings_for(make_runs(tmp_path / "two", config), "", report)
    assert (chosen.r, chosen.alpha, chosen.lr, chosen.epochs) == (4, 8.0, 0.01, 3.0)


def test_progress_shows_state_step_loss_and_why_a_run_failed():
    running = RunProgress("x-1", "x", RunState.RUNNING, step=3, total_steps=10, epoch=0.3, losses=((1, 2.5), (3, 1.25)),
                          elapsed_s=4.2)
    assert progress_text(running) == "**x: running** step 3/10, epoch 0.30, loss 1.2500, 4 s"
    assert loss_rows(running) == [{"step": 1, "loss": 2.5}, {"step": 3, "loss": 1.25}]
    failed = RunProgress("x-1", "x", RunState.FAILED, error="data.jsonl:2: field 'messages': missing")
    assert "data.jsonl:2: field 'messages': missing" in progress_text(failed)
    done = RunProgress("x-1", "x", RunState.FINISHED, adapter_dir="/store/x/3")
    assert "Published to `3`" in progress_text(done)
    assert "nothing was published" in progress_text(RunProgress("x-1", "x", RunState.STOPPED))


def test_picking_a_dataset_suggests_its_task_as_the_name_unless_one_is_typed(tmp_path):
    runs = make_runs(tmp_path)
    path = tmp_path / "data" / "colors" / "train.jsonl"
    view = dataset_view(runs, path, "")
    assert view.name == "colors" and view.settings == FALLBACK and "3 examples" in view.validation
    assert dataset_view(runs, path, "mine").name == "mine"
    assert dataset_view(runs, tmp_path / "data" / "bad.jsonl", "").name == ""


def test_progress_shows_the_last_eval():
    running = RunProgress("x-1", "x", RunState.RUNNING, step=10, evals=({"step": 10, "eval_loss": 0.25, "exact_match": 0.5},))
    assert progress_text(running).endswith(", eval loss 0.250, exact match 0.500")


# -- versions, the gate, promote and roll back (Service's interface, faked) ----------------------

class FakeVersions:
    """Service.versions/gate_report/promote/rollback as the Adapters tab calls them."""

    def __init__(self):
        from serve.gate import GateReport, RegressedPrompt
        from serve.service import VersionPointers, VersionRow

        row = dict(created_at="2026-12-02T00:00:00+00:00", status="servable", metric="exact_match", base_metric=0.0,
                   eval_examples=6, r=8, alpha=16.0, learning_rate=0.005, golden=6, rollback_target=False)
        self.rows = [VersionRow(version="v1", live=True, candidate=False, adapter_metric=1.0, **row),
                     VersionRow(version="v2", live=False, candidate=True, adapter_metric=0.0, **row)]
        self.report = GateReport(name="colors", live_version="v1", candidate_version="v2", verdict="held", margin=0.05,
                                 prompts=6, live_score=1.0, candidate_score=0.0,
                                 regressed=(RegressedPrompt("Color of cat?", "red", "red", "small"),),
                                 decided_at="2026-12-02T00:00:01+00:00")
        self.moves = []
        self.pointers = VersionPointers

    def versions(self, name):
        return self.rows

    def gate_report(self, name):
        return self.report

    def promote(self, name, version=None):
        self.moves.append(("promote", name, version))
        return self.pointers(name, version or "v2", None, "v1")

    def rollback(self, name):
        self.moves.append(("rollback", name))
        return self.pointers(name, "v1", None, "v2")


def test_the_versions_view_puts_versions_side_by_side_newest_first_with_the_gate():
    view = versions_view(FakeVersions(), "colors")
    assert [r[0] for r in view.rows] == ["v2", "v1"] and view.versions == ["v2", "v1"]
    assert view.rows[0][2] == "candidate" and view.rows[1][2] == "live"
    assert view.rows[0][4] == "exact_match 0.000 -> 0.000" and view.rows[1][4] == "exact_match 0.000 -> 1.000"
    assert view.gate.startswith("**Gate: held** version `v2` against live `v1`")
    assert "live **1.000**, new **0.000**" in view.gate
    assert view.regressed == [["Color of cat?", "red", "red", "small"]]
    assert versions_view(FakeVersions(), None) == type(view)([], "", [], [])


def test_promote_takes_the_candidate_unless_a_version_is_picked_and_rollback_flips_back():
    service = FakeVersions()
    assert move_pointer(service, "colors", "", "promote") == "**colors**: live `v2`, candidate `-`, rollback target `v1`"
    move_pointer(service, "colors", "v1", "promote")
    assert "live `v1`" in move_pointer(service, "colors", None, "rollback")
    assert service.moves == [("promote", "colors", None), ("promote", "colors", "v1"), ("rollback", "colors")]
    with pytest.raises(ValueError, match="choose an adapter"):
        move_pointer(service, None, None, "promote")
