"""The learning-rate schedule: linear warmup, cosine decay, then flat."""

from __future__ import annotations

import math
from typing import Any

import torch

from backpack_nb.params import TrainConfig


class WarmupCosineSchedule:
    """Linear warmup to ``learning_rate``, cosine decay to ``min_lr`` at ``lr_decay_iters``,
    then flat. A pure function of the iteration: its state is only where it is, so a resume
    may change warmup/decay settings and the new ones apply from there on."""

    def __init__(self, cfg: TrainConfig):
        self.learning_rate, self.min_lr = cfg.learning_rate, cfg.min_lr
        self.warmup_iters, self.lr_decay_iters = cfg.warmup_iters, cfg.lr_decay_iters
        self.last_iter = 0

    def lr(self, it: int) -> float:
        if it < self.warmup_iters:
            return self.learning_rate * (it + 1) / (self.warmup_iters + 1)
        if it >= self.lr_decay_iters:
            return self.min_lr
        span = max(self.lr_decay_iters - self.warmup_iters, 1)
        ratio = (it - self.warmup_iters) / span
        return self.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (self.learning_rate - self.min_lr)

    def step_to(self, it: int, optimizer: torch.optim.Optimizer) -> float:
        self.last_iter = it
        lr = self.lr(it)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self) -> dict[str, Any]:
        return {"last_iter": self.last_iter, "learning_rate": self.learning_rate,
                "min_lr": self.min_lr, "warmup_iters": self.warmup_iters,
                "lr_decay_iters": self.lr_decay_iters}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_iter = int(state["last_iter"])
