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
        senses = self.sense_vectors(idx).transpose(1, 2)  # (B, T, k, d) -> (B, k, T, d)
        q, k = self._queries_keys(idx)  # 2 x (B, k, T, d/k)
        # Summing over j with weights alpha_l[i, j] is causal attention with the senses as
        # values (value width d, key width d/k). A fused kernel that allows the two widths
        # (CUDA's memory-efficient one) never stores alpha; on CPU SDPA takes its math path,
        # as fast as an explicit softmax-and-bmm (measured).
        o = F.scaled_dot_product_attention(q, k, senses, is_causal=True)  # (B, k, T, d)
        return o.sum(dim=1)  # (B, T, d): sum over the k senses

    # -- the two halves, also public for inspection -----------------------------------------

    def sense_vectors(self, idx: torch.Tensor) -> torch.Tensor:
        """C(x) for each input token: (B, T) -> (B, T, k, d)."""
        k, d = self.config.n_senses, self.config.n_embd
        if self.config.sense_source == "table":
            return self.sense_table(idx).view(*idx.shape, k, d)  # (B, T, k*d) -> (B, T, k, d)
        # C depends only on the token, so run the sense network once per distinct token of
        # the batch and gather (a batch of 16k positions has a few thousand types). In
        # training this shares one dropout mask among a token's occurrences in the batch;
        # at eval it is exact. (Under torch.compile the data-dependent size U is a graph
        # break; the sense network is then compiled for a dynamic U.)
        types, where = torch.unique(idx, return_inverse=True)  # (U,), (B, T)
        per_type = self.sense_network(self.wte(types))  # (U, k*d)
        return F.embedding(where, per_type).view(*idx.shape, k, d)  # (B, T, k, d)

    def contextualization(self, idx: torch.Tensor) -> torch.Tensor:
        """alpha (B, k, T, T): ``alpha[b, l, i, j]`` is the weight of sense l of token j in
        position i's output; non-negative, zero for j > i, each row sums to 1."""
        q, k = self._queries_keys(idx)  # 2 x (B, k, T, d/k)
        T = idx.shape[1]
        acc = torch.promote_types(q.dtype, torch.float32)
        scores = (q.to(acc) @ k.to(acc).transpose(-1, -2)) / math.sqrt(q.shape[-1])  # (B,k,T,T)
        future = torch.ones(T, T, dtype=torch.bool, device=idx.device).triu(1)  # (T, T)
        return scores.masked_fill(future, float("-inf")).softmax(dim=-1)

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
