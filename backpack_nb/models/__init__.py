"""The models: a Backpack language model and the Transformer baseline it is compared to.

The shape is :mod:`backpack_nb.model_config` (no torch). Read in this order: :mod:`.layers`
(shared blocks), :mod:`.gpt` and :mod:`.backpack` (the two models), :mod:`.mixing` (the
weighted sum of senses), :mod:`.base` (head, loss and counting they share),
:mod:`.generation` (cached decoding, sampling), :mod:`.intervention` (steering: sense
weights, edited senses and input rows), :mod:`.loss` (chunked linear cross-entropy),
:mod:`.init` (weights), :mod:`.flops` (useful FLOPs).
``python -m backpack_nb.models --config <name> --vocab-size N`` prints parameter counts.
"""

from __future__ import annotations

from backpack_nb.errors import UserError
from backpack_nb.models.backpack import BackpackLM, SenseNetwork
from backpack_nb.models.base import LanguageModel
from backpack_nb.model_config import MODEL_KEYS, MODEL_TYPES, ConfigError, ModelConfig
from backpack_nb.models.gpt import GPT
from backpack_nb.models.loss import LOSS_CHUNK_ROWS, linear_cross_entropy

_CLASSES = {"backpack": BackpackLM, "transformer": GPT}


def build_model(model_type: str, config: ModelConfig) -> LanguageModel:
    """A freshly initialised model of ``model_type`` ("backpack" or "transformer"). Build
    under ``with torch.device("meta"):`` to count parameters without allocating them."""
    if model_type not in _CLASSES:
        raise UserError(
            f"unknown model_type {model_type!r}: use one of {', '.join(MODEL_TYPES)}"
        )
    return _CLASSES[model_type](config)


__all__ = [
    "BackpackLM", "ConfigError", "GPT", "LOSS_CHUNK_ROWS", "LanguageModel", "MODEL_KEYS",
    "MODEL_TYPES", "ModelConfig", "SenseNetwork", "build_model", "linear_cross_entropy",
]
