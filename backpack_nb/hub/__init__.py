"""Hugging Face interop: the released Backpack (``stanfordnlp/backpack-gpt2``) and GPT-2 in
(:mod:`.load`), trained runs out in the layouts the field reads (:mod:`.export`), and the
name rules of those layouts (:mod:`.layout`). ``python -m backpack_nb.hub export`` writes a
run out."""

from .export import export, hf_config, hf_weights
from .layout import ARCHITECTURES, HF_PREFIX
from .load import (is_pretrained, load_pretrained, model_config, pretrained_tokenizer,
                   read_config, read_weights, snapshot_folder, weight_sources)

__all__ = ["ARCHITECTURES", "HF_PREFIX", "export", "hf_config", "hf_weights", "is_pretrained",
           "load_pretrained", "model_config", "pretrained_tokenizer", "read_config",
           "read_weights", "snapshot_folder", "weight_sources"]
