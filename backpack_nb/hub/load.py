"""Hugging Face models in: the released Backpack (``stanfordnlp/backpack-gpt2``) and GPT-2.

    model, tok, info = load_pretrained("hf:stanfordnlp/backpack-gpt2")   # from the Hub (cached)
    model, tok, info = load_pretrained("path/to/snapshot")              # a downloaded folder

A Hub id is always written with the ``hf:`` prefix, so it is never mistaken for a relative
path; a folder holding ``config.json`` is a pretrained folder (a folder holding ``ckpt.pt`` or
``best.pt`` is a run, read by :func:`backpack_nb.loading.load_model`). ``architectures``
decides what is built: ``BackpackGPT2LMHeadModel`` -> :class:`~backpack_nb.models.BackpackLM`,
``GPT2LMHeadModel`` -> :class:`~backpack_nb.models.GPT`, with GPT-2's shape (biases
everywhere, the tanh GELU, ``scale_attn_by_inverse_layer_idx`` as the config says).

The weights load without running pickled code (safetensors, or ``torch.load`` with
``weights_only=True``). The files store tied tensors under several names (the released
Backpack: ``backpack.word_embeddings.weight``, ``backpack.gpt2_model.wte.weight`` and
``lm_head.weight``): aliases are accepted when equal and are an error when not, and every
distinct tensor of the file is used exactly once. GPT-2's ``Conv1D`` layers store weights as
(in, out) and are transposed into ``nn.Linear``'s (out, in).

A folder this project exported (:mod:`.export`) keeps the run's own tokenizer, a compact
vocabulary of a tiktoken encoding, in ``backpack_nb_tokenizer.json``; it is read from there,
never replaced by GPT-2's BPE.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from ..errors import UserError
from ..model_source import HF_PREFIX
from ..models import ModelConfig, build_model
from ..paths import resolve_in_root
from ..tokenizer import Tokenizer, get_encoding
from .layout import (ARCHITECTURES, TOKENIZER_FILE, TOKENIZER_FILES, WEIGHT_FILES,
                     candidates, is_conv1d, is_ignored)


def load_pretrained(name_or_path: str | os.PathLike, device: str | torch.device = "cpu", *,
                    tokenizer: bool = True, encoding: str | None = None,
                    ) -> tuple[torch.nn.Module, Tokenizer | None, dict[str, Any]]:
    """The project's model (eval mode, on ``device``), a tokenizer and a description of a
    Hugging Face model: ``hf:<repo id>`` (downloaded once into the Hub cache) or a folder with
    config.json and model.safetensors or pytorch_model.bin. A folder this project exported
    reads with the run's own tokenizer (its ``backpack_nb_tokenizer.json``); any other model
    with GPT-2's BPE over its full vocabulary: ``encoding`` (``gpt2:/path/gpt2.tiktoken``)
    when given, else the folder's vocab.json + merges.txt, else tiktoken's ``gpt2``
    (downloaded where there is network). ``tokenizer=False`` skips it (None)."""
    folder = snapshot_folder(name_or_path)
    model_type, model = build_pretrained(folder)
    model.to(device).eval()
    config = model.config
    tok = pretrained_tokenizer(folder, config.vocab_size, encoding) if tokenizer else None
    info = {"model_type": model_type, "model_config": config.to_dict(),
            "source": str(name_or_path), "folder": str(folder), "hf_config": read_config(folder)}
    return model, tok, info


def build_pretrained(folder: Path, *, dropout: float | None = None,
                     ) -> tuple[str, torch.nn.Module]:
    """The model type and the project's model (on the CPU, train mode) of a snapshot folder,
    holding its weights; ``dropout``, when given, replaces the config's (a fine-tune's own
    choice: dropout changes no weight)."""
    model_type, config = model_config(read_config(folder), folder)
    if dropout is not None:
        config = dataclasses.replace(config, dropout=dropout)
    model = build_model(model_type, config)
    model.load_state_dict(convert_weights(read_weights(folder), model, folder))
    return model_type, model


# --- where the files are -------------------------------------------------------------------------


def snapshot_folder(name_or_path: str | os.PathLike) -> Path:
    """The local folder of ``hf:<repo id>`` (the Hub cache, downloading what is missing) or
    of a path (from the project root)."""
    spec = str(name_or_path)
    if spec.startswith(HF_PREFIX):
        return _download(spec[len(HF_PREFIX):])
    folder = resolve_in_root(spec)
    if not folder.is_dir():
        raise UserError(f"{spec}: no such folder; give a folder holding a Hugging Face model's "
                        "config.json, or hf:<repo id> for the Hub")
    if not (folder / "config.json").is_file():
        runs = [n for n in ("ckpt.pt", "best.pt") if (folder / n).is_file()]
        hint = (f"it is a run folder: pass {folder / runs[-1]}" if runs else
                "a pretrained folder holds config.json and model.safetensors or "
                "pytorch_model.bin")
        raise UserError(f"{folder} has no config.json; {hint}")
    return folder


def _download(repo_id: str) -> Path:
    try:
        # optional (the `hf` extra): only a Hub id needs it
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UserError(f"hf:{repo_id} needs the huggingface_hub package (pip install -e "
                        "'.[hf]'); or download the model elsewhere and pass its folder") from None
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", repo_id):
        raise UserError(f"hf:{repo_id} is not a Hub repo id (owner/name)")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=["config.json", *WEIGHT_FILES,
                                                               *TOKENIZER_FILES]))
    except Exception as exc:  # offline, unknown repo, gated, no network: all say the same
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(
            f"could not get hf:{repo_id} from the Hugging Face Hub or its cache ({first}). "
            f"Without network, download it where there is (`hf download {repo_id} --local-dir "
            "DIR`) and pass DIR instead of the hf: id") from None


# --- config ----------------------------------------------------------------------------------------


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} is not readable JSON ({exc})") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} is not a JSON object")
    return config


def model_config(hf: Mapping[str, Any], folder: Path) -> tuple[str, ModelConfig]:
    """The model type and ModelConfig of a Hugging Face config.json; what this project's
    models cannot express is refused by name."""
    where = folder / "config.json"
    archs = hf.get("architectures") or []
    known = [a for a in archs if a in ARCHITECTURES]
    if not known:
        raise UserError(f"{where}: architectures {archs} is none of {', '.join(ARCHITECTURES)}; "
                        "this project reads the Backpack-GPT2 and GPT-2 language models")
    model_type = ARCHITECTURES[known[0]]
    d = hf.get("n_embd")
    problems = []
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        problems.append(f"activation_function {hf['activation_function']!r} (only the tanh "
                        "GELU, gelu_new)")
    if hf.get("n_inner") not in (None, 4 * d if isinstance(d, int) else None):
        problems.append(f"n_inner {hf['n_inner']} (the MLPs here are 4 x n_embd wide)")
    if hf.get("add_cross_attention"):
        problems.append("add_cross_attention (no encoder here)")
    if not hf.get("scale_attn_weights", True):
        problems.append("scale_attn_weights false")
    if hf.get("layer_norm_epsilon", 1e-5) != 1e-5:
        problems.append(f"layer_norm_epsilon {hf['layer_norm_epsilon']} (1e-5 here)")
    if not hf.get("tie_word_embeddings", True):
        problems.append("tie_word_embeddings false (the head is the embedding here)")
    if model_type == "backpack" and hf.get("sense_intermediate_scale", 4) != 4:
        problems.append(f"sense_intermediate_scale {hf['sense_intermediate_scale']} (4 here)")
    if problems:
        raise UserError(f"{where}: this project's models cannot express "
                        + "; ".join(problems))
    values = {"vocab_size": hf.get("vocab_size"), "block_size": hf.get("n_positions"),
              "n_layer": hf.get("n_layer"), "n_head": hf.get("n_head"), "n_embd": d,
              "n_senses": hf.get("num_senses", 1) if model_type == "backpack" else 1,
              "dropout": float(hf.get("resid_pdrop", 0.1)), "bias": True,
              "scale_attn_by_inverse_layer_idx": bool(hf.get("scale_attn_by_inverse_layer_idx",
                                                             False))}
    try:
        return model_type, ModelConfig(**values)
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None


# --- weights -------------------------------------------------------------------------------------


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of model.safetensors, else pytorch_model.bin (never unpickling code)."""
    safetensors, pickled = (folder / n for n in WEIGHT_FILES)
    if safetensors.is_file():
        try:
            # optional (the `hf` extra): only .safetensors files need it
            from safetensors.torch import load_file
        except ImportError:
            raise UserError(f"{safetensors} needs the safetensors package (pip install -e "
                            "'.[hf]')") from None
        try:
            return load_file(safetensors)
        except Exception as exc:  # a truncated or foreign file
            raise UserError(f"{safetensors} is not a readable safetensors file ({exc})") from None
    if not pickled.is_file():
        raise UserError(f"{folder} has config.json but no weights ({' or '.join(WEIGHT_FILES)})")
    try:
        state = torch.load(pickled, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"{pickled} holds pickled objects that are not tensors; refused to load "
                        "it, since unpickling it could run code (a plain state dict is needed)") from None
    except Exception as exc:
        raise UserError(f"{pickled} is unreadable ({type(exc).__name__}); it may be truncated") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{pickled} is not a plain state dict (name -> tensor)")
    return state


