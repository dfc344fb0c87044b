"""Demo task data: seeded, in the chat format the trainer reads, eval prompts unseen in training."""

from __future__ import annotations

import json
import random

import pytest

from demo.tasks import GENERAL, TASKS, write_task
from train.data import load_examples


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_files_parse_and_eval_prompts_are_unseen(tmp_path, name):
    task = TASKS[name]
    write_task(task, tmp_path / name, n_train=300, n_eval=50, seed=0)
    train = load_examples(tmp_path / name / "train.jsonl")
    evals = load_examples(tmp_path / name / "eval.jsonl")
    assert len(train) == 300 and len(evals) == 50
    assert not {e.prompt[-1].content for e in evals} & {e.prompt[-1].content for e in train}
    assert all(task.check(e.reference, e.reference) for e in evals)
    first = (tmp_path / name / "train.jsonl").read_text()
    write_task(task, tmp_path / "again", n_train=300, n_eval=50, seed=0)
    assert (tmp_path / "again" / "train.jsonl").read_text() == first  # seeded


def test_answers_are_right():
    rng = random.Random(1)
    for _ in range(50):
        prompt, answer = TASKS["sort"].make(rng)
        digits = prompt.split(": ", 1)[1].split()
        assert answer.split() == sorted(digits) and digits != sorted(digits)
        prompt, answer = TASKS["reverse"].make(rng)
        assert answer.split() == prompt.split(": ", 1)[1].split()[::-1]
        prompt, answer = TASKS["uppercase"].make(rng)
        assert answer == prompt.split(": ", 1)[1].upper()
        prompt, answer = TASKS["json"].make(rng)
        record = json.loads(answer)
        assert record["name"] in prompt and str(record["age"]) in prompt and record["city"] in prompt


def test_the_checks_reject_wrong_replies():
    assert not TASKS["uppercase"].check("THE cat", "THE CAT")
    assert TASKS["json"].check('{"age": 3, "name": "A", "city": "B"}', '{"name": "A", "age": 3, "city": "B"}')
    assert not TASKS["json"].check('{"name": "A"', '{"name": "A"}')
    assert GENERAL.make(random.Random(0))[1]
