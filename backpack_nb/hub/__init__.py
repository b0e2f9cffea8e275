"""Hugging Face interop: the released Backpack (``stanfordnlp/backpack-gpt2``) and GPT-2 in
(:mod:`.load`), trained runs out in the layouts the field reads (:mod:`.export`), written
whole or not at all and over nothing but an earlier export (:mod:`.replace`), and the name
rules of those layouts (:mod:`.layout`). ``python -m backpack_nb.hub export`` writes a run
out."""

from .export import export, hf_config, hf_weights
from ..model_source import HF_PREFIX, is_pretrained
from .layout import ARCHITECTURES, EXPORT_FILES, TOKENIZER_FILE
from .load import (exported_tokenizer, load_pretrained, model_config,
                   pretrained_tokenizer, read_config, read_weights, snapshot_folder,
                   weight_sources)
from .replace import check_out_dir

__all__ = ["ARCHITECTURES", "EXPORT_FILES", "HF_PREFIX", "TOKENIZER_FILE", "check_out_dir",
           "export", "exported_tokenizer", "hf_config", "hf_weights", "is_pretrained",
           "load_pretrained", "model_config", "pretrained_tokenizer", "read_config",
           "read_weights", "snapshot_folder", "weight_sources"]
