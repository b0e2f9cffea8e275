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
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..models import ModelConfig, build_model
from ..tokenizer import Tokenizer
from .layout import TOKENIZER_FILE, candidates, is_conv1d
from .replace import check_out_dir, write_folder

OFFICIAL_CODE = "stanfordnlp/backpack-gpt2"


def export(model: torch.nn.Module, tok: Tokenizer, state: dict[str, Any],
           out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write a run's model (``loading.load_model``'s model, tokenizer and checkpoint dict)
    as a Hugging Face folder ``out_dir``, whole or not at all. ``out_dir`` must be new or
    empty or, with ``overwrite``, hold nothing but an earlier export
    (:func:`~.replace.check_out_dir`)."""
    check_out_dir(out_dir, overwrite)  # before the work of converting the weights
    model_type = state["model_type"]
    config = hf_config(model_type, model.config, tok)
    weights = hf_weights(model)
    # optional (the `hf` extra): only exporting needs safetensors
    from safetensors.torch import save

    files = {
        "config.json": (json.dumps(config, indent=2) + "\n").encode("utf-8"),
        "model.safetensors": save(weights, metadata={"format": "pt"}),
        TOKENIZER_FILE: (json.dumps(tok.state_dict()) + "\n").encode("utf-8"),
        "README.md": _readme(model_type, state, tok).encode("utf-8"),
    }
    return write_folder(out_dir, files, overwrite=overwrite)


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
    broken = [k for k, t in have.items() if t.is_floating_point() and not bool(t.isfinite().all())]
    if broken:
        more = f" and {len(broken) - 3} more" if len(broken) > 3 else ""
        raise UserError(f"the model has non-finite weights (NaN or inf) in {', '.join(broken[:3])}"
                        f"{more}; nothing was exported: export a checkpoint from before they "
                        "appeared (the run's best.pt or ckpt.prev.pt)")
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
