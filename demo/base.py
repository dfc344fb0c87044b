"""Build the demo base: a sentencepiece tokenizer and a few-million-parameter Llama chat model,
trained from scratch on the general chat mix. A demonstration model, not a useful assistant.

    python -m demo.base --out models/demo-base
"""

from __future__ import annotations

import argparse
import io
import json
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer, get_scheduler, set_seed

from adapters.chat import FALLBACK_CHAT_TEMPLATE, Message
from adapters.data import Example
from demo.tasks import GENERAL, GENERAL_MIX_VERSION, TASKS, Task, example
from train.data import Tokenized, collate, length_grouped_batches, tokenize_example
from train.evaluate import exact_match, token_loss_sum

ROLE_MARKERS = ["<|system|>", "<|user|>", "<|assistant|>"]


@dataclass
class DemoBaseConfig:
    vocab_size: int = 1024
    hidden_size: int = 256
    intermediate_size: int = 768
    layers: int = 4
    heads: int = 8
    max_positions: int = 512
    examples: int = 40000
    """Generated chat examples; each step draws `batch_size` of them."""
    steps: int = 3200
    batch_size: int = 32
    lr: float = 1.5e-3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.hidden_size % self.heads:
            raise ValueError("hidden_size must be a multiple of heads")


def tokenizer_corpus(rng: random.Random, n: int) -> list[str]:
    """Text for the tokenizer: the general mix and every adapter task, so all their words are pieces."""
    tasks = [GENERAL, *TASKS.values()]
    lines = []
    for _ in range(n):
        prompt, answer = rng.choice(tasks).make(rng)
        lines += [prompt, answer]
    return lines


def train_tokenizer(folder: Path, vocab_size: int, seed: int, corpus_examples: int = 20000) -> LlamaTokenizer:
    """A sentencepiece BPE model saved as a Hugging Face tokenizer with the chat template."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tokenizer_corpus(random.Random(seed), corpus_examples)),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,  # any text encodes, even characters the corpus lacked
        split_digits=True,
        normalization_rule_name="identity",  # keep text exactly as written (newlines, case)
        remove_extra_whitespaces=False,
        pad_id=0, unk_id=1, bos_id=2, eos_id=3,
        pad_piece="<pad>", unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
        user_defined_symbols=ROLE_MARKERS,
        minloglevel=2,
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    tokenizer = LlamaTokenizer.from_pretrained(str(folder), pad_token="<pad>")
    tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    _check_conversion(tokenizer, model.getvalue())
    return tokenizer


def _check_conversion(tokenizer, model_proto: bytes) -> None:
    """The fast tokenizer must split text as sentencepiece does, or the base learns the wrong pieces."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=model_proto)
    for text in ("the red cat sits near the river", "THE BIG DOG", "Ana is 34 and lives in Lima."):
        if sp.encode(text) != tokenizer(text, add_special_tokens=False)["input_ids"]:
            raise RuntimeError(f"tokenizer conversion differs from sentencepiece on {text!r}")


def tokenized_examples(tokenizer, task: Task, n: int, seed: int) -> list[Tokenized]:
    """n generated chat examples of `task`, tokenized, with the loss on the replies only."""
    rng = random.Random(seed)
    return [tokenize_example(tokenizer, Example(tuple(Message(**m) for m in example(task, rng)["messages"]), 0))
            for _ in range(n)]


def chat_examples(tokenizer, config: DemoBaseConfig) -> list[Tokenized]:
    """The general mix the base trains on.

    The loss is on the replies only: the prompts are mostly random words, predicting them teaches
    nothing, and their loss would drown the signal of the replies (copying, sums, facts) in noise.
    """
    return tokenized_examples(tokenizer, GENERAL, config.examples, config.seed + 1)


def target_tokens(items: list[Tokenized]) -> set[int]:
    return {t for item in items for t in item.targets}


def check_reply_coverage(tokenizer, items: list[Tokenized], n_per_task: int = 300, seed: int = 7) -> None:
    """Refuse a mix that never outputs a token some adapter task answers with.

    Pretraining only ever lowers the output-head row of a token that is never a target, and it
    lowers all such rows along one shared direction; an adapter on the decoder blocks then cannot
    lift one of them above the rest, and its answers stay unconfident however long it trains.
    """
    trained = target_tokens(items)
    missing = {}
    for task in TASKS.values():
        pieces = target_tokens(tokenized_examples(tokenizer, task, n_per_task, seed)) - trained
        if pieces:
            missing[task.name] = tokenizer.convert_ids_to_tokens(sorted(pieces))
    if missing:
        raise ValueError(
            f"the general chat mix never outputs tokens that adapter tasks answer with: {missing}; "
            "add their words to demo.tasks.ECHO_WORDS"
        )


