"""The NF4 base's linear layers in a decode step: bitsandbytes' own path against the fused kernel
(bench/nf4_kernel.py), as a share of the GPU's memory-bandwidth bound, at batch 1 and 16.

A decode step reads every weight once, so its floor is the weights' bytes over the memory
bandwidth. bitsandbytes (0.50) runs its fused 4-bit kernel for up to 4 rows; above that its
calibrated heuristic often dequantizes the whole weight to bf16 and multiplies (on an H100, for
most of the 8B shape's layers at 16 rows), reading the 4-bit weight, writing and reading back
four times its bytes. The fused kernel reads the 4-bit bytes only, at any batch.

For each of the Llama-3.1-8B shape's seven linear layers (NF4, double quantization, block 64,
bf16 compute, as adapters.load_base loads them), and for 1 and 16 rows, this times:

  bnb           the layer's own forward (`Linear4bit`, i.e. `bnb.matmul_4bit`)
  bnb_fused     bitsandbytes' fused kernel called directly at 16 rows, bypassing its heuristic
                (a private function of bitsandbytes: left out where it is missing)
  kernel        bench/nf4_kernel.py in its DEFAULT launch shape, and each of KERNEL_SWEEP's

Each is captured in a CUDA graph, cycling through enough distinct weights that they do not fit
in L2 (else the weights would be read from cache, not memory), and replayed; the time per call
is the best replay's. The share of the bound is the layer's stored bytes (codes, scales, nested
scales, x and y) over time, against the device's peak bandwidth (from its memory clock and bus
width, or --peak-tbps). The step figure adds the seven layers times 32 blocks: the linear layers'
part of a decode step (bench.gpu measures the whole step: attention, norms and the bf16 output
head besides). Every way's output is compared with the layer's own, and the memory it allocates
beyond its output is recorded (bitsandbytes' dequantized weight, where it makes one).

Needs CUDA; refuses to run without it. Writes bench/results/nf4-decode-<device>.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

LAYERS_8B = {"q_proj": (4096, 4096), "k_proj": (4096, 1024), "v_proj": (4096, 1024), "o_proj": (4096, 4096),
             "gate_proj": (4096, 14336), "up_proj": (4096, 14336), "down_proj": (14336, 4096)}
"""(in, out) of each linear layer of a Llama-3.1-8B block."""
BLOCKS_8B = 32
BATCHES = (1, 16)
POOL_BYTES = 512 * 2**20
"""Distinct weights per timed shape add up to at least this: ten times an H100's 50 MB L2."""
REPEATS = 5
"""Passes over the weight pool per captured graph."""
PEAK_TBPS = {"h100": 3.35, "h200": 4.8}
"""Spec-sheet bandwidth (SXM parts) where the device does not report its memory clock."""


@dataclass(frozen=True)
class Way:
    """One way to compute a layer's output: a name and a function of (layer, x)."""

    name: str
    run: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]


def require_cuda() -> torch.device:
    if not torch.cuda.is_available():
        raise SystemExit("bench/nf4_decode.py times GPU kernels and needs CUDA: torch.cuda.is_available() is False "
                         "here (on a GPU machine: NF4=1 bash bench/on_gpu_machine.sh)")
    return torch.device("cuda")


def peak_bandwidth(device: torch.device, override_tbps: float | None) -> tuple[float, str]:
    """(bytes per second, where the figure came from)."""
    if override_tbps:
        return override_tbps * 1e12, "--peak-tbps"
    props = torch.cuda.get_device_properties(device)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:  # double data rate: two transfers a clock
        return 2 * clock_khz * 1e3 * bus_bits / 8, "memory clock × bus width"
    for key, tbps in PEAK_TBPS.items():
        if key in props.name.lower():
            return tbps * 1e12, "spec sheet"
    raise SystemExit(f"unknown peak bandwidth for {props.name}: give --peak-tbps")


def quantized_layer(width: int, out: int, device: torch.device, seed: int) -> torch.nn.Module:
    """A bitsandbytes NF4 layer as adapters.load_base makes them: double quantization, block 64, bf16 compute."""
    import bitsandbytes as bnb

    torch.manual_seed(seed)
    layer = bnb.nn.Linear4bit(width, out, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True,
                              quant_type="nf4")
    layer.weight.data.normal_(0, 0.02)
    return layer.to(device).eval()  # moving it quantizes it


def stored_bytes(layer: torch.nn.Module) -> int:
    """The weight's bytes in memory: codes, 8-bit scales, their float32 scales and the tables."""
    state = layer.weight.quant_state
    tensors = [layer.weight.data, state.absmax, state.code, state.state2.absmax, state.state2.code, state.offset]
    return sum(t.numel() * t.element_size() for t in tensors)


