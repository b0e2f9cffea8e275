"""The Backpack's weighted sum of senses, behind one call: :func:`weighted_sum_of_senses`.

    o_i = sum_j sum_l alpha_l[i, j] C(x_j)_l,
    alpha_l[i, j] = softmax_{j <= i}(q_l,i . k_l,j / sqrt(d/k)).

Two kernels compute this same function (values and gradients agree in float64); which one
runs is a speed and memory choice, never a modelling one:

- ``"sdpa"`` (the default): the sum is causal attention with the senses as values (value
  width d, key width d/k), so one ``scaled_dot_product_attention`` call per batch; CUDA's
  memory-efficient kernel accepts the two widths and never stores alpha (the CPU runs the
  math path: alpha written out, as einsum does).
- ``"einsum"``: alpha written out (B, k, T, T), then one contraction over (sense, position).
  The plain reference.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

KERNELS = ("sdpa", "einsum")

Distinct = tuple[torch.Tensor, torch.Tensor]
"""A batch's distinct token ids (U,) and each position's index into them (B, T)."""


def distinct_tokens(idx: torch.Tensor, bucket: bool = True) -> Distinct:
    """The distinct ids of a (B, T) batch and where each position's id is among them, for
    :meth:`BackpackLM.forward`'s ``distinct``: computed where the batch is assembled (the
    host), the device step then has no data-dependent size to wait for. ``bucket`` pads the
    ids (repeating the last, so no new token is touched: sparse updates stay the same) to a
    multiple of 1/8 to 1/16 of their number (at least 64), so a compiled step sees a few
    sizes instead of a new one every batch; the padding rows are never gathered."""
    types, where = torch.unique(idx, return_inverse=True)  # (U,), (B, T)
    if bucket and len(types):
        n = len(types)
        step = max(64, 1 << max(0, n.bit_length() - 4))
        padded = -(-n // step) * step
        types = torch.cat([types, types[-1:].expand(padded - n)])
    return types, where


class Senses(NamedTuple):
    """C(x) for every position of a (B, T) batch, stored once per token type."""

    per_type: torch.Tensor  # (U, k*d): C of each distinct token, or of each position (U = B*T)
    where: torch.Tensor | None  # (B, T): each position's row of per_type; None: row b*T + t
    shape: tuple[int, int, int, int]  # (B, T, k, d)

    def per_position(self) -> torch.Tensor:
        """(B, T, k, d): C(x_j)_l at [b, j, l]."""
        if self.where is None:
            return self.per_type.view(self.shape)
        return F.embedding(self.where, self.per_type).view(self.shape)


def weighted_sum_of_senses(q: torch.Tensor, key: torch.Tensor, senses: Senses,
                           mixing: str = "sdpa") -> torch.Tensor:
    """o (B, T, d) from alpha's queries and keys q, key (B, k, T, d/k) and the senses, by
    the kernel ``mixing`` names (one of :data:`KERNELS`)."""
    if mixing not in KERNELS:
        raise ValueError(f"unknown mixing {mixing!r}: use one of {', '.join(KERNELS)}")
    values = senses.per_position()  # (B, T, k, d)
    if mixing == "sdpa":
        o = F.scaled_dot_product_attention(q, key, values.transpose(1, 2), is_causal=True)
        return o.sum(dim=1)  # (B, k, T, d) -> (B, T, d): sum over the k senses
    alpha = causal_alpha(q, key)  # (B, k, T, T)
    return torch.einsum("blij,bjld->bid", alpha, values)  # (B, T, d)


def causal_alpha(q: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Causal softmax of q.k / sqrt(d/k): (B, k, T, d/k) x 2 -> (B, k, T, T)."""
    T = q.shape[-2]
    scores = (q @ key.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # (B, k, T, T)
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)  # (T, T)
    return scores.masked_fill(future, float("-inf")).softmax(dim=-1)