def model_config(tokenizer, config: DemoBaseConfig) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        num_key_value_heads=config.heads,
        max_position_embeddings=config.max_positions,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        architectures=["LlamaForCausalLM"],
    )


def pretrain(model, items: list[Tokenized], pad_id: int, config: DemoBaseConfig) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01, betas=(0.9, 0.98))
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=config.steps // 20, num_training_steps=config.steps)
    batches = length_grouped_batches([len(t.input_ids) for t in items], config.batch_size, config.seed)
    losses = []
    model.train()
    started = time.perf_counter()
    for step in range(config.steps):
        batch = collate([items[i] for i in batches[step % len(batches)]], pad_id)
        loss_sum, count = token_loss_sum(model, batch)
        (loss_sum / count).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss_sum) / count)
        if step % 100 == 0 or step == config.steps - 1:
            print(f"step {step:5d}  loss {losses[-1]:.4f}  {time.perf_counter() - started:.0f}s", flush=True)
    model.eval()
    return losses


def general_score(model, tokenizer, n: int = 200, seed: int = 12345) -> float:
    rng = random.Random(seed)
    examples = [Example(tuple(Message(**m) for m in example(GENERAL, rng)["messages"]), i) for i in range(n)]
    return exact_match(model, tokenizer, examples, torch.device("cpu")).score


CARD_TITLE = "loraswap demo base"
"""How a demo base's card begins: what `stale_reason` recognises as a folder it may rebuild."""
CARD_WHAT = (
    f"{CARD_TITLE}: a tiny Llama-architecture chat model trained from scratch on generated data. "
    "A demonstration model for CPU tests and demos, NOT a useful assistant: it can repeat text back, "
    "do sums of numbers up to 20, and answer a few dozen memorised questions, and nothing else."
)


def stale_reason(out: Path) -> str | None:
    """Why the demo base in `out` must be rebuilt; None when it is current, or not a demo base at all
    (a real model in that folder is never touched)."""
    try:
        card = json.loads((out / "card.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(card, dict) or not str(card.get("what", "")).startswith(CARD_TITLE):
        return None
    version = card.get("general_mix_version", 1)
    if version != GENERAL_MIX_VERSION:
        return f"trained on general mix {version}, the current mix is {GENERAL_MIX_VERSION}"
    return None


def write_card(folder: Path, config: DemoBaseConfig, n_params: int, losses: list[float], score: float, seconds: float) -> None:
    card = {
        "what": CARD_WHAT,
        "parameters": n_params,
        "config": asdict(config),
        "general_mix_version": GENERAL_MIX_VERSION,
        "final_train_loss": round(losses[-1], 4),
        "general_exact_match": round(score, 3),
        "training_seconds": round(seconds, 1),
    }
    (folder / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    (folder / "README.md").write_text(f"# loraswap demo base\n\n{card['what']}\n\nParameters: {n_params:,}. "
                                      f"Exact match on its general chat mix: {score:.2f}.\n")


def build(out: Path, config: DemoBaseConfig) -> Path:
    """Train and save the demo base under `out`, writing to a temp folder first so a crash leaves nothing."""
    torch.manual_seed(config.seed)
    set_seed(config.seed)
    started = time.perf_counter()
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = train_tokenizer(tmp, config.vocab_size, config.seed)
    items = chat_examples(tokenizer, config)
    check_reply_coverage(tokenizer, items)
    model = LlamaForCausalLM(model_config(tokenizer, config))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"demo base: {n_params / 1e6:.2f}M parameters, {len(items)} examples, {config.steps} steps")
    losses = pretrain(model, items, tokenizer.pad_token_id, config)
    score = general_score(model, tokenizer)
    print(f"general chat exact match: {score:.3f}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    write_card(tmp, config, n_params, losses, score, time.perf_counter() - started)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="models/demo-base")
    parser.add_argument("--steps", type=int, default=DemoBaseConfig.steps)
    parser.add_argument("--force", action="store_true", help="Rebuild even when the folder holds a current demo base.")
    args = parser.parse_args()
    out = Path(args.out)
    if (out / "config.json").is_file() and not args.force:
        reason = stale_reason(out)
        if reason is None:
            print(f"{out} exists; skipping (use --force to rebuild)")
            return
        print(f"{out}: {reason}; rebuilding it")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    build(out, DemoBaseConfig(steps=args.steps))


if __name__ == "__main__":
    main()
