"""The Backpack's weighted sum of senses, behind one call: :func:`weighted_sum_of_senses`.

    o_i = sum_j sum_l alpha_l[i, j] C(x_j)_l,
    alpha_l[i, j] = softmax_{j <= i}(q_l,i . k_l,j / sqrt(d/k)).

Three kernels compute this same function (values and gradients agree in float64); which one
runs is a speed and memory choice, never a modelling one:

- ``"einsum"``: alpha written out (B, k, T, T), then one contraction over (sense, position).
  The plain reference.
- ``"sdpa"``: the sum is causal attention with the senses as values (value width d, key width
  d/k), so one ``scaled_dot_product_attention`` call; CUDA's memory-efficient kernel accepts
  the two widths and never stores alpha.
- ``"blocked"``: alpha by blocks of query rows, each one matmul over the keys it can see, so
  the masked future half is never computed. On the CPU SDPA takes its math path for these
  widths (full T x T products, several passes over alpha); this kernel beats it and einsum
  there (``python -m benchmarks.speed`` measures them).

``mixing="auto"`` picks sdpa on CUDA, blocked elsewhere when the length allows, else einsum.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

KERNELS = ("sdpa", "einsum", "blocked")

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
    """C(x) for every position of a (B, T) batch, stored once per token type. Each kernel
    gathers from it straight into the layout it multiplies with."""

    per_type: torch.Tensor  # (U, k*d): C of each distinct token, or of each position (U = B*T)
    where: torch.Tensor | None  # (B, T): each position's row of per_type; None: row b*T + t
    shape: tuple[int, int, int, int]  # (B, T, k, d)

    def per_position(self) -> torch.Tensor:
        """(B, T, k, d): C(x_j)_l at [b, j, l]."""
        if self.where is None:
            return self.per_type.view(self.shape)
        return F.embedding(self.where, self.per_type).view(self.shape)

    def block_major(self, n_blocks: int) -> torch.Tensor:
        """(B, T*k, d) with row (c, l, j) = C(x at position c*bs + j)_l, bs = T / n_blocks:
        :class:`_CausalMixing`'s key layout, gathered in one pass (no (B, T, k, d) tensor and
        no permuted copy of it)."""
        B, T, k, d = self.shape
        where = self.where
        if where is None:
            where = torch.arange(B * T, device=self.per_type.device)
        rows_of_senses = self.per_type.view(-1, d)  # (U*k, d): row u*k + l is C(u)_l
        sense = torch.arange(k, device=where.device).view(1, 1, k, 1)
        rows = where.view(B, n_blocks, 1, T // n_blocks) * k + sense  # (B, nb, k, bs)
        return F.embedding(rows.view(B, T * k), rows_of_senses)  # (B, T*k, d)


def weighted_sum_of_senses(q: torch.Tensor, key: torch.Tensor, senses: Senses,
                           mixing: str = "auto", block: int = 64) -> torch.Tensor:
    """o (B, T, d) from alpha's queries and keys q, key (B, k, T, d/k) and the senses, by the
    kernel :func:`choose_kernel` picks for ``mixing``, ``block`` and where q lives."""
    kernel = choose_kernel(mixing, block, length=q.shape[2], device=q.device)
    if kernel == "blocked":
        n_blocks = q.shape[2] // block
        return _blocked_mixing(q, key, senses.block_major(n_blocks), n_blocks)  # (B, T, d)
    values = senses.per_position()  # (B, T, k, d)
    if kernel == "sdpa":
        o = F.scaled_dot_product_attention(q, key, values.transpose(1, 2), is_causal=True)
        return o.sum(dim=1)  # (B, k, T, d) -> (B, T, d): sum over the k senses
    alpha = causal_alpha(q, key)  # (B, k, T, T)
    return torch.einsum("blij,bjld->bid", alpha, values)  # (B, T, d)


def choose_kernel(mixing: str, block: int, length: int, device: torch.device) -> str:
    """The kernel for ``mixing`` ("auto" or one of :data:`KERNELS`) at sequence ``length``."""
    blockable = length % block == 0 and length >= 2 * block
    if mixing == "auto":
        if device.type == "cuda":
            return "sdpa"
        return "blocked" if blockable else "einsum"
    if mixing == "blocked" and not length % block == 0:
        raise ValueError(f"blocked mixing needs a length divisible by mixing_block "
                         f"({block}); got {length}")
    if mixing not in KERNELS:
        raise ValueError(f"unknown mixing {mixing!r}: use auto, sdpa, einsum or blocked")
    return mixing


def causal_alpha(q: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Causal softmax of q.k / sqrt(d/k): (B, k, T, d/k) x 2 -> (B, k, T, T)."""
    T = q.shape[-2]
    scores = (q @ key.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # (B, k, T, T)
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)  # (T, T)
    return scores.masked_fill(future, float("-inf")).softmax(dim=-1)


