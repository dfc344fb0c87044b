"""Task data: three JSONL formats read into chat conversations, checked line by line, tokenized
with the loss on assistant tokens only, and batched by length."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from adapters.chat import ROLES, Message, encode_chat

IGNORE_INDEX = -100
FORMATS = {
    "chat": ("messages",),
    "alpaca": ("instruction", "output"),
    "completion": ("prompt", "completion"),
}


class DataError(ValueError):
    """Bad training data, located by file, line and field."""

    def __init__(self, path: Path | str, message: str, line: int | None = None, field: str | None = None):
        self.path, self.line, self.field = str(path), line, field
        where = self.path + (f":{line}" if line is not None else "")
        what = f" field '{field}':" if field else ""
        super().__init__(f"{where}:{what} {message}")


@dataclass(frozen=True)
class Example:
    messages: tuple[Message, ...]
    line: int
    """1-based line number in the source file."""

    @property
    def prompt(self) -> tuple[Message, ...]:
        """Everything before the last assistant reply."""
        return self.messages[:-1]

    @property
    def reference(self) -> str:
        return self.messages[-1].content


@dataclass(frozen=True)
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    """input_ids with every non-assistant token replaced by IGNORE_INDEX."""
    line: int

    @property
    def target_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


def _text(record: dict, key: str, path, line: int, required: bool = True) -> str:
    value = record.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise DataError(path, f"expected a string, got {type(value).__name__}", line, key)
    if required and not value.strip():
        raise DataError(path, "is empty", line, key)
    return value


def _chat_messages(record: dict, path, line: int) -> tuple[Message, ...]:
    raw = record["messages"]
    if not isinstance(raw, list) or not raw:
        raise DataError(path, "expected a non-empty list of {role, content}", line, "messages")
    messages = []
    for i, item in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(item, dict):
            raise DataError(path, "expected an object with role and content", line, where)
        role = item.get("role")
        if role not in ROLES:
            raise DataError(path, f"role {role!r} is not one of {list(ROLES)}", line, where + ".role")
        messages.append(Message(role, _content(item, path, line, where)))
    _check_order(messages, path, line)
    return tuple(messages)


def _content(item: dict, path, line: int, where: str) -> str:
    content = item.get("content")
    if not isinstance(content, str):
        raise DataError(path, f"expected a string, got {type(content).__name__}", line, where + ".content")
    if not content.strip():
        raise DataError(path, "is empty", line, where + ".content")
    return content


def _check_order(messages: list[Message], path, line: int) -> None:
    """An optional system turn, then user and assistant alternating, ending on the assistant."""
    turns = messages[1:] if messages[0].role == "system" else messages
    offset = len(messages) - len(turns)
    for i, message in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if message.role != expected:
            raise DataError(
                path, f"expected role {expected!r} here, got {message.role!r}", line, f"messages[{i + offset}].role"
            )
    if not turns or turns[-1].role != "assistant":
        raise DataError(path, "the conversation must end with an assistant reply", line, "messages")


def parse_record(record: object, path, line: int) -> Example:
    """One JSONL record in any of the known formats, as a chat conversation."""
    if not isinstance(record, dict):
        raise DataError(path, f"expected a JSON object, got {type(record).__name__}", line)
    if "messages" in record:
        return Example(_chat_messages(record, path, line), line)
    if "instruction" in record or "output" in record:
        instruction = _text(record, "instruction", path, line)
        extra = _text(record, "input", path, line, required=False)
        user = instruction + ("\n\n" + extra if extra.strip() else "")
        output = _text(record, "output", path, line)
        return Example((Message("user", user), Message("assistant", output)), line)
    if "prompt" in record or "completion" in record:
        prompt = _text(record, "prompt", path, line)
        completion = _text(record, "completion", path, line)
        return Example((Message("user", prompt), Message("assistant", completion)), line)
    known = "; ".join(f"{name}: {', '.join(keys)}" for name, keys in FORMATS.items())
    raise DataError(path, f"keys {sorted(record)} match no known format ({known})", line)


DEFAULT_MAX_LINE_BYTES = 2**20
_SKIP_CHUNK = 2**16
"""Bytes read at a time while skipping the rest of an over-long line."""


@dataclass
class ReadExamples:
    examples: list[Example]
    long_lines: list[int]
    """Lines over max_line_bytes, dropped unread (1-based)."""


def load_examples(path: Path | str, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> list[Example]:
    """Every example in a JSONL file; DataError at the first bad or over-long line, before anything is trained."""
    return read_examples(path, max_line_bytes, on_long="error").examples


def read_examples(path: Path | str, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES, on_long: str = "error") -> ReadExamples:
    """Every example in a JSONL file, read line by line with at most max_line_bytes + 1 bytes in memory
    per line: a line over the limit is never parsed, and is dropped (on_long='drop', line numbers kept)
    or rejected with a DataError naming file and line. Any other bad line is a DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found")
    examples, long_lines = [], []
    with path.open("rb") as handle:
        for number, raw in enumerate(_bounded_lines(handle, max_line_bytes), start=1):
            if raw is None:
                if on_long == "error":
                    raise DataError(path, f"line longer than max_line_bytes={max_line_bytes} bytes; "
                                          "raise --max-line-bytes or use --on-long drop", number)
                long_lines.append(number)
                continue
            if raw.strip():
                examples.append(parse_record(_decode_json(raw, path, number), path, number))
    if not examples:
        raise DataError(path, "no examples: the dataset is empty" if not long_lines else
                        f"no examples left: every line is longer than max_line_bytes={max_line_bytes} bytes")
    return ReadExamples(examples, long_lines)


