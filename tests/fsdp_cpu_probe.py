"""Run under torchrun (2 CPU processes, gloo) by tests/test_ddp.py: does torch's FSDP shard this
project's QLoRA model on the CPU, where accelerate will not set FSDP up (docs/training.md#fsdp-on-the-cpu)?

The base loads as adapters/base.py loads it for FSDP (ACCELERATE_USE_FSDP=true: the 4-bit bytes
in float32 containers, no device map), the LoRA as train/loop.py attaches it. Prints one JSON
line on rank 0: whether fsdp-qlora.yaml's wrapping alone is refused, and the loss of one batch
before and after one AdamW step, sharded and unsharded.
"""

from __future__ import annotations

import functools
import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

import train.loop as loop
from adapters.base import load_base, under_fsdp
from adapters.data import load_examples
from train.config import config_from_args
from train.data import collate, tokenize
from train.evaluate import token_loss_sum

CPU = torch.device("cpu")


def qlora_model(base_dir: str, data: str):
    """The same model each call, in every process: the LoRA init is drawn from a fixed seed."""
    torch.manual_seed(0)
    config = config_from_args(["--name", "probe", "--base", base_dir, "--data", data, "--r", "8", "--dropout", "0"])
    base = load_base(config.base)
    return loop.attach_lora(base.model, config, base.model.config.num_hidden_layers), base.tokenizer


def batch(tokenizer, data: str) -> dict[str, torch.Tensor]:
    items, _ = tokenize(load_examples(data)[:4], tokenizer, 512, "drop", data)
    return collate(items, tokenizer.pad_token_id)


def loss_and_step(model, inputs: dict[str, torch.Tensor]) -> tuple[float, float]:
    """The batch's loss per target token, then one AdamW step on it, then the loss again."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    loss, count = token_loss_sum(model, inputs)
    (loss / count).backward()  # every rank the same batch: FSDP's averaged gradient is this one
    optimizer.step()
    with torch.no_grad():
        after, _ = token_loss_sum(model, inputs)
    return float(loss.detach() / count), float(after / count)


def transformer_wrap_refusal(base_dir: str, data: str) -> str:
    """FSDP1 over the decoder blocks alone, use_orig_params=False: fsdp-qlora.yaml without peft's policy."""
    model, _ = qlora_model(base_dir, data)
    block = type(model.base_model.model.model.layers[0])
    try:
        FSDP(model, auto_wrap_policy=functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={block}),
             use_orig_params=False, device_id=CPU)
    except ValueError as err:
        return str(err).splitlines()[0]
    return ""


def main(base_dir: str, data: str) -> None:
    dist.init_process_group("gloo")
    assert under_fsdp(), "run with ACCELERATE_USE_FSDP=true, so the base loads as it does for FSDP"
    from peft.utils.other import fsdp_auto_wrap_policy

    refusal = transformer_wrap_refusal(base_dir, data)
    plain, tokenizer = qlora_model(base_dir, data)
    inputs = batch(tokenizer, data)
    unsharded = loss_and_step(plain, inputs)
    model, _ = qlora_model(base_dir, data)
    weight = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    storage = str(weight.dtype)
    sharded = loss_and_step(FSDP(model, auto_wrap_policy=fsdp_auto_wrap_policy(model), use_orig_params=False, device_id=CPU), inputs)
    if dist.get_rank() == 0:
        print(json.dumps({"refusal": refusal, "storage": storage, "unsharded": unsharded, "sharded": sharded}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