def bnb_fused(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """bitsandbytes' fused kernel whatever its heuristic would pick; None where this version lacks it."""
    try:
        from bitsandbytes.backends.cuda import ops
    except ImportError:  # a bitsandbytes without this backend module
        return None
    impl = getattr(ops, "_gemm_4bit_kernel_impl", None)  # private to bitsandbytes 0.50: may go
    if impl is None:
        return None
    state = layer.weight.quant_state
    return impl(x, layer.weight.data.view(-1, 1), state.shape, state.state2.absmax, state.blocksize, state.quant_type,
                None, state.absmax, state.state2.code, state.offset)


def ways(batch: int) -> list[Way]:
    from bench import nf4_kernel

    found = [Way("bnb", lambda layer, x: layer(x))]
    if batch > 4:  # at up to 4 rows bitsandbytes runs its fused kernel anyway
        found.append(Way("bnb_fused", bnb_fused))
    for index, config in enumerate((nf4_kernel.DEFAULT, *nf4_kernel.KERNEL_SWEEP)):
        name = "kernel" if index == 0 else f"kernel_sweep{index}"
        found.append(Way(name, lambda layer, x, config=config: nf4_kernel.nf4_linear(layer, x, config)))
    return found


def graph_seconds(calls: list[Callable[[], object]], device: torch.device) -> float:
    """Seconds per call: REPEATS passes over `calls` captured in one CUDA graph, best of five replays."""
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm up off the capture stream: Triton compiles, allocators settle
        for call in calls:
            call()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(REPEATS):
            for call in calls:
                call()
    graph.replay()
    best = float("inf")
    for _ in range(5):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best / (REPEATS * len(calls))


def transient_bytes(call: Callable[[], torch.Tensor], device: torch.device) -> int:
    """Memory one eager call allocates beyond the output it returns (a dequantized weight, say)."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = call()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before - result.numel() * result.element_size()


def weight_pool(width: int, out: int, device: torch.device) -> list[torch.nn.Module]:
    """One quantized layer and copies of it in memory of their own, POOL_BYTES in all: timed in
    turn, each call reads its weight from memory rather than from L2. Same values: only the
    addresses matter here."""
    first = quantized_layer(width, out, device, seed=0)
    pool = [first] + [copy.deepcopy(first) for _ in range(max(1, -(-POOL_BYTES // stored_bytes(first)) - 1))]
    if len({layer.weight.data.data_ptr() for layer in pool}) != len(pool):
        raise RuntimeError("the weight copies share memory: the pool would be read from L2")
    return pool


def measure_shape(name: str, pool: list[torch.nn.Module], batch: int, device: torch.device, peak: float) -> dict:
    """Every way on one layer shape and batch: time, share of the bound, error, transient memory."""
    layer = pool[0]
    width, out = layer.in_features, layer.out_features
    x = torch.randn(batch, width, device=device, dtype=torch.bfloat16)
    moved = stored_bytes(layer) + (batch * width + batch * out) * 2
    figures = {}
    with torch.no_grad():
        reference = layer(x).double()
        for way in ways(batch):
            got = way.run(layer, x)
            if got is None:
                continue
            seconds = graph_seconds([lambda each=each, way=way: way.run(each, x) for each in pool], device)
            figures[way.name] = {
                "us_per_call": round(seconds * 1e6, 2), "bandwidth_share": round(moved / seconds / peak, 3),
                "max_rel_error_vs_bnb": float((got.double() - reference).abs().max() / reference.abs().max()),
                "transient_bytes": transient_bytes(lambda way=way: way.run(layer, x), device)}
    return {"layer": name, "in": width, "out": out, "batch": batch, "bytes_moved": moved, "weights_in_pool": len(pool),
            "ways": figures}


def step_summary(shapes: list[dict], batch: int, peak: float) -> dict:
    """The linear layers of one decode step (7 per block, 32 blocks) each way, and with the kernel's
    best launch shape for each layer."""
    rows = [s for s in shapes if s["batch"] == batch]
    moved = BLOCKS_8B * sum(s["bytes_moved"] for s in rows)
    names = set.intersection(*(set(s["ways"]) for s in rows))
    seconds = {n: BLOCKS_8B * sum(s["ways"][n]["us_per_call"] for s in rows) / 1e6 for n in names}
    seconds["kernel_best_per_layer"] = BLOCKS_8B * sum(
        min(v["us_per_call"] for k, v in s["ways"].items() if k.startswith("kernel")) for s in rows) / 1e6
    return {n: {"ms": round(t * 1e3, 3), "bandwidth_share": round(moved / t / peak, 3),
                "vs_bnb": round(seconds["bnb"] / t, 3)} for n, t in sorted(seconds.items())}


def device_slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="default bench/results/nf4-decode-<device>.json")
    parser.add_argument("--peak-tbps", type=float, default=None, help="the device's peak memory bandwidth, TB/s")
    parser.add_argument("--layers", nargs="+", default=list(LAYERS_8B), choices=list(LAYERS_8B))
    args = parser.parse_args()
    device = require_cuda()
    import bitsandbytes

    from bench import nf4_kernel

    name = torch.cuda.get_device_name(device)
    peak, peak_source = peak_bandwidth(device, args.peak_tbps)
    shapes = []
    for layer in args.layers:
        pool = weight_pool(*LAYERS_8B[layer], device)
        shapes += [measure_shape(layer, pool, batch, device, peak) for batch in BATCHES]
        del pool
        torch.cuda.empty_cache()
    report = {"device": name, "torch": torch.__version__, "bitsandbytes": bitsandbytes.__version__,
              "peak_bandwidth_tbps": round(peak / 1e12, 3), "peak_source": peak_source, "repeats": REPEATS,
              "configs": {"kernel": repr(nf4_kernel.DEFAULT),
                          **{f"kernel_sweep{i}": repr(c) for i, c in enumerate(nf4_kernel.KERNEL_SWEEP, 1)}},
              "shapes": shapes,
              "decode_linears": ({str(b): step_summary(shapes, b, peak) for b in BATCHES}
                                 if len(args.layers) == len(LAYERS_8B) else None)}  # a step needs every layer
    out = Path(args.out or f"bench/results/nf4-decode-{device_slug(name)}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    for shape in shapes:
        cells = " | ".join(f"{k} {v['us_per_call']} µs {v['bandwidth_share']:.0%}" for k, v in shape["ways"].items())
        print(f"{shape['layer']:<10} batch {shape['batch']:<3} {cells}")
    for batch, summary in (report["decode_linears"] or {}).items():
        cells = " | ".join(f"{k} {v['ms']} ms {v['bandwidth_share']:.0%}" for k, v in summary.items())
        print(f"batch {batch} step linears: {cells}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
