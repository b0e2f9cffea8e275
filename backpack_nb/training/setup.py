"""What a run needs before its :class:`~backpack_nb.training.loop.Trainer` is built, resolved
once and in an order that changes nothing on a mistake: the run folder's state is checked first
(a new run over an old one needs ``overwrite``; a resume needs a checkpoint), then the dataset is
prepared on first use and read. Nothing here removes or rewrites a file of an earlier run: with
``overwrite`` the Trainer's first save replaces the old run (see ``Trainer.save``)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from backpack_nb import checkpoint as ckpt_io
from backpack_nb import data, dataset, finetune
from backpack_nb.params import TrainConfig
from backpack_nb.paths import resolve_in_root
from backpack_nb.spelling import setting
from backpack_nb.errors import UserError
from backpack_nb.tokenizer import Tokenizer

from .runtime import Runtime


def check_out_dir(cfg: TrainConfig) -> bool:
    """Whether this run replaces an earlier one in ``out_dir`` (a new run where checkpoints
    are, with ``overwrite``); a UserError for a new run over an old one without ``overwrite``,
    or a resume without a checkpoint. Reads only."""
    out_dir = resolve_in_root(cfg.out_dir)
    if cfg.init_from == "resume":
        ckpt_io.require_checkpoint(out_dir)  # before the data and the model: fail fast
        return False
    existing = ckpt_io.existing_checkpoints(out_dir)
    if existing and not cfg.overwrite:
        raise UserError(
            f"{out_dir} already holds a run ({', '.join(p.name for p in existing)}); "
            f"continue it with {setting('init_from', 'resume')}, pick another "
            f"{setting('out_dir')}, or pass {setting('overwrite', True)} to replace it")
    return bool(existing)


@dataclass
class RunData:
    """The prepared dataset a run trains on: its folder, meta.json (and its hash), tokenizer
    and the train and val tokens."""

    folder: Path
    meta: dict[str, Any]
    meta_hash: str
    tok: Tokenizer
    splits: dict[str, np.ndarray]


def prepare_run_data(cfg: TrainConfig, rt: Runtime,
                     origin: finetune.Origin | None) -> RunData:
    """The run's dataset, prepared on first use (by local rank 0) and checked: a fine-tune's
    data must be in its model's ids, every token id below the vocabulary."""
    folder = dataset.resolve_data_dir(cfg.data_dir)
    # a fine-tune's data must be in the model's ids: checked before the generic check of
    # the preparation (whose hint would re-prepare the dataset), or after a first preparation
    prepared_before = (folder / "meta.json").is_file()
    if origin is not None and prepared_before:
        finetune.check_data(dataset.load_meta(folder), origin.vocab_size, folder, origin)
    _prepare(cfg, rt, folder, full_vocab=origin is not None)
    meta = dataset.load_meta(folder)
    tok = dataset.load_tokenizer(folder)
    splits = {split: dataset.load_tokens(folder, split) for split in ("train", "val")}
    for split, tokens in splits.items():
        dataset.check_token_ids(tokens, tok.vocab_size, folder / f"{split}.bin")
    if origin is not None and not prepared_before:
        finetune.check_data(meta, origin.vocab_size, folder, origin)
    return RunData(folder, meta, dataset.meta_hash(folder), tok, splits)


def _prepare(cfg: TrainConfig, rt: Runtime, folder: Path, *, full_vocab: bool) -> None:
    """Prepare the dataset on first use, once per machine (local rank 0). The other processes
    wait for its meta.json (the dataset folder appears atomically, complete) rather than at a
    collective: a first preparation can outlast NCCL's timeout, and if rank 0 fails torchrun
    stops them all."""
    if rt.local_rank != 0:
        while not (folder / "meta.json").exists():
            time.sleep(1.0)
    # on the other ranks this only checks that the dataset fits this run
    data.ensure_prepared(
        folder, source=cfg.data_source or None, langs=cfg.languages, form=cfg.data_form,
        block_size=cfg.block_size, seed=cfg.seed, encoding=cfg.encoding, full_vocab=full_vocab,
        progress=rt.master, source_flag="--data_source")
