"""The Transformer baseline: a standard GPT (pre-LN, GELU MLP 4d, causal attention, head
tied to the token embedding), with the same shape settings as the Backpack it is compared to.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from backpack_nb.models.base import LanguageModel
from backpack_nb.model_config import ModelConfig
from backpack_nb.models.generation import Intervention, TransformerDecoder
from backpack_nb.models.init import init_gpt_
from backpack_nb.models.layers import CausalTransformer
from backpack_nb.models.mixing import Distinct


class GPT(LanguageModel):
    """``logits_i = E h_i`` with h the causal Transformer's output over ``E x + positions``.
    ``config.n_senses`` and ``config.sense_source`` are ignored."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate_for("transformer")
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # E, also the head
        self.transformer = CausalTransformer(config)
        init_gpt_(self)

    def hidden_states(self, idx: torch.Tensor, distinct: Distinct | None = None) -> torch.Tensor:
        return self.transformer(self.wte(idx))  # (B, T) -> (B, T, d); no senses to share

    def parameter_parts(self) -> dict[str, list[nn.Module]]:
        t = self.transformer
        return {"embedding": [self.wte], "positions": [t.wpe], "blocks": [t.h, t.ln_f]}

    def decoder(self, intervention: Intervention | None = None) -> TransformerDecoder:
        """Generation's cached decoder (:mod:`backpack_nb.models.generation`); ``intervention``
        is refused (a Transformer has no senses)."""
        return TransformerDecoder(self, intervention)
