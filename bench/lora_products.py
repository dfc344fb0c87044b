"""The LoRA products of one decode row, each way torch can compute them, timed as a replayed step pays them.

At batch 1 an adapter's cost on a GPU is not arithmetic: it is how many kernels its products
launch and how long each takes to start and finish. Run 1's profile (H100, Llama-3.1-8B shape)
showed `x·Aᵀ` for one row running as a split-K GEMM plus a reduction kernel, about 5.9 µs for
0.1 µs worth of memory traffic, and `y += s·h·Bᵀ` as one kernel of about 2.5 µs; a block has 4
of the first (q/k/v and gate/up share theirs) and 7 of the second. This script times, for the
shapes of the 8B shape at r=16, each way of computing them:

  shrink  h = x·Aᵀ, x [1, in], A [rows, in] (the router's stacks): `mm_At` (what
          serve/routing.py runs outside CUDA graphs), `mm_A_x` (the same product the other way
          round), `mv`, `mul_sum` (elementwise, then a float32 sum), and `reduce` (the same
          fused by Inductor into one reduction kernel: the router's choice in replayed steps on
          a GPU since run 5, where this script measured it as `mul_sum_compiled`)
  expand  y += s·h·Bᵀ, h [1, R], Bᵀ [R, out]: `addmm_` (serve/routing.py's), `addmv_`,
          `mul_sum_add_compiled` (one fused kernel that also adds)

On a GPU each variant is captured REPEATS times in one CUDA graph and replayed, so the time per
product is what a replayed decode step pays; its kernels are counted under the profiler. On the
CPU the same code runs eagerly on small shapes (a test runs it). Every variant's result is
checked against a float64 reference. Writes bench/results/lora-products-<device>.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from bench.profiling import synchronize
from serve.routing import SHRINKS

REPEATS = 100
"""Products per captured graph (and per timed loop on the CPU)."""


@dataclass(frozen=True)
class Case:
    name: str
    kind: str
    """shrink (x·Aᵀ) or expand (y += s·h·Bᵀ)."""
    inner: int
    """The summed dimension: in for a shrink, R for an expand."""
    outer: int
    """The produced width: the rows of A (members × R) for a shrink, out for an expand."""


RANK = 16
CASES_8B = (
    Case("q/k/v shared x·Aᵀ", "shrink", 4096, 3 * RANK),
    Case("o_proj x·Aᵀ", "shrink", 4096, RANK),
    Case("gate/up shared x·Aᵀ", "shrink", 4096, 2 * RANK),
    Case("down_proj x·Aᵀ", "shrink", 14336, RANK),
    Case("q/o/down y += h·Bᵀ", "expand", RANK, 4096),
    Case("k/v y += h·Bᵀ", "expand", RANK, 1024),
    Case("gate/up y += h·Bᵀ", "expand", RANK, 14336),
)
CASES_TINY = (Case("shrink", "shrink", 128, 3 * 4), Case("expand", "expand", 4, 384))
"""The CPU's: small, so that the test is quick; the code path is what it checks."""
CURRENT = {"shrink": "mm_At", "expand": "addmm_"}
"""What serve/routing.py's one-adapter path runs; the ratios are against it."""


def _mm_A_x(x2: torch.Tensor, At: torch.Tensor) -> torch.Tensor:
    return torch.mm(At.t(), x2.t()).t()


def _mv(x2: torch.Tensor, At: torch.Tensor) -> torch.Tensor:
    return torch.mv(At.t(), x2[0]).unsqueeze(0)


ROUTER_SHRINKS = {"mm_At": SHRINKS["mm"], "mm_A_x": _mm_A_x, "mv": _mv, "reduce": SHRINKS["reduce"]}
"""The ways serve/routing.py can take (`SHRINKS`: mm_At, reduce), timed as they are, and two it
once could (mm_A_x, mv: no faster than mm in a decode step, and dropped)."""


