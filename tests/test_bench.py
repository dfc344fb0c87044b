"""The benchmark scripts' CPU paths run, so they cannot rot between GPU sessions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from serve.routing import SHRINKS

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_gpu_tiny_runs_every_stage_on_the_cpu(tmp_path):
    out = tmp_path / "tiny.json"
    # TRITON_INTERPRET: Triton reads it when it is first imported; with it the bench-only Triton
    # LoRA kernel runs under Triton's interpreter on CPU tensors, so its experiment runs here too.
    env = {**os.environ, "TRITON_INTERPRET": "1"} if not torch.cuda.is_available() else None
    done = subprocess.run([sys.executable, "-m", "bench.gpu", "--sizes", "tiny", "--out", str(out), "--workdir", str(tmp_path),
                           "--profile", "--skip", "none"],  # every experiment, so none can rot
                          # the timeout only stops a hang: a loaded 2-core machine took over 240 s
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    result = report["shapes"]["tiny"]
    # Every stage and experiment ran: a failure inside one is recorded as an "error" key, not raised.
    assert not list(_errors(result)), list(_errors(result))
    memory, training, serving = result["memory"], result["training"], result["serving"]
    # The 4-bit base holds what the analytic NF4 + double-quant size says, within 2%.
    assert abs(memory["base_parameter_bytes"] / memory["base_analytic_bytes"] - 1) < 0.02
    # Nothing of the shape's base, adapters or engine is still reachable once it is done.
    assert result["left_on_device"]["reachable_bytes"] < 0.05 * memory["base_parameter_bytes"]
    # The training comparison is fair: every side trained the same steps on the same tokens ...
    sides = ("ours_fused", "trainer", "ours_peft_forward", "ours_compiled")
    assert {(training[s]["steps"], training[s]["real_tokens"]) for s in sides} == {(3, 3 * 64)}
    # ... and reached the same eval loss (the fused layers and the compiled blocks reorder float sums only).
    fused, trainer = training["ours_fused"], training["trainer"]
    assert training["ours"] == "ours_fused"  # the CPU's default, whose ratio is printed
    assert abs(fused["eval_loss"] - trainer["eval_loss"]) < 0.01 * trainer["eval_loss"]
    for side in ("ours_peft_forward", "ours_compiled"):
        assert abs(training[side]["eval_loss"] - fused["eval_loss"]) < 1e-4 * trainer["eval_loss"], side
    assert training["tokens_per_s_ratio"] == round(fused["tokens_per_s"] / trainer["tokens_per_s"], 3)
    # The warm figures are what they say: every adapter was resident before they were timed.
    assert serving["warm_runs_loads_from_disk"] == 0
    # The engine on the static cache captured nothing on the CPU (no graphs), and failed nothing.
    engine_static = serving["static_engine"]
    assert engine_static["graph_captures"] == 0 and engine_static["graph_error"] is None
    # The bench-only Triton kernel (interpreted here) took the decode steps and declined the
    # prefills, which have more rows: the comparison timed the kernel, not the fallback.
    answers = serving["lora_kernel"]["kernel_answers"]
    assert answers["taken"] > 0 and answers["declined"] > 0
    # auto's shrink outside CUDA graphs is mm, and every shrink was timed on the adapter's steps.
    steps = engine_static["decode_steps"]
    assert (steps["step_mode"], steps["step_shrink"]) == ("eager", "mm")
    assert sorted(steps["step_batch1_adapter_by_shrink"]) == sorted(SHRINKS)
    # The share of the bandwidth bound at batch 1 is each base rate times the bytes a token reads
    # over the copy bandwidth the run measured.
    bandwidth = report["copy_bandwidth_gb_s"] * 1e9
    rates = {"hf_generate": serving["decode_base_tokens_per_s"],
             "server_static_slots": engine_static["engine_static_batch1_base_tokens_per_s"],
             "decode_step": steps["step_batch1_base_tokens_per_s"]}
    shares = serving["bandwidth_bound_share_batch1_base"]
    assert sorted(shares) == sorted(rates)
    for path, rate in rates.items():
        assert abs(shares[path] - rate * serving["weight_bytes_per_token"] / bandwidth) < 0.0015 + 0.01 * shares[path], path
    # The stages' times add up within the shape's (the GPU run has an 8-minute bound to keep).
    assert result["shape_s"] >= result["training_s"] + result["serving_s"] > 0
    assert "tiny" in done.stdout and "the issue's bound" in done.stdout  # the table, then the times
    # --profile: each window's operator table is in the text file.
    windows = ["training", "decode base, batch 1", "decode one adapter, batch 1", "decode base, batch 16",
               "decode 16 adapters, batch 16"]
    assert sorted(result["profile"]) == sorted(windows)
    tables = (tmp_path / "tiny-profile.txt").read_text()
    assert all(f"== tiny / {w}:" in tables for w in windows) and "aten::mm" in tables


def _errors(tree, path: str = ""):
    """The paths of every "error" key with a value, anywhere in a bench report."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            if key in ("error", "graph_error") and value is not None:
                yield f"{path}.{key}: {str(value)[:200]}"
            else:
                yield from _errors(value, f"{path}.{key}")
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from _errors(value, f"{path}[{i}]")


