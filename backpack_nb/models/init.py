"""Weight initialisation, in one place: the official GPT-2 / Backpack recipe.

Linear and embedding weights N(0, 0.02), biases 0, LayerNorm weight 1 and bias 0; every
output projection (``c_proj``: the second Linear of every MLP, the sense network's two
included, and every attention output) N(0, 0.02 / sqrt(2 * n_layer)), so the residual
stream does not grow with depth. With it a fresh model predicts nearly uniformly: its loss
starts at ln V (a default N(0, 1) embedding starts the Backpack far above it).
"""

from __future__ import annotations

import math

import torch.nn as nn

STD = 0.02


def init_gpt_(model: nn.Module) -> None:
    """Initialise a :class:`~backpack_nb.models.GPT` in place."""
    _gpt2_recipe_(model, model.config.n_layer)


def init_backpack_(model: nn.Module) -> None:
    """Initialise a :class:`~backpack_nb.models.BackpackLM` in place: the same recipe over
    the whole model. The sense table (if any) is an embedding, N(0, 0.02); the sense
    network's MLPs are scaled by the depth of the contextualization Transformer, as in the
    official code."""
    _gpt2_recipe_(model, model.config.n_layer)


def _gpt2_recipe_(model: nn.Module, n_layer: int) -> None:
    proj_std = STD / math.sqrt(2 * n_layer)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            std = proj_std if name.rsplit(".", 1)[-1] == "c_proj" else STD
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=STD)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