def causal_mixing(q: torch.Tensor, k: torch.Tensor, senses: torch.Tensor,
                  n_blocks: int) -> torch.Tensor:
    """The blocked kernel on per-position senses: ``o_i = sum_l sum_{j <= i} alpha_l[i, j]
    senses_j,l``, computed by ``n_blocks`` blocks of query rows: block r only meets keys of
    blocks <= r, so (n + 1) / 2n of the full T x T work is done. q, k: (B, k, T, d/k);
    senses: (B, T, k, d); T divisible by ``n_blocks``. Returns (B, T, d). Exact (same result
    and gradients as the einsum kernel, checked in float64)."""
    B, T, n_senses, d = senses.shape
    # (B, T, k, d) -> (B, nb, k, bs, d) -> (B, T*k, d): block-major keys
    values = senses.view(B, n_blocks, T // n_blocks, n_senses, d).transpose(2, 3)
    return _blocked_mixing(q, k, values.reshape(B, T * n_senses, d), n_blocks)


@torch.compiler.disable
def _blocked_mixing(q, key, values, n_blocks: int) -> torch.Tensor:
    # Outside torch.compile graphs, like the chunked loss: traced, the writes into slices
    # of the preallocated alpha / outputs become whole-tensor copies and the step's peak
    # grows (measured by benchmarks/compile_memory.py); the kernel is bmm-bound anyway.
    return _CausalMixing.apply(q, key, values, n_blocks)


class _CausalMixing(torch.autograd.Function):
    # Keys are laid out block-major: key index (c, l, j) for key block c, sense l, position j
    # in the block. The keys visible to query block r are then a prefix (blocks 0..r) of
    # that axis, so each query block is one (rows x prefix) @ (prefix x d) matmul, and in
    # backward each key block's sense gradient is one matmul over the query rows that see
    # it. alpha is stored in the same layout, (B, T, n_blocks * k * block).

    @staticmethod
    def forward(ctx, q, key, values, n_blocks: int):
        # values: (B, T*k, d), block-major (see Senses.block_major)
        ctx.dtypes = (q.dtype, key.dtype, values.dtype)  # the gradients come back in these
        dtype = torch.promote_types(torch.promote_types(q.dtype, key.dtype), values.dtype)
        acc = torch.promote_types(dtype, torch.float32)
        B, k, T, dk = q.shape
        d, nb = values.shape[-1], n_blocks
        bs = T // nb
        with torch.autocast(q.device.type, enabled=False):
            q, key, keys_v = q.to(dtype), key.to(dtype), values.to(dtype)
            alpha = torch.empty(B, T, T * k, dtype=dtype, device=q.device)  # prefixes only
            o = torch.empty(B, T, d, dtype=dtype, device=q.device)
            future = torch.ones(bs, bs, dtype=torch.bool, device=q.device).triu_(1)
            for r in range(nb):
                rows, seen = slice(r * bs, (r + 1) * bs), (r + 1) * bs
                scores = q[:, :, rows] @ key[:, :, :seen].transpose(-1, -2)  # (B, k, bs, seen)
                scores[..., r * bs:].masked_fill_(future, float("-inf"))
                weights = torch.softmax(scores.mul_(1.0 / math.sqrt(dk)), dim=-1, dtype=acc)
                a = alpha[:, rows, : seen * k]  # (B, bs, seen*k), rows strided
                a.view(B, bs, r + 1, k, bs).copy_(
                    weights.view(B, k, bs, r + 1, bs).permute(0, 2, 3, 1, 4))
                o[:, rows] = torch.bmm(a, keys_v[:, : seen * k])  # (B, bs, d)
        ctx.save_for_backward(q, key, keys_v, alpha)
        ctx.nb = nb
        return o

    @staticmethod
    def backward(ctx, grad_o):
        q, key, keys_v, alpha = ctx.saved_tensors
        nb = ctx.nb
        B, k, T, dk = q.shape
        bs = T // nb
        scale = 1.0 / math.sqrt(dk)
        grad_o = grad_o.to(q.dtype).contiguous()  # (B, T, d)
        grad_v = torch.empty_like(keys_v)  # (B, T*k, d)
        for c in range(nb):  # key block c is seen by query rows c*bs..T-1
            cols = slice(c * k * bs, (c + 1) * k * bs)
            grad_v[:, cols] = torch.bmm(alpha[:, c * bs:, cols].transpose(1, 2),
                                        grad_o[:, c * bs:])
        grad_q = torch.empty_like(q)
        grad_k = torch.zeros_like(key)
        for r in range(nb):
            rows, seen = slice(r * bs, (r + 1) * bs), (r + 1) * bs
            grad_a = torch.bmm(grad_o[:, rows], keys_v[:, : seen * k].transpose(1, 2))
            grad_a = grad_a.view(B, bs, r + 1, k, bs)
            a = alpha[:, rows, : seen * k].view(B, bs, r + 1, k, bs)
            # softmax backward per (query, sense) row: a * (g - sum_j g a); masked a are 0
            grad_a.sub_((grad_a * a).sum(dim=(2, 4), keepdim=True)).mul_(a)
            grad_s = grad_a.permute(0, 3, 1, 2, 4).reshape(B, k, bs, seen).mul_(scale)
            grad_q[:, :, rows] = grad_s @ key[:, :, :seen]
            grad_k[:, :, :seen] += grad_s.transpose(-1, -2) @ q[:, :, rows]
        q_dtype, k_dtype, v_dtype = ctx.dtypes
        return grad_q.to(q_dtype), grad_k.to(k_dtype), grad_v.to(v_dtype), None
