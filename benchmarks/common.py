"""What the benchmark commands share: byte units, device synchronisation, the float32 matmul
peak that MFU is measured against, a training step as train.py runs it, where the Europarl
sample is, and writing results."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from backpack_nb.paths import outputs_root

GiB = 2**30
MiB = 2**20


def sync(device: str | torch.device) -> None:
    """Wait for queued CUDA work, so a wall-clock time covers the kernels it launched."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def matmul_gflops(n: int = 2048, reps: int = 3, device: str = "cpu",
                  dtype: torch.dtype = torch.float32) -> float:
    """Best-of-``reps`` GFLOP/s of an n x n float32 matmul: the roofline for MFU here."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device, dtype)
    b = torch.randn(n, n, generator=gen).to(device, dtype)
    a @ b  # warm-up: the first call pays for the library's set-up
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def amp_step(forward: Callable[..., Any], params: list[torch.Tensor],
             opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler, x: torch.Tensor,
             y: torch.Tensor, dtype: torch.dtype | None, *,
             clip: Callable[..., Any] = torch.nn.utils.clip_grad_norm_,
             **kwargs: Any) -> torch.Tensor:
    """One training step as train.py runs it: forward under autocast to ``dtype`` (None:
    none), the scaled backward, unscale, clip the gradient norm to 1, step, update the
    scaler, clear the gradients. Returns the loss (not synced)."""
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
        _, loss = forward(x, y, **kwargs)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    clip(params, 1.0)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    return loss


def default_europarl_source() -> Path:
    """``EUROPARL_SOURCE``, else the sample beside the checkout (``../shared/europarl``)."""
    env = os.environ.get("EUROPARL_SOURCE")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "europarl"


def write_json(result: Any, path: str | None, section: str) -> Path:
    """Write ``result`` to ``path`` (default: ``<outputs root>/bench/<section>.json``)
    atomically, so an interrupted run never leaves half a file behind."""
    out = Path(path) if path else outputs_root() / "bench" / f"{section}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out)
    return out
