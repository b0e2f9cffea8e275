"""The Backpack language model (Hewitt et al., ACL 2023), exactly as in the paper.

Each token type x has k sense vectors C(x)_1..C(x)_k that do not depend on context. A causal
Transformer over the sequence only decides how to *weight* them: k attention-like heads give
non-negative weights alpha_l[i, j] (j <= i, each row sums to 1), and

    o_i = sum_j sum_l alpha_l[i, j] C(x_j)_l,        logits_i = E o_i,

with the same E (V x d) that embeds the input. Nothing follows the sum (no LayerNorm, no
projection), so the log-probabilities stay linear in the senses: a sense can be read off as
``E C(x)_l`` and scaling its weight changes the output predictably.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from backpack_nb.models.base import LanguageModel
from backpack_nb.models.config import ModelConfig
from backpack_nb.models.init import init_backpack_
from backpack_nb.models.layers import MLP, CausalTransformer


class BackpackLM(LanguageModel):
    """Backpack LM. Submodules: ``wte`` (E), ``transformer`` (the contextualization network:
    positions, blocks, final LayerNorm), ``alpha_qk`` (Linear d -> 2d, with bias as in the
    paper: queries and keys of the k weight heads) and ``sense_network`` (the paper) or
    ``sense_table`` (a V x k*d lookup), per ``config.sense_source``."""

    # Performance switches, not part of the model's definition (same weights, same function,
    # same checkpoints); set them on an instance. backpack_nb.bench measures each one.
    dedup_senses: bool = True
    """Compute the senses once per distinct token of the batch (exact gradients)."""
    mixing: str = "auto"
    """How o = sum_j sum_l alpha_l[i, j] C(x_j)_l is computed: ``"sdpa"`` (one fused
    attention call with the senses as values; on CUDA its memory-efficient kernel never stores
    alpha), ``"einsum"`` (explicit alpha, one contraction over (sense, position): the plain
    reference), ``"blocked"`` (explicit alpha by blocks of ``mixing_block`` query rows, each
    one matmul over the keys it can see: skips the future half of the work; needs
    block_size divisible by ``mixing_block``), or ``"auto"``: sdpa on CUDA, blocked on
    other devices when the length allows, else einsum (the fastest measured on CPU)."""
    mixing_block: int = 64

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate_for("backpack")
        self.config = config
        d, k = config.n_embd, config.n_senses
        self.wte = nn.Embedding(config.vocab_size, d)  # E, also the head
        self.transformer = CausalTransformer(config)
        self.alpha_qk = nn.Linear(d, 2 * d, bias=True)
        if config.sense_source == "network":
            self.sense_network = SenseNetwork(config)
        else:
            self.sense_table = nn.Embedding(config.vocab_size, k * d)
        init_backpack_(self)

    def hidden_states(self, idx: torch.Tensor) -> torch.Tensor:
        """o (B, T, d): each position's weighted sum of the senses of the tokens up to it."""
        kernel = self._mixing_kernel(idx)
        if kernel == "blocked":
            # On CPU SDPA takes its math path for these widths (full T x T products and
            # several passes over alpha); this skips the masked half, and gathers the senses
            # straight into the layout it multiplies with (measured by backpack_nb.bench).
            n_blocks = idx.shape[1] // self.mixing_block
            values = self._block_major_senses(idx, n_blocks)  # (B, T*k, d)
            q, k = self._queries_keys(idx)  # 2 x (B, k, T, d/k)
            return _blocked_mixing(q, k, values, n_blocks)  # (B, T, d)
        senses = self.sense_vectors(idx)  # (B, T, k, d)
        q, k = self._queries_keys(idx)  # 2 x (B, k, T, d/k)
        if kernel == "sdpa":
            # Summing over j with weights alpha_l[i, j] is causal attention with the senses as
            # values (value width d, key width d/k). A fused kernel that allows the two widths
            # (CUDA's memory-efficient one) never stores alpha.
            o = F.scaled_dot_product_attention(q, k, senses.transpose(1, 2), is_causal=True)
            return o.sum(dim=1)  # (B, k, T, d) -> (B, T, d): sum over the k senses
        alpha = self._alpha(q, k)  # (B, k, T, T)
        return torch.einsum("blij,bjld->bid", alpha, senses)  # (B, T, d)

    # -- the two halves, also public for inspection -----------------------------------------

    def sense_vectors(self, idx: torch.Tensor) -> torch.Tensor:
        """C(x) for each input token: (B, T) -> (B, T, k, d)."""
        k, d = self.config.n_senses, self.config.n_embd
        if not self.dedup_senses:  # the plain path, kept as the reference for the lever
            return self._senses_of(idx.reshape(-1)).view(*idx.shape, k, d)
        # C depends only on the token, so compute it once per distinct token of the batch
        # and gather (a batch of 16k positions has a few thousand types). In training this
        # shares one dropout mask among a token's occurrences in the batch; at eval it is
        # exact. For the table it makes the (sparse) gradient U rows instead of B*T. (Under
        # torch.compile the data-dependent size U is a graph break; the sense network is
        # then compiled for a dynamic U.)
        types, where = self._distinct_tokens(idx)  # (U,), (B, T)
        per_type = self._senses_of(types)  # (U, k*d)
        return F.embedding(where, per_type).view(*idx.shape, k, d)  # (B, T, k, d)

    def contextualization(self, idx: torch.Tensor) -> torch.Tensor:
        """alpha (B, k, T, T): ``alpha[b, l, i, j]`` is the weight of sense l of token j in
        position i's output; non-negative, zero for j > i, each row sums to 1."""
        q, k = self._queries_keys(idx)  # 2 x (B, k, T, d/k)
        acc = torch.promote_types(q.dtype, torch.float32)
        return self._alpha(q.to(acc), k.to(acc))

    def sense_logits(self, token_ids: torch.Tensor) -> torch.Tensor:
        """``E C(x)_l`` for inspection: (n,) token ids -> (n, k, V). The largest entries are
        the words sense l of x promotes, the smallest those it suppresses. Call ``eval()``
        first (the sense network has dropout)."""
        senses = self.sense_vectors(token_ids.reshape(1, -1))[0]  # (n, k, d)
        return F.linear(senses, self.wte.weight)  # (n, k, V)

    def parameter_parts(self) -> dict[str, list[nn.Module]]:
        t = self.transformer
        senses = "sense_network" if self.config.sense_source == "network" else "sense_table"
        return {
            "embedding": [self.wte],
            "positions": [t.wpe],
            "blocks": [t.h, t.ln_f],
            "alpha_qk": [self.alpha_qk],
            senses: [getattr(self, senses)],
        }

    def _queries_keys(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T = idx.shape
        k = self.config.n_senses
        h = self.transformer(self.wte(idx))  # (B, T, d)
        qk = self.alpha_qk(h).view(B, T, 2, k, -1)  # (B, T, 2, k, d/k)
        q, key = qk.permute(2, 0, 3, 1, 4).unbind(0)  # 2 x (B, k, T, d/k)
        return q, key

    @staticmethod
    def _alpha(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Causal softmax of q.k / sqrt(d/k): (B, k, T, d/k) x 2 -> (B, k, T, T)."""
        T = q.shape[-2]
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # (B, k, T, T)
        future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)  # (T, T)
        return scores.masked_fill(future, float("-inf")).softmax(dim=-1)

    def _senses_of(self, tokens: torch.Tensor) -> torch.Tensor:
        """C(x) of token ids (n,) -> (n, k*d), from the table or the sense network."""
        if self.config.sense_source == "table":
            return self.sense_table(tokens)  # (n, k*d)
        return self.sense_network(self.wte(tokens))  # (n, d) -> (n, k*d)

    def _block_major_senses(self, idx: torch.Tensor, n_blocks: int) -> torch.Tensor:
        """The senses of the batch's positions in :func:`causal_mixing`'s key layout,
        (B, T*k, d) with row (c, l, j) = C(x at position c*bs + j)_l, gathered in one pass
        from the per-type senses (no (B, T, k, d) tensor and no permuted copy of it)."""
        B, T = idx.shape
        k, d = self.config.n_senses, self.config.n_embd
        if self.dedup_senses:
            types, where = self._distinct_tokens(idx)  # (U,), (B, T)
        else:
            types, where = idx.reshape(-1), torch.arange(idx.numel(), device=idx.device)
        per_type = self._senses_of(types).view(-1, d)  # (U*k, d): row u*k + l is C(u)_l
        sense = torch.arange(k, device=idx.device).view(1, 1, k, 1)
        rows = where.view(B, n_blocks, 1, T // n_blocks) * k + sense  # (B, nb, k, bs)
        return F.embedding(rows.view(B, T * k), per_type)  # (B, T*k, d)

    def _distinct_tokens(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's distinct token ids (U,) and where each position's id is in them
        (B, T). A method so that a shape-only trace (backpack_nb.bench memory) can supply U."""
        return torch.unique(idx, return_inverse=True)

    def _mixing_kernel(self, idx: torch.Tensor) -> str:
        T = idx.shape[1]
        blockable = T % self.mixing_block == 0 and T >= 2 * self.mixing_block
        if self.mixing == "auto":
            if idx.device.type == "cuda":
                return "sdpa"
            return "blocked" if blockable else "einsum"
        if self.mixing == "blocked" and not T % self.mixing_block == 0:
            raise ValueError(f"blocked mixing needs a length divisible by mixing_block "
                             f"({self.mixing_block}); got {T}")
        if self.mixing not in ("sdpa", "einsum", "blocked"):
            raise ValueError(f"unknown mixing {self.mixing!r}: use auto, sdpa, einsum or blocked")
        return self.mixing


def causal_mixing(q: torch.Tensor, k: torch.Tensor, senses: torch.Tensor,
                  n_blocks: int) -> torch.Tensor:
    """``o_i = sum_l sum_{j <= i} alpha_l[i, j] senses_j,l`` with alpha the causal softmax of
    q.k / sqrt(d/k), computed by ``n_blocks`` blocks of query rows: block r only meets keys
    of blocks <= r, so (n + 1) / 2n of the full T x T work is done. q, k: (B, k, T, d/k);
    senses: (B, T, k, d); T divisible by ``n_blocks``. Returns (B, T, d). Exact (same
    result and gradients as the einsum path, checked in float64)."""
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
        # values: (B, T*k, d), block-major (see causal_mixing)
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


class SenseNetwork(nn.Module):
    """C(x) from the shared embedding e = E[x] alone (no positions), as in the paper:

        r1 = e + LN_0(e);   r2 = r1 + FF_1(LN_1(r1));   C(x) = FF_2(LN_2(r2)),

    FF_1 = d -> 4d -> d and FF_2 = d -> 4d -> k*d. The raw embedding stays in the residual
    stream (a pre-norm block whose mixer is the identity, as the official code builds it)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d, k = config.n_embd, config.n_senses
        self.drop = nn.Dropout(config.dropout)
        self.ln_0 = nn.LayerNorm(d, bias=config.bias)
        self.ln_1 = nn.LayerNorm(d, bias=config.bias)
        self.ff_1 = MLP(d, 4 * d, d, config.bias, config.dropout)
        self.ln_2 = nn.LayerNorm(d, bias=config.bias)
        self.ff_2 = MLP(d, 4 * d, k * d, config.bias, config.dropout)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        e = self.drop(e)  # (n, d)
        r1 = e + self.drop(self.ln_0(e))
        r2 = r1 + self.ff_1(self.ln_1(r1))  # the MLP ends in dropout
        return self.ff_2(self.ln_2(r2))  # (n, k*d)