def _mul_sum(x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    return (A * x).sum(-1, dtype=torch.float32).to(A.dtype).unsqueeze(0)


def shrink_variants(A: torch.Tensor, compiled: bool) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Ways to compute x·Aᵀ for x [1, in] and A [rows, in]: each returns [1, rows]."""
    At = A.t()  # the router's per-slot view
    variants = {name: (lambda x, way=way: way(x, At)) for name, way in ROUTER_SHRINKS.items()
                if compiled or name != "reduce"}
    variants["mul_sum"] = functools.partial(_mul_sum, A=A)
    return variants


def expand_variants(Bt: torch.Tensor, scale: float, compiled: bool) -> dict[str, Callable[[torch.Tensor, torch.Tensor], None]]:
    """Ways to add scale·h·Bᵀ into y in place, for h [1, R], Bᵀ [R, out] and y [1, out]."""
    variants = {
        "addmm_": lambda y, h: y.addmm_(h, Bt, alpha=scale),
        "addmv_": lambda y, h: y[0].addmv_(Bt.t(), h[0], alpha=scale),
    }
    if compiled:
        fused = torch.compile(lambda y, h, Bt: y.add_((Bt * h.t()).sum(0, dtype=torch.float32).to(y.dtype), alpha=scale),
                              dynamic=False, fullgraph=True)
        variants["mul_sum_add_compiled"] = lambda y, h: fused(y, h, Bt)
    return variants


def seconds_per_call(fn: Callable[[], object], device: torch.device, repeats: int = REPEATS) -> float:
    """On a GPU: `repeats` calls captured in one CUDA graph, the best of a few replays; on the
    CPU: the calls run one by one. Per call."""
    if device.type != "cuda":
        fn()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - start) / repeats
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # CUDA wants the work run once off the capture stream first
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeats):
            fn()
    graph.replay()
    best = float("inf")
    for _ in range(5):
        synchronize(device)
        start = time.perf_counter()
        graph.replay()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best / repeats


def kernels_per_call(fn: Callable[[], object], device: torch.device) -> int | None:
    """Kernels one eager call launches on a GPU (None on the CPU)."""
    if device.type != "cuda":
        return None
    fn()
    synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        synchronize(device)
    return sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA)


def measure_case(case: Case, device: torch.device, dtype: torch.dtype, compiled: bool) -> dict:
    """Every variant of one product: time, kernels and largest error relative to a float64 reference."""
    generator = torch.Generator().manual_seed(0)
    shape = (case.outer, case.inner) if case.kind == "shrink" else (case.inner, case.outer)  # A, or Bᵀ
    weight = torch.randn(*shape, generator=generator) * 0.02
    row = torch.randn(1, case.inner, generator=generator)  # x, or h
    if case.kind == "shrink":
        reference = row.double() @ weight.double().t()
        x = row.to(device, dtype)
        calls = {name: functools.partial(fn, x) for name, fn in shrink_variants(weight.to(device, dtype), compiled).items()}

        def result(call) -> torch.Tensor:
            return call()
    else:
        scale, start = 2.0, torch.randn(1, case.outer, generator=generator)
        reference = start.double() + scale * (row.double() @ weight.double())
        y, h = torch.empty(1, case.outer, device=device, dtype=dtype), row.to(device, dtype)  # y: never `start` itself
        calls = {name: functools.partial(fn, y, h) for name, fn in expand_variants(weight.to(device, dtype), scale, compiled).items()}

        def result(call) -> torch.Tensor:  # the variants add into y: from the same start each time
            y.copy_(start)
            call()
            return y.clone()
    out = {}
    for name, call in calls.items():
        error = float((result(call).double().cpu() - reference).abs().max() / reference.abs().max())
        out[name] = {"us_per_call": round(seconds_per_call(call, device) * 1e6, 2),
                     "kernels": kernels_per_call(call, device), "max_rel_error": round(error, 5)}
    current = out[CURRENT[case.kind]]["us_per_call"]
    for figures in out.values():
        figures["vs_current"] = round(figures["us_per_call"] / current, 3)
    return {"case": case.name, "kind": case.kind, "inner": case.inner, "outer": case.outer, "variants": out}


def _table(cases: list[dict]) -> str:
    lines = []
    for case in cases:
        cells = [f"{name} {v['us_per_call']} µs" + (f" ({v['kernels']} k)" if v["kernels"] is not None else "")
                 + f" x{v['vs_current']}" for name, v in case["variants"].items()]
        lines.append(f"{case['case']:<24} " + " | ".join(cells))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="default bench/results/lora-products-<device>.json")
    parser.add_argument("--compiled", action=argparse.BooleanOptionalAction, default=None,
                        help="also the torch.compile'd variants (default: on a GPU only)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    name = torch.cuda.get_device_name() if on_gpu else "cpu"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    compiled = on_gpu if args.compiled is None else args.compiled
    cases = [measure_case(case, device, dtype, compiled) for case in (CASES_8B if on_gpu else CASES_TINY)]
    out = Path(args.out or f"bench/results/lora-products-{re.sub(r'[^A-Za-z0-9]+', '-', name).strip('-').lower()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": name, "torch": torch.__version__, "dtype": str(dtype), "repeats": REPEATS,
                               "graphed": on_gpu, "cases": cases}, indent=2) + "\n")
    print(_table(cases))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
