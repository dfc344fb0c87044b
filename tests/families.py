"""A zoo of tiny model families for tests: each a random-weight model from the family's own config
class with its structural options, a word-level tokenizer trained here on a tiny corpus with the
family's special tokens, and a chat template written here that behaves like the family's.

Built in about a second each; `build_family(name, folder)` writes a Hugging Face model folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

WORDS = ("Color of cat dog bird fish king queen ? red blue green small big tiny Size Say this back : hill "
         "What is 3 + 4 Echo the You are a helpful assistant . user assistant system model Hello").split()
"""Every word the tests' prompts and replies use: the tokenizer's whole vocabulary."""

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
    "{{ m.content | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
# Qwen2.5 writes a default system prompt when the conversation has none.
QWEN_TEMPLATE = (
    "{% if messages[0].role != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Mistral's rule: user and assistant strictly alternate, starting with the user; no system role.
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if (m.role == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if m.role == 'user' %}[INST] {{ m.content }} [/INST]{% else %}{{ m.content }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)
# Gemma's rule: no system turn; the assistant's role is written 'model'.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for m in messages %}"
    "{% if (m.role == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "<start_of_turn>{{ 'model' if m.role == 'assistant' else m.role }}\n{{ m.content | trim }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
PHI3_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% else %}{{ eos_token }}{% endif %}"
)
PLAIN_TEMPLATE = (
    "{% for m in messages %}{{ m.role }} : {{ m.content }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)


@dataclass(frozen=True)
class Family:
    """One family's recipe: its config class and options, its special tokens and its template."""

    name: str
    config_class: str
    options: dict
    template: str
    bos: str | None
    eos: str
    end_of_turn: str
    """What the template writes after an assistant reply."""
    extra_special: tuple[str, ...] = ()
    generation_eos: tuple[str, ...] | None = None
    """generation_config.eos_token_id as a list, where the family's checkpoints list several."""
    tie_word_embeddings: bool = False
    byte_level: bool = False
    """A byte-level BPE (as Qwen ships: transformers rebuilds Qwen2Tokenizer from its vocab and merges)."""
    notes: str = ""
    initializer_range: float = 0.3
    """Wide: a random head's logits must be large enough for a small LoRA to move (tests/conftest.py)."""
    shapes: dict = field(default_factory=lambda: {"hidden_size": 64, "num_hidden_layers": 2})


