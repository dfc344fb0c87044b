"""Where a step's time goes: torch.profiler around a piece of work, summarised for `bench-gpu --profile`.

The figure that decides what to optimise on a GPU is the busy share: the accelerator's kernel
time over the wall time of the same work. Near 1 the kernels set the pace (faster or fewer FLOPs
and bytes help); far below 1 the host does, launching kernels from Python (fewer launches,
CUDA graphs help). The tables beside it name the operators behind either.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile


@dataclass(frozen=True)
class Window:
    name: str
    what: str
    """What ran, in words (steps, tokens, rows)."""
    wall_s: float
    """Wall time under the profiler, which adds a little per operator."""
    device_busy_s: float | None
    """Summed kernel and copy time on the accelerator; None on the CPU."""
    kernels: int | None
    """Kernels and copies launched on the accelerator; None on the CPU."""
    table: str
    """Top operators: by accelerator time on a GPU, by CPU time on the CPU."""

    def summary(self) -> dict:
        busy = None if self.device_busy_s is None else round(self.device_busy_s / self.wall_s, 3)
        return {"what": self.what, "wall_s": round(self.wall_s, 4), "device_busy_s": self.device_busy_s and round(self.device_busy_s, 4),
                "busy_share": busy, "kernels": self.kernels}


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (nothing to wait for on the CPU): for timing with the host's clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_window(name: str, what: str, device: torch.device, work: Callable[[], object], rows: int = 20) -> Window:
    """Run `work` once under torch.profiler (CPU, and CUDA on a GPU) and summarise it."""
    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    synchronize(device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        work()
        synchronize(device)
        wall = time.perf_counter() - start
    events = prof.key_averages()
    if not on_gpu:
        return Window(name, what, wall, None, None, events.table(sort_by="self_cpu_time_total", row_limit=rows))
    # Kernel and memcpy entries carry the device's own time; CPU operators' device columns repeat it.
    on_device = [e for e in events if e.device_type == DeviceType.CUDA]
    table = events.table(sort_by="self_device_time_total", row_limit=rows)
    if not on_device:  # no kernel records (a profiler without CUDA support): say nothing rather than 0
        return Window(name, what, wall, None, None, table)
    busy = sum(e.self_device_time_total for e in on_device) / 1e6
    return Window(name, what, wall, busy, sum(e.count for e in on_device), table)


def report(windows: dict[str, list[Window]]) -> str:
    """The text file beside the results: per shape, each window's summary line and table."""
    parts = []
    for shape, items in windows.items():
        for w in items:
            s = w.summary()
            head = f"== {shape} / {w.name}: {w.what}; wall {s['wall_s']} s"
            if s["busy_share"] is not None:
                head += f", device busy {s['device_busy_s']} s ({s['busy_share']:.1%}), {s['kernels']} kernels"
            parts.append(f"{head}\n{w.table}")
    return "\n\n".join(parts) + "\n"
