"""The one loader of a model to read: a run's checkpoint (``ckpt.pt``, ``best.pt``) or a
pretrained Hugging Face model (``hf:<repo id>``, or a folder holding config.json). It sits above
both :mod:`backpack_nb.checkpoint` and :mod:`backpack_nb.hub`, which know nothing of each other:
evaluation, sampling, the notebooks and lexsim load through it."""

from __future__ import annotations

import os

import torch

from backpack_nb.checkpoint import check_model_type, load_run_model
from backpack_nb.hub.load import load_pretrained
from backpack_nb.model_source import is_pretrained
from backpack_nb.tokenizer import Tokenizer


def load_model(model_path: str | os.PathLike, device: str | torch.device = "cpu",
               model_type: str | None = None) -> tuple[torch.nn.Module, Tokenizer, dict]:
    """The model (in eval mode, on ``device``), tokenizer and checkpoint dict of a ``ckpt.pt``
    or ``best.pt``, or of a pretrained model, whose dict says so under ``pretrained`` (with
    ``iter_num`` 0). ``model_type``, when given, must match what the file holds."""
    if not is_pretrained(model_path):
        return load_run_model(model_path, device, model_type)
    model, tok, info = load_pretrained(model_path, device)
    state = {"model_type": info["model_type"], "model_config": info["model_config"],
             "tokenizer": tok.state_dict(), "iter_num": 0, "pretrained": info["source"]}
    check_model_type(model_type, state["model_type"], model_path)
    return model, tok, state
