"""The QLoRA training loop, readable top to bottom: data, base, LoRA, steps, eval, save.

One process: `python -m train ...`. Several: `accelerate launch --config_file
configs/accelerate/ddp.yaml -m train ...` (GPUs) or `.../cpu-ddp.yaml` (CPU processes over gloo);
each process loads its own 4-bit copy of the base and runs its share of every optimizer step's
micro-batches, and DDP averages the gradients. The losses are those of one process running the
whole step (docs/training.md#several-processes).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedType
from peft import LoraConfig, PeftModel, get_peft_model
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, get_scheduler, set_seed

from adapters.base import LoadedBase, check_base_code, load_base, load_tokenizer, resolve_device, under_fsdp
from adapters.card import AdapterCard, BaseInfo, ChatInfo, DatasetInfo, LoraInfo, MetricInfo, StopRowsInfo, TrainingInfo
from adapters.chat import end_of_turn_token
from adapters.cpu import has_amx
from adapters.data import Example, read_examples
from adapters.store import AdapterStore
from train.allocator import keep_freed_memory
from train.checkpoint import Progress, latest_checkpoint, load_checkpoint, save_checkpoint
from train.compiled import compile_blocks
from train.config import LoraSettings, TrainConfig, config_to_dict
from train.data import (
    IGNORE_INDEX,
    LongExamples,
    Tokenized,
    collate,
    file_digest,
    length_grouped_batches,
    split_eval,
    tokenize,
)
from train.evaluate import eval_loss, exact_match, token_loss_sum
from train.fused_lora import base_products_dtype, fuse_lora_layers
from train.save import save_adapter
from train.stops import StopProbe, StopRowsPlan, plan_stop_rows, probe_sample, probe_stops, report_stop_rows, token_indices_for

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A setting that does not fit the base (unknown target module, too many layers)."""


class TrainingDiverged(ValueError):
    """The loss or the LoRA weights went inf or NaN: the run stops and publishes nothing.

    A ValueError, so that `python -m train` reports it as it reports a bad setting (exit 2):
    the cause is nearly always one (a learning rate or alpha too large for the data).
    """


@dataclass
class PreparedData:
    train_examples: list[Example]
    eval_examples: list[Example]
    train: list[Tokenized]
    eval: list[Tokenized]
    eval_source: str
    dropped: LongExamples
    """Training examples over max_length tokens."""
    long_lines: list[int]
    """Training-file lines over max_line_bytes, dropped unread."""


Report = Callable[[dict], None]
"""Receives the run's progress events, one dict each ("event": start, step, eval, saved), in the
main process only; `python -m train --progress-file` writes them as JSON lines (docs/training.md#progress-events)."""


def no_report(event: dict) -> None:
    """The default Report: progress goes to the log and the progress bar only."""


@dataclass
class TrainResult:
    adapter_dir: Path
    card: AdapterCard
    published: bool = True
    """This process wrote the adapter: the only process, or the main one of several (the others
    return once it is published)."""


