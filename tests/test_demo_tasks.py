"""Demo task data: seeded, in the chat format the trainer reads, eval prompts unseen in training."""

from __future__ import annotations

import json
import random

import pytest

from adapters.data import load_examples
from demo.tasks import GENERAL, TASKS, write_task


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


@pytest.fixture(scope="module")
def demo_tokenizer(tmp_path_factory):
    """The demo base's tokenizer, trained as `make base` trains it (seconds; no model)."""
    from demo.base import DemoBaseConfig, train_tokenizer

    config = DemoBaseConfig()
    return train_tokenizer(tmp_path_factory.mktemp("demo-tokenizer"), config.vocab_size, config.seed)


@pytest.mark.slow
def test_the_general_mix_outputs_every_token_the_adapter_tasks_answer_with(demo_tokenizer, monkeypatch):
    """Each answer token must be a target in pretraining, or its output-head row stays collapsed."""
    import demo.tasks
    from demo.base import DemoBaseConfig, chat_examples, check_reply_coverage

    config = DemoBaseConfig(examples=8000)
    check_reply_coverage(demo_tokenizer, chat_examples(demo_tokenizer, config))

    # The guard fails for the mix as it was: the sentiment labels were never a reply.
    without_labels = tuple(w for w in demo.tasks.ECHO_WORDS if w not in demo.tasks.SENTIMENT_LABELS)
    monkeypatch.setattr(demo.tasks, "ECHO_WORDS", without_labels)
    with pytest.raises(ValueError, match=r"'sentiment': \['▁negative', '▁positive'\]"):
        check_reply_coverage(demo_tokenizer, chat_examples(demo_tokenizer, config))


def test_only_a_demo_base_of_an_older_mix_is_rebuilt(tmp_path):
    """`make demo` asks demo.base every time; it must rebuild a stale demo base and nothing else."""
    from demo.base import CARD_WHAT, stale_reason
    from demo.tasks import GENERAL_MIX_VERSION

    def folder(name, card):
        path = tmp_path / name
        path.mkdir()
        (path / "config.json").write_text("{}")
        if card is not None:
            (path / "card.json").write_text(card if isinstance(card, str) else json.dumps(card))
        return path

    assert stale_reason(folder("current", {"what": CARD_WHAT, "general_mix_version": GENERAL_MIX_VERSION})) is None
    reason = stale_reason(folder("first-mix", {"what": CARD_WHAT}))  # built before the card named its mix
    assert reason == f"trained on general mix 1, the current mix is {GENERAL_MIX_VERSION}"
    assert stale_reason(folder("real-model", None)) is None  # no card: a model of the user's own
    assert stale_reason(folder("other-card", {"what": "my model"})) is None
    assert stale_reason(folder("broken-card", "{not json")) is None
