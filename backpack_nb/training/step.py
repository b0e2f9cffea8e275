"""One optimizer step, as training takes it: the Trainer and every benchmark call
:func:`optimizer_step`, so a benchmark measures the step training runs.

A step is ``accum`` micro-batches, each forward under autocast and its loss divided by
``accum``, scaled and backpropagated (under DDP the gradients are all-reduced once, on the
last micro-batch); then unscale, clip the gradient norm (sparse-aware, see
:mod:`backpack_nb.optim`), step the optimizer, update the scaler, clear the gradients.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager

import torch

from backpack_nb.optim import clip_grad_norm_

Batch = tuple[torch.Tensor, torch.Tensor, dict[str, Any]]


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   scaler: torch.amp.GradScaler, next_batch: Callable[[], Batch], *,
                   accum: int = 1, grad_clip: float = 1.0,
                   autocast: Callable[[], ContextManager[Any]] = contextlib.nullcontext,
                   ddp: bool = False, params: Callable[[], Any] | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Take one step over ``accum`` micro-batches drawn from ``next_batch()`` (x, y and
    extra keyword arguments for the model). ``params()`` gives the parameters to clip (default:
    the model's; under DDP pass the wrapped module's). Returns the last micro-batch's loss
    (divided by ``accum``) and the number of non-finite micro-batch losses, both tensors on
    the device, so that nothing waits for the device."""
    if accum < 1:
        raise ValueError(f"accum must be >= 1, got {accum}")
    nonfinite = loss = torch.zeros(())  # both set at the first micro-batch
    for micro in range(accum):
        x, y, kwargs = next_batch()
        if micro == 0:  # made on the batch's device: no host-to-device copy, no sync
            nonfinite = torch.zeros((), dtype=torch.int32, device=x.device)
        skip_sync = ddp and micro < accum - 1  # under DDP all-reduce on the last micro-batch only
        with model.no_sync() if skip_sync else contextlib.nullcontext():
            with autocast():
                _, loss = model(x, y, **kwargs)
                loss = loss / accum
            nonfinite += (~torch.isfinite(loss.detach())).to(torch.int32)
            scaler.scale(loss).backward()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        clip_grad_norm_(params() if params is not None else model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss, nonfinite
