"""The two Hugging Face layouts this project reads and writes, as name rules: the released
Backpack-GPT2's (``BackpackGPT2LMHeadModel``) and GPT-2's (``GPT2LMHeadModel``). For each of
our parameters, the names the file stores it under (tied aliases, canonical name first), and
which of those are GPT-2 ``Conv1D`` weights, stored (in, out) instead of ``nn.Linear``'s
(out, in)."""

from __future__ import annotations

import re

import torch

ARCHITECTURES = {"BackpackGPT2LMHeadModel": "backpack", "GPT2LMHeadModel": "transformer"}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
TOKENIZER_FILES = ("vocab.json", "merges.txt")
# What an export of this project writes: the tokenizer file marks a folder as one (a
# downloaded model has config.json and weights too, never this file).
TOKENIZER_FILE = "backpack_nb_tokenizer.json"
EXPORT_FILES = ("config.json", "model.safetensors", TOKENIZER_FILE, "README.md")
# Causal-mask buffers older transformers versions wrote into GPT-2 state dicts.
_IGNORED = re.compile(r"(^|\.)attn\.(bias|masked_bias)$")
# GPT-2's Conv1D layers (weights stored (in, out)); the Backpack's sense_weight_net.c_attn is
# an nn.Linear, stored (out, in) like ours.
_CONV1D = re.compile(r"(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj|final_mlp\.c_fc|final_mlp\.c_proj)\.weight$")

# Our parameter name -> the names the file may store it under (aliases of one tensor).
_BACKPACK_NAMES = [
    (r"wte\.weight", ["backpack.word_embeddings.weight", "backpack.gpt2_model.wte.weight",
                      "lm_head.weight"]),
    (r"transformer\.wpe\.weight", ["backpack.position_embeddings.weight",
                                   "backpack.gpt2_model.wpe.weight"]),
    (r"transformer\.(.+)", [r"backpack.gpt2_model.\1"]),
    (r"alpha_qk\.(.+)", [r"backpack.sense_weight_net.c_attn.\1"]),
    (r"sense_network\.ln_0\.(.+)", [r"backpack.sense_network.ln.\1"]),
    (r"sense_network\.ln_([12])\.(.+)", [r"backpack.sense_network.block.ln_\1.\2"]),
    (r"sense_network\.ff_1\.(.+)", [r"backpack.sense_network.block.mlp.\1"]),
    (r"sense_network\.ff_2\.(.+)", [r"backpack.sense_network.final_mlp.\1"]),
]
_GPT2_NAMES = [
    (r"wte\.weight", ["transformer.wte.weight", "lm_head.weight"]),
    (r"transformer\.(.+)", [r"transformer.\1"]),
]


def candidates(model: torch.nn.Module, target: str, *, bare: bool = False) -> list[str]:
    """The names a file in ``model``'s Hugging Face layout may store parameter ``target``
    under, canonical first; ``bare``: GPT-2's own files (hf:gpt2), which store the bare
    GPT2Model (``h.0...``, ``wte.weight``). Empty when no rule names it (a bug)."""
    rules = _BACKPACK_NAMES if model.__class__.__name__ == "BackpackLM" else _GPT2_NAMES
    for pattern, names in rules:
        m = re.fullmatch(pattern, target)
        if m:
            found = [m.expand(c) for c in names]
            return [re.sub(r"^transformer\.", "", f) for f in found] if bare else found
    return []


def is_conv1d(name: str) -> bool:
    """Whether the file stores ``name`` as a Conv1D weight (in, out)."""
    return bool(_CONV1D.search(name))


def is_ignored(name: str) -> bool:
    """The causal-mask buffers older transformers versions wrote (not weights)."""
    return bool(_IGNORED.search(name))