def _bounded_lines(handle, limit: int) -> Iterator[bytes | None]:
    """Each line of a binary file (newline included), or None for a line over `limit` bytes
    (newline excluded), whose rest is skipped in small chunks instead of read whole."""
    while True:
        raw = handle.readline(limit + 1)
        if not raw:
            return
        if len(raw) <= limit or raw.endswith(b"\n"):  # at most `limit` bytes before the newline
            yield raw
            continue
        while raw and not raw.endswith(b"\n"):
            raw = handle.readline(_SKIP_CHUNK)
        yield None


def _decode_json(raw: bytes, path: Path, number: int) -> object:
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise DataError(path, f"not valid UTF-8 (byte {err.start + 1})", number) from None
    except json.JSONDecodeError as err:
        raise DataError(path, f"invalid JSON: {err.msg} (column {err.colno})", number) from None


def file_digest(path: Path | str) -> tuple[str, int]:
    """sha256 and size of a file, read in chunks (a data file may be larger than memory allows)."""
    digest, size = hashlib.sha256(), 0
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(2**20), b""):
            digest.update(chunk)
            size += len(chunk)
    return "sha256:" + digest.hexdigest(), size


def split_eval(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded held-out split; at least one example on each side."""
    if len(examples) < 2:
        raise ValueError("need at least 2 examples to hold some out for eval; pass --eval-data")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(examples) - 1, max(1, round(len(examples) * fraction)))
    held = set(order[:n_eval])
    train = [e for i, e in enumerate(examples) if i not in held]
    evals = [e for i, e in enumerate(examples) if i in held]
    return train, evals


@dataclass
class LongExamples:
    count: int
    first_lines: list[int]

    def describe(self, path, max_length: int) -> str:
        lines = ", ".join(map(str, self.first_lines))
        return f"{path}: {self.count} example(s) longer than max_length={max_length} tokens (lines {lines}{', ...' if self.count > len(self.first_lines) else ''})"


def tokenize(examples: list[Example], tokenizer, max_length: int, on_long: str, path) -> tuple[list[Tokenized], LongExamples]:
    """Token ids and loss labels; over-long examples are dropped or rejected, never cut."""
    kept, long_lines = [], []
    for example in examples:
        ids, mask = encode_chat(tokenizer, example.messages)
        if len(ids) > max_length:
            long_lines.append(example.line)
            continue
        labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
        kept.append(Tokenized(ids, labels, example.line))
    long = LongExamples(len(long_lines), long_lines[:5])
    if long.count and on_long == "error":
        raise DataError(path, long.describe(path, max_length).split(": ", 1)[1] + "; raise --max-length or use --on-long drop")
    if not kept:
        raise DataError(path, f"no examples left: all are longer than max_length={max_length}")
    return kept, long


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int) -> list[list[int]]:
    """Batches of similar length, in a seeded random order.

    Shuffle, cut into windows of 50 batches, sort each window by length, then shuffle the
    batches: padding stays small without feeding the model sorted data.
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * 50
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def collate(items: list[Tokenized], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors for a micro-batch: input_ids, attention_mask, labels  # [batch, seq]."""
    width = max(len(item.input_ids) for item in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item.input_ids)
        ids[row, :n] = torch.tensor(item.input_ids)
        labels[row, :n] = torch.tensor(item.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
