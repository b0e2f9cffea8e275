"""Useful training FLOPs of a step, by part: the one count behind every MFU figure here
(``python -m benchmarks.speed`` and the training loop's progress line and ``run.json``)."""

from __future__ import annotations

import numpy as np
import torch.nn as nn

from backpack_nb.models.backpack import BackpackLM
from backpack_nb.model_config import ModelConfig


def train_flops(model: nn.Module, batch_size: int, block_size: int,
                distinct_tokens: float) -> dict[str, float]:
    """Useful FLOPs of one training step (forward and backward: 3 x the forward's 2 per
    multiply-add), by part. Counted: every matmul weight once per token that uses it (the
    tied head once, as the head), attention and the Backpack's mixing as causal (half of
    the T x T products), the sense network once per *distinct* token of the batch.
    Not counted: lookups, normalisation, activations, softmax, the optimizer."""
    cfg: ModelConfig = model.config
    N, T, d = batch_size * block_size, block_size, cfg.n_embd
    blocks = model.transformer.h if hasattr(model, "transformer") else model.h

    def matmul_weights(module: nn.Module) -> int:
        return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))

    parts = {
        "blocks": 6.0 * N * matmul_weights(blocks),
        "attention": 6.0 * cfg.n_layer * batch_size * T * T * d,  # 12 L T d per token, halved
        "head": 6.0 * N * cfg.vocab_size * d,
    }
    if isinstance(model, BackpackLM):
        k = cfg.n_senses
        parts["alpha_qk"] = 6.0 * N * model.alpha_qk.weight.numel()
        # scores (width d/k, k heads) and values (width d, k heads), causal: B T^2 d (1 + k)
        parts["mixing"] = 3.0 * batch_size * T * T * d * (1 + k)
        if cfg.sense_source == "network":
            parts["sense_network"] = 6.0 * distinct_tokens * matmul_weights(model.sense_network)
    parts["total"] = sum(parts.values())
    return parts


def mean_distinct_tokens(tokens: np.ndarray, batch_size: int, block_size: int,
                         samples: int = 8, seed: int = 0) -> float:
    """Mean number of distinct token ids in a batch of ``batch_size`` random windows of
    ``block_size`` tokens of ``tokens`` (what the Backpack's sense network runs on), over
    ``samples`` batches drawn with their own generator (the global RNGs are not touched)."""
    n = len(tokens) - block_size
    if n <= 0:
        return float(min(batch_size * block_size, len(np.unique(tokens)) if len(tokens) else 1))
    rng = np.random.default_rng(seed)
    counts = []
    for _ in range(samples):
        starts = rng.integers(0, n, size=batch_size)
        windows = np.concatenate([np.asarray(tokens[s:s + block_size]) for s in starts])
        counts.append(len(np.unique(windows)))
    return float(np.mean(counts))
