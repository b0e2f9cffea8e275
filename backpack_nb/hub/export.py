"""Trained models out, in the layouts the field reads.

    python -m backpack_nb.hub export RUN/best.pt OUT_DIR

A Backpack becomes the released Backpack-GPT2 layout: ``config.json`` with the official fields,
``architectures`` and an ``auto_map`` that points at the official code on the Hub
(``stanfordnlp/backpack-gpt2--modeling_backpack_gpt2.BackpackGPT2LMHeadModel``: this project
ships no copy of it), and ``model.safetensors`` with the official names and orientations. A
Transformer becomes a plain ``GPT2LMHeadModel`` folder that ``transformers`` loads as it is.
Tied tensors are stored once (safetensors requires it) and a run trained without biases gets
zero biases, which compute the same. The run's tokenizer is a tiktoken encoding seen through a
compact vocabulary, which no Hugging Face tokenizer expresses: ``backpack_nb_tokenizer.json``
holds the encoding name and the compact map, and the folder's README says how to decode.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..models import ModelConfig, build_model
from ..paths import resolve_in_root
from ..tokenizer import Tokenizer
from .layout import candidates, is_conv1d

TOKENIZER_FILE = "backpack_nb_tokenizer.json"
OFFICIAL_CODE = "stanfordnlp/backpack-gpt2"


def check_out_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """The folder to export into: new, empty, or replaced with ``overwrite``."""
    out = resolve_in_root(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder; choose another OUT_DIR")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out} is not empty; choose an empty or new OUT_DIR, or pass --overwrite "
                        "to replace it")
    return out


def export(model: torch.nn.Module, tok: Tokenizer, state: dict[str, Any],
           out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write a run's model (``checkpoint.load_model``'s model, tokenizer and checkpoint dict)
    as a Hugging Face folder ``out_dir``, atomically (a temporary folder renamed at the end)."""
    out = check_out_dir(out_dir, overwrite)
    model_type = state["model_type"]
    config = hf_config(model_type, model.config, tok)
    weights = hf_weights(model)
    # optional (the `hf` extra): only exporting needs safetensors
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.export-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        save_file(weights, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / TOKENIZER_FILE).write_text(json.dumps(tok.state_dict()) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(_readme(model_type, state, tok), encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def hf_config(model_type: str, config: ModelConfig, tok: Tokenizer) -> dict[str, Any]:
    """config.json: GPT-2's fields, and for a Backpack the official Backpack-GPT2 ones."""
    values: dict[str, Any] = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "activation_function": "gelu_new", "vocab_size": config.vocab_size,
        "n_positions": config.block_size, "n_embd": config.n_embd, "n_layer": config.n_layer,
        "n_head": config.n_head, "n_inner": None, "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout, "attn_pdrop": config.dropout, "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02, "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": config.scale_attn_by_inverse_layer_idx,
        "reorder_and_upcast_attn": False, "tie_word_embeddings": True, "use_cache": True,
        "bos_token_id": tok.eot_id, "eos_token_id": tok.eot_id, "pad_token_id": None,
    }
    if model_type == "backpack":
        values.update({
            "architectures": ["BackpackGPT2LMHeadModel"],
            "auto_map": {
                "AutoConfig": f"{OFFICIAL_CODE}--configuration_backpack_gpt2.BackpackGPT2Config",
                "AutoModelForCausalLM":
                    f"{OFFICIAL_CODE}--modeling_backpack_gpt2.BackpackGPT2LMHeadModel"},
            "num_senses": config.n_senses, "sense_intermediate_scale": 4,
        })
    return values


def hf_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under their canonical Hugging Face names, Conv1D weights as
    (in, out), zero biases where the model has none."""
    if getattr(model.config, "sense_source", "network") == "table" and hasattr(model, "sense_table"):
        raise UserError("a Backpack with a sense table (sense_source: table) has no "
                        "Backpack-GPT2 layout: only the paper's sense network exports")
    # The layout of the same shape with biases: what the file must hold.
    with torch.device("meta"):
        full = build_model(_model_type(model), dataclasses.replace(model.config, bias=True))
    have = model.state_dict()
    out = {}
    for target, like in full.state_dict().items():
        tensor = have.get(target)
        if tensor is None:  # a bias the run was trained without: zero computes the same
            tensor = torch.zeros(like.shape, dtype=have["wte.weight"].dtype)
        name = candidates(full, target)[0]
        out[name] = (tensor.t() if is_conv1d(name) else tensor).detach().cpu().contiguous()
    return out


def _model_type(model: torch.nn.Module) -> str:
    return "backpack" if model.__class__.__name__ == "BackpackLM" else "transformer"


def _readme(model_type: str, state: dict, tok: Tokenizer) -> str:
    kind = ("a Backpack language model in the Backpack-GPT2 layout (load it with transformers' "
            f"trust_remote_code, which fetches the official code from {OFFICIAL_CODE}, or with "
            "backpack_nb.hub.load_pretrained)" if model_type == "backpack" else
            "a GPT-2-style Transformer (transformers.AutoModelForCausalLM.from_pretrained loads it)")
    return f"""# {state.get('config', {}).get('run_name', 'a backpack-nb run')}

Exported by backpack-nb from a run at iteration {state.get('iter_num', '?')}: {kind}.

## Tokens

The model reads ids of a *compact vocabulary*: the tiktoken encoding `{tok.encoding_name}`
restricted to the {tok.vocab_size:,} tokens its training data used (plus the 256 single bytes
and the special tokens), renumbered in order. `{TOKENIZER_FILE}` holds the encoding name and
`base_ids`, the tiktoken id of each model id. To decode model ids:

```python
import json, tiktoken
t = json.load(open("{TOKENIZER_FILE}"))
enc = tiktoken.get_encoding(t["encoding"].split(":")[0])
text = enc.decode([t["base_ids"][i] for i in model_ids])
```

and to encode, map each tiktoken id to its index in `base_ids` (a token outside it is spelled
out as its bytes, each a single-byte token), or use `backpack_nb.tokenizer.Tokenizer`.
"""
