"""Runs that start from a pretrained model: ``init_from: hf:<repo id>`` or a folder holding a
Hugging Face model's config.json (the released Backpack, GPT-2).

    python train.py --config finetune_backpack_gpt2                 # init_from in the file
    python train.py --config tiny_backpack --init_from hf:stanfordnlp/backpack-gpt2 \\
        --data_dir europarl_gpt2 --encoding gpt2

The pretrained model decides what its weights fix: ``model_type`` and the shape keys
(:func:`backpack_nb.model_config.model_shape_keys`) replace the params file's, with one warning
listing what changed, and such a key typed on the command line with another value is an error.
Dropout stays the run's own choice (it changes no weight). The data must be in the model's own
ids: the GPT-2 encoding prepared with ``--full_vocab``, every id below the model's vocabulary
(50,264 > 50,257 is fine). The checkpoints are ordinary ones; ``--init_from resume`` takes the
same keys from the checkpoint, so the params file the run started from resumes it.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from pathlib import Path
from typing import Any, Collection

import torch

from . import checkpoint as ckpt_io
from .errors import UserError
from .model_source import INIT_FROM, PRETRAINED_ENCODING
from .hub.load import build_pretrained, model_config, read_config, snapshot_folder
from .model_config import model_shape_keys
from .params import TrainConfig
from .paths import resolve_in_root

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Origin:
    """Where a run's weights started: ``source`` (``hf:<id>`` or a folder), the values its
    weights fix (TrainConfig keys), the model's vocabulary size (may exceed the data's) and,
    for a run that starts from it, the local folder of the pretrained model."""

    source: str
    fixed: dict[str, Any]
    vocab_size: int
    described: str  # "the pretrained model hf:x" or "checkpoint out/x/ckpt.pt (from hf:x)"
    folder: Path | None = None  # None when resuming: the weights come from the checkpoint


def starts_from_pretrained(cfg: TrainConfig) -> bool:
    return cfg.init_from not in INIT_FROM


def origin(cfg: TrainConfig) -> Origin | None:
    """The pretrained origin of the run ``cfg`` starts or resumes; None for a run from
    scratch (or the resume of one)."""
    if starts_from_pretrained(cfg):
        folder = snapshot_folder(cfg.init_from)
        model_type, config = model_config(read_config(folder), folder)
        fixed = {"model_type": model_type,
                 **{k: getattr(config, k) for k in model_shape_keys(model_type)[1:]}}
        return Origin(cfg.init_from, _with_encoding(fixed, cfg.encoding), config.vocab_size,
                      f"the pretrained model {cfg.init_from}", folder)
    if cfg.init_from != "resume":
        return None
    state, path = _peek(resolve_in_root(cfg.out_dir))
    history = (state or {}).get("history")
    source = history.get("pretrained") if isinstance(history, dict) else None
    if not source or not isinstance(state.get("model_config"), dict):
        return None  # a run from scratch, or a damaged checkpoint the resume will name
    saved = state["config"]
    keys = model_shape_keys(saved.get("model_type", "backpack")) + ("encoding",)
    return Origin(source, {k: saved[k] for k in keys if k in saved},
                  state["model_config"]["vocab_size"], f"checkpoint {path} (from {source})")


def _with_encoding(fixed: dict[str, Any], encoding: str) -> dict[str, Any]:
    """GPT-2's BPE; a run that names it already (``gpt2:/folder`` too) keeps its spelling."""
    keep = encoding.split(":")[0] == PRETRAINED_ENCODING
    return {**fixed, "encoding": encoding if keep else PRETRAINED_ENCODING}


def _peek(out_dir: Path) -> tuple[dict[str, Any] | None, Path | None]:
    """The checkpoint a resume would read, memory-mapped (its weights are not read), or None:
    the resume itself reports a missing or unreadable checkpoint."""
    for name in (ckpt_io.CKPT_NAME, ckpt_io.PREV_NAME):
        path = out_dir / name
        if not path.is_file():
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # unreadable: the resume says so, or falls back to ckpt.prev.pt
            continue
        if isinstance(state, dict) and isinstance(state.get("config"), dict):
            return state, path
    return None, None


def inherit_shape(cfg: TrainConfig, typed: Collection[str] = ()) -> tuple[TrainConfig, Origin | None]:
    """``cfg`` with the keys its origin fixes (see the module's docstring) and the origin.
    A key in ``typed`` (typed on the command line) that disagrees is a UserError."""
    found = origin(cfg)
    if found is None:
        return cfg, None
    changed = {k: v for k, v in found.fixed.items() if getattr(cfg, k) != v}
    conflicts = [k for k in changed if k in typed]
    if conflicts:
        raise UserError(
            f"{', '.join(f'--{k} {getattr(cfg, k)}' for k in conflicts)} conflicts with "
            f"{found.described}, which fixes "
            f"{', '.join(f'{k} {found.fixed[k]}' for k in conflicts)}; drop "
            f"{'it' if len(conflicts) == 1 else 'them'} (the weights decide the shape)")
    if changed:
        log.warning("%s fixes the model and its ids: %s (replacing the params file's values)",
                    found.described,
                    ", ".join(f"{k} {getattr(cfg, k)} -> {v}" for k, v in changed.items()))
        cfg = cfg.replace(**changed)
    return cfg, found


def pretrained_model(found: Origin, dropout: float) -> torch.nn.Module:
    """The pretrained model a run starts from (CPU, train mode), with the run's dropout."""
    if found.folder is None:
        raise ValueError(f"{found.described}: a resumed run's weights come from its checkpoint")
    _, model = build_pretrained(found.folder, dropout=dropout)
    return model


def check_data(meta: dict[str, Any], vocab_size: int, data_dir: Path, found: Origin) -> None:
    """The dataset is in the model's own ids: its encoding, not compacted, ids below the
    model's vocabulary."""
    encoding = str(meta["encoding"])
    full = bool(meta.get("config", {}).get("full_vocab"))
    if (encoding.split(":")[0] != PRETRAINED_ENCODING or not full
            or int(meta["vocab_size"]) > vocab_size):
        kind = "the encoding's own ids" if full else "a compact vocabulary"
        raise UserError(
            f"{data_dir} ({encoding}, {kind}, {meta['vocab_size']:,} tokens) does not match "
            f"{found.described} (GPT-2's BPE in its own ids, a vocabulary of {vocab_size:,}); "
            "prepare a dataset in the model's ids: `python -m backpack_nb.data prepare --out "
            f"europarl_gpt2 --langs {','.join(meta['langs'])} --encoding {PRETRAINED_ENCODING} "
            "--full_vocab` and train with --data_dir europarl_gpt2")

