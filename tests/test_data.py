"""Data formats, validation errors that name file, line and field, and length handling."""

from __future__ import annotations

import pytest

from adapters.base import load_tokenizer
from adapters.chat import Message, encode_chat, encode_prompt
from adapters.data import DataError, load_examples
from tests.conftest import chat, write_jsonl
from train.data import IGNORE_INDEX, length_grouped_batches, tokenize


def test_each_format_parses_to_the_same_conversation(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        chat("Say hi", "hi", system="Be brief."),
        {"instruction": "Say hi", "input": "to Ana", "output": "hi Ana"},
        {"instruction": "Say hi", "output": "hi"},
        {"prompt": "Say hi", "completion": "hi"},
    ])
    examples = load_examples(path)
    assert [e.line for e in examples] == [1, 2, 3, 4]
    assert examples[0].messages == (Message("system", "Be brief."), Message("user", "Say hi"), Message("assistant", "hi"))
    assert examples[1].messages == (Message("user", "Say hi\n\nto Ana"), Message("assistant", "hi Ana"))
    assert examples[2].messages == examples[3].messages == (Message("user", "Say hi"), Message("assistant", "hi"))


def test_multi_turn_chat_keeps_every_turn(tmp_path):
    rows = [{"messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}]
    (example,) = load_examples(write_jsonl(tmp_path / "t.jsonl", rows))
    assert [m.content for m in example.messages] == ["a", "b", "c", "d"]
    assert example.reference == "d"


BAD_LINES = [
    ("{not json", 2, None, "invalid JSON"),
    ('{"text": "hello"}', 2, None, "match no known format"),
    ('{"prompt": "hi", "completion": ""}', 2, "completion", "is empty"),
    ('{"prompt": "hi"}', 2, "completion", "expected a string"),
    ('{"instruction": "hi", "output": 3}', 2, "output", "expected a string"),
    ('{"messages": []}', 2, "messages", "non-empty list"),
    ('{"messages": [{"role": "bot", "content": "x"}]}', 2, "messages[0].role", "not one of"),
    ('{"messages": [{"role": "assistant", "content": "x"}]}', 2, "messages[0].role", "expected role 'user'"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]}', 2, "messages[1].role", "expected role 'assistant'"),
    ('{"messages": [{"role": "user", "content": "x"}]}', 2, "messages", "must end with an assistant"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}]}', 2, "messages[1].content", "is empty"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant"}]}', 2, "messages[1].content", "expected a string"),
    ('[1, 2]', 2, None, "expected a JSON object"),
]


@pytest.mark.parametrize("line,number,field,message", BAD_LINES)
def test_bad_line_names_file_line_and_field(tmp_path, line, number, field, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [chat("ok", "fine"), line])
    with pytest.raises(DataError) as info:
        load_examples(path)
    err = info.value
    assert (err.path, err.line, err.field) == (str(path), number, field)
    assert message in str(err) and f"{path}:{number}:" in str(err)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_examples(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="dataset is empty"):
        load_examples(tmp_path / "empty.jsonl")


def test_loss_mask_covers_only_assistant_tokens(tiny_base):
    tokenizer, _ = load_tokenizer(str(tiny_base))
    messages = [Message("system", "Be brief."), Message("user", "the cat"), Message("assistant", "THE CAT"),
                Message("user", "the dog"), Message("assistant", "THE DOG")]
    ids, mask = encode_chat(tokenizer, messages)
    masked = tokenizer.decode([t for t, m in zip(ids, mask) if m])
    unmasked = tokenizer.decode([t for t, m in zip(ids, mask) if not m])
    assert [part.strip() for part in masked.split(tokenizer.eos_token)] == ["THE CAT", "THE DOG", ""]
    assert masked.count(tokenizer.eos_token) == 2  # the model learns to stop after each reply
    assert "THE" not in unmasked and "the cat" in unmasked and "Be brief." in unmasked
    # What generation sees is exactly the training prefix before the last reply.
    prompt = encode_prompt(tokenizer, messages[:-1])
    assert ids[: len(prompt)] == prompt and not any(mask[len(prompt) - 1 : len(prompt)])


def test_long_examples_are_counted_named_and_dropped_or_rejected(tiny_base, tmp_path):
    tokenizer, _ = load_tokenizer(str(tiny_base))
    rows = [chat("hi", "yes"), chat("word " * 80, "long"), chat("hi", "no"), chat("word " * 90, "long")]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    examples = load_examples(path)
    kept, long = tokenize(examples, tokenizer, max_length=40, on_long="drop", path=path)
    assert [k.line for k in kept] == [1, 3] and long.count == 2 and long.first_lines == [2, 4]
    assert all(any(label != IGNORE_INDEX for label in k.labels) for k in kept)
    with pytest.raises(DataError, match=r"2 example\(s\) longer than max_length=40 tokens \(lines 2, 4\)"):
        tokenize(examples, tokenizer, max_length=40, on_long="error", path=path)


def test_length_grouping_keeps_every_example_once_and_groups_lengths():
    lengths = [((i * 37) % 100) + 1 for i in range(1000)]
    batches = length_grouped_batches(lengths, 8, seed=3)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(1000))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 10  # random batches of 8 would spread over ~75
    assert batches == length_grouped_batches(lengths, 8, seed=3)
    assert batches != length_grouped_batches(lengths, 8, seed=4)
