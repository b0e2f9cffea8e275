"""Where a command runs and in what precision: the one rule train.py, evaluate.py, sample.py,
the notebooks and lexsim share.

- ``cuda`` (or ``cuda:N``, ``mps``) on a machine without it falls back to the CPU with one
  warning, or is refused with ``strict`` (``--strict_device``).
- ``float16`` on a CPU becomes ``float32``: CPU autocast to float16 is slow and loses
  precision for nothing. ``bfloat16`` on a GPU without it becomes ``float16``.
- Anything else is a :class:`UserError` naming the choices.
"""

from __future__ import annotations

import contextlib

import torch

from .device_names import DTYPES, device_problem
from .errors import UserError

__all__ = ["DTYPES", "autocast", "autocast_dtype", "device_problem", "resolve_device"]


def resolve_device(device: str, dtype: str = "float32", *, strict: bool = False,
                   local_rank: int = 0, world_size: int = 1,
                   task: str = "training") -> tuple[torch.device, str, list[str]]:
    """The device and autocast dtype to use when ``device`` and ``dtype`` are asked for, and
    the warnings that explain any fallback (``task`` names what falls back in them). Under
    torchrun (``world_size`` > 1) each process takes the GPU of its ``local_rank``."""
    problem = device_problem(device)
    if problem or dtype not in DTYPES:
        raise UserError(problem or f"dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    notes: list[str] = []

    def fallback(problem: str, instead: str, fix: str) -> None:
        if strict:
            raise UserError(f"{problem}, and --strict_device forbids falling back; {fix}, "
                            "or drop --strict_device")
        notes.append(f"{problem}: {instead}; {fix} to silence this")

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else "no visible GPU"
            fallback(f"--device {device}: CUDA is not available here (torch "
                     f"{torch.__version__}, {build})", f"{task} on the CPU instead (much slower)",
                     "pass --device cpu")
            used = torch.device("cpu")
        elif world_size > 1:
            used = torch.device("cuda", local_rank)
        else:
            used = torch.device(device)
            if (used.index or 0) >= torch.cuda.device_count():
                raise UserError(f"--device {device}: only {torch.cuda.device_count()} CUDA "
                                "device(s) here; use --device cuda or cuda:0")
    elif device == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            fallback("--device mps: Apple MPS is not available here",
                     f"{task} on the CPU instead", "pass --device cpu")
            used = torch.device("cpu")
        else:
            used = torch.device("mps")
    else:
        used = torch.device("cpu")

    if used.type == "cpu" and dtype == "float16":
        fallback("--dtype float16 is for GPUs", f"on the CPU {task} runs in float32",
                 "pass --dtype float32 (or bfloat16)")
        dtype = "float32"
    elif used.type == "cuda" and dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
        fallback(f"--dtype bfloat16: {torch.cuda.get_device_name(used)} has no bfloat16 "
                 "support", "using float16 with a gradient scaler", "pass --dtype float16")
        dtype = "float16"
    return used, dtype, notes


def autocast_dtype(dtype: str) -> torch.dtype | None:
    """The torch dtype to autocast to (None: plain float32)."""
    return None if dtype == "float32" else getattr(torch, dtype)


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` on ``device``; a no-op for float32."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, dtype))