def test_the_trainers_8bit_optimizer_registry_is_cleared_after_its_run():
    """The Trainer registers embeddings with bitsandbytes' process-wide manager for an 8-bit
    optimizer; left there, an 8B shape's 1.05 GB embedding outlived its base (H100, bench-gpu)."""
    import gc
    import weakref

    from bitsandbytes.optim import GlobalOptimManager

    from bench.training import forget_8bit_overrides

    embedding = torch.nn.Embedding(4, 2)
    GlobalOptimManager.get_instance().register_module_override(embedding, "weight", {"optim_bits": 32})
    weight = weakref.ref(embedding.weight)
    del embedding
    gc.collect()
    assert weight() is not None  # what the Trainer leaves behind
    forget_8bit_overrides()
    gc.collect()
    assert weight() is None


@pytest.mark.slow
def test_lora_products_bench_times_every_variant_and_each_computes_the_product(tmp_path):
    """bench/lora_products.py's CPU path (eager, small shapes, the compiled variants included)."""
    out = tmp_path / "products.json"
    done = subprocess.run([sys.executable, "-m", "bench.lora_products", "--out", str(out), "--compiled"],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    cases = {case["kind"]: case for case in json.loads(out.read_text())["cases"]}
    expected = {"shrink": {"mm_At", "mm_A_x", "mv", "mul_sum", "reduce"},
                "expand": {"addmm_", "addmv_", "mul_sum_add_compiled"}}
    assert {kind: set(case["variants"]) for kind, case in cases.items()} == expected
    for kind, case in cases.items():
        for name, figures in case["variants"].items():
            assert figures["us_per_call"] > 0 and figures["max_rel_error"] < 1e-4, (kind, name)
        current = {"shrink": "mm_At", "expand": "addmm_"}[kind]
        assert case["variants"][current]["vs_current"] == 1.0


# --- make bench-train: ours against every training baseline -------------------------------------

WORDS = "red green blue cold warm water stone river light dark".split()


def _varied_chats(n: int) -> list[dict]:
    """Echo tasks of 1 to 10 words: lengths vary, so how batches are formed changes the padding."""
    from conftest import chat

    return [chat("Echo: " + " ".join(WORDS[: 1 + i % 10]), " ".join(WORDS[: 1 + i % 10])) for i in range(n)]


@pytest.mark.slow
def test_bench_train_quick_runs_ours_and_every_baseline_on_the_same_examples(tiny_base, tmp_path):
    from conftest import write_jsonl

    from bench.training import BASELINES

    data = write_jsonl(tmp_path / "train.jsonl", _varied_chats(32))
    evals = write_jsonl(tmp_path / "eval.jsonl", _varied_chats(16))
    out = tmp_path / "train.json"
    done = subprocess.run([sys.executable, "-m", "bench.train", "--quick", "--base", str(tiny_base), "--data", str(data),
                           "--eval-data", str(evals), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    sides = report["sides"]
    assert sorted(sides) == sorted(["ours", *BASELINES])
    # One epoch of two micro-batches: every side took the same two steps over all 32 examples
    # (TRL's tokens and loss masks were checked to be ours before it trained) ...
    assert {side: run["steps"] for side, run in sides.items()} == dict.fromkeys(sides, 2)
    unpacked = [side for side in sides if side != "trl_packed"]
    assert len({sides[side]["real_tokens"] for side in unpacked}) == 1
    # ... packed rows of about a micro-batch's tokens each: two steps hold at most all of them.
    assert 0 < sides["trl_packed"]["real_tokens"] <= sides["ours"]["real_tokens"]
    # Padding: none padding-free. Ours splits the epoch's sorted lengths into batches, which no
    # other split of the same examples undercuts. (The Trainer's grouped sampler sorts within
    # "megabatches" of up to 50 batches, but of one batch under 4 batches' examples, as here.)
    for side in ("trl_padding_free", "trl_packed"):
        assert sides[side]["padded_tokens"] == sides[side]["real_tokens"], side
    assert all(sides["ours"]["padded_tokens"] <= sides[side]["padded_tokens"] for side in ("trainer", "trainer_grouped"))
    assert sides["ours"]["padded_tokens"] < sides["trainer"]["padded_tokens"]
    # The ratios are against the fastest baseline, by median tokens/s.
    fastest = max(BASELINES, key=lambda side: sides[side]["tokens_per_s"])
    assert report["fastest_baseline"] == fastest
    assert report["tokens_per_s_ratio"] == round(sides["ours"]["tokens_per_s"] / sides[fastest]["tokens_per_s"], 2)
    gap = abs(sides["ours"]["eval_loss"] - sides[fastest]["eval_loss"]) / sides[fastest]["eval_loss"]
    assert report["eval_loss_gap"] == round(gap, 4) and report["same_eval_loss_within_1pct"] == (gap <= 0.01)
    assert "fastest baseline: " + fastest in done.stdout


def test_trl_padding_free_batch_keeps_examples_apart_on_sdpa_only_without_a_cache(tiny_base):
    """What the trl_padding_free baseline relies on: with no attention mask and no KV cache,
    transformers reads the packed examples from the position ids and builds a block-diagonal
    mask for SDPA, so the flattened row scores each example as alone. With a cache (the default
    use_cache=True of a plain forward) that detection is off and the examples attend to each other."""
    import torch.nn.functional as F
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from adapters.base import BaseConfig, load_base
    from adapters.data import Example
    from adapters.chat import Message
    from train.data import tokenize_example

    base = load_base(BaseConfig(str(tiny_base)))
    rows = _varied_chats(6)
    items = [tokenize_example(base.tokenizer, Example(tuple(Message(**m) for m in r["messages"]), i + 1))
             for i, r in enumerate(rows)]

    def loss_sum(logits, labels):  # [1, seq, vocab], [1, seq]
        return float(F.cross_entropy(logits[0, :-1].float(), labels[0, 1:], ignore_index=-100, reduction="sum"))

    flat = DataCollatorForLanguageModeling(pad_token_id=base.tokenizer.pad_token_id, padding_free=True)(
        [{"input_ids": t.input_ids, "labels": t.labels} for t in items])
    inputs = {k: v for k, v in flat.items() if k != "labels"}
    with torch.no_grad():
        alone = sum(loss_sum(base.model(input_ids=torch.tensor([t.input_ids]), use_cache=False).logits,
                             torch.tensor([t.labels])) for t in items)
        packed = loss_sum(base.model(**inputs, use_cache=False).logits, flat["labels"])
        cached = loss_sum(base.model(**inputs, use_cache=True).logits, flat["labels"])
    # The same float32 products over other shapes: they differ by reordered sums only, a few
    # units of float32's 1.2e-7 per product, far under 1e-5 of the total.
    assert abs(packed - alone) <= 1e-5 * alone
    # The silent failure, kept visible: a hundred times past that reordering bound.
    assert abs(cached - alone) > 1e-3 * alone


def test_trl_tokens_that_are_not_ours_are_refused():
    from bench.training import check_same_tokens
    from train.data import Tokenized

    ours = [Tokenized([2, 5, 7, 3], [-100, -100, 7, 3], 1), Tokenized([2, 6, 3], [-100, 6, 3], 2)]
    same = [{"input_ids": t.input_ids, "labels": t.labels} for t in ours]
    check_same_tokens(same, ours, packed=False)
    check_same_tokens([{"input_ids": [2, 6, 3, 2, 5, 7, 3], "labels": [-100, 6, 3, -100, -100, 7, 3], "seq_lengths": [3, 4]}],
                      ours, packed=True)
    with pytest.raises(ValueError, match="line 2"):
        check_same_tokens([same[0], {"input_ids": [2, 6, 3], "labels": [-100, -100, 3]}], ours, packed=False)
    with pytest.raises(ValueError, match="packed rows"):
        check_same_tokens([{"input_ids": [2, 6, 3, 2, 5, 7, 3], "labels": [-100, 6, 3, -100, 5, 7, 3], "seq_lengths": [3, 4]}],
                          ours, packed=True)
