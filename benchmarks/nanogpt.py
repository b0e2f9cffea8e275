"""The speed reference for the Transformer baseline, after karpathy/nanoGPT's ``model.py``: the
architecture of :class:`backpack_nb.models.GPT` (pre-LN, tanh GELU, SDPA, tied head, same init)
trained the plain way: all logits, then ``F.cross_entropy``."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from backpack_nb.models import ModelConfig
from backpack_nb.models.init import init_gpt_


class NanoGPT(nn.Module):
    """A straightforward GPT with the baseline's architecture and initialisation."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        d = config.n_embd
        self.wte = nn.Embedding(config.vocab_size, d)
        self.wpe = nn.Embedding(config.block_size, d)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(_NanoBlock(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(d, bias=config.bias)
        self.lm_head = nn.Linear(d, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        init_gpt_(self)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                **_: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        T = idx.shape[1]
        x = self.drop(self.wte(idx) + self.wpe(torch.arange(T, device=idx.device)))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Weight decay on matrices only, as the library's models do."""
        return [{"params": [p for p in self.parameters() if (p.dim() >= 2) == decay],
                 "weight_decay": weight_decay if decay else 0.0} for decay in (True, False)]


class _NanoAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.dropout = config.n_head, config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape  # -> (B, n_head, T, head size)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in self.c_attn(x).split(C, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, C)))


class _NanoBlock(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d, bias = config.n_embd, config.bias
        self.ln_1, self.attn = nn.LayerNorm(d, bias=bias), _NanoAttention(config)
        self.ln_2 = nn.LayerNorm(d, bias=bias)
        self.c_fc, self.c_proj = nn.Linear(d, 4 * d, bias=bias), nn.Linear(4 * d, d, bias=bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        h = F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh")  # the MLP: (B, T, 4d)
        return x + self.dropout(self.c_proj(h))