def weight_sources(model: torch.nn.Module, names: set[str]) -> dict[str, list[str]]:
    """For each of ``model``'s parameters, the names in the file that hold it (its aliases,
    canonical first; only those present, or ``[name, "<missing>"]``)."""
    # GPT-2's own files (hf:gpt2) store the bare GPT2Model: h.0..., wte.weight
    bare = not any(n.startswith(("transformer.", "backpack.")) for n in names)
    out = {}
    for target in model.state_dict():
        found = candidates(model, target, bare=bare) or [f"<no rule for {target}>"]
        out[target] = [f for f in found if f in names] or [found[0], "<missing>"]
    return out


def convert_weights(weights: Mapping[str, torch.Tensor], model: torch.nn.Module,
                    folder: Path) -> dict[str, torch.Tensor]:
    """``model``'s state dict from a Hugging Face state dict: aliases checked equal, Conv1D
    weights transposed, shapes checked; a missing or unexpected key (but the old causal-mask
    buffers) is one error listing them."""
    sources = weight_sources(model, set(weights))
    expected = model.state_dict()
    state, problems, used = {}, [], set()
    for target, names in sources.items():
        if names[-1] == "<missing>":
            problems.append(f"missing {names[0]}")
            continue
        first = weights[names[0]]
        unequal = [n for n in names[1:] if not torch.equal(weights[n], first)]
        if unequal:
            problems.append(f"{', '.join(unequal)} should be the same tensor as {names[0]} "
                            "(tied) but differ")
        used.update(names)
        tensor = first.t() if is_conv1d(names[0]) else first
        if tuple(tensor.shape) != tuple(expected[target].shape):
            problems.append(f"{names[0]} has shape {tuple(first.shape)}, the config needs "
                            f"{tuple(expected[target].shape)}")
        state[target] = tensor.to(expected[target].dtype).contiguous()
    unexpected = sorted(n for n in weights if n not in used and not is_ignored(n))
    problems += [f"unexpected {n}" for n in unexpected]
    if problems:
        more = f" and {len(problems) - 6} more" if len(problems) > 6 else ""
        raise UserError(f"the weights in {folder} do not fit its config.json: "
                        f"{'; '.join(problems[:6])}{more}")
    return state