FAMILIES = {
    "llama3": Family(
        "llama3", "LlamaConfig",
        dict(intermediate_size=172, num_attention_heads=4, num_key_value_heads=2,  # GQA 2:1, width 172 (not 64k)
             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 64}, rope_theta=500000.0),
        LLAMA3_TEMPLATE, "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>",
        ("<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>"),
        generation_eos=("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"),
        notes="GQA, llama3 rope scaling, MLP width 172, generation_config lists three EOS ids"),
    "qwen2": Family(
        "qwen2", "Qwen2Config",
        dict(intermediate_size=128, num_attention_heads=4, num_key_value_heads=1, rope_theta=1000000.0),  # q/k/v biases
        QWEN_TEMPLATE, None, "<|endoftext|>", "<|im_end|>", ("<|im_start|>", "<|im_end|>"), tie_word_embeddings=True, byte_level=True,
        notes="q/k/v biases, GQA 4:1, tied embeddings, default system prompt; EOS is <|endoftext|> as in the "
              "base checkpoints, so <|im_end|> is found from the template"),
    "mistral": Family(
        "mistral", "MistralConfig",
        dict(intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, sliding_window=32),
        MISTRAL_TEMPLATE, "<s>", "</s>", "</s>", ("[INST]", "[/INST]"),
        notes="sliding window, strict user/assistant alternation, the reply ends with EOS"),
    "gemma2": Family(
        "gemma2", "Gemma2Config",
        dict(intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
             sliding_window=32, attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
        GEMMA_TEMPLATE, "<bos>", "<eos>", "<end_of_turn>", ("<start_of_turn>", "<end_of_turn>"),
        generation_eos=("<eos>", "<end_of_turn>"), tie_word_embeddings=True,
        notes="soft-capping, alternating sliding window, tied embeddings, no system turn"),
    "phi3": Family(
        "phi3", "Phi3Config",
        dict(intermediate_size=128, num_attention_heads=4, num_key_value_heads=4),  # fused qkv_proj and gate_up_proj
        PHI3_TEMPLATE, None, "<|endoftext|>", "<|end|>", ("<|user|>", "<|assistant|>", "<|system|>", "<|end|>"),
        generation_eos=("<|endoftext|>", "<|assistant|>", "<|end|>"),
        notes="fused qkv_proj and gate_up_proj"),
    "gpt2": Family(
        "gpt2", "GPT2Config", dict(n_embd=64, n_layer=2, n_head=2, n_positions=256), PLAIN_TEMPLATE, None,
        "<|endoftext|>", "<|endoftext|>", tie_word_embeddings=True, shapes={},
        notes="Conv1D layers (fused c_attn), tied embeddings, learned positions"),
    "neox": Family(
        "neox", "GPTNeoXConfig", dict(intermediate_size=128, num_attention_heads=4, rotary_pct=0.25,
                                      use_parallel_residual=True),
        PLAIN_TEMPLATE, "<|endoftext|>", "<|endoftext|>", "<|endoftext|>",
        notes="fused query_key_value, partial rotary, parallel residual"),
    "mixtral": Family(
        "mixtral", "MixtralConfig", dict(intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                                         num_local_experts=4, num_experts_per_tok=2),
        MISTRAL_TEMPLATE, "<s>", "</s>", "</s>", ("[INST]", "[/INST]"),
        notes="experts held as fused 3-D parameters: 'all-linear' adapts attention and the router only"),
}


def build_tokenizer(family: Family):
    """A word-level tokenizer over WORDS with the family's special tokens, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>"] + [t for t in dict.fromkeys((family.bos, family.eos, *family.extra_special)) if t]
    if family.byte_level:
        core = Tokenizer(models.BPE())
        core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        core.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        core = Tokenizer(models.WordLevel(unk_token="<unk>"))
        core.pre_tokenizer = pre_tokenizers.Whitespace()
        trainer = trainers.WordLevelTrainer(special_tokens=specials)
    # each word after a space and after a newline (a reply's first word follows the template's newline)
    core.train_from_iterator([" ".join(WORDS), "\n".join(WORDS)] * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<unk>",
                                        bos_token=family.bos, eos_token=family.eos,
                                        additional_special_tokens=list(family.extra_special))
    tokenizer.chat_template = family.template
    return tokenizer


def build_config(family: Family, tokenizer):
    import transformers

    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    config_class = getattr(transformers, family.config_class)
    config = config_class(vocab_size=len(tokenizer), max_position_embeddings=256, tie_word_embeddings=family.tie_word_embeddings,
                          initializer_range=family.initializer_range, **family.shapes, **family.options, **ids)
    return config


def build_family(name: str, folder: Path, seed: int = 0, dtype: torch.dtype = torch.float32,
                 max_shard_size: str | None = None) -> Path:
    """Write the family's tiny model, tokenizer and generation config into `folder`: the weights
    stored in `dtype` (as checkpoints ship bf16), in shards of at most `max_shard_size` with their
    index (`model.safetensors.index.json`) when given."""
    from transformers import AutoModelForCausalLM

    family = FAMILIES[name]
    tokenizer = build_tokenizer(family)
    config = build_config(family, tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    config.architectures = [type(model).__name__]
    if family.generation_eos:
        model.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids(t) for t in family.generation_eos]
    model.to(dtype).save_pretrained(folder, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    tokenizer.save_pretrained(folder)
    return Path(folder)
