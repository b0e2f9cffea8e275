"""Building blocks shared by the Transformer baseline and the Backpack.

Both models run the same causal Transformer over ``E x + positions``: the GPT reads its
logits off it directly; the Backpack turns it into contextualization weights. The sense
network reuses the same MLP. Every output projection is named ``c_proj`` so that
:mod:`backpack_nb.models.init` can find the ones that get the smaller, depth-scaled init.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from backpack_nb.model_config import ModelConfig
from backpack_nb.models.generation import KVCache


class MLP(nn.Module):
    """``d_in -> d_hidden -> d_out`` with a tanh-approximated GELU (as GPT-2 and the
    official Backpack), and dropout on the output."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int, bias: bool, dropout: float) -> None:
        super().__init__()
        self.c_fc = nn.Linear(d_in, d_hidden, bias=bias)
        self.c_proj = nn.Linear(d_hidden, d_out, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.c_fc(x), approximate="tanh")  # (..., d_hidden)
        return self.dropout(self.c_proj(x))  # (..., d_out)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention through ``scaled_dot_product_attention`` (a fused
    kernel where one exists; it never stores the T x T weights for backward). Scores are
    q.k / sqrt(head size), and further / (layer + 1) with
    ``config.scale_attn_by_inverse_layer_idx``.

    For generation (:mod:`backpack_nb.models.generation`) it also runs new positions against
    the keys and values of earlier ones: ``kv`` keeps them and grows by the new ones, and
    ``mask`` (B, 1, n, L), True where a new position may attend, replaces the causal mask
    (None: every column seen so far for one new position, causal for a first chunk)."""

    def __init__(self, config: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        self.n_head = config.n_head
        # None: SDPA's own 1/sqrt(head size), so models without the option run as before
        self.scale: float | None = None
        if config.scale_attn_by_inverse_layer_idx:
            self.scale = 1.0 / math.sqrt(config.n_embd // config.n_head) / (layer + 1)
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, kv: KVCache | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        # q, k, v: (B, n_head, T, head_size)
        if kv is not None:
            k, v = kv.extend(k, v)  # (B, n_head, L, head_size): every column so far
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
            dropout_p=self.dropout if self.training else 0.0, scale=self.scale,
        )  # (B, n_head, T, head_size)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class Block(nn.Module):
    """Pre-LN Transformer block: ``x + attn(LN(x))``, then ``x + MLP(LN(x))``."""

    def __init__(self, config: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        d = config.n_embd
        self.ln_1 = nn.LayerNorm(d, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(d, bias=config.bias)
        self.mlp = MLP(d, 4 * d, d, config.bias, config.dropout)

    def forward(self, x: torch.Tensor, kv: KVCache | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), kv, mask)
        return x + self.mlp(self.ln_2(x))


class CausalTransformer(nn.Module):
    """Learned positions, a stack of blocks and a final LayerNorm: token embeddings
    (B, T, d) in, causal hidden states (B, T, d) out. The token embedding E is not here
    because it belongs to the language model (it is also its output head)."""

    checkpoint_blocks: bool = False
    """Activation checkpointing: keep only each block's input and recompute the block in
    backward (about a third more compute, most of the blocks' activation memory saved).
    A performance switch, not part of the model: set it on an instance, or use
    :meth:`~backpack_nb.models.LanguageModel.set_activation_checkpointing`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.block_size = config.block_size
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config, layer) for layer in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)

    def forward(self, tok_emb: torch.Tensor, *, positions: torch.Tensor | None = None,
                cache: Sequence[KVCache] | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings (B, T, d) at positions 0..T-1 -> hidden states (B, T, d).

        For generation: ``cache`` (one :class:`KVCache` per block) holds the keys and values
        of the columns before these, ``positions`` ((T,) or (B, T)) are the new columns'
        positions and ``mask`` which columns each may attend (see :class:`CausalSelfAttention`).
        """
        if cache is not None:
            x = self.drop(tok_emb + self.wpe(positions))  # (B, T, d)
            for block, kv in zip(self.h, cache, strict=True):
                x = block(x, kv, mask)
            return self.ln_f(x)  # (B, T, d)
        T = tok_emb.shape[1]
        if T > self.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than block_size {self.block_size}")
        pos = torch.arange(T, device=tok_emb.device)  # (T,)
        x = self.drop(tok_emb + self.wpe(pos))  # (B, T, d)
        recompute = self.checkpoint_blocks and torch.is_grad_enabled()
        for block in self.h:
            # use_reentrant=False: the supported mode; the RNG state is replayed, so dropout
            # masks are the same in the recomputation.
            x = checkpoint(block, x, use_reentrant=False) if recompute else block(x)
        return self.ln_f(x)  # (B, T, d)
