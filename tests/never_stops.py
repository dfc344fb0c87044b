"""A base that never stops, obtained as real ones are: a tiny Llama (tied embeddings, GQA, MLP width
172, like the llama2.c story model of issue 22) pretrained briefly on chat text that never holds
its end-of-turn token, EOS.

Its special tokens (EOS, BOS, UNK and 256 reserved ones, as Llama-3 reserves) start where
transformers puts tokens added to a vocabulary (`resize_token_embeddings`): at the mean of the
word rows, plus a little noise. Pretraining never emits them, so it pushes their rows down
together; the base then answers and runs on into the next turn, and a LoRA on its blocks lifts
the whole crowd of unused tokens at best, never EOS above the rest of it.

`build_never_stopping_base(folder)` takes seconds.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from pathlib import Path

import torch

from tests.families import Family, build_config, build_tokenizer

COLORS = {"cat": "red", "dog": "blue", "bird": "green", "fish": "red", "king": "blue", "queen": "green"}
"""What the base learns in pretraining: the color of each animal."""

RESERVED = tuple(f"<|reserved_{i}|>" for i in range(256))
# A completion-style template: the reply follows the user's text and ends with EOS. A base
# predicts a reply's first word at the last token of the prompt, here the animal itself, so the
# tiny base learns its facts as plain bigrams in a few hundred steps.
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m.role == 'assistant' %} {{ m.content }}{{ eos_token }}\n"
    "{% else %}{{ m.content }}{% endif %}{% endfor %}"
)
NEVER_STOPS = Family(
    "never-stops", "LlamaConfig", dict(intermediate_size=172, num_attention_heads=4, num_key_value_heads=2),
    TEMPLATE, "<s>", "</s>", "</s>", extra_special=RESERVED, tie_word_embeddings=True,
    initializer_range=0.1,  # pretrained, not random: a narrower init than the random zoo's, wide enough to learn fast
)
PRETRAIN = {"steps": 300, "lr": 2e-2, "batch": 16, "documents": 512, "turns": 3, "noise": 1e-3, "seed": 0}
"""The pretraining run: a few hundred steps of a tiny model (docs/training.md#stop-rows shows what it gives)."""


def pretraining_text(rng: random.Random, turns: int) -> str:
    """One document: the chat template's turns about the animals' colors, without EOS."""
    lines = []
    for _ in range(turns):
        animal = rng.choice(sorted(COLORS))
        lines.append(f"Color of {animal} {COLORS[animal]}\n")
    return "".join(lines)


def mean_init_special_rows(model, tokenizer, noise: float, seed: int) -> None:
    """The special tokens' rows at the mean of the word rows plus `noise` of their spread, as
    transformers initializes tokens added to a vocabulary."""
    weight = model.get_input_embeddings().weight.data  # tied: the output head's too
    special = sorted(set(tokenizer.all_special_ids))
    words = [i for i in range(weight.shape[0]) if i not in set(special)]
    generator = torch.Generator().manual_seed(seed)
    spread = noise * weight[words].std(0) * torch.randn(len(special), weight.shape[1], generator=generator)
    weight[special] = weight[words].mean(0) + spread


@contextmanager
def one_thread():
    """torch on one intra-op thread: this tiny model's operators run faster on one than on several
    (each costs the threads a synchronisation it does not amortise), the most on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def pretrain(model, ids: torch.Tensor, steps: int, lr: float, batch: int, seed: int) -> float:
    """Plain next-token training on every position; returns the last loss."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    with one_thread():
        for _ in range(steps):
            rows = ids[torch.randint(0, len(ids), (batch,), generator=generator)]
            loss = model(input_ids=rows, labels=rows).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    model.eval()
    return float(loss)


def build_never_stopping_base(folder: Path) -> Path:
    """Write the pretrained base and its tokenizer into `folder`."""
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer(NEVER_STOPS)
    config = build_config(NEVER_STOPS, tokenizer)
    torch.manual_seed(PRETRAIN["seed"])
    model = AutoModelForCausalLM.from_config(config)
    config.architectures = [type(model).__name__]
    mean_init_special_rows(model, tokenizer, PRETRAIN["noise"], PRETRAIN["seed"] + 1)
    rng = random.Random(PRETRAIN["seed"])
    texts = [pretraining_text(rng, PRETRAIN["turns"]) for _ in range(PRETRAIN["documents"])]
    ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer(t, add_special_tokens=False)["input_ids"]] for t in texts])
    assert not (ids == tokenizer.eos_token_id).any()  # the property itself: EOS is never in the text
    pretrain(model, ids, PRETRAIN["steps"], PRETRAIN["lr"], PRETRAIN["batch"], PRETRAIN["seed"])
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)
