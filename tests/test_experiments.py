"""Rank sweep, technique comparison and the adapter x task matrix, on the tiny base."""

from __future__ import annotations

import json

import pytest

from adapters import AdapterStore
from experiments.__main__ import main as experiments_main
from experiments.matrix import evaluate_all, task_sets, write_report
from experiments.sweep import SweepRow, recommend
from serve.reports import read_matrix
from tests.conftest import ANIMAL_SIZES, chat, start_service, write_jsonl


def toy_flags(base, data, tmp_path, name: str = "toy") -> list[str]:
    return ["--name", name, "--base", str(base), "--data", str(data), "--eval-data", str(data.parent / "eval.jsonl"),
            "--lr", "5e-3", "--epochs", "3", "--micro-batch-size", "8", "--dropout", "0",
            "--runs-dir", str(tmp_path / "runs"), "--adapters", str(tmp_path / "store")]


@pytest.mark.slow
def test_sweep_trains_one_servable_adapter_per_rank_and_reports_each(tiny_base, toy_task, tmp_path):
    reports = tmp_path / "reports"
    assert experiments_main(["sweep", "--ranks", "1", "8", "--reports", str(reports), *toy_flags(tiny_base, toy_task, tmp_path)]) == 0
    rows = json.loads((reports / "sweep-toy.json").read_text())
    assert [(r["r"], r["alpha"]) for r in rows] == [(1, 2.0), (8, 16.0)]  # alpha follows 2r by default
    assert rows[0]["trainable"] * 8 == rows[1]["trainable"]  # parameters grow linearly with r
    for r in rows:
        assert 0 <= r["metric"] <= 1 and r["eval_loss"] > 0 and r["seconds"] > 0 and r["peak_memory_mb"] > 0
    store = AdapterStore(tmp_path / "store")
    assert store.names() == ["toy-r1-a2-lr0.005", "toy-r8-a16-lr0.005"]
    text = (reports / "sweep-toy.md").read_text()
    pick = recommend([SweepRow(**r) for r in rows])
    assert f"**Recommendation: `{pick.name}`**" in text and (reports / "sweep-toy.png").stat().st_size > 5000


def test_recommendation_is_the_smallest_setting_within_one_point_of_the_best():
    def row(r: int, metric: float) -> SweepRow:
        return SweepRow(f"x-r{r}", r, 2 * r, 1e-3, metric, 0.0, 1.0, 100 * r, 0.01, 1.0, 1.0)

    rows = [row(1, 0.80), row(4, 0.945), row(16, 0.95), row(64, 0.96)]
    assert recommend(rows).r == 16  # 0.95 is within 0.01 of 0.96; 0.945 is not
    assert recommend([row(2, 0.5), row(8, 0.5)]).r == 2


@pytest.mark.slow
def test_techniques_compare_four_ways_and_measure_forgetting_on_the_other_sets(tiny_base, toy_task, tmp_path):
    data_dir = toy_task.parent.parent  # toy/ beside a second task's eval set
    write_jsonl(data_dir / "sizes" / "eval.jsonl", [chat(f"Size of {a}?", s) for a, s in ANIMAL_SIZES.items()])
    reports = tmp_path / "reports"
    args = ["techniques", "--last-n", "1", "--data-dir", str(data_dir), "--eval-examples", "6", "--reports", str(reports),
            *toy_flags(tiny_base, toy_task, tmp_path)]
    assert experiments_main(args) == 0
    rows = json.loads((reports / "techniques-toy.json").read_text())
    assert [r["technique"] for r in rows] == ["qlora", "lora-unquantized", "qlora-last-1", "full fine-tuning"]
    total = rows[-1]["trainable"]
    assert rows[2]["trainable"] * 2 == rows[0]["trainable"] == rows[1]["trainable"] < total  # last 1 of 2 blocks
    for r in rows:
        assert set(r["others"]) == {"sizes"} and set(r["reference"]) == {"sizes"}
        assert r["forgetting"] == pytest.approx(r["reference"]["sizes"] - r["others"]["sizes"])
        assert 0 <= r["metric"] <= 1 and r["peak_memory_mb"] > 0
    assert rows[0]["metric"] > 0.5  # QLoRA learned the toy task
    assert (reports / "techniques-toy.png").stat().st_size > 5000
    assert "untouched base (4-bit)" in (reports / "techniques-toy.md").read_text()


def test_the_matrix_diagonal_reads_each_adapters_own_task(tiny_base, two_adapters, tmp_path):
    service = start_service(tiny_base, two_adapters, reports=tmp_path / "reports")
    try:
        assert service.eval_matrix() is None  # the Adapters tab hides it until make eval ran
        data_dir = two_adapters.root.parent  # colors/ and sizes/ with their eval sets
        matrix = evaluate_all(service.engine, task_sets(data_dir, 6))
        write_report(matrix, tmp_path / "reports", str(tiny_base))
        headers, rows = service.eval_matrix()
    finally:
        service.close()
    assert headers == ["model", "colors", "sizes"] and rows[1][0] == "colors" and rows[1][1] == "1.000 *"
    assert matrix.models == ["base", "colors", "sizes"] and matrix.tasks == ["colors", "sizes"]
    assert matrix.trained_on == {"colors": "colors", "sizes": "sizes"}
    assert matrix.scores["colors"]["colors"] == 1.0 and matrix.scores["sizes"]["sizes"] >= 0.8
    # Off the diagonal each adapter answers the other task with its own vocabulary: it scores low.
    assert matrix.scores["colors"]["sizes"] < 0.5 and matrix.scores["sizes"]["colors"] < 0.5
    assert matrix.scores["base"]["colors"] < 0.5
    path = write_report(matrix, tmp_path / "reports", str(tiny_base))
    assert "**1.000**" in path.read_text() and read_matrix(tmp_path / "reports") == matrix


def test_the_adapters_tab_shows_no_matrix_of_another_store(tiny_base, two_adapters, tmp_path):
    """A report written for other adapters (another store, an old run) is not shown as this one's;
    rows of adapters no longer served are left out."""
    from serve.reports import EvalMatrix

    reports = tmp_path / "reports"
    other = EvalMatrix(models=["base", "json", "count"], tasks=["json", "count"], trained_on={"json": "json", "count": "count"},
                       scores={m: {"json": 0.5, "count": 0.5} for m in ("base", "json", "count")}, examples={"json": 1, "count": 1})
    write_report(other, reports, "elsewhere")
    service = start_service(tiny_base, two_adapters, reports=reports)
    try:
        hidden = service.eval_matrix()
        mixed = EvalMatrix(models=["base", "colors", "gone"], tasks=["colors"], trained_on={"colors": "colors"},
                           scores={m: {"colors": 1.0} for m in ("base", "colors", "gone")}, examples={"colors": 1})
        write_report(mixed, reports, "here")
        _, rows = service.eval_matrix()
    finally:
        service.close()
    assert hidden is None
    assert [r[0] for r in rows] == ["base", "colors"]