# --- tokenizer -----------------------------------------------------------------------------------


def pretrained_tokenizer(folder: Path, vocab_size: int, encoding: str | None = None) -> Tokenizer:
    """The tokenizer of a pretrained folder. A folder this project exported holds its own
    (``backpack_nb_tokenizer.json``: the run's encoding and compact vocabulary); any other
    reads GPT-2's BPE over its full vocabulary (ids are the encoding's own): ``encoding`` when
    given, else the folder's vocab.json + merges.txt, else tiktoken's ``gpt2``."""
    if encoding is None and (folder / TOKENIZER_FILE).is_file():
        return exported_tokenizer(folder, vocab_size)
    if encoding is None:
        has_files = all((folder / f).is_file() for f in TOKENIZER_FILES)
        encoding = f"gpt2:{folder}" if has_files else "gpt2"
    try:
        enc = get_encoding(encoding)
    except UserError as exc:
        if encoding != "gpt2":
            raise
        # get_encoding's hint names a flag; say what works for every command instead
        cause = exc.__cause__ or exc
        raise UserError(
            f"{folder} holds no tokenizer ({' and '.join(TOKENIZER_FILES)}, or {TOKENIZER_FILE}) "
            f"and tiktoken's gpt2 could not be downloaded ({type(cause).__name__}); copy GPT-2's "
            f"{' and '.join(TOKENIZER_FILES)} (a Hub snapshot of gpt2 has them) into {folder}, "
            "or run once where there is network") from None
    if enc.n_vocab > vocab_size:
        raise UserError(f"the tokenizer {encoding} has {enc.n_vocab} tokens, more than the "
                        f"model's vocabulary of {vocab_size}")
    return Tokenizer(encoding, np.arange(enc.n_vocab))


def exported_tokenizer(folder: Path, vocab_size: int) -> Tokenizer:
    """The run's own tokenizer that an export of this project keeps in
    ``backpack_nb_tokenizer.json`` (a tiktoken encoding and its compact vocabulary)."""
    path = folder / TOKENIZER_FILE
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} is not readable JSON ({exc})") from None
    if (not isinstance(saved, dict) or not isinstance(saved.get("encoding"), str)
            or not isinstance(saved.get("base_ids"), list)
            or not all(isinstance(i, int) and i >= 0 for i in saved["base_ids"])):
        raise UserError(f"{path} is not a tokenizer this project wrote (it needs an "
                        "\"encoding\" name and \"base_ids\", a list of token ids)")
    try:
        tok = Tokenizer.from_state_dict(saved)
    except UserError as exc:
        cause = exc.__cause__
        if ":" in saved["encoding"] or cause is None or isinstance(cause, ValueError):
            # a local ranks file, an unknown name, a bad vocabulary: the message says which
            raise UserError(f"{path}: {exc}") from None
        raise UserError(f"{path} names the tiktoken encoding {saved['encoding']!r}, which "
                        f"could not be loaded ({type(cause).__name__}); it is downloaded on first "
                        "use: run once where there is network (tiktoken keeps it in its cache, "
                        "TIKTOKEN_CACHE_DIR)") from None
    if tok.vocab_size > vocab_size:
        raise UserError(f"{path} has {tok.vocab_size} tokens, more than the model's vocabulary "
                        f"of {vocab_size} in config.json")
    return tok
