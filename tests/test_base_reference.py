"""The base computes the same way whatever the server did before: its greedy answers equal plain
transformers + bitsandbytes on the same 4-bit base, before and after adapters load and leave."""

from __future__ import annotations

import bitsandbytes as bnb
import torch
from transformers import AutoModelForCausalLM

from adapters import BaseConfig, Message, load_base
from adapters.base import quantization_config
from adapters.chat import encode_prompt
from serve.slots import DecodeSettings
from tests.conftest import PROMPTS, new_engine, request, texts

NEW_TOKENS = 8


def plain_reference(tiny_base, prompts: list[str]) -> list[str]:
    """Greedy replies from transformers' own generate on a 4-bit model loaded the plain way.

    bitsandbytes' exact path (dequantize, then a float32 product) is the one it takes on CPUs
    without AVX512-BF16 and in training; on CPUs with it, eval-mode forwards switch to a bf16
    kernel that computes another model (adapters/base.py, use_exact_4bit_kernels), so that switch
    is turned off here as the engine turns it off."""
    model = AutoModelForCausalLM.from_pretrained(str(tiny_base), quantization_config=quantization_config(torch.float32),
                                                 dtype=torch.float32, device_map={"": "cpu"})
    model.eval()
    for layer in model.modules():
        if isinstance(layer, bnb.nn.Linear4bit):
            layer.support_avx512bf16_for_cpu = False
    tokenizer = load_base(BaseConfig(str(tiny_base))).tokenizer
    replies = []
    for prompt in prompts:
        ids = torch.tensor([encode_prompt(tokenizer, [Message("user", prompt)])])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                 do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        replies.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return replies


def base_answers(engine) -> list[str]:
    return [texts(engine, [request("base", p, max_new_tokens=NEW_TOKENS)])[0] for p in PROMPTS]


def test_base_answers_equal_plain_transformers_before_and_after_adapters(served, tiny_base):
    _, _, registry = served
    reference = plain_reference(tiny_base, PROMPTS)
    engine = new_engine(tiny_base, registry, max_loaded=2, decode=DecodeSettings())
    try:
        before = base_answers(engine)
        texts(engine, [request(n) for n in ("a", "b", "c")])  # loads three, evicts one to host memory
        with_adapters = base_answers(engine)
        engine.evict("b")
        texts(engine, [request("a"), request("base")])
        after = base_answers(engine)
    finally:
        engine.close()
    assert before == reference
    assert with_adapters == reference
    assert after == reference


def test_reading_the_base_s_state_leaves_its_numbers_alone(tiny_base):
    """peft reads `state_dict()` when it loads or saves an adapter; on an AVX512-BF16 CPU that
    unpacked bitsandbytes' repacked weights, and the next forward repacked them differently."""
    base = load_base(BaseConfig(str(tiny_base)))
    ids = torch.tensor([[5, 17, 33, 40, 2, 9]])
    with torch.no_grad():
        first = base.model(ids).logits
        base.model.state_dict()
        again = base.model(ids).logits
    assert torch.equal(first, again)
    layers = [m for m in base.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)