def linear_module_names(base_path: str, trust_remote_code: bool = False) -> tuple[set[str], int]:
    """Leaf names of the base's linear layers and its block count, from the config alone (meta device)."""
    config = AutoConfig.from_pretrained(base_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    return names, getattr(config, "num_hidden_layers", 0)


def check_lora_fits_base(lora: LoraSettings, base_path: str, trust_remote_code: bool = False) -> None:
    names, n_layers = linear_module_names(base_path, trust_remote_code)
    if lora.target_modules != ["all-linear"]:
        unknown = [m for m in lora.target_modules if m not in names]
        if unknown:
            raise ConfigError(
                f"lora.target_modules: unknown target module(s) {unknown}; "
                f"the base's linear layers are {sorted(names)} (or use all-linear)"
            )
    if lora.last_layers is not None and lora.last_layers > n_layers:
        raise ConfigError(f"lora.last_layers={lora.last_layers}, but the base has {n_layers} blocks")


def prepare_data(config: TrainConfig, tokenizer) -> PreparedData:
    """Read, check, split and tokenize; every data error surfaces here, before the base loads."""
    data = config.data
    read = read_examples(data.path, data.max_line_bytes, data.on_long)
    _warn_long_lines(data.path, read.long_lines, data.max_line_bytes)
    examples = read.examples
    if data.eval_path:
        # Eval lines over the limit are dropped, as over-long eval examples are (below).
        evals = read_examples(data.eval_path, data.max_line_bytes, "drop")
        _warn_long_lines(data.eval_path, evals.long_lines, data.max_line_bytes)
        train_ex, eval_ex, source = examples, evals.examples, data.eval_path
    else:
        train_ex, eval_ex = split_eval(examples, data.eval_fraction, config.seed)
        source = f"held-out fraction {data.eval_fraction} of {data.path}"
    eval_ex = eval_ex[: data.max_eval_examples]
    train_tok, dropped = tokenize(train_ex, tokenizer, data.max_length, data.on_long, data.path)
    if dropped.count:
        log.warning("%s; dropped", dropped.describe(data.path, data.max_length))
    eval_tok, _ = tokenize(eval_ex, tokenizer, data.max_length, "drop", data.eval_path or data.path)
    kept_eval = {t.line for t in eval_tok}
    eval_ex = [e for e in eval_ex if e.line in kept_eval]
    return PreparedData(train_ex, eval_ex, train_tok, eval_tok, source, dropped, read.long_lines)


def _warn_long_lines(path: str, lines: list[int], limit: int) -> None:
    if lines:
        shown = ", ".join(map(str, lines[:5])) + (", ..." if len(lines) > 5 else "")
        log.warning("%s: %d line(s) longer than max_line_bytes=%d bytes (lines %s); dropped unread",
                    path, len(lines), limit, shown)


def keep_4bit_layers_differentiable(model) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel; undo it where done.

    On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit layer's weight the first time it runs
    in eval mode without gradients (an eval pass between epochs), and from then on computes the
    layer with a kernel that has no backward, even in training mode: gradients stop flowing
    through the base layers to the LoRA matrices below them (with a tiny model, layer 0's LoRA
    gradients came out a third smaller after one eval pass). Returns how many layers were unpacked.
    """
    from bitsandbytes.nn import Linear4bit

    unpacked = 0
    for module in model.modules():
        if not isinstance(module, Linear4bit):
            continue
        module.support_avx512bf16_for_cpu = False
        state = getattr(module.weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(module.weight.data, state)
            unpacked += 1
    return unpacked


def attach_lora(model, config: TrainConfig, n_layers: int, stop_token_ids: list[int] | tuple[int, ...] = ()):
    """Wrap the frozen base with trainable LoRA matrices; only A and B require grad, and the
    output rows (tied: the shared rows) of `stop_token_ids` (train/stops.py)."""
    keep_4bit_layers_differentiable(model)
    lora = config.lora
    if config.gradient_checkpointing:
        enable_checkpointing(model)
        model.enable_input_require_grads()  # checkpointed blocks need a grad-carrying input
    targets = "all-linear" if lora.target_modules == ["all-linear"] else lora.target_modules
    layers = list(range(n_layers - lora.last_layers, n_layers)) if lora.last_layers else None
    if layers and targets == "all-linear":
        # peft takes a layer subset only with named targets: name every linear layer inside the blocks.
        targets = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n})
    peft_config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        layers_to_transform=layers,
        layers_pattern="layers" if layers else None,
        trainable_token_indices=token_indices_for(model, list(stop_token_ids)) if stop_token_ids else None,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, peft_config)
    if use_fused_lora(config.fused_lora, model) and not under_fsdp():  # FSDP's flat parameters keep peft's forward
        bf16 = use_bf16_base_products(config.bf16_base_products, model, has_amx())
        fuse_lora_layers(model, torch.bfloat16 if bf16 else None)
    elif config.bf16_base_products:
        log.warning("--bf16-base-products applies to the fused layers only (--fused-lora); the base's products "
                    "stay in the compute dtype")
    if use_compile(config.compile, model):
        if under_fsdp():  # FSDP re-wraps the blocks after this; not tried together
            log.warning("--compile is not applied under FSDP: the blocks run eagerly")
        else:
            model.enable_input_require_grads()  # every block's input the same kind: block 0 needs no graph of its own
            log.info("compiled %d decoder blocks' training forward: the first steps wait for the compilation "
                     "(minutes for a large shape on a GPU); --no-compile skips it", compile_blocks(model))
    return model


def enable_checkpointing(model) -> None:
    """Recompute each block's activations in the backward pass (non-reentrant checkpoints).
    transformers 5.x renamed gradient checkpointing to activation checkpointing partway through
    the 5 series; the old name warns that it goes in v6."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def prepare_process(device: torch.device) -> None:
    """Process settings for training on `device`: on the CPU, freed activation memory is kept for
    the next step (train/allocator.py). After the base is loaded, whose large blocks are mapped
    as glibc would map them anyway."""
    if device.type == "cpu":
        keep_freed_memory()


def use_bf16_base_products(setting: bool | None, model, amx: bool) -> bool:
    """bf16 base products in the fused layers: asked for, or by default on a CPU with AMX (`amx`)
    when the base computes in float32.

    On AMX, oneDNN's bf16 products are several times faster than float32's, and a step of ours
    faster with them, at an eval loss within a fraction of a percent; without AMX (AVX512-BF16 only,
    or none) they were not measured faster. A base already in bf16 has nothing to gain. The
    figures: docs/performance.md#training-on-the-cpu.
    """
    if setting is not None:
        return setting
    embeddings = model.get_input_embeddings().weight
    return amx and embeddings.device.type == "cpu" and embeddings.dtype == torch.float32


def use_fused_lora(setting: bool | None, model) -> bool:
    """The fused layers where they were measured to help: asked for, or by default on the CPU.

    They speed up CPU training; on a GPU they showed no steady gain over peft's forward, so a GPU
    keeps peft's forward unless asked (and compiles it, `use_compile`). The figures:
    docs/performance.md#device-dependent-defaults.
    """
    if setting is not None:
        return setting
    return next(model.parameters()).device.type == "cpu"


def use_compile(setting: bool | None, model) -> bool:
    """Compiled decoder blocks where they were measured to help: asked for, or by default on a GPU.

    On a GPU the compiled blocks train faster at the same peak memory once compiled; the CPU's
    short runs spend about as long compiling as they save (docs/performance.md#device-dependent-defaults).
    """
    if setting is not None:
        return setting
    return next(model.parameters()).device.type == "cuda"


def check_optimizer_fits_device(optimizer: str, device: torch.device) -> None:
    if optimizer == "paged_adamw_8bit" and device.type != "cuda":
        raise ConfigError(f"optim.optimizer=paged_adamw_8bit pages its states through CUDA memory; the base is on {device}: use adamw")


def make_optimizer(model, config: TrainConfig, device: torch.device):
    """AdamW over the trainable (LoRA) parameters.

    The default is torch's fused AdamW (as the Trainer's default is), on a GPU and on the CPU: a
    few multi-tensor kernels step all the LoRA matrices together. QLoRA's paged 8-bit AdamW
    (`paged_adamw_8bit`) steps them one by one, a kernel per matrix, to save memory that LoRA's
    few parameters hardly need: their float32 states are a small fraction of the base's 4-bit
    weights (docs/performance.md#device-dependent-defaults).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optim = config.optim
    if optim.optimizer == "paged_adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=optim.lr, weight_decay=optim.weight_decay)
    fused = device.type in ("cuda", "cpu") and not under_fsdp()  # FSDP's sharded parameters keep the default loop
    return torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay, fused=fused or None)


def count_steps(n_batches: int, config: TrainConfig) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps)."""
    per_epoch = max(1, math.ceil(n_batches / config.optim.grad_accum))
    total = config.optim.max_steps or max(1, math.ceil(per_epoch * config.optim.epochs))
    return per_epoch, total


def config_digest(config: TrainConfig) -> str:
    """What must not change between a run and its resumption (the schedule and the data order)."""
    relevant = config_to_dict(config)
    for key in ("resume", "checkpoint_every", "log_every", "store_dir"):
        relevant.pop(key)
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def train(config: TrainConfig, store: AdapterStore | None = None, report: Report = no_report) -> TrainResult:
    """Train one adapter and publish it in the store. Nothing is written before data and settings check out.

    `report` gets the progress events (`Report`): once the steps are counted, after every optimizer
    step, after every eval, and once the adapter is published.

    TrainingDiverged when the loss (every step), the trained LoRA weights or the final eval loss
    are inf or NaN: the store is left untouched. Under a launcher's several processes only the
    main one publishes (`TrainResult.published`); every process returns once it has.
    """
    store = store or AdapterStore(config.store_dir)
    set_seed(config.seed)
    check_base_code(config.base)  # before anything reads the folder: its own code runs only if allowed
    check_lora_fits_base(config.lora, config.base.path, config.base.trust_remote_code)
    check_optimizer_fits_device(config.optim.optimizer, resolve_device(config.base.device))
    tokenizer, _ = load_tokenizer(config.base.path, config.base.trust_remote_code)
    data = prepare_data(config, tokenizer)

    accelerator = make_accelerator(resolve_device(config.base.device))
    base = load_base(config.base)
    prepare_process(base.device)
    n_layers = base.model.config.num_hidden_layers
    stops = plan_stops(config, base, data, accelerator)
    model = attach_lora(base.model, config, n_layers, stops.token_ids)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total_params = _count_params(model)
    if under_fsdp():
        use_peft_fsdp_wrapping(accelerator, model)
        model = accelerator.prepare(model)  # FSDP wraps first; the optimizer must see the sharded parameters
    optimizer = make_optimizer(model, config, base.device)

    lengths = [len(t.input_ids) for t in data.train]
    batches_per_epoch = len(length_grouped_batches(lengths, config.optim.micro_batch_size, 0))
    steps_per_epoch, total_steps = count_steps(math.ceil(batches_per_epoch / accelerator.num_processes), config)
    scheduler = get_scheduler(
        config.optim.schedule,
        optimizer,
        num_warmup_steps=int(config.optim.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    model, optimizer = (model, accelerator.prepare(optimizer)) if under_fsdp() else accelerator.prepare(model, optimizer)
    if accelerator.num_processes > 1:
        # The LoRA init above is the same everywhere (and DDP copies rank 0's anyway); from here on each
        # process draws its own dropout masks, not the same stream as every other process.
        set_seed(config.seed + accelerator.process_index)

    run_dir = Path(config.runs_dir) / config.name / "checkpoints"
    progress = Progress(config_digest=config_digest(config))
    if config.resume:
        progress = _resume(run_dir, accelerator.unwrap_model(model), optimizer, scheduler, progress.config_digest)

    pad_id = tokenizer.pad_token_id
    device = accelerator.device
    started = time.perf_counter() - progress.elapsed_s
    bar = tqdm(total=total_steps, initial=progress.step, desc=config.name, disable=not accelerator.is_main_process)
    report = report if accelerator.is_main_process else no_report
    report({"event": "start", "step": progress.step, "total_steps": total_steps, "steps_per_epoch": steps_per_epoch,
            "train_examples": len(data.train), "eval_examples": len(data.eval_examples)})
    model.train()
    while progress.step < total_steps:
        steps = epoch_windows(lengths, config, progress.epoch, accelerator)
        for window in steps[progress.step_in_epoch :]:
            micro = [collate([data.train[i] for i in batch], pad_id) for batch in window]
            loss_value = train_step(model, micro, optimizer, scheduler, accelerator, config, progress)
            elapsed = time.perf_counter() - started
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}", tok_s=f"{progress.tokens / max(elapsed - progress.eval_s, 1e-9):.0f}")
            if progress.step % config.log_every == 0 or progress.step == 1:
                progress.history.append({"step": progress.step, "train_loss": round(loss_value, 5)})
            report({"event": "step", "step": progress.step, "total_steps": total_steps, "loss": loss_value,
                    "epoch": progress.step / steps_per_epoch, "lr": scheduler.get_last_lr()[0], "elapsed_s": elapsed})
            if progress.step >= total_steps:
                break
            if config.checkpoint_every and progress.step % config.checkpoint_every == 0 and accelerator.is_main_process:
                progress.elapsed_s = elapsed
                save_checkpoint(run_dir, accelerator.unwrap_model(model), optimizer, scheduler, progress)
        else:
            # The epoch ran out before the step budget: score it, then start the next one.
            eval_started = time.perf_counter()
            _end_of_epoch(model, tokenizer, data, progress, device, accelerator, base.stop_token_ids)
            progress.eval_s += time.perf_counter() - eval_started
            report({"event": "eval", "total_steps": total_steps, **progress.history[-1]})
            progress.epoch += 1
            progress.step_in_epoch = 0
            continue
        break
    bar.close()
    progress.elapsed_s = time.perf_counter() - started
    check_finite_weights(model, progress.step)
    final_eval = eval_loss(model, data.eval, pad_id, config.optim.micro_batch_size, device)
    if not math.isfinite(final_eval):
        raise TrainingDiverged(f"the eval loss after step {progress.step} is {final_eval}; nothing was published")
    progress.history.append({"step": progress.step, "eval_loss": round(final_eval, 5)})
    report({"event": "eval", "total_steps": total_steps, "epoch": progress.step / steps_per_epoch, **progress.history[-1]})

    unwrapped: PeftModel = accelerator.unwrap_model(model)
    metric = _score(unwrapped, tokenizer, data.eval_examples, device, base.stop_token_ids)
    after = probe_stops(unwrapped, probe_sample(data.train, config.stop.probe_examples, config.seed), base.stop_token_ids,
                        pad_id, device)
    card = _build_card(config, base, data, progress, steps_per_epoch, trainable, total_params, final_eval, metric,
                       stop_rows_info(stops, after, config), accelerator.num_processes)
    if accelerator.is_main_process:
        if config.checkpoint_every:
            save_checkpoint(run_dir, unwrapped, optimizer, scheduler, progress)
        path = save_adapter(store, unwrapped, tokenizer, card, data.eval_examples)  # golden prompts and examples from them
        log.info("saved adapter %s: exact match base %.3f -> adapter %.3f", path, metric.base, metric.adapter)
        report({"event": "saved", "step": progress.step, "total_steps": total_steps, "adapter_dir": str(path),
                "exact_match": {"base": metric.base, "adapter": metric.adapter}})
    # No process returns (and so no launcher sees the job end) before the adapter is published.
    accelerator.wait_for_everyone()
    return TrainResult(store.path(config.name), card, accelerator.is_main_process)


def make_accelerator(device: torch.device) -> Accelerator:
    """This process's Accelerator: the only process, or one of several started by a launcher.

    `cpu` follows the base's device: processes launched for a CPU base then join over gloo
    (MULTI_CPU) whichever launcher started them; without it, on a machine with no GPU each would
    train alone on all the data and each would publish the adapter. ConfigError for an FSDP
    launch that cannot get FSDP, before accelerate is set up.
    """
    if under_fsdp() and device.type == "cpu":
        raise ConfigError(
            "an FSDP config was launched for a CPU base: accelerate turns FSDP on only for GPU-class devices "
            "(CPU processes get DDP; docs/training.md#fsdp-on-the-cpu). On the CPU use configs/accelerate/cpu-ddp.yaml")
    accelerator = Accelerator(cpu=device.type == "cpu")
    if under_fsdp() and accelerator.distributed_type != DistributedType.FSDP:
        # Else the FSDP code paths here and in adapters/base.py would run without FSDP.
        raise ConfigError(f"ACCELERATE_USE_FSDP=true but accelerate set up {accelerator.distributed_type.value}, not FSDP: "
                          "launch with `accelerate launch --config_file configs/accelerate/fsdp-qlora.yaml -m train ...`")
    return accelerator


def use_peft_fsdp_wrapping(accelerator: Accelerator, model) -> None:
    """Give every LoRA matrix its own FSDP unit, as peft's policy does (the HF Trainer sets it too).

    FSDP1 flattens each unit's parameters into one tensor, which must be all trainable or all
    frozen unless use_orig_params: a decoder block holding both its frozen 4-bit weights and its
    LoRA matrices is refused ("Must flatten tensors with uniform `requires_grad`"), as
    fsdp-qlora.yaml's TRANSFORMER_BASED_WRAP alone would make it.
    """
    plugin = accelerator.state.fsdp_plugin
    if plugin.fsdp_version == 1 and not plugin.use_orig_params:
        from peft.utils.other import fsdp_auto_wrap_policy

        plugin.auto_wrap_policy = fsdp_auto_wrap_policy(model)


def plan_stops(config: TrainConfig, base: LoadedBase, data: PreparedData, accelerator: Accelerator) -> StopRowsPlan:
    """Probe the base where the training replies end and decide which stop tokens' rows to
    train (train/stops.py); said before training starts."""
    sample = probe_sample(data.train, config.stop.probe_examples, config.seed)
    probe = probe_stops(base.model, sample, base.stop_token_ids, base.tokenizer.pad_token_id, base.device)
    plan = plan_stop_rows(config.stop, probe)
    if accelerator.is_main_process:
        report_stop_rows(plan, config.stop, base.tokenizer)
    return plan


def stop_rows_info(plan: StopRowsPlan, after: StopProbe, config: TrainConfig) -> StopRowsInfo:
    """The card's record of the stop tokens: the base's probabilities, the adapter's, what was trained."""
    return StopRowsInfo(
        base_probability={str(t): p for t, p in plan.probe.probability.items()},
        threshold=config.stop.min_stop_probability,
        setting=plan.setting,
        trained_token_ids=plan.token_ids,
        adapter_probability={str(t): p for t, p in after.probability.items()},
        probed_examples=plan.probe.examples,
    )


def epoch_windows(lengths: list[int], config: TrainConfig, epoch: int, accelerator: Accelerator) -> list[list[list[int]]]:
    """One epoch's optimizer steps, each a list of micro-batches of example indices: grad_accum
    micro-batches for each process (fewer in the last step); every process gets the same list
    and runs its share of each step (`local_share`).

    Examples of similar length share a micro-batch, so little of each forward pass is padding.
    The order depends only on (seed, epoch): a resumed run sees the same order, and P processes
    with accumulation A see the same steps as one process with accumulation P x A.
    """
    order = length_grouped_batches(lengths, config.optim.micro_batch_size, config.seed + epoch)
    per_step = config.optim.grad_accum * accelerator.num_processes
    return [order[i : i + per_step] for i in range(0, len(order), per_step)]


def local_share(micro: list[dict], accelerator: Accelerator) -> tuple[list[dict], int]:
    """This process's micro-batches of a step, and the weight (1 or 0) of their loss.

    Process r takes micro[r::P]. One left without any (a last step with fewer micro-batches than
    processes) runs the step's first with weight 0: its backward still meets the others' gradient
    all-reduce, which would otherwise wait for it, and adds nothing to it.
    """
    share = micro[accelerator.process_index :: accelerator.num_processes]
    return (share, 1) if share else (micro[:1], 0)


def run_steps(model, items: list[Tokenized], pad_id: int, optimizer, scheduler, accelerator: Accelerator,
              config: TrainConfig, progress: Progress, total: int, on_batch=None) -> None:
    """Optimizer steps over length-grouped epochs until `total`, without evals or checkpoints:
    the plain loop that the benchmarks and full fine-tuning share. on_batch(micro) sees each step's batches."""
    lengths = [len(t.input_ids) for t in items]
    while progress.step < total:
        for window in epoch_windows(lengths, config, progress.epoch, accelerator):
            micro = [collate([items[i] for i in batch], pad_id) for batch in window]
            if on_batch is not None:
                on_batch(micro)
            train_step(model, micro, optimizer, scheduler, accelerator, config, progress)
            if progress.step >= total:
                return
        progress.epoch += 1


def train_step(model, micro: list[dict], optimizer, scheduler, accelerator: Accelerator, config: TrainConfig, progress: Progress) -> float:
    """One optimizer step over its micro-batches; returns the step's loss per target token.

    TrainingDiverged when that loss is inf or NaN (the loss is read every step anyway).
    """
    loss = accumulate_gradients(model, micro, accelerator, progress)
    if accelerator.num_processes > 1:
        # The whole step's loss in every process: the curve is one process's, and a divergence
        # stops every process at the same step.
        loss = accelerator.reduce(loss, reduction="sum")
    if config.optim.max_grad_norm > 0:
        accelerator.clip_grad_norm_(model.parameters(), config.optim.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    # Read only now: on a GPU, reading the loss waits for the backward, and the optimizer's
    # launches are then queued behind it instead of after the wait.
    loss_value = float(loss)
    progress.step += 1
    progress.step_in_epoch += 1
    if not math.isfinite(loss_value):
        # The step has already applied inf/NaN gradients: nothing after it is worth saving.
        raise TrainingDiverged(f"training diverged at step {progress.step}: loss {loss_value}; the run stops "
                               "before saving anything (lower --lr, or check --alpha and the data)")
    progress.last_loss = loss_value
    return loss_value


def check_finite_weights(model, step: int) -> None:
    """TrainingDiverged naming the first trainable (LoRA) parameter that holds inf or NaN.

    One device sync for all of them: the per-parameter flags are stacked and read once.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and p.numel()]
    if not named:
        return
    finite = torch.stack([torch.isfinite(p.detach()).all() for _, p in named]).cpu()
    if not bool(finite.all()):
        name = named[int((~finite).nonzero()[0])][0]
        raise TrainingDiverged(f"after step {step} the trainable parameter {name} holds inf or NaN; nothing was published")


def accumulate_gradients(model, micro: list[dict], accelerator: Accelerator, progress: Progress) -> torch.Tensor:
    """Backward over this process's share of one optimizer step's micro-batches (all still on the
    CPU); returns the share's summed loss over the step's target-token count, on the device,
    unread (summed over processes, the step's loss per target token).

    Each micro-batch's summed loss is divided by the whole step's target-token count, over every
    process's micro-batches, and multiplied by the process count, which DDP's gradient average
    divides again: the gradient is the same as one big batch's in one process. DDP syncs only on
    the share's last micro-batch.
    """
    window_tokens = sum(int((m["labels"][:, 1:] != IGNORE_INDEX).sum()) for m in micro)
    share, weight = local_share(micro, accelerator)
    total = torch.zeros((), device=accelerator.device)
    for j, batch in enumerate(share):
        last = j == len(share) - 1
        with nullcontext() if last else accelerator.no_sync(model):
            loss_sum, _ = token_loss_sum(model, batch, accelerator.device)
            accelerator.backward(loss_sum * (weight * accelerator.num_processes) / window_tokens)
        total += loss_sum.detach() * weight
    progress.tokens += sum(int(m["attention_mask"].sum()) for m in micro)  # every process's: the job's throughput
    return total / window_tokens


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this run: allocated GPU memory on CUDA, the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _resume(run_dir: Path, model, optimizer, scheduler, digest: str) -> Progress:
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise FileNotFoundError(f"--resume: no checkpoint under {run_dir}")
    progress = load_checkpoint(checkpoint, model, optimizer, scheduler)
    if progress.config_digest != digest:
        raise ConfigError(f"--resume: {checkpoint} was written with different settings; start a new run or use the same ones")
    log.info("resumed from %s at step %d", checkpoint, progress.step)
    return progress


def _end_of_epoch(model, tokenizer, data: PreparedData, progress: Progress, device, accelerator, stop_ids) -> None:
    """Eval loss and the task metric (with the adapter) at the end of an epoch, into the history."""
    loss = eval_loss(model, data.eval, tokenizer.pad_token_id, 32, device)
    score = exact_match(accelerator.unwrap_model(model), tokenizer, data.eval_examples, device, stop_ids=stop_ids).score
    progress.history.append({"step": progress.step, "eval_loss": round(loss, 5), "exact_match": score, "epoch": progress.epoch + 1})
    if accelerator.is_main_process:
        tqdm.write(f"epoch {progress.epoch + 1}: eval loss {loss:.4f}, exact match {score:.3f}")


def _score(model: PeftModel, tokenizer, examples: list[Example], device, stop_ids) -> MetricInfo:
    """The task metric with the adapter and with the base alone, on the same eval examples, and
    how often the replies of each stopped on a stop token."""
    with_adapter = exact_match(model, tokenizer, examples, device, stop_ids=stop_ids)
    with model.disable_adapter():  # the trained token rows too (peft disables its TrainableTokensWrapper)
        base_alone = exact_match(model, tokenizer, examples, device, stop_ids=stop_ids)
    return MetricInfo("exact_match", base=base_alone.score, adapter=with_adapter.score, eval_examples=len(examples),
                      stop_rate=with_adapter.stop_rate, base_stop_rate=base_alone.stop_rate)


def _count_params(model) -> int:
    """Parameters as the model holds them unpacked: a 4-bit matrix counts its full shape, not its bytes."""
    total = 0
    for p in model.parameters():
        shape = getattr(p, "quant_state", None)
        total += int(torch.Size(shape.shape).numel()) if shape is not None else p.numel()
    return total


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _versions() -> dict[str, str]:
    import bitsandbytes
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__}


def _build_card(config, base: LoadedBase, data: PreparedData, progress: Progress, steps_per_epoch: int, trainable: int, total: int, final_eval: float, metric: MetricInfo,
                stop_rows: StopRowsInfo | None = None, processes: int = 1) -> AdapterCard:
    digest, size = file_digest(config.data.path)
    arch = (base.model.config.architectures or [type(base.model).__name__])[0]
    return AdapterCard(
        name=config.name,
        task=config.data.task,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        base=BaseInfo(config.base.path, base.fingerprint, arch, base.quantization),
        lora=LoraInfo(config.lora.r, config.lora.alpha, config.lora.dropout, config.lora.target_modules, config.lora.last_layers, trainable, total),
        dataset=DatasetInfo(config.data.path, digest, size, len(data.train), len(data.eval_examples), data.eval_source,
                            data.dropped.count + len(data.long_lines)),
        training=TrainingInfo(
            epochs=round(progress.step / steps_per_epoch, 3),
            steps=progress.step,
            learning_rate=config.optim.lr,
            batch_size=config.optim.micro_batch_size * config.optim.grad_accum * processes,
            max_length=config.data.max_length,
            seed=config.seed,
            duration_s=round(progress.elapsed_s, 2),
            tokens_per_s=round(progress.tokens / max(progress.elapsed_s - progress.eval_s, 1e-9), 1),
            peak_memory_mb=round(peak_memory_mb(base.device), 1),
            train_loss=round(progress.last_loss, 5),
            eval_loss=round(final_eval, 5),
            history=progress.history,
            base_products=_dtype_name(base_products_dtype(base.model)),
        ),
        metric=metric,
        versions=_versions(),
        chat=ChatInfo(sorted(base.stop_token_ids), end_of_turn_token(base.tokenizer)),
        stop_rows=stop_rows,
    )
