"""What the Hugging Face tests share: the tiny model of the released kind
(../shared/backpack-gpt2-tiny, read-only: tests copy it) and a GPT-2-format BPE learned on
small data, so that no test needs GPT-2's own vocabulary files."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from backpack_nb.hub.layout import is_conv1d
from conftest import ROOT

TINY = ROOT.parent / "shared" / "backpack-gpt2-tiny"


def write_small_gpt2_bpe(folder: Path, text: str, n_merges: int) -> None:
    """A GPT-2-format byte-level BPE learned greedily on ``text``: vocab.json and merges.txt
    as a Hugging Face snapshot stores them, <|endoftext|> last."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    char = {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(others)}
    vocab = {char[b]: i for i, b in enumerate(printable + others)}
    words = [[char[b] for b in w.encode()] for w in text.replace(" ", " \0").split("\0") if w]
    merges = []
    for _ in range(n_merges):
        pairs: dict[tuple[str, str], int] = {}
        for w in words:
            for a, b in zip(w, w[1:]):
                pairs[a, b] = pairs.get((a, b), 0) + 1
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        merges.append(f"{a} {b}")
        vocab[a + b] = len(vocab)
        for w in words:
            i = 0
            while i < len(w) - 1:
                if (w[i], w[i + 1]) == (a, b):
                    w[i:i + 2] = [a + b]
                i += 1
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges), encoding="utf-8")


TEXT = ("The Commission welcomes the vote of the Parliament on the report. " * 3
        + "La Commission se félicite du vote du Parlement sur le rapport. " * 3)


def as_gpt2_folder(model, folder: Path, *, bare: bool) -> None:
    """Write a project GPT as transformers' GPT2LMHeadModel files (Conv1D weights (in, out),
    the old causal-mask buffers, lm_head tied) — the layout GPT-2's own files have."""
    c = model.config
    prefix = "" if bare else "transformer."
    state = {}
    for name, tensor in model.state_dict().items():
        hf_name = prefix + name.removeprefix("transformer.")
        if is_conv1d(hf_name):
            tensor = tensor.t()
        state[hf_name] = tensor.clone().contiguous()
    state["lm_head.weight"] = state[f"{prefix}wte.weight"].clone()
    for i in range(c.n_layer):
        state[f"{prefix}h.{i}.attn.bias"] = torch.ones(1, 1, c.block_size, c.block_size).tril()
    folder.mkdir()
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["GPT2LMHeadModel"], "activation_function": "gelu_new",
        "vocab_size": c.vocab_size, "n_positions": c.block_size, "n_embd": c.n_embd,
        "n_layer": c.n_layer, "n_head": c.n_head, "n_inner": None, "resid_pdrop": 0.1,
        "layer_norm_epsilon": 1e-5, "scale_attn_weights": True}))
