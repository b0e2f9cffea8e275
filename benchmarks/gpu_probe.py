"""What bounds a training step: host synchronisations and the kernels the time goes to.

:func:`count_syncs` runs one step with CUDA's sync debug mode and counts the synchronising
calls it warns about (``torch.unique``'s data-dependent size, ``.item()``...); each one
stalls the host until the GPU catches up, so the next kernels launch late.
:func:`top_kernels` profiles a few steps with ``torch.profiler`` and lists the kernels
(device time on CUDA, CPU time elsewhere) with their share of the total.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch


def count_syncs(step: Callable[[], Any], device: torch.device) -> int | None:
    """Synchronising CUDA calls in one ``step`` (None off CUDA: nothing to count)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def top_kernels(step: Callable[[], Any], device: torch.device, steps: int = 3,
                rows: int = 12) -> dict[str, Any]:
    """The ``rows`` most expensive kernels (CUDA) or ops (CPU) over ``steps`` steps: name,
    milliseconds per step, share of the step's total, calls per step."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    if cuda:  # device kernels only: the time the GPU was busy, by kernel
        events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    else:  # the ops that ran (self time: no double counting of nested ops)
        events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU]
    by_name: dict[str, list[float]] = {}
    for e in events:
        us = e.time_range.elapsed_us() if cuda else e.self_cpu_time_total
        entry = by_name.setdefault(e.name, [0.0, 0])
        entry[0] += us
        entry[1] += 1
    total = sum(v[0] for v in by_name.values()) or 1.0
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:rows]
    return {"busy_ms_per_step": round(total / steps / 1000, 3),
            "clock": "GPU kernel time" if cuda else "CPU self time",
            "kernels": [{"name": name[:120], "ms_per_step": round(us / steps / 1000, 3),
                         "share": round(us / total, 4), "calls_per_step": round(n / steps, 1)}
                        for name, (us, n) in ranked]}


def format_top(name: str, ms_per_step: float, profile: dict[str, Any]) -> str:
    """A profile as text: busy time against the step's wall time, then the top kernels."""
    lines = [f"{name}: {profile['clock']} {profile['busy_ms_per_step']:.2f} ms of a "
             f"{ms_per_step:.2f} ms step ({profile['busy_ms_per_step'] / ms_per_step:.0%} busy)"]
    for k in profile["kernels"]:
        lines.append(f"  {k['share']:6.1%} {k['ms_per_step']:8.3f} ms x{k['calls_per_step']:<6g} "
                     f"{k['name']}")
    return "\n".join(lines)
