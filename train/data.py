"""Training data: task examples (`adapters.data`) tokenized with the loss on assistant tokens
only, split for eval, and batched by length."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from adapters.chat import encode_chat
from adapters.data import DataError, Example

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    """input_ids with every non-assistant token replaced by IGNORE_INDEX."""
    line: int

    @property
    def target_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)

    @property
    def targets(self) -> list[int]:
        """The token ids the loss is computed on (the assistant's), in order."""
        return [t for t in self.labels if t != IGNORE_INDEX]


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


def tokenize_example(tokenizer, example: Example) -> Tokenized:
    """One conversation's token ids, with the loss on its assistant tokens only."""
    ids, mask = encode_chat(tokenizer, example.messages)
    return Tokenized(ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask)], example.line)


def tokenize(examples: list[Example], tokenizer, max_length: int, on_long: str, path) -> tuple[list[Tokenized], LongExamples]:
    """Token ids and loss labels; over-long examples are dropped or rejected, never cut."""
    kept, long_lines = [], []
    for example in examples:
        item = tokenize_example(tokenizer, example)
        if len(item.input_ids) > max_length:
            long_lines.append(example.line)
            continue
        kept.append(item)
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
