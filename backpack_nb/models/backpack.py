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

import torch
import torch.nn as nn
import torch.nn.functional as F

from backpack_nb.models.base import LanguageModel
from backpack_nb.model_config import ModelConfig
from backpack_nb.models.generation import BackpackDecoder, Intervention
from backpack_nb.models.init import init_backpack_
from backpack_nb.models.layers import MLP, CausalTransformer
from backpack_nb.models.mixing import (Distinct, Senses, causal_alpha, distinct_tokens,
                                       weighted_sum_of_senses)


class BackpackLM(LanguageModel):
    """Backpack LM. Submodules: ``wte`` (E), ``transformer`` (the contextualization network:
    positions, blocks, final LayerNorm), ``alpha_qk`` (Linear d -> 2d, with bias as in the
    paper: queries and keys of the k weight heads) and ``sense_network`` (the paper) or
    ``sense_table`` (a V x k*d lookup), per ``config.sense_source``."""

    # Performance switches, not part of the model's definition (same weights, same function,
    # same checkpoints); set them on an instance. `python -m benchmarks.speed` measures each.
    dedup_senses: bool = True
    """Compute the senses once per distinct token of the batch (exact gradients)."""
    mixing: str = "sdpa"
    """How o = sum_j sum_l alpha_l[i, j] C(x_j)_l is computed: ``"sdpa"`` (one
    ``scaled_dot_product_attention`` call) or ``"einsum"`` (the plain reference);
    :mod:`backpack_nb.models.mixing` describes both."""

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

    def hidden_states(self, idx: torch.Tensor, distinct: Distinct | None = None) -> torch.Tensor:
        """o (B, T, d): each position's weighted sum of the senses of the tokens up to it,
        ``o_i = sum_j sum_l alpha_l[i, j] C(x_j)_l``. Nothing follows the sum: the logits are
        E o (:meth:`LanguageModel.forward`). ``distinct``: the batch's distinct tokens and
        where each position's is, computed ahead
        (:func:`distinct_tokens`), else here."""
        senses = self._senses(idx, distinct)  # C(x): (B, T, k, d), once per token type
        q, k = self._queries_keys(idx)  # 2 x (B, k, T, d/k): alpha = causal softmax(q.k)
        o = weighted_sum_of_senses(q, k, senses, self.mixing)  # (B, T, d)
        return o

    # -- the two halves, also public for inspection -----------------------------------------

    def sense_vectors(self, idx: torch.Tensor) -> torch.Tensor:
        """C(x) for each input token: (B, T) -> (B, T, k, d)."""
        return self._senses(idx).per_position()

    def contextualization(self, idx: torch.Tensor) -> torch.Tensor:
        """alpha (B, k, T, T): ``alpha[b, l, i, j]`` is the weight of sense l of token j in
        position i's output; non-negative, zero for j > i, each row sums to 1."""
        q, k = self._queries_keys(idx)  # 2 x (B, k, T, d/k)
        acc = torch.promote_types(q.dtype, torch.float32)
        return causal_alpha(q.to(acc), k.to(acc))

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

    def _senses(self, idx: torch.Tensor, distinct: Distinct | None = None) -> Senses:
        """C(x) of the batch's tokens (B, T), computed by type unless ``dedup_senses`` is off."""
        shape = (*idx.shape, self.config.n_senses, self.config.n_embd)  # (B, T, k, d)
        if not self.dedup_senses:  # the plain path, kept as the reference for the lever
            return Senses(self.senses_of_tokens(idx.reshape(-1)), None, shape)  # (B*T, k*d)
        # C depends only on the token, so compute it once per distinct token of the batch
        # and gather (a batch of 16k positions has a few thousand types). In training this
        # shares one dropout mask among a token's occurrences in the batch; at eval it is
        # exact. For the table it makes the (sparse) gradient U rows instead of B*T. (Under
        # torch.compile the data-dependent size U is a graph break; the sense network is
        # then compiled for a dynamic U. A `distinct` computed ahead on the host avoids both:
        # no sync, and padded to a few sizes; its padding rows are never gathered.)
        types, where = distinct if distinct is not None else self._distinct_tokens(idx)
        return Senses(self.senses_of_tokens(types), where, shape)  # (U, k*d)

    def senses_of_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """C(x) of token ids (n,) -> (n, k*d), from the table or the sense network."""
        if self.config.sense_source == "table":
            return self.sense_table(tokens)  # (n, k*d)
        return self.sense_network(self.wte(tokens))  # (n, d) -> (n, k*d)

    def _distinct_tokens(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's distinct token ids (U,) and where each position's id is in them
        (B, T). A method so that a shape-only memory trace (benchmarks.memory) can supply U."""
        return distinct_tokens(idx, bucket=False)

    def alpha_heads(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries and keys of the k weight heads from the contextualization network's output
        h (B, T, d) -> 2 x (B, k, T, d/k)."""
        B, T = h.shape[:2]
        qk = self.alpha_qk(h).view(B, T, 2, self.config.n_senses, -1)  # (B, T, 2, k, d/k)
        q, key = qk.permute(2, 0, 3, 1, 4).unbind(0)  # 2 x (B, k, T, d/k)
        return q, key

    def decoder(self, intervention: Intervention | None = None) -> BackpackDecoder:
        """Generation's cached decoder (:mod:`backpack_nb.models.generation`)."""
        return BackpackDecoder(self, intervention)

    def _queries_keys(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.alpha_heads(self.transformer(self.wte(idx)))  # (B, T) -> 2 x (B, k, T, d/k)


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
