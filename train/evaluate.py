"""Eval loss and the task metric (exact match of greedy replies) for a model, with or without its adapter."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F

from adapters.base import stop_token_ids
from adapters.chat import encode_prompt, left_pad
from adapters.data import Example
from adapters.metric import is_exact_match
from train.data import IGNORE_INDEX, Tokenized, collate


def token_loss_sum(model, batch: dict[str, torch.Tensor], device: torch.device | None = None) -> tuple[torch.Tensor, int]:
    """Summed next-token loss over the labelled tokens, and their count.

    Summing (not averaging) per micro-batch lets gradient accumulation weight every target
    token equally, however the tokens are spread over micro-batches. The output head runs only
    at positions whose next token is a target (`logits_to_keep`): prompt positions need no
    logits, and with a large vocabulary the float32 logits are the biggest activation in the step.

    With `device`, `batch` is still on the CPU: the positions and the count are read there, and
    the tensors go to the device without the host waiting for the device's queued work (pinned,
    asynchronous copies on a GPU), which a read of device values would make it do.
    """
    targets = batch["labels"][:, 1:]  # [batch, seq-1]
    keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)  # [positions]
    targets = targets[:, keep]
    count = int((targets != IGNORE_INDEX).sum())
    if device is not None:
        batch, keep, targets = to_device(batch, device), _to(keep, device), _to(targets, device)
    # use_cache=False: a loss needs no KV cache, and building one costs every block a cache update
    # (and a compiled block a second graph: block 0 meets an empty cache, the others a filled one).
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep,
                   use_cache=False).logits
    logits = logits.float()  # [batch, positions, vocab]
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, count


def _to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    if torch.device(device).type == "cuda":  # from pinned memory the copy is queued, not waited for
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: _to(v, device) for k, v in batch.items()}


@torch.no_grad()
def eval_loss(model, items: list[Tokenized], pad_id: int, batch_size: int, device) -> float:
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(items), batch_size):
        loss, n = token_loss_sum(model, collate(items[start : start + batch_size], pad_id), device)
        total, count = total + float(loss), count + n
    model.train(was_training)
    return total / max(count, 1)


@dataclass
class ExactMatch:
    score: float
    outputs: list[str]
    stop_rate: float = 0.0
    """Share of replies that ended on a stop token rather than at the token limit."""


@dataclass
class Reply:
    text: str
    stopped: bool
    """It ended on one of the stop tokens (not at max_new_tokens)."""


@torch.no_grad()
def generate_replies(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int, device,
                     stop_ids: Iterable[int] | None = None) -> list[Reply]:
    """Greedy replies for tokenized prompts, batched with left padding, each ending at the first
    of `stop_ids` (default: the tokenizer's EOS)."""
    stops = sorted(stop_ids) if stop_ids is not None else [tokenizer.eos_token_id]
    was_training = model.training
    model.eval()
    replies = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        ids, mask = left_pad(chunk, tokenizer.pad_token_id)
        width = ids.shape[1]
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=stops,
        )
        replies.extend(_reply(tokenizer, row[width:].tolist(), set(stops)) for row in out)
    model.train(was_training)
    return replies


def _reply(tokenizer, new: list[int], stops: set[int]) -> Reply:
    # generate pads a row that stopped early with pad_token_id, which may itself be a stop id
    end = next((i for i, t in enumerate(new) if t in stops), None)
    return Reply(tokenizer.decode(new[:end], skip_special_tokens=True), end is not None)


def exact_match(model, tokenizer, examples: list[Example], device, batch_size: int = 32,
                stop_ids: Iterable[int] | None = None) -> ExactMatch:
    """Share of examples whose greedy reply is an exact match of the reference (`adapters.metric`).

    stop_ids: the tokens a reply ends on (`LoadedBase.stop_token_ids`); by default the ones the
    model's generation config, the tokenizer and its chat template give (`adapters.base.stop_token_ids`).
    """
    if stop_ids is None:
        stop_ids = stop_token_ids(model, tokenizer)
    prompts = [encode_prompt(tokenizer, e.prompt) for e in examples]
    longest = max(len(tokenizer(e.reference, add_special_tokens=False)["input_ids"]) for e in examples)
    replies = generate_replies(model, tokenizer, prompts, longest + 8, batch_size, device, stop_ids)
    hits = sum(is_exact_match(r.text, e.reference) for r, e in zip(replies, examples))
    stopped = sum(r.stopped for r in replies)
    return ExactMatch(hits / len(examples), [r.text for r in replies], stopped / len(examples))
