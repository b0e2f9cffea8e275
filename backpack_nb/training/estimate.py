"""The loss estimate taken while training (nanoGPT's ``estimate_loss``), and how a stop cuts
it short.

An estimate is the mean loss over ``eval_iters`` fixed batches of each split. With a large
``eval_iters`` it can take minutes (the seed configuration on a CPU: more than ten), so a
SIGINT/SIGTERM does not wait for it: the estimate is abandoned between two batches and the
loop saves and stops. Nothing of it is kept (not even the finished splits), so the resume
evaluates that iteration again, in full; evaluation draws from its own generators, so the
resumed run stays bit-exact.
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np
import torch
import torch.distributed as dist

from backpack_nb.params import TrainConfig

from .batches import BatchSampler
from .runtime import Runtime

# Offsets that give evaluation its own fixed generators, far from the training seed's.
EVAL_SEED_OFFSET = {"train": 1_000_003, "val": 2_000_003}


class EvaluationAbandoned(Exception):
    """A stop arrived during an estimate; ``reason`` is the stop's (``SIGINT``, ``peer``...)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@torch.no_grad()
def estimate_loss(model: torch.nn.Module, splits: Mapping[str, np.ndarray], cfg: TrainConfig,
                  rt: Runtime, stop_reason: Callable[[], str | None]) -> dict[str, float]:
    """Mean loss over ``eval_iters`` batches of each split. The same fixed batches at every
    evaluation (a smoother curve), drawn from their own generators (evaluating never changes
    the training run); under DDP the ranks share the batches out. ``stop_reason()`` is asked
    before every batch (collective under DDP: every rank asks at the same batch); when it
    names a stop, :class:`EvaluationAbandoned` is raised."""
    model.eval()
    losses = {}
    try:
        for split, tokens in splits.items():
            fixed = BatchSampler(tokens, block_size=cfg.block_size, batch_size=cfg.batch_size,
                                 seed=cfg.seed + EVAL_SEED_OFFSET[split], device=rt.device,
                                 name=split)
            total = torch.zeros((), dtype=torch.float64, device=rt.device)
            for k in range(cfg.eval_iters):
                reason = stop_reason()
                if reason:
                    raise EvaluationAbandoned(reason)
                x, y = fixed.next_batch()
                if k % rt.world_size == rt.rank:
                    with rt.autocast():
                        _, loss = model(x, y)
                    total += loss.double()
            if rt.ddp:
                dist.all_reduce(total)
            losses[split] = total.item() / cfg.eval_iters
    finally:
        model.train()
    return losses
