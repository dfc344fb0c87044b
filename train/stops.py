"""Bases that never stop: how likely the base is to emit its stop tokens where the training
replies end, and, where it is not, training those tokens' rows beside the LoRA.

A base that never emitted a token in pretraining (a llama2.c story model's EOS, a Llama-3 base's
`<|eot_id|>`) keeps an output-head row for it that pretraining only ever pushed down, in the same
direction as the rows of every other token it never emitted. A LoRA on the decoder blocks moves
the hidden state, not that row: it can lift the whole crowd of unused tokens but not the stop
token above the rest of it, and its adapter gets the words right and then runs on to the token
limit. The fix trains the stop token's own output row (and its input row, where the embeddings are
tied and the two are one row) with peft's `trainable_token_indices`; the serving engine applies
those rows per request (serve/token_rows.py). docs/training.md#stop-rows
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

import torch

from train.config import StopSettings
from train.data import IGNORE_INDEX, Tokenized, collate
from train.evaluate import to_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StopProbe:
    """What a model gives the stop tokens where the probed replies end."""

    probability: dict[int, float]
    """Stop token id -> its mean probability at the reply ends where it is the next token."""
    positions: dict[int, int] = field(default_factory=dict)
    """Stop token id -> how many reply ends it closes among the probed examples."""
    examples: int = 0

    def below(self, threshold: float) -> list[int]:
        return sorted(t for t, p in self.probability.items() if p < threshold)


@dataclass(frozen=True)
class StopRowsPlan:
    """Which stop tokens get their rows trained, decided from the base's probe and the settings."""

    probe: StopProbe
    token_ids: list[int]
    setting: str
    """'auto', 'on' or 'off' (`StopSettings.train_stop_rows` None, True, False)."""


def reply_ends(item: Tokenized, stop_ids: frozenset[int]) -> list[tuple[int, int]]:
    """(position, stop token) for each assistant reply of `item` that ends on a stop token: the
    position whose logits predict the reply's first stop token (what a decode loop would stop on)."""
    ends, stopped = [], False
    for t in range(1, len(item.labels)):
        label = item.labels[t]
        if label == IGNORE_INDEX:
            stopped = False  # the next labelled span is the next reply
        elif label in stop_ids and not stopped:
            ends.append((t - 1, label))
            stopped = True
    return ends


@torch.no_grad()
def probe_stops(model, items: list[Tokenized], stop_ids: frozenset[int], pad_id: int, device,
                batch_size: int = 16) -> StopProbe:
    """The model's mean probability of each stop token at the reply ends of `items` where it is
    the next token (one forward pass per batch, logits only at those positions)."""
    was_training = model.training
    model.eval()
    sums: dict[int, float] = {}
    counts: dict[int, int] = {}
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        ends = [reply_ends(item, stop_ids) for item in chunk]
        for (row, pos, token), p in zip(_flat(ends), _end_probabilities(model, chunk, ends, pad_id, device)):
            sums[token] = sums.get(token, 0.0) + p
            counts[token] = counts.get(token, 0) + 1
    model.train(was_training)
    return StopProbe({t: sums[t] / counts[t] for t in sorted(sums)}, dict(sorted(counts.items())), len(items))


def _flat(ends: list[list[tuple[int, int]]]) -> list[tuple[int, int, int]]:
    return [(row, pos, token) for row, row_ends in enumerate(ends) for pos, token in row_ends]


def _end_probabilities(model, chunk: list[Tokenized], ends: list[list[tuple[int, int]]], pad_id: int, device) -> list[float]:
    """The probability of each reply end's stop token, in `_flat(ends)` order."""
    flat = _flat(ends)
    if not flat:
        return []
    keep = sorted({pos for _, pos, _ in flat})
    column = {pos: i for i, pos in enumerate(keep)}
    batch = to_device(collate(chunk, pad_id), device)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                   logits_to_keep=torch.tensor(keep, device=device)).logits.float()  # [batch, positions, vocab]
    rows = torch.tensor([r for r, _, _ in flat], device=device)
    cols = torch.tensor([column[p] for _, p, _ in flat], device=device)
    tokens = torch.tensor([t for _, _, t in flat], device=device)
    picked = logits[rows, cols]  # [ends, vocab]
    return (picked.gather(1, tokens[:, None]).squeeze(1) - picked.logsumexp(-1)).exp().tolist()


def probe_sample(items: list[Tokenized], n: int, seed: int) -> list[Tokenized]:
    """A seeded sample of n training examples (all of them when there are fewer)."""
    return items if len(items) <= n else random.Random(seed).sample(items, n)


def plan_stop_rows(settings: StopSettings, probe: StopProbe) -> StopRowsPlan:
    """Train every probed stop token's rows when asked (on), none (off), else those below the threshold."""
    if settings.train_stop_rows is None:
        return StopRowsPlan(probe, probe.below(settings.min_stop_probability), "auto")
    chosen = sorted(probe.probability) if settings.train_stop_rows else []
    return StopRowsPlan(probe, chosen, "on" if settings.train_stop_rows else "off")


def report_stop_rows(plan: StopRowsPlan, settings: StopSettings, tokenizer) -> None:
    """Say what the probe found and what the run does about it, before training starts."""
    probe, threshold = plan.probe, settings.min_stop_probability
    if not probe.probability:
        log.warning("none of the %d probed training replies ends on a stop token: the adapter is not taught to "
                    "stop (check the chat template's end of turn)", probe.examples)
        return
    found = ", ".join(f"{_named(tokenizer, [t])} {p:.1e} at {probe.positions[t]} reply ends"
                      for t, p in probe.probability.items())
    low = probe.below(threshold)
    if low and plan.setting == "off":
        log.warning("the base gives its stop token(s) %s a probability below %.0e where the training replies end "
                    "(%s): it never learned to end a reply, and --no-train-stop-rows leaves it so; expect replies "
                    "that run to the token limit (the card's metric.stop_rate)", _named(tokenizer, low), threshold, found)
    elif low:
        log.warning("the base gives its stop token(s) %s a probability below %.0e where the training replies end "
                    "(%s): it never learned to end a reply, and a LoRA on the decoder blocks cannot raise the token; "
                    "training its output row beside the LoRA (peft trainable_token_indices; --no-train-stop-rows "
                    "skips it; docs/training.md#stop-rows)", _named(tokenizer, low), threshold, found)
    else:
        log.info("stop token probabilities where the training replies end: %s (threshold %.0e)%s", found, threshold,
                 "; training their rows as asked (--train-stop-rows)" if plan.token_ids else "")


def _named(tokenizer, ids: list[int]) -> str:
    return "[" + ", ".join(f"{tokenizer.convert_ids_to_tokens(i)!r} (id {i})" for i in ids) + "]"


def token_indices_for(model, token_ids: list[int]) -> list[int] | dict[str, list[int]]:
    """`trainable_token_indices` for these tokens' output rows: on a tied model a list (peft then
    trains the input embedding's rows and ties the output head to them: one row each, the same
    tensor), else a mapping naming the output head alone (its input rows play no part in stopping)."""
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if head.weight is embedding.weight:
        return list(token_ids)
    name = next(n for n, m in model.named_modules() if m is head)
    return {name: list(token_ids)}
