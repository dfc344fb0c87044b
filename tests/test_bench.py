"""The benchmark scripts' CPU paths run, so they cannot rot between GPU sessions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_gpu_tiny_runs_every_stage_on_the_cpu(tmp_path):
    out = tmp_path / "tiny.json"
    # TRITON_INTERPRET: Triton reads it when it is first imported; with it the bench-only Triton
    # LoRA kernel runs under Triton's interpreter on CPU tensors, so its experiment runs here too.
    env = {**os.environ, "TRITON_INTERPRET": "1"} if not torch.cuda.is_available() else None
    done = subprocess.run([sys.executable, "-m", "bench.gpu", "--sizes", "tiny", "--out", str(out), "--workdir", str(tmp_path),
                           "--profile", "--skip", "none"],  # every experiment, so none can rot
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())["shapes"]["tiny"]
    assert "error" not in result and "error" not in result["training"] and "error" not in result["serving"]
    memory, training, serving = result["memory"], result["training"], result["serving"]
    # The 4-bit base holds what the analytic NF4 + double-quant size says, within 2%.
    assert abs(memory["base_parameter_bytes"] / memory["base_analytic_bytes"] - 1) < 0.02
    # Nothing of the shape's base, adapters or engine is still reachable once it is done.
    assert result["left_on_device"]["reachable_bytes"] < 0.05 * memory["base_parameter_bytes"]
    for side in ("ours_fused", "trainer", "ours_peft_forward"):
        assert training[side]["steps"] == 3 and training[side]["real_tokens"] == 3 * 64
    # On the CPU our default is the fused layers, and the ratios are of that run.
    assert training["ours"] == "ours_fused"
    fused, plain, trainer = training["ours_fused"], training["ours_peft_forward"], training["trainer"]
    assert training["tokens_per_s_ratio"] == round(fused["tokens_per_s"] / trainer["tokens_per_s"], 3)
    # Same data, settings and steps: both loops end at the same eval loss.
    assert abs(fused["eval_loss"] - trainer["eval_loss"]) < 0.01 * trainer["eval_loss"]
    assert abs(fused["eval_loss"] - plain["eval_loss"]) < 1e-4 * trainer["eval_loss"]
    # The compiled blocks train the same steps to the same loss (inductor reorders float sums only).
    compiled = training["ours_compiled"]
    assert "error" not in compiled and compiled["steps"] == 3 and compiled["compile_warmup_s"] > 0
    assert abs(compiled["eval_loss"] - fused["eval_loss"]) < 1e-4 * trainer["eval_loss"]
    assert training["compiled_tokens_per_s_ratio"] == round(compiled["tokens_per_s"] / trainer["tokens_per_s"], 3)
    # The static-cache decode experiment ran (eagerly: the CPU has no graphs to capture).
    static = serving["static_cache_decode"]
    assert "error" not in static and static["eager_adapters16_batch16_tokens_per_s"] > 0
    # Batch-1 decode on one adapter with q/k/v and gate/up sharing their products, and without.
    shared = serving["shared_inputs"]
    assert "error" not in shared
    for case in ("adapter_batch1", "adapters16_batch16"):
        assert shared[f"eager_{case}_shared_inputs_tokens_per_s"] > 0 and shared[f"eager_{case}_per_layer_tokens_per_s"] > 0
    # The Triton LoRA kernel (bench/lora_triton.py, interpreted here) took the decode steps and
    # declined the prefills, which have more rows.
    kernel = serving["lora_kernel"]
    assert "error" not in kernel and kernel["kernel_answers"]["taken"] > 0 and kernel["kernel_answers"]["declined"] > 0
    for case in ("adapter_batch1", "adapters4_batch4"):
        assert kernel[f"eager_{case}_triton_tokens_per_s"] > 0 and kernel[f"eager_{case}_torch_tokens_per_s"] > 0
    assert len(kernel["sweep"]) == 5 and all(run["adapter_batch1_tokens_per_s"] > 0 for run in kernel["sweep"])
    # The engine on the static decode cache served every mix (eagerly: nothing captured on the CPU).
    engine_static = serving["static_engine"]
    assert "error" not in engine_static and engine_static["graph_captures"] == 0 and engine_static["graph_error"] is None
    assert all(engine_static[f"engine_static_{k}_adapters_tokens_per_s"] > 0 for k in (1, 4, 16))
    assert engine_static["triton"]["engine_static_batch1_adapter_tokens_per_s"] > 0
    for key in ("decode_base_tokens_per_s", "decode_adapter_tokens_per_s", "engine_base_only_tokens_per_s",
                "engine_1_adapters_tokens_per_s", "engine_16_adapters_tokens_per_s", "engine_16_adapters_cold_tokens_per_s",
                "set_adapter_16_adapters_tokens_per_s"):
        assert serving[key] > 0, key
    # The warm figures are what they say: every adapter was resident before they were timed.
    assert serving["warm_runs_loads_from_disk"] == 0
    for k in (1, 4, 16):
        ratio = serving[f"engine_{k}_adapters_tokens_per_s"] / serving["set_adapter_16_adapters_tokens_per_s"]
        assert serving[f"serve_{k}_adapters_vs_set_adapter"] == round(ratio, 2)
    # The batch-1 target per decode step: the base's and one adapter's steps, eager on the CPU.
    steps = engine_static["decode_steps"]
    assert (steps["step_mode"], steps["step_shrink"]) == ("eager", "mm")  # auto's choice outside CUDA graphs
    step_ratio = steps["step_batch1_adapter_tokens_per_s"] / steps["step_batch1_base_tokens_per_s"]
    assert abs(steps["step_batch1_adapter_vs_base"] - step_ratio) < 0.01
    # ... and the adapter's steps with each way of computing a row's x·Aᵀ (serve.routing.SHRINKS).
    by_shrink = steps["step_batch1_adapter_by_shrink"]
    assert sorted(by_shrink) == ["mm", "reduce"] and all(run["tokens_per_s"] > 0 for run in by_shrink.values())
    # The share of the bandwidth bound at batch 1, from each base rate measured, against the copy
    # bandwidth the run measured.
    bandwidth = json.loads(out.read_text())["copy_bandwidth_gb_s"] * 1e9
    shares = serving["bandwidth_bound_share_batch1_base"]
    rates = {"hf_generate": serving["decode_base_tokens_per_s"],
             "server_static_slots": engine_static["engine_static_batch1_base_tokens_per_s"],
             "decode_step": steps["step_batch1_base_tokens_per_s"]}
    assert sorted(shares) == sorted(rates)
    for path, rate in rates.items():
        assert abs(shares[path] - rate * serving["weight_bytes_per_token"] / bandwidth) < 0.0015 + 0.01 * shares[path], path
    # Where the time went, per shape and stage (the GPU run has an 8-minute bound to keep).
    assert all(result[key] > 0 for key in ("training_s", "serving_s", "shape_s"))
    assert result["shape_s"] >= result["training_s"] + result["serving_s"]
    assert "tiny" in done.stdout and "the issue's bound" in done.stdout  # the table, then the times
    # --profile: each window ran and was timed, and its operator table is in the text file.
    windows = ["training", "decode base, batch 1", "decode one adapter, batch 1", "decode base, batch 16",
               "decode 16 adapters, batch 16"]
    assert sorted(result["profile"]) == sorted(windows)
    assert all(result["profile"][w]["wall_s"] > 0 for w in windows)
    tables = (tmp_path / "tiny-profile.txt").read_text()
    assert all(f"== tiny / {w}:" in tables for w in windows) and "aten::mm" in tables


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
